"""Ledger micro/throughput benchmark: cost of `Ledger.record()` on the hot path, and
rows per second the flusher moves into Postgres (existing-row check, COPY, insert,
hourly upsert, aggregated balance/key charges).

    .venv/bin/python bench/ledger_bench.py [--dsn postgresql://postgres@127.0.0.1:5432/test]
        [--rows 500000] [--flush-rows 5000] [--max-batch-factor 16] [--users 1000]
        [--keys-per-user 2] [--burst 32] [--async-commit] [--connections 2]
    .venv/bin/python bench/ledger_bench.py --steady 5000 [--steady-seconds 10] [--steady-keys 1]
        [--flush-interval-ms 250]

record() is measured three ways: memory only; writing each row to the journal at
once (no event loop: what a script or the crash test sees); and deferred, as in a
worker with a running flusher: bursts of `--burst` rows per loop iteration, the
per-iteration journal write included in the figure. The flusher figure is a catch-up:
every row is recorded first, then the flusher drains them (the batch grows up to
flush_rows * max_batch_factor). `--steady RATE` measures steady traffic instead: rows
recorded at RATE per second while the flusher runs as in a worker, and the CPU each row
costs this process and the flusher's Postgres backends. `--async-commit` runs the flusher's session with
synchronous_commit=off, to measure what the docstring of accounting.ledger.Flusher
argues against. A throwaway database is created on the server named by --dsn,
migrated, and dropped.
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
from collections.abc import Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accounting import migrate
from accounting.journal import Journal
from accounting.ledger import Flusher, Ledger
from accounting.records import Usage, UsageRecord
from bench import procstat


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


async def bench_record_deferred(rows: list[UsageRecord], journal_dir: str, burst: int) -> float:
    """Mean µs per row with per-iteration journal writes, the writes included."""
    journal = Journal(journal_dir)
    ledger = Ledger(journal, max_pending_rows=len(rows) + 1, flush_rows=len(rows) + 1)
    ledger.defer_writes(asyncio.get_running_loop())
    rec = ledger.record
    t0 = time.perf_counter()
    for i in range(0, len(rows), burst):
        for r in rows[i:i + burst]:
            rec(r)
        await asyncio.sleep(0)  # the iteration ends: its rows are written in one call
    dt = time.perf_counter() - t0
    assert journal.seq == len(rows) and journal.write_errors == 0
    journal.close(delete=True)
    return dt / len(rows) * 1e6


async def bench_flush(dsn: str, rows: list[UsageRecord], flush_rows: int, jdir: str,
                      factor: int, connections: int) -> tuple[float, Flusher]:
    ledger = Ledger(Journal(jdir), max_pending_rows=len(rows) + 1, flush_rows=flush_rows)
    for r in rows:
        ledger.record(r)
    flusher = Flusher(ledger, dsn, flush_interval_ms=1, flush_rows=flush_rows,
                      max_batch_factor=factor, connections=connections)
    t0 = time.perf_counter()
    flusher.start()
    ok = await flusher.stop(timeout=600)
    dt = time.perf_counter() - t0
    assert ok and flusher.flushed_rows == len(rows), flusher.stats()
    return dt, flusher


async def _poll(done: Callable[[], bool]) -> None:
    for _ in range(60_000):  # 10 minutes at most
        if done():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the flusher did not catch up in 10 minutes")


async def bench_steady(dsn: str, rows: list[UsageRecord], rate: int, seconds: float,
                       jdir: str, interval_ms: int = 250) -> str:
    """Steady traffic, as a worker sees it: `rate` rows/s recorded in bursts every 10 ms
    while the flusher runs with its default settings (every `interval_ms`, 250 by default,
    or 5000 rows). Reports the CPU
    per row of this process (record, journal, flusher: what a worker pays) and of the
    flusher's Postgres backends (what the database pays, read from /proc when Postgres
    runs on this host)."""
    ledger = Ledger(Journal(jdir), max_pending_rows=200_000, flush_rows=5000)
    flusher = Flusher(ledger, dsn, flush_interval_ms=interval_ms)
    flusher.start()
    loop = asyncio.get_running_loop()
    per_tick = max(1, rate // 100)
    i = 0

    async def feed(until: float) -> None:
        nonlocal i
        while loop.time() < until and i < len(rows):
            for r in rows[i:i + per_tick]:
                ledger.record(r)
            i += per_tick
            await asyncio.sleep(0.01)

    await feed(loop.time() + 1.0)  # warm-up: the flusher connects and prepares
    await _poll(lambda: flusher.flushed_rows > 0)
    pids = [c.get_server_pid() for c in flusher._conns if c is not None]
    pg0 = [procstat.cpu_s(p) for p in pids]
    first, cpu0, t0 = i, time.process_time(), time.perf_counter()
    await feed(loop.time() + seconds)
    n = i - first
    await _poll(lambda: ledger.backlog == 0)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - t0
    pg1 = [procstat.cpu_s(p) for p in pids]
    assert await flusher.stop(timeout=60)
    pg = sum(b - a for a, b in zip(pg0, pg1, strict=True) if a is not None and b is not None)
    local = all(x is not None for x in pg0 + pg1)
    return (f"steady {n / wall:,.0f} rows/s for {wall:.1f} s, {flusher.flushes} flushes:"
            f" this process {cpu / n * 1e6:.1f} µs CPU/row (record + journal + flusher),"
            + (f" Postgres backends {pg / n * 1e6:.1f} µs CPU/row" if local
               else " Postgres backends not on this host")
            + f", raced batches {flusher.raced_batches}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default=os.environ.get("TOLLWAY_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--flush-rows", type=int, default=5000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--keys-per-user", type=int, default=2)
    ap.add_argument("--max-batch-factor", type=int, default=16)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--async-commit", action="store_true")
    ap.add_argument("--connections", type=int, default=2,
                    help="flusher connections for catch-up batches (ledger.flush_connections)")
    ap.add_argument("--steady", type=int, metavar="ROWS_PER_S",
                    help="instead: steady traffic at this rate, CPU per row of the process"
                         " and of Postgres")
    ap.add_argument("--steady-seconds", type=float, default=10.0)
    ap.add_argument("--flush-interval-ms", type=int, default=250,
                    help="the flusher's interval in --steady mode (ledger.flush_interval_ms)")
    ap.add_argument("--steady-keys", type=int, default=0,
                    help="spread steady traffic over this many keys (default: all)")
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

        if args.steady:
            keys = accounts[:args.steady_keys] if args.steady_keys else accounts
            with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp:
                rows = make_rows(int(args.steady * (args.steady_seconds + 2)), keys)
                print(await bench_steady(dsn, rows, args.steady, args.steady_seconds, tmp,
                                         args.flush_interval_ms),
                      f"({len(keys)} keys, flush_interval_ms {args.flush_interval_ms})")
            await conn.close()
            return
        with tempfile.TemporaryDirectory(prefix="tollway-bench-") as tmp:
            sample = make_rows(200_000, accounts, seed=9)
            bench_record(sample[:20_000], tmp)  # warm up
            mem = bench_record(sample, None)
            jr = bench_record(sample, tmp)
            dj = await bench_record_deferred(sample, tmp, args.burst)
            print(f"record(): {dj:.2f} µs/row deferred journal write (bursts of {args.burst},"
                  f" write included), {jr:.2f} µs/call immediate journal write,"
                  f" {mem:.2f} µs/call memory only ({len(sample)} calls)")

            rows = make_rows(args.rows, accounts)
            fdsn = dsn + ("?synchronous_commit=off" if args.async_commit else "")
            dt, flusher = await bench_flush(fdsn, rows, args.flush_rows, tmp, args.max_batch_factor,
                                             args.connections)
            print(f"flusher: {len(rows)} rows in {dt:.2f} s = {len(rows) / dt:,.0f} rows/s"
                  f" (batch {args.flush_rows} x{args.max_batch_factor},"
                  f" {args.connections} connection(s),"
                  f"{' synchronous_commit=off,' if args.async_commit else ''}"
                  f" {flusher.flushes} transactions,"
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
