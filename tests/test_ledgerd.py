"""The ledger process (accounting.ledgerd): workers only journal, one process flushes.

Real Postgres, real journal files, the real unix socket between the two ends.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from accounting import journal as jn
from accounting.journal import Journal, encode, replay
from accounting.ledger import Ledger, _csv_ready, write_batch
from accounting.ledger import prepare as prepare_stage
from accounting.ledgerd import LedgerDaemon, LedgerLink, _plain
from relay.config import LedgerConfig
from relay.metrics import Metrics, ledger_families
from tests.test_ledger import balance, make_account, read_file, rec, spent, until

SETTINGS = LedgerConfig(flush_interval_ms=20, flush_rows=500, process=True)


class Reports:
    """The worker's view of the ledger process: what its LedgerLink received."""

    def __init__(self) -> None:
        self.begins = 0
        self.done: list[dict[str, Any]] = []

    def begin(self) -> None:
        self.begins += 1

    def on_done(self, msg: dict[str, Any]) -> None:
        self.done.append(msg)

    def user_sum(self, uid: int) -> int:
        return sum(int(m["u"].get(str(uid), 0)) for m in self.done)

    def key_sum(self, kid: int) -> int:
        return sum(int(m["k"].get(str(kid), 0)) for m in self.done)


async def logged(pg: asyncpg.Connection, uid: int) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM usage_log WHERE user_id = $1", uid))


async def test_a_worker_journal_is_flushed_and_reported_by_the_ledger_process(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    uid, (kid,) = await make_account(pg, balance=10**12)
    journal = Journal(tmp_path, name="w1", segment_bytes=16 << 10)  # rotates every ~50 rows
    ledger = Ledger(journal, keep=False)
    daemon = LedgerDaemon(str(tmp_path), pg_dsn, SETTINGS)
    await daemon.start()
    reports = Reports()
    link = LedgerLink(str(tmp_path), journal.name, reports.begin, reports.on_done)
    assert link.connect()
    costs = [1000 + i for i in range(600)]
    for i, c in enumerate(costs):
        ledger.record(rec(uid, kid, c).row() if i % 2 else rec(uid, kid, c))
        if i % 100 == 99:
            await asyncio.sleep(0.03)  # traffic over several flushes
    assert ledger.pending == [] and ledger.unjournaled == []  # the worker keeps nothing
    await until(lambda: reports.user_sum(uid) == sum(costs), 20)

    assert await logged(pg, uid) == len(costs)
    assert await balance(pg, uid) == 10**12 - sum(costs)
    assert await spent(pg, kid) == sum(costs)
    assert reports.key_sum(kid) == sum(costs) and reports.begins >= 1
    # The worker deletes what the reports say is committed; its newest segment stays.
    last = reports.done[-1]
    assert journal.committed_through(last["s"], last["o"]) >= 0
    assert len(journal.paths) <= 2 and len(os.listdir(tmp_path)) <= 3

    # The worker exits: its journal is adopted, read to the end and deleted.
    more = [rec(uid, kid, 7) for _ in range(30)]
    for r in more:
        ledger.record(r)
    link.close()
    journal.close()
    await until(lambda: not daemon.tails, 20)
    assert await logged(pg, uid) == len(costs) + len(more)
    assert await balance(pg, uid) == 10**12 - sum(costs) - 7 * len(more)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".wal")] == []
    assert await daemon.stop(timeout=10)


async def test_a_restarted_ledger_process_charges_nothing_twice(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    uid, (kid,) = await make_account(pg, balance=10**12)
    journal = Journal(tmp_path, name="w2")
    ledger = Ledger(journal, keep=False)
    rows = [rec(uid, kid, 500) for _ in range(200)]
    for r in rows:
        ledger.record(r)
    first = LedgerDaemon(str(tmp_path), pg_dsn, SETTINGS)
    await first.start()
    await until(lambda: bool(first.tails) and first.tails["w2"].flusher.flushed_rows == 200, 20)
    # Killed after its commit: nothing deleted (the segment is the worker's current one).
    if first._task is not None:
        first._task.cancel()
    for t in first.tails.values():
        assert t.flusher._task is not None
        t.flusher._task.cancel()
        t.close()
    assert first._server is not None
    first._server.close()
    await asyncio.sleep(0.05)

    later = [rec(uid, kid, 300) for _ in range(50)]
    for r in later:
        ledger.record(r)
    second = LedgerDaemon(str(tmp_path), pg_dsn, SETTINGS)
    await second.start()
    await until(lambda: second.tails["w2"].flusher.flushed_rows == 50, 20)
    tail = second.tails["w2"]
    assert tail.flusher.duplicate_rows == 200  # read again, found logged, charged nothing
    assert await logged(pg, uid) == 250
    assert await balance(pg, uid) == 10**12 - 200 * 500 - 50 * 300
    journal.close()
    assert await second.stop(timeout=10)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".wal")] == []


async def test_a_report_made_while_no_worker_listens_arrives_when_one_connects(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    uid, (kid,) = await make_account(pg)
    journal = Journal(tmp_path, name="w3")
    ledger = Ledger(journal, keep=False)
    for _ in range(40):
        ledger.record(rec(uid, kid, 250))
    daemon = LedgerDaemon(str(tmp_path), pg_dsn, SETTINGS)
    await daemon.start()
    await until(lambda: bool(daemon.tails) and daemon.tails["w3"].flusher.flushed_rows == 40, 20)
    reports = Reports()
    link = LedgerLink(str(tmp_path), journal.name, reports.begin, reports.on_done)
    assert link.connect()
    await until(lambda: reports.user_sum(uid) == 40 * 250, 10)
    link.close()
    journal.close()
    assert await daemon.stop(timeout=10)


def test_a_row_the_journal_cannot_write_stays_with_the_worker(tmp_path: Path) -> None:
    """keep=False keeps nothing in memory but what the journal could not take."""
    journal = Journal(tmp_path, name="w4")
    ledger = Ledger(journal, keep=False)
    bad = rec(1, 1, 5)
    bad.model = "\ud800"  # a lone surrogate: orjson cannot encode it
    ledger.record(bad)
    ledger.record(rec(1, 1, 6))
    assert [r.model for r in ledger.unjournaled] == ["\ud800"] and ledger.pending == []
    journal.close()


def test_the_ledger_process_reads_csv_readiness_off_the_bytes_as_the_worker_decides_it() -> None:
    """ledgerd._plain (no decode) must agree with ledger._csv_ready on every shape."""
    shapes = []
    for text in ["gpt-4o", "Ünïcødé 🚀", "a,b", 'q"uote', "back\\slash", "", "null", "\u2028"]:
        r = rec(1, 2, 3, model=text)
        r.channel = text
        shapes.append(r)
    shapes += [rec(1, 2, 3, rid=rid) for rid in ["req_plain", "a,b", 'a"b', "a\\b", "ünï"]]
    shapes += [rec(1, 2, 3, ts=ts)
               for ts in [1_800_000_000.5, 1_800_000_000.0, 1e16, -1.0, 253_402_300_800.0, 0.0]]
    empty = rec(1, 2, 3)
    empty.request_id = ""
    shapes.append(empty)
    int_ts = rec(1, 2, 3)
    int_ts.ts = 1_800_000_000  # type: ignore[assignment]
    shapes.append(int_ts)
    plain = 0
    for r in shapes:
        frame = encode(r)
        assert _plain(frame) == _csv_ready(r, frame), r
        plain += _plain(frame)
    assert 0 < plain < len(shapes)


async def test_the_workers_limiter_learns_each_commit_from_the_ledger_process(pg_dsn: str) -> None:
    """A gateway worker with [ledger] process = true: its limiter's unflushed spend goes
    back to zero once the ledger process reports the commit, and its local balance then
    equals Postgres's, as with an in-process flusher."""
    import aiohttp

    from tests.gateway import Harness

    h = Harness()
    daemon = LedgerDaemon(os.path.join(h.tmp.name, "journal"), pg_dsn, SETTINGS)
    await daemon.start()
    await h.start(pg_dsn, ledger={"process": True, "flush_interval_ms": 20})
    try:
        uid, kid, secret = await h.user_and_key("10")
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                async with http.post(f"{h.url}/v1/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {secret}"}) as resp:
                    assert resp.status == 200, await resp.text()
        assert h.worker is not None and h.worker.gw is not None
        lim = h.worker.gw.limiter
        assert h.worker.gw.ledger.pending == []  # the worker holds no rows
        await until(lambda: uid in lim.users and lim.users[uid].unflushed == 0
                    and lim.keys[kid].unflushed == 0, 15)
        conn = await asyncpg.connect(pg_dsn)
        try:
            bal = await balance(conn, uid)
            assert await conn.fetchval("SELECT count(*) FROM usage_log WHERE user_id = $1", uid) == 20
            assert bal < 10 * 10**9
            assert lim.users[uid].db == bal
            assert lim.keys[kid].db == -await spent(conn, kid)
        finally:
            await conn.close()
    finally:
        if h.worker is not None:
            await h.worker.stop()  # closes its journal, which the ledger process then finishes
            h.worker = None
        assert await daemon.stop(timeout=10)
        await h.stop()


async def test_a_deferred_row_the_journal_cannot_write_stays_with_the_worker(tmp_path: Path) -> None:
    """The same with writes deferred to the end of the loop iteration (a running worker)."""
    journal = Journal(tmp_path, name="w5")
    ledger = Ledger(journal, keep=False)
    ledger.defer_writes(asyncio.get_running_loop())
    bad = rec(1, 1, 5)
    bad.model = "\ud800"
    ledger.record(rec(1, 1, 4).row())
    ledger.record(bad.row())
    ledger.record(rec(1, 1, 6))
    assert ledger.unjournaled == []  # nothing encoded yet
    await asyncio.sleep(0)  # the iteration's write
    assert [r.model for r in ledger.unjournaled] == ["\ud800"] and ledger.pending == []
    ledger.defer_writes(None)
    journal.close()
    assert [r.cost_nano for r in replay(tmp_path)] == [4, 6]


def test_metrics_sum_counters_and_keep_the_slowest_last_flush(tmp_path: Path) -> None:
    """/metrics merges the flushing processes' snapshots: counters and backlogs add up,
    while last_flush_seconds is the slowest process's, not a sum of durations."""
    mine = Metrics(tmp_path)
    mine.state = lambda: ledger_families(
        {"flushed_rows_total": 5, "pending_rows": 3, "last_flush_seconds": 0.25})
    other = Metrics(None)
    other.state = lambda: ledger_families(
        {"flushed_rows_total": 7, "pending_rows": 4, "last_flush_seconds": 0.5})
    # Another live process's snapshot: this test's parent stands in for it.
    (tmp_path / f"{os.getppid()}.json").write_bytes(orjson.dumps(other.snapshot()))
    values = {line.split()[0]: float(line.split()[1]) for line in mine.render().decode().splitlines()
              if line.startswith("tollway_ledger_")}
    assert values["tollway_ledger_flushed_rows_total"] == 12
    assert values["tollway_ledger_pending_rows"] == 7
    assert values["tollway_ledger_last_flush_seconds"] == 0.5


async def test_a_second_ledger_process_waits_for_the_first_to_exit(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """One ledger process per journal directory: a second one (started while the first,
    left by a supervisor that died, still drains) waits, then takes over the journals."""
    uid, (kid,) = await make_account(pg, balance=10**12)
    first = LedgerDaemon(str(tmp_path), pg_dsn, SETTINGS)
    await first.start()
    second = LedgerDaemon(str(tmp_path), pg_dsn, SETTINGS)
    starting = asyncio.ensure_future(second.start())
    await asyncio.sleep(0.5)
    assert not starting.done() and second.tails == {}
    assert await first.stop()
    await asyncio.wait_for(starting, 5)
    # The second now flushes: a journal left by a worker that is gone is adopted.
    journal = Journal(tmp_path, name="gone")
    ledger = Ledger(journal, keep=False)
    for _ in range(20):
        ledger.record(rec(uid, kid, 11))
    journal.close()
    await until(lambda: not second.journals_left(), 20)
    assert await logged(pg, uid) == 20 and await balance(pg, uid) == 10**12 - 220
    assert await second.stop()


async def test_the_ledger_process_skips_live_checkpoints_and_charges_a_dead_workers_last_ones(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """While the worker lives its checkpoints are skipped (never flushed, never counted
    as corrupt), across rotations and the segments deleted after commits. Once it is
    dead, each stream it never settled is charged its last checkpoint, once, even when
    that row reached Postgres before (a previous life of this process)."""
    uid, (kid,) = await make_account(pg, balance=10**12)
    tag = uuid.uuid4().hex[:8]
    a, b, c = f"a-{tag}", f"b-{tag}", f"c-{tag}"
    ts = time.time()

    def ck(rid: str, cost: int) -> tuple[object, ...]:
        r = rec(uid, kid, cost, rid=rid, ts=ts)
        r.usage_source = "interrupted"
        return r.row()

    journal = Journal(tmp_path, name="w9", segment_bytes=16 << 10)
    ledger = Ledger(journal, keep=False)
    daemon = LedgerDaemon(str(tmp_path), pg_dsn, SETTINGS)
    await daemon.start()
    reports = Reports()
    link = LedgerLink(str(tmp_path), journal.name, reports.begin, reports.on_done)
    assert link.connect()
    for k in range(5):
        for rid, base in ((a, 100), (b, 200), (c, 300)):
            ledger.checkpoint(ck(rid, base + k))
        for _ in range(60):
            ledger.record(rec(uid, kid, 10))
        await asyncio.sleep(0.03)
    ledger.forget_checkpoint(b)
    ledger.record(rec(uid, kid, 999, rid=b, ts=ts))
    await until(lambda: reports.user_sum(uid) == 300 * 10 + 999, 20)
    assert await logged(pg, uid) == 301
    tail = daemon.tails["w9"]
    assert tail.skipped_frames == 0 and tail.flusher.interrupted_rows == 0
    last = reports.done[-1]
    journal.committed_through(last["s"], last["o"])
    left = [cp for p in journal.paths
            for cp in jn.parse_all(read_file(p))[1]]
    assert {(cp.request_id, cp.cost_nano) for cp in left} >= {(a, 104), (c, 304)}
    # c's row is in Postgres already: a previous life of this process committed it.
    await prepare_stage(pg)
    assert (await write_batch(pg, [ck(c, 304)])).inserted == 1

    link.close()
    journal.close()  # the worker dies with a and c still streaming
    await until(lambda: not daemon.tails, 20)
    got = {r["request_id"]: (r["n"], r["cost"]) for r in await pg.fetch(
        "SELECT request_id, count(*) AS n, sum(cost_nano) AS cost FROM usage_log"
        " WHERE request_id = ANY($1::text[]) GROUP BY request_id", [a, b, c])}
    assert got == {a: (1, 104), b: (1, 999), c: (1, 304)}
    assert await balance(pg, uid) == 10**12 - 3000 - 999 - 104 - 304
    assert daemon.stats()["interrupted_rows_total"] == 2
    assert [p for p in os.listdir(tmp_path) if p.endswith(".wal")] == []
    assert await daemon.stop(timeout=10)
