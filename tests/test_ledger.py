"""The ledger and its flusher against a real Postgres: idempotence, exact aggregated
charges, concurrent flushers, outages, spill, partitions, poison rows, the multiplier."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import asyncpg
import orjson
import pytest

from accounting import journal as jn
from accounting import ledger as ledger_mod
from accounting import reports
from accounting.journal import Journal
from accounting.ledger import Flusher, Ledger, as_record, pg_timestamp, write_batch
from accounting.ledger import prepare as prepare_stage
from accounting.pricing import PriceRow, cost_nano
from accounting.records import Usage, UsageRecord


async def make_account(pg: asyncpg.Connection, balance: int = 10**12, keys: int = 1) -> tuple[int, list[int]]:
    uid = await pg.fetchval(
        "INSERT INTO users (name, balance_nano) VALUES ($1, $2) RETURNING id",
        f"ledger-{uuid.uuid4().hex[:12]}", balance,
    )
    kids = [
        await pg.fetchval(
            "INSERT INTO keys (user_id, key_hash, key_prefix) VALUES ($1, $2, 'sk-test') RETURNING id",
            uid, os.urandom(32),
        )
        for _ in range(keys)
    ]
    return uid, kids


def rec(user_id: int, key_id: int, cost: int, *, rid: str | None = None, ts: float | None = None,
        plan_id: int = 0, status: int = 200, model: str = "gpt-4o-mini") -> UsageRecord:
    return UsageRecord(
        request_id=rid or f"req_{uuid.uuid4().hex}", ts=time.time() if ts is None else ts,
        user_id=user_id, key_id=key_id, group="default", model=model,
        upstream_model=model, channel="main", protocol="openai", route="chat", stream=True,
        status=status, error_code="" if status < 400 else "upstream_error",
        usage=Usage(input=100, output=20, cache_read=5, cache_write=1, reasoning=3),
        usage_source="upstream", cost_nano=cost, price_version=1, latency_ms=40, ttfb_ms=7,
        plan_id=plan_id,
    )


async def until(pred: Callable[[], bool], limit_s: float = 15.0) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def closed_port_dsn(pg_dsn: str) -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"postgresql://postgres@127.0.0.1:{port}/nothing"


def read_file(path: str | Path) -> bytes:
    return Path(path).read_bytes()


async def balance(pg: asyncpg.Connection, uid: int) -> int:
    return int(await pg.fetchval("SELECT balance_nano FROM users WHERE id = $1", uid))


class Flushed:
    """An `on_flushed` callback that sums what the flusher reports, per user and per key."""

    def __init__(self) -> None:
        self.users: dict[int, int] = {}
        self.keys: dict[int, int] = {}

    def __call__(self, users: dict[int, int], keys: dict[int, int]) -> None:
        for seen, got in ((self.users, users), (self.keys, keys)):
            for k, v in got.items():
                seen[k] = seen.get(k, 0) + v


async def spent(pg: asyncpg.Connection, kid: int) -> int:
    return int(await pg.fetchval("SELECT spent_nano FROM keys WHERE id = $1", kid))


async def test_same_rows_twice_are_logged_and_charged_once(pg: asyncpg.Connection) -> None:
    uid, (kid,) = await make_account(pg, balance=1_000_000)
    rows = [rec(uid, kid, 1000 + i) for i in range(50)]
    await prepare_stage(pg)
    first = await write_batch(pg, rows[:40] + rows[:5])  # the same row twice in one batch
    second = await write_batch(pg, rows + rows[:10])  # a replay, and duplicates in one batch
    assert first.inserted == 40 and second.inserted == 10
    third = await write_batch(pg, rows)
    assert third.inserted == 0 and third.user_deltas == {} and third.key_deltas == {}
    total = sum(r.cost_nano for r in rows)
    assert await balance(pg, uid) == 1_000_000 - total
    assert await spent(pg, kid) == total
    ids = [r.request_id for r in rows]
    assert await pg.fetchval("SELECT count(*) FROM usage_log WHERE request_id = ANY($1)", ids) == 50
    hourly = await pg.fetchrow(
        "SELECT sum(requests) AS n, sum(cost_nano) AS c FROM usage_hourly WHERE key_id = $1", kid)
    assert hourly["n"] == 50 and hourly["c"] == total


async def test_aggregated_deltas_are_exact(pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    accounts = [await make_account(pg, balance=5 * 10**9, keys=2) for _ in range(4)]
    rows = []
    for _ in range(3000):
        uid, kids = rng.choice(accounts)
        rows.append(rec(uid, rng.choice(kids), rng.randrange(0, 10**7),
                        plan_id=rng.choice([0, 0, 0, 9]), status=rng.choice([200, 200, 502])))
    on_flushed = Flushed()
    ledger = Ledger(Journal(tmp_path), flush_rows=700)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=20,
                      flush_rows=700, on_flushed=on_flushed)
    flusher.start()
    for r in rows:
        ledger.record(r)
    assert await flusher.stop(timeout=30)
    want_users: dict[int, int] = {}
    want_keys: dict[int, int] = {}
    for r in rows:
        if r.plan_id == 0:
            want_users[r.user_id] = want_users.get(r.user_id, 0) + r.cost_nano
        want_keys[r.key_id] = want_keys.get(r.key_id, 0) + r.cost_nano
    assert on_flushed.users == want_users and on_flushed.keys == want_keys
    for uid, kids in accounts:
        assert await balance(pg, uid) == 5 * 10**9 - want_users.get(uid, 0)
        for kid in kids:
            assert await spent(pg, kid) == want_keys.get(kid, 0)
            h = await pg.fetchrow(
                "SELECT sum(requests) n, sum(errors) e, sum(input_tokens) i FROM usage_hourly"
                " WHERE key_id = $1", kid)
            mine = [r for r in rows if r.key_id == kid]
            assert h["n"] == len(mine)
            assert h["e"] == sum(1 for r in mine if r.status >= 400)
            assert h["i"] == 100 * len(mine)
    assert flusher.stats()["flushed_rows_total"] == 3000
    assert os.listdir(tmp_path) == []  # every segment committed and deleted


async def test_concurrent_flushers_on_shared_users_do_not_deadlock(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    accounts = [await make_account(pg, balance=10**12, keys=3) for _ in range(8)]
    rng = random.Random(3)
    pairs = []
    for i in range(2):
        ledger = Ledger(Journal(tmp_path, name=f"w{i}"), flush_rows=200)
        pairs.append((ledger, Flusher(ledger, pg_dsn, flush_interval_ms=5, flush_rows=200)))
    for _, f in pairs:
        f.start()
    total = 0
    for n in range(12_000):
        uid, kids = rng.choice(accounts)
        cost = rng.randrange(1, 10**6)
        total += cost
        pairs[n % 2][0].record(rec(uid, rng.choice(kids), cost))
        if n % 500 == 0:
            await asyncio.sleep(0)  # let both flushers run interleaved
    results = await asyncio.gather(*(f.stop(timeout=60) for _, f in pairs))
    assert results == [True, True]
    assert [f.failures for _, f in pairs] == [0, 0], [f.last_error for _, f in pairs]
    uids = [a[0] for a in accounts]
    charged = await pg.fetchval(
        "SELECT sum(10^12 - balance_nano)::bigint FROM users WHERE id = ANY($1)", uids)
    assert charged == total


async def test_postgres_unreachable_then_back_loses_nothing(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    uid, (kid,) = await make_account(pg, balance=10**9)
    ledger = Ledger(Journal(tmp_path), flush_rows=100)
    flusher = Flusher(ledger, closed_port_dsn(pg_dsn), flush_interval_ms=10, flush_rows=100,
                      max_backoff_s=0.1)
    flusher.start()
    rows = [rec(uid, kid, 1000) for _ in range(500)]
    for r in rows:
        ledger.record(r)  # requests keep flowing while the database is away
    await until(lambda: flusher.failures >= 3)
    assert ledger.backlog == 500 and flusher.flushed_rows == 0
    flusher.dsn = pg_dsn
    await until(lambda: ledger.backlog == 0)
    assert await flusher.stop(timeout=10)
    ids = [r.request_id for r in rows]
    assert await pg.fetchval("SELECT count(*) FROM usage_log WHERE request_id = ANY($1)", ids) == 500
    assert await balance(pg, uid) == 10**9 - 500 * 1000


async def test_spill_past_max_pending_rows_keeps_memory_bounded_and_order(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    uid, (kid,) = await make_account(pg)
    journal = Journal(tmp_path, segment_bytes=16 * 1024)  # many small segments
    order: list[str] = []

    class Recording(Ledger):
        def committed(self, n: int) -> None:
            order.extend(as_record(r).request_id for r in self.pending[:n])
            super().committed(n)

    ledger = Recording(journal, max_pending_rows=100, flush_rows=40)
    flusher = Flusher(ledger, closed_port_dsn(pg_dsn), flush_interval_ms=10, flush_rows=40,
                      max_backoff_s=0.1)
    flusher.start()
    base = time.time()
    rows = [rec(uid, kid, 7, rid=f"spill-{uuid.uuid4().hex[:8]}-{i:05d}", ts=base + i / 1000)
            for i in range(2000)]
    for r in rows:
        ledger.record(r)
    assert len(ledger.pending) == 100  # the bound holds
    assert ledger.spilled_rows == 1900 and ledger.backlog == 2000
    assert flusher.stats()["journal_bytes"] > 0 and len(os.listdir(tmp_path)) > 3
    flusher.dsn = pg_dsn
    await until(lambda: ledger.backlog == 0)
    for _ in range(5):  # after the spill drains, new rows go to memory again
        ledger.record(rec(uid, kid, 7))
    assert len(ledger.pending) == 5 and ledger.spilled_rows == 0
    assert await flusher.stop(timeout=10)
    assert order[:2000] == [r.request_id for r in rows]  # FIFO through the spill
    ids = [r.request_id for r in rows]
    assert await pg.fetchval("SELECT count(*) FROM usage_log WHERE request_id = ANY($1)", ids) == 2000
    assert os.listdir(tmp_path) == []


async def test_day_partitions_created_ahead_and_dropped_by_retention(pg: asyncpg.Connection) -> None:
    today = datetime.now(UTC).date()
    names = {r["relname"] for r in await pg.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'usage_log'::regclass")}
    for d in range(4):
        assert f"usage_log_p{(today + timedelta(days=d)):%Y%m%d}" in names
    assert "usage_log_default" in names
    # A row whose day has no partition lands in the default one, and moves when it is made.
    far = date(2090, 1, 2)
    ts = datetime(2090, 1, 2, 12, tzinfo=UTC).timestamp()
    uid, (kid,) = await make_account(pg)
    await prepare_stage(pg)
    await write_batch(pg, [rec(uid, kid, 1, rid="far-future", ts=ts)])
    where = "SELECT tableoid::regclass::text FROM usage_log WHERE request_id = 'far-future'"
    assert await pg.fetchval(where) == "usage_log_default"
    assert await pg.fetchval("SELECT usage_log_ensure_partitions($1, 2)", far) == 2
    assert await pg.fetchval(where) == "usage_log_p20900102"
    # Retention: an old day goes away whole.
    old = today - timedelta(days=200)
    await pg.fetchval("SELECT usage_log_ensure_partitions($1, 1)", old)
    old_ts = datetime(old.year, old.month, old.day, 1, tzinfo=UTC).timestamp()
    await write_batch(pg, [rec(uid, kid, 1, rid="very-old", ts=old_ts)])
    assert await pg.fetchval("SELECT usage_log_drop_before($1)", today - timedelta(days=90)) >= 1
    assert await pg.fetchval("SELECT count(*) FROM usage_log WHERE request_id = 'very-old'") == 0
    assert await pg.fetchval("SELECT to_regclass($1)", f"usage_log_p{old:%Y%m%d}") is None
    assert await pg.fetchval("SELECT usage_log_maintain(90)") == 0  # already ahead: nothing to make


def test_record_is_synchronous_and_bounded(tmp_path: Path) -> None:
    ledger = Ledger(Journal(tmp_path), max_pending_rows=10)
    r = rec(1, 1, 1)
    assert ledger.record(r) is None  # a plain call: no coroutine to await
    for _ in range(30):
        ledger.record(rec(1, 1, 1))
    assert len(ledger.pending) == 10 and ledger.backlog == 31


# --- round two: poison rows, the fast path's exactness and races, the multiplier ----------


async def test_poison_rows_between_good_ones_go_to_the_dead_letter_file(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uid, (kid,) = await make_account(pg, balance=10**9)
    good = [rec(uid, kid, 100 + i) for i in range(40)]
    nul = rec(uid, kid, 5)
    nul.model = "gpt\x00evil"  # passes the type checks, refused by Postgres (22021)
    long = rec(uid, kid, 9)
    long.model = "".join(chr(0x4E00 + i * 7919 % 20000) for i in range(40_000))  # 54000:
    # incompressible, too big for an index row
    huge = rec(uid, kid, 6)
    huge.status = 2**40  # too big for an integer column: refused by the encoder
    nocost = rec(uid, kid, 7)
    nocost.cost_nano = None  # type: ignore[assignment]  # refused before COPY
    coerced = rec(uid, kid, 8)
    coerced.channel = None  # type: ignore[assignment]  # a missing text field reads ''
    rows = [*good[:20], nul, huge, long, coerced, nocost, *good[20:]]
    journal = Journal(tmp_path, name="poison")
    ledger = Ledger(journal, flush_rows=1000)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=1000)
    flusher.start()
    for r in rows:
        ledger.record(r)
    assert await flusher.stop(timeout=30)

    assert flusher.failures == 0 and flusher.deadletter_rows == 2
    warnings = [r for r in caplog.records if "set aside" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 45 rows" in warnings[0].getMessage()
    st = flusher.stats()
    assert st["deadletter_rows_total"] == 2 and st["sanitized_rows_total"] == 2
    assert flusher.flushed_rows == 43
    billed = [*good, coerced, nul, long]
    ids = [r.request_id for r in billed]
    assert await pg.fetchval("SELECT count(*) FROM usage_log WHERE request_id = ANY($1)", ids) == 43
    assert await pg.fetchval(
        "SELECT channel FROM usage_log WHERE request_id = $1", coerced.request_id) == ""
    assert await pg.fetchval(  # bad text is made storable; the request is still billed
        "SELECT model FROM usage_log WHERE request_id = $1", nul.request_id) == "gpt\ufffdevil"
    assert await pg.fetchval(
        "SELECT length(model) FROM usage_log WHERE request_id = $1", long.request_id) == 256
    assert await balance(pg, uid) == 10**9 - sum(r.cost_nano for r in billed)
    dead = [orjson.loads(line) for line in read_file(tmp_path / "deadletter-poison.jsonl").splitlines()]
    assert sorted(d["row"]["request_id"] for d in dead) == sorted(
        r.request_id for r in (huge, nocost))
    errors = {d["row"]["request_id"]: d["error"] for d in dead}
    assert "cost_nano" in errors[nocost.request_id] and errors[huge.request_id]
    assert dead[0]["row"]["usage"]["input"] == 100  # the whole row, to re-import by hand
    # The journal let go of the batch only once both halves were safe.
    assert [p for p in os.listdir(tmp_path) if p.endswith(".wal")] == []


async def test_dead_letter_file_unwritable_keeps_the_batch_in_the_journal(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    uid, (kid,) = await make_account(pg, balance=10**9)
    bad = rec(uid, kid, 1)
    bad.latency_ms = 2**40
    rows = [rec(uid, kid, 10), bad, rec(uid, kid, 20)]
    ledger = Ledger(Journal(tmp_path / "j", name="dl"), flush_rows=100)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=100, max_backoff_s=0.05,
                      deadletter_path=str(tmp_path / "missing-dir" / "dl.jsonl"))
    flusher.start()
    for r in rows:
        ledger.record(r)
    await until(lambda: flusher.failures >= 2)
    assert ledger.backlog == 3 and flusher.deadletter_rows == 0  # nothing released
    (tmp_path / "missing-dir").mkdir()
    await until(lambda: ledger.backlog == 0)
    assert await flusher.stop(timeout=10)
    assert flusher.deadletter_rows == 1
    assert read_file(tmp_path / "missing-dir" / "dl.jsonl").count(b"\n") == 1
    assert await balance(pg, uid) == 10**9 - 30  # the good rows, charged once despite retries


async def test_python_timestamps_match_postgres_to_timestamp(pg: asyncpg.Connection) -> None:
    rng = random.Random(11)
    now = time.time()
    values = [now + rng.uniform(-10**6, 10**6) for _ in range(3000)]
    # Half-microsecond ties and values that float rounding pushes either way.
    values += [1_700_000_000 + (k + 0.5) / 1e6 for k in range(200)]
    values += [float(int(now)), 0.0, 1e-7, 253_402_300_799.0]
    want = await pg.fetch("SELECT to_timestamp(x) FROM unnest($1::float8[]) AS x", values)
    assert [pg_timestamp(v) for v in values] == [r[0] for r in want]


async def test_a_row_committed_by_another_flusher_meanwhile_is_charged_once(
    pg: asyncpg.Connection, pg_dsn: str
) -> None:
    uid, (kid,) = await make_account(pg, balance=10**9)
    rows = [rec(uid, kid, 1000 + i) for i in range(30)]
    other = await asyncpg.connect(pg_dsn)
    try:
        await prepare_stage(pg)
        await prepare_stage(other)
        tr = other.transaction()
        await tr.start()
        await write_batch(other, rows[10:12])  # not committed yet: our check cannot see it
        task = asyncio.create_task(write_batch(pg, rows))
        await asyncio.sleep(0.3)  # our insert now waits on the other's index entries
        assert not task.done()
        await tr.commit()
        res = await task
    finally:
        await other.close()
    assert res.inserted == 28 and res.key_deltas == {
        kid: sum(r.cost_nano for r in rows) - rows[10].cost_nano - rows[11].cost_nano}
    assert await balance(pg, uid) == 10**9 - sum(r.cost_nano for r in rows)
    assert await pg.fetchval(
        "SELECT sum(requests) FROM usage_hourly WHERE key_id = $1", kid) == 30


async def test_a_fresh_batch_with_rows_logged_after_all_is_charged_once(
    pg: asyncpg.Connection,
) -> None:
    """A batch called fresh skips the existing-row check; if rows of it are logged after
    all, the unique index stops the insert and the slow path charges only the others."""
    uid, (kid,) = await make_account(pg, balance=10**9)
    rows = [rec(uid, kid, 500 + i) for i in range(40)]
    await prepare_stage(pg)
    first = await write_batch(pg, rows[5:15], fresh=True)
    assert first.inserted == 10 and not first.raced
    res = await write_batch(pg, rows, fresh=True)
    assert res.raced and res.inserted == 30
    assert res.key_deltas == {kid: sum(r.cost_nano for r in rows[:5] + rows[15:])}
    assert await balance(pg, uid) == 10**9 - sum(r.cost_nano for r in rows)
    assert await pg.fetchval(
        "SELECT sum(requests) FROM usage_hourly WHERE key_id = $1", kid) == 40
    again = await write_batch(pg, rows)  # checked: nothing new, no race
    assert again.inserted == 0 and not again.raced


async def test_multiplier_is_stored_and_explains_the_bill(pg: asyncpg.Connection) -> None:
    uid, (kid,) = await make_account(pg)
    price = PriceRow(version=1, model="gpt-4o-mini", input=150_000_000, output=600_000_000,
                     cache_read=75_000_000, cache_write=187_500_000)
    r = rec(uid, kid, 0)
    r.multiplier = "4/5"
    r.cost_nano = cost_nano(r.usage, price, Fraction(4, 5))
    await prepare_stage(pg)
    await write_batch(pg, [r])
    row = await reports.usage_row(pg, r.request_id)
    assert row is not None and row["multiplier"] == "4/5"
    # The group's multiplier has changed since: the row's own still explains the charge.
    bill = reports.explain(row, price, fallback=Fraction(2))
    assert bill["matches_charged"] and bill["multiplier_source"] == "row"
    legacy = dict(row, multiplier="")  # a row logged before the column existed
    assert reports.explain(legacy, price, fallback=Fraction(4, 5))["multiplier_source"] == "fallback"
    assert reports.explain(legacy, price)["matches_charged"] is False
    assert reports.explain(row, price, Fraction(1))["multiplier_source"] == "argument"


async def test_deferred_journal_writes_land_once_per_loop_iteration(tmp_path: Path) -> None:
    journal = Journal(tmp_path, name="defer")
    ledger = Ledger(journal)
    ledger.defer_writes(asyncio.get_running_loop())
    rows = [rec(1, 1, i) for i in range(50)]
    for r in rows:
        ledger.record(r)
    path = journal.paths[0]
    assert read_file(path) == b"" and journal.seq == 50  # buffered, not yet written
    assert ledger.pending == rows  # records until the write encodes them
    await asyncio.sleep(0)
    assert jn.parse(read_file(path))[0] == rows  # one write at the iteration's end
    # The write's frames replaced the records: what the flusher sends as CSV.
    assert all(type(x) is bytes for x in ledger.pending)
    assert [as_record(x) for x in ledger.pending] == rows
    ledger.defer_writes(None)
    ledger.record(rows[0])  # immediate again
    assert len(jn.parse(read_file(path))[0]) == 51
    journal.close(delete=True)


async def test_charges_move_the_user_feed_but_not_the_key_feed(pg: asyncpg.Connection) -> None:
    uid, (kid,) = await make_account(pg)
    q = "SELECT (SELECT version FROM users WHERE id = $1), (SELECT version FROM keys WHERE id = $2)"
    user_v, key_v = await pg.fetchrow(q, uid, kid)
    await prepare_stage(pg)
    await write_batch(pg, [rec(uid, kid, 500)])
    user_v2, key_v2 = await pg.fetchrow(q, uid, kid)
    assert user_v2 > user_v  # workers learn the new balance through the users feed
    assert key_v2 == key_v  # spend is read by id; the key's configuration did not change
    assert await spent(pg, kid) == 500
    await pg.execute("UPDATE keys SET spent_nano = 0 WHERE id = $1", kid)  # an operator's reset
    assert await pg.fetchval("SELECT version FROM keys WHERE id = $1", kid) > key_v


async def test_catch_up_batch_is_split_by_user_over_two_connections_and_charged_once(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """A backlog larger than flush_rows is written as per-user parts on two connections.
    Rows that one part committed before a failure (here: logged beforehand, as a retry
    after a lost part would find them) are found logged and charged nothing."""
    rng = random.Random(11)
    accounts = [await make_account(pg, balance=10**12, keys=2) for _ in range(6)]
    rows = []
    for _ in range(4000):
        uid, kids = rng.choice(accounts)
        rows.append(rec(uid, rng.choice(kids), rng.randrange(1, 10**6)))
    # One user's rows were committed by an earlier attempt of the same batch.
    first_uid = accounts[0][0]
    earlier = [r for r in rows if r.user_id == first_uid]
    await prepare_stage(pg)
    res = await write_batch(pg, earlier)
    assert res.inserted == len(earlier) > 0
    on_flushed = Flushed()
    seen = on_flushed.users
    ledger = Ledger(Journal(tmp_path), flush_rows=500)
    for r in rows:
        ledger.record(r)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=500,
                      max_batch_factor=16, connections=2, on_flushed=on_flushed)
    parts = flusher._split(rows)
    assert len(parts) == 2 and sum(map(len, parts)) == len(rows)
    assert not {r.user_id for r in parts[0]} & {r.user_id for r in parts[1]}
    assert flusher._split(rows[:500]) == [rows[:500]]  # steady traffic: one transaction
    flusher.start()
    assert await flusher.stop(timeout=60)
    assert flusher.flushed_rows == len(rows) - len(earlier)
    assert flusher.duplicate_rows == len(earlier)
    ids = [r.request_id for r in rows]
    assert await pg.fetchval(
        "SELECT count(*) FROM usage_log WHERE request_id = ANY($1)", ids) == len(rows)
    for uid, kids in accounts:
        mine = sum(r.cost_nano for r in rows if r.user_id == uid)
        assert await balance(pg, uid) == 10**12 - mine
        if uid != first_uid:
            assert seen[uid] == mine
        for kid in kids:
            assert await spent(pg, kid) == sum(r.cost_nano for r in rows if r.key_id == kid)
    assert first_uid not in seen  # charged by the earlier attempt, not again
    assert await pg.fetchval(
        "SELECT sum(requests) FROM usage_hourly WHERE user_id = ANY($1)",
        [a[0] for a in accounts]) == len(rows)


async def test_a_failed_part_is_written_again_and_the_committed_part_is_not_charged_twice(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """One part of a split batch fails (its user row is locked past lock_timeout) while
    the other commits: the commit is reported at once, the whole batch is written again
    once the lock goes, and every row is logged and charged exactly once."""
    a_uid, (a_kid,) = await make_account(pg, balance=10**12)
    b_uid, (b_kid,) = await make_account(pg, balance=10**12)
    if a_uid % 2 == b_uid % 2:  # the two must land in different parts
        b_uid, (b_kid,) = await make_account(pg, balance=10**12)
    rows = [rec(*(a_uid, a_kid) if i % 2 else (b_uid, b_kid), 1000 + i) for i in range(1200)]
    on_flushed = Flushed()
    seen = on_flushed.users
    ledger = Ledger(Journal(tmp_path), flush_rows=300)
    for r in rows:
        ledger.record(r)
    sep = "&" if "?" in pg_dsn else "?"
    flusher = Flusher(ledger, f"{pg_dsn}{sep}lock_timeout=300", flush_interval_ms=10,
                      flush_rows=300, connections=2, on_flushed=on_flushed,
                      max_backoff_s=0.2)
    locker = await asyncpg.connect(pg_dsn)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", a_uid)
        flusher.start()
        want_b = sum(r.cost_nano for r in rows if r.user_id == b_uid)
        await until(lambda: flusher.failures >= 1 and seen.get(b_uid) == want_b)
        assert a_uid not in seen and ledger.backlog == len(rows)  # nothing let go yet
        await tx.rollback()
    finally:
        await locker.close()
    assert await flusher.stop(timeout=30)
    want_a = sum(r.cost_nano for r in rows if r.user_id == a_uid)
    assert seen == {a_uid: want_a, b_uid: want_b}
    assert flusher.flushed_rows == len(rows)
    # The batch written again had been in a transaction, so it was checked first: the
    # committed part was left out, not collided with.
    assert flusher.raced_batches == 0 and flusher.duplicate_rows > 0
    assert await balance(pg, a_uid) == 10**12 - want_a
    assert await balance(pg, b_uid) == 10**12 - want_b
    assert await spent(pg, a_kid) == want_a and await spent(pg, b_kid) == want_b
    assert await pg.fetchval("SELECT count(*) FROM usage_log WHERE request_id = ANY($1)",
                             [r.request_id for r in rows]) == len(rows)


async def test_no_room_for_a_second_connection_flushes_the_catch_up_on_one(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """A role limited to one connection (as max_connections or a pooler would): the
    catch-up batch goes through the one connection instead of failing forever."""
    role = f"tollway_one_{uuid.uuid4().hex[:8]}"
    await pg.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER CONNECTION LIMIT 1")
    try:
        for what in ("TABLES", "SEQUENCES"):
            await pg.execute(f"GRANT ALL ON ALL {what} IN SCHEMA public TO {role}")
        uids = [(await make_account(pg, balance=10**12)) for _ in range(4)]
        rows = [rec(uid, kids[0], 10 + i) for i in range(1000) for uid, kids in [uids[i % 4]]]
        ledger = Ledger(Journal(tmp_path), flush_rows=200)
        for r in rows:
            ledger.record(r)
        scheme, _, rest = pg_dsn.partition("://")
        dsn = f"{scheme}://{role}@{rest.rpartition('@')[2]}"
        flusher = Flusher(ledger, dsn, flush_interval_ms=10, flush_rows=200, connections=2)
        assert len(flusher._split(rows)) == 2
        flusher.start()
        assert await flusher.stop(timeout=30)
        assert flusher.flushed_rows == len(rows) and flusher.failures == 0
        assert len(flusher._split(rows)) == 1  # and it stays on one for a while
        for uid, _ in uids:
            assert await balance(pg, uid) == 10**12 - sum(
                r.cost_nano for r in rows if r.user_id == uid)
    finally:
        await pg.execute(f"DROP OWNED BY {role}")
        await pg.execute(f"DROP ROLE {role}")


async def test_steady_traffic_is_flushed_once_per_interval_and_a_full_batch_at_once(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """Rows trickling in are written one batch per tick, not back to back as they
    arrive during the previous flush; flush_rows pending still wake the flusher at once,
    and a backlog of full batches is drained in one go."""
    uid, (kid,) = await make_account(pg, balance=10**12)
    ledger = Ledger(Journal(tmp_path), flush_rows=100_000)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=300, flush_rows=100_000)
    flusher.start()
    loop = asyncio.get_running_loop()
    n = 0
    end = loop.time() + 1.5
    while loop.time() < end:  # a row every millisecond, so some arrive during each flush
        ledger.record(rec(uid, kid, 1, rid=f"trickle-{uid}-{n}"))
        n += 1
        await asyncio.sleep(0.001)
    await until(lambda: ledger.backlog == 0)
    # 1.5 s at one tick per 300 ms: about 5 flushes (back to back, as the rows
    # recorded during each flush were written at once, it was hundreds).
    assert 3 <= flusher.flushes <= 8, flusher.flushes
    assert await flusher.stop(timeout=10)
    assert flusher.flushed_rows == n

    # A 10 s tick: five full batches recorded at once are written on the wake, well
    # before it, in one drain (one catch-up batch, parted over the two connections).
    ledger = Ledger(Journal(tmp_path / "burst"), flush_rows=200)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10_000, flush_rows=200)
    flusher.start()
    await asyncio.sleep(0.05)  # the flusher is waiting for its first tick, 10 s away
    for i in range(200 * 5):
        ledger.record(rec(uid, kid, 1, rid=f"burst-{uid}-{i}"))
    await until(lambda: ledger.backlog == 0, limit_s=5)
    assert flusher.flushes <= 2
    assert await flusher.stop(timeout=10)
    assert await balance(pg, uid) == 10**12 - n - 1000


async def test_payload_rows_are_logged_exactly_as_typed_rows_are(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """A journaled row goes to Postgres as its journal payload (a CSV line) unless it
    needs escaping or checking; either way usage_log holds the same values as the
    binary path (no journal) gives the same row."""
    uid, (kid,) = await make_account(pg)
    texts = ["gpt-4o", "Ünïcødé 模型 🚀", "a,b,c", "null", "", " lead and trail ",
             'say "hi"', "back\\slash", "tab\there", "line\nbreak", "\u2028sep"]
    shapes = []
    for i, text in enumerate(texts):
        r = rec(uid, kid, 2**50 + i, model=text)
        r.channel = text
        r.client_request_id = text
        r.ts = 1_800_000_000.123456789 + i / 7
        r.stream = i % 2 == 0
        r.usage = Usage(input=2**40, output=0, cache_read=i, cache_write=0, reasoning=2**31)
        r.multiplier = "4/5" if i % 3 else "1"
        shapes.append(r)
    odd = rec(uid, kid, 3, rid="req_with,comma")  # would break the user-id split: typed
    unset = rec(uid, kid, 4)
    # A CSV line with NULL: refused by usage_log, then typed on its own and stored as ''.
    unset.error_code = None  # type: ignore[assignment]
    rows = [*shapes, odd, unset]

    ledger = Ledger(Journal(tmp_path, name="csv"), flush_rows=1000)
    for r in rows:
        ledger.record(r)
    kinds = [type(x) for x in ledger.pending]
    plain = {"gpt-4o", "Ünïcødé 模型 🚀", "a,b,c", "null", "", " lead and trail ", "\u2028sep"}
    assert kinds == [bytes if r.model in plain else UsageRecord for r in shapes] + [UsageRecord, bytes]
    assert [as_record(x) for x in ledger.pending[:len(shapes)]] == shapes
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=1000)
    flusher.start()
    assert await flusher.stop(timeout=30)
    assert flusher.flushed_rows == len(rows) and flusher.deadletter_rows == 0

    ids = [r.request_id for r in rows]
    got = await pg.fetch(f"SELECT {ledger_mod._COLS} FROM usage_log WHERE request_id = ANY($1)"
                         " ORDER BY request_id", ids)
    await pg.execute("DELETE FROM usage_log WHERE request_id = ANY($1)", ids)
    typed = Ledger(None, flush_rows=1000)  # no journal: every row through the binary COPY
    for r in rows:
        typed.record(r)
    assert all(type(x) is UsageRecord for x in typed.pending)
    flusher = Flusher(typed, pg_dsn, flush_interval_ms=10, flush_rows=1000)
    flusher.start()
    assert await flusher.stop(timeout=30)
    want = await pg.fetch(f"SELECT {ledger_mod._COLS} FROM usage_log WHERE request_id = ANY($1)"
                          " ORDER BY request_id", ids)
    assert len(got) == len(rows) and [tuple(g) for g in got] == [tuple(w) for w in want]
    # The gateway records flat rows (UsageRow), not records: the same values again.
    await pg.execute("DELETE FROM usage_log WHERE request_id = ANY($1)", ids)
    flat = Ledger(Journal(tmp_path, name="flat"), flush_rows=1000)
    for r in rows:
        flat.record(r.row())
    assert [type(x) for x in flat.pending] == [tuple if k is UsageRecord else k for k in kinds]
    flusher = Flusher(flat, pg_dsn, flush_interval_ms=10, flush_rows=1000)
    flusher.start()
    assert await flusher.stop(timeout=30)
    again = await pg.fetch(f"SELECT {ledger_mod._COLS} FROM usage_log WHERE request_id = ANY($1)"
                           " ORDER BY request_id", ids)
    assert [tuple(g) for g in again] == [tuple(w) for w in want]
    by_id = {g["request_id"]: g for g in got}
    for r in shapes:
        g = by_id[r.request_id]
        assert (g["model"], g["channel"], g["client_request_id"]) == (r.model,) * 3
        assert g["ts"] == pg_timestamp(r.ts) and g["stream"] is r.stream
        assert g["cost_nano"] == r.cost_nano and g["input_tokens"] == 2**40
    assert by_id[unset.request_id]["error_code"] == ""


def test_a_row_orjson_cannot_encode_is_held_in_memory_not_journaled(tmp_path: Path) -> None:
    journal = Journal(tmp_path, name="surrogate")
    ledger = Ledger(journal)
    bad = rec(1, 1, 5, model="lone \ud800 surrogate")
    good = rec(1, 1, 6)
    ledger.record(bad)
    ledger.record(good)
    assert ledger.unjournaled == [bad] and journal.seq == 1
    assert [as_record(x) for x in ledger.pending] == [good]
    assert jn.parse(read_file(journal.paths[0]))[0] == [good]
    journal.close(delete=True)


async def test_an_unencodable_row_is_billed_with_its_text_made_storable(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    uid, (kid,) = await make_account(pg, balance=10**9)
    bad = rec(uid, kid, 5, model="lone \ud800 surrogate")
    good = rec(uid, kid, 6)
    ledger = Ledger(Journal(tmp_path, name="surrogate-pg"), flush_rows=1000)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=1000)
    flusher.start()
    ledger.record(bad)
    ledger.record(good)
    assert await flusher.stop(timeout=30)
    assert flusher.flushed_rows == 2 and flusher.sanitized_rows == 1
    assert await pg.fetchval("SELECT model FROM usage_log WHERE request_id = $1",
                             bad.request_id) == "lone ? surrogate"
    assert await balance(pg, uid) == 10**9 - 11


async def test_a_deferred_row_orjson_cannot_encode_stays_a_record_and_the_rest_are_written(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path, name="defer-surrogate")
    ledger = Ledger(journal)
    ledger.defer_writes(asyncio.get_running_loop())
    rows = [rec(1, 1, i) for i in range(5)]
    rows[2].model = "lone \ud800 surrogate"
    for r in rows:
        ledger.record(r)
    await asyncio.sleep(0)
    assert jn.parse(read_file(journal.paths[0]))[0] == rows[:2] + rows[3:]
    assert journal.write_errors == 1 and journal.seq == 5
    assert [type(x) for x in ledger.pending] == [bytes, bytes, UsageRecord, bytes, bytes]
    assert ledger.pending[2] is rows[2]  # held in memory, flushed on the typed path
    ledger.record(rec(1, 1, 9))  # later rows are journaled as usual
    await asyncio.sleep(0)
    assert len(jn.parse(read_file(journal.paths[0]))[0]) == 5
    ledger.defer_writes(None)
    journal.close(delete=True)


async def test_checkpoints_never_reach_postgres_while_their_writer_lives(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """A live stream's checkpoint stays in the journal only, across flushes, rotations
    and deleted segments; stopped with the stream still live, the journal is kept, and
    the next start charges the checkpoint once."""
    uid, (kid,) = await make_account(pg, balance=10**12)
    rid = f"live-{uuid.uuid4().hex}"
    ts = time.time()

    def ck(cost: int) -> tuple[object, ...]:
        r = rec(uid, kid, cost, rid=rid, ts=ts)
        r.usage_source = "interrupted"
        return r.row()

    journal = Journal(tmp_path, segment_bytes=4096)
    ledger = Ledger(journal, flush_rows=50)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=50)
    flusher.start()
    for i in range(300):
        if i % 50 == 0:
            ledger.checkpoint(ck(100 + i))
            # Deferred like rows: on disk at the end of this loop iteration.
            assert journal._checkpoints
            await asyncio.sleep(0)
            assert not journal._checkpoints
        ledger.record(rec(uid, kid, 10))
        if i % 50 == 49:
            await asyncio.sleep(0.02)  # several flushes
    await until(lambda: ledger.backlog == 0 and flusher.flushed_rows == 300)
    assert not any(isinstance(r, tuple) and r[1] == rid for r in ledger.pending)
    assert await pg.fetchval("SELECT count(*) FROM usage_log WHERE request_id = $1", rid) == 0
    assert flusher.interrupted_rows == 0 and flusher.deadletter_rows == 0
    # Committed segments were deleted; the stream's latest checkpoint is in what is left.
    assert len(os.listdir(tmp_path)) < 10
    cps = [c for p in journal.paths for c in jn.parse_all(read_file(p))[1]]
    assert cps and cps[-1].request_id == rid and cps[-1].cost_nano == 350

    assert await flusher.stop(timeout=10)  # the stream never settled
    assert [p for p in os.listdir(tmp_path) if p.endswith(jn.SUFFIX)]
    assert await balance(pg, uid) == 10**12 - 3000
    again = Flusher(Ledger(Journal(tmp_path)), pg_dsn, flush_interval_ms=10)
    again.start()
    assert again.interrupted_rows == 1
    assert await again.stop(timeout=10)
    assert await pg.fetchval("SELECT cost_nano FROM usage_log WHERE request_id = $1", rid) == 350
    assert await balance(pg, uid) == 10**12 - 3000 - 350
    assert [p for p in os.listdir(tmp_path) if p.endswith(jn.SUFFIX)] == []


def test_checkpoint_without_a_journal_or_unencodable_is_a_no_op(tmp_path: Path) -> None:
    Ledger(None).checkpoint(rec(1, 1, 1).row())
    journal = Journal(tmp_path)
    ledger = Ledger(journal)
    bad = list(rec(1, 1, 1).row())
    bad[5] = object()  # orjson cannot encode it
    ledger.checkpoint(tuple(bad))
    assert journal.live_checkpoints == 0 and ledger.pending == []
    ledger.checkpoint(rec(1, 1, 1, rid="r").row())
    assert journal.live_checkpoints == 1 and ledger.pending == [] and journal.seq == 0
    ledger.forget_checkpoint("r")
    ledger.forget_checkpoint("never-seen")
    assert journal.live_checkpoints == 0
    journal.close(delete=True)
