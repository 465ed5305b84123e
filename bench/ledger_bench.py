"""Ledger micro/throughput benchmark: cost of `Ledger.record()` on the hot path, and
rows per second the flusher moves into Postgres (COPY, idempotent insert, hourly
upsert, aggregated balance/key charges).

    .venv/bin/python bench/ledger_bench.py [--dsn postgresql://postgres@127.0.0.1:5432/test]
        [--rows 500000] [--flush-rows 5000] [--users 1000] [--keys-per-user 2]

A throwaway database is created on the server named by --dsn, migrated, and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accounting import migrate
from accounting.journal import Journal
from accounting.ledger import Flusher, Ledger
from accounting.records import Usage, UsageRecord


def make_rows(n: int, accounts: list[tuple[int, int]], seed: int = 1) -> list[UsageRecord]:
    rng = random.Random(seed)
    now = time.time()
    prefix = secrets.token_hex(4)
    out = []
    for i in range(n):
        uid, kid = accounts[rng.randrange(len(accounts))]
        out.append(UsageRecord(
            request_id=f"req_{prefix}{i:010d}", ts=now + i / 1e6, user_id=uid, key_id=kid,
            group="default", model=rng.choice(("gpt-4o-mini", "claude-sonnet-4", "gpt-5.5")),
            upstream_model="upstream-model", channel="main", protocol="openai", route="chat",
            stream=True, status=200, error_code="",
            usage=Usage(input=rng.randrange(2000), output=rng.randrange(800), cache_read=100,
                        cache_write=0, reasoning=0),
            usage_source="upstream", cost_nano=rng.randrange(1, 5_000_000), price_version=1,
            latency_ms=rng.randrange(50, 5000), ttfb_ms=rng.randrange(20, 900),
        ))
    return out


def bench_record(rows: list[UsageRecord], journal_dir: str | None) -> float:
    """Mean µs per record() call."""
    journal = Journal(journal_dir) if journal_dir else None
    ledger = Ledger(journal, max_pending_rows=len(rows) + 1, flush_rows=len(rows) + 1)
    rec = ledger.record
    t0 = time.perf_counter()
    for r in rows:
        rec(r)
    dt = time.perf_counter() - t0
    if journal is not None:
        journal.close(delete=True)
    return dt / len(rows) * 1e6


async def bench_flush(dsn: str, rows: list[UsageRecord], flush_rows: int, jdir: str) -> tuple[float, Flusher]:
    ledger = Ledger(Journal(jdir), max_pending_rows=len(rows) + 1, flush_rows=flush_rows)
    for r in rows:
        ledger.record(r)
    flusher = Flusher(ledger, dsn, flush_interval_ms=1, flush_rows=flush_rows)
    t0 = time.perf_counter()
    flusher.start()
    ok = await flusher.stop(timeout=600)
    dt = time.perf_counter() - t0
    assert ok and flusher.flushed_rows == len(rows), flusher.stats()
    return dt, flusher


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default=os.environ.get("TOLLWAY_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--flush-rows", type=int, default=5000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--keys-per-user", type=int, default=2)
    args = ap.parse_args()

    db = f"tollway_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{db}"')
    dsn = args.dsn.rpartition("/")[0] + "/" + db
    try:
        await migrate.apply_dsn(dsn)
        conn = await asyncpg.connect(dsn)
        uids = [r["id"] for r in await conn.fetch(
            "INSERT INTO users (name, balance_nano) SELECT 'bench' || g, 10^15::bigint"
            " FROM generate_series(1, $1) g RETURNING id", args.users)]
        accounts = []
        for uid in uids:
            for _ in range(args.keys_per_user):
                kid = await conn.fetchval(
                    "INSERT INTO keys (user_id, key_hash, key_prefix) VALUES ($1, $2, 'sk-b') RETURNING id",
                    uid, os.urandom(32))
                accounts.append((uid, kid))

        with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp:
            sample = make_rows(200_000, accounts, seed=9)
            bench_record(sample[:20_000], tmp)  # warm up
            mem = bench_record(sample, None)
            jr = bench_record(sample, tmp)
            print(f"record(): {jr:.2f} µs/call with journal write, {mem:.2f} µs/call memory only"
                  f" ({len(sample)} calls)")

            rows = make_rows(args.rows, accounts)
            dt, flusher = await bench_flush(dsn, rows, args.flush_rows, tmp)
            print(f"flusher: {len(rows)} rows in {dt:.2f} s = {len(rows) / dt:,.0f} rows/s"
                  f" (batch {args.flush_rows}, {flusher.flushes} transactions,"
                  f" last batch {flusher.last_flush_s * 1000:.1f} ms,"
                  f" {len(accounts)} keys / {len(uids)} users)")
            # Replay of the same rows: all duplicates, nothing charged.
            dup_rows = rows[:100_000]
            ledger = Ledger(Journal(tmp), max_pending_rows=len(dup_rows) + 1)
            for r in dup_rows:
                ledger.record(r)
            f2 = Flusher(ledger, dsn, flush_interval_ms=1, flush_rows=args.flush_rows)
            t0 = time.perf_counter()
            f2.start()
            await f2.stop(timeout=600)
            dt2 = time.perf_counter() - t0
            print(f"replay of {len(dup_rows)} already-logged rows: {len(dup_rows) / dt2:,.0f} rows/s,"
                  f" {f2.duplicate_rows} duplicates, {f2.flushed_rows} charged")
        total = await conn.fetchval("SELECT count(*) FROM usage_log")
        charged = await conn.fetchval("SELECT sum(10^15::bigint - balance_nano)::bigint FROM users")
        assert total == len(rows) and charged == sum(r.cost_nano for r in rows)
        print(f"check: usage_log has {total} rows; balances charged exactly {charged} nano")
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
