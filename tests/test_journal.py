"""The local journal: framing, torn and corrupt records, segments, and replay after a
real kill -9 of a worker process."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import sys
import textwrap
import time
import uuid
import zlib
from pathlib import Path

import asyncpg
import orjson
from test_ledger import balance, make_account, rec

from accounting import journal as jn
from accounting.journal import Journal, encode, parse, replay
from accounting.ledger import Flusher, Ledger
from tests.children import stop

REPO = Path(__file__).resolve().parent.parent


def test_roundtrip_keeps_every_field(tmp_path: Path) -> None:
    r = rec(3, 4, 12345, plan_id=2, status=502)
    r.client_request_id = "cli-1"
    r.client_ip = "10.0.0.1"
    r.channels_tried = "a,b"
    r.attempts = 2
    r.multiplier = "4/5"
    out, used, skipped = parse(encode(r))
    assert out == [r] and skipped == 0 and used == len(encode(r))


def test_record_from_before_the_multiplier_reads_it_as_not_recorded() -> None:
    r = rec(3, 4, 12345)
    t = orjson.loads(encode(r)[jn._HDR_SIZE:])
    assert len(t) == 32  # multiplier, upstream_request_id and response_id appended since
    payload = orjson.dumps(t[:29])  # the layout journals were written in before
    frame = jn._HDR.pack(jn.MAGIC, len(payload), zlib.crc32(payload)) + payload
    (old,), _, _ = parse(frame)
    assert old.multiplier == "" and old.request_id == r.request_id and old.plan_id == 0


def test_torn_last_record_is_ignored() -> None:
    rows = [rec(1, 1, i) for i in range(5)]
    buf = b"".join(encode(r) for r in rows)
    torn = encode(rec(1, 1, 99))
    for cut in (3, len(torn) // 2, len(torn) - 1):
        out, _, skipped = parse(buf + torn[:cut])
        assert out == rows and skipped == cut


def test_corrupt_record_is_skipped_and_reader_resynchronises() -> None:
    rows = [rec(1, 1, i) for i in range(5)]
    frames = [bytearray(encode(r)) for r in rows]
    frames[2][-3] ^= 0xFF  # a flipped byte in the middle record's payload: CRC mismatch
    out, _, skipped = parse(b"".join(bytes(f) for f in frames))
    assert out == rows[:2] + rows[3:]
    assert skipped == len(frames[2])


def test_segments_rotate_read_back_in_order_and_go_once_committed(tmp_path: Path) -> None:
    j = Journal(tmp_path, name="t", segment_bytes=2048)
    start = j.tail()
    rows = [rec(1, 1, i) for i in range(100)]
    for r in rows:
        assert j.append(r)
    assert len(os.listdir(tmp_path)) > 5 and j.seq == 100
    got, cur = j.read(start, 37)
    more, cur = j.read(cur, 1000)
    assert got + more == rows and cur == j.tail()
    j.committed(50)
    left = sorted(os.listdir(tmp_path))
    assert 0 < len(left) < 10
    rest, _ = j.read(start, 1000)  # cursor in a deleted segment: continues with what is left
    assert rest[-1] == rows[-1] and len(rest) >= 50
    j.committed(100)
    assert len(os.listdir(tmp_path)) <= 1  # only the current segment may remain
    j.close(delete=True)
    assert os.listdir(tmp_path) == []


def test_live_segments_are_not_replayed(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append(rec(1, 1, 1))
    assert replay(tmp_path) == []  # we hold the lock: it is ours, not a dead worker's
    j.close()
    assert len(replay(tmp_path)) == 1  # closed without delete: replayable
    assert len(replay(tmp_path)) == 1  # replay itself deletes nothing


def test_write_failure_keeps_the_row_in_memory(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    ledger = Ledger(j, max_pending_rows=1)
    os.close(j._current.fd)  # writes now fail (EBADF), as on a full disk
    r = rec(1, 1, 1)
    ledger.record(r)
    ledger.record(r)
    assert ledger.unjournaled == [r, r] and j.write_errors == 2


_CRASHER = """
import os, signal, sys, time
sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
from accounting.journal import Journal, encode
from accounting.ledger import Ledger
from test_ledger import rec
j = Journal({dir!r}, segment_bytes=32 * 1024)
ledger = Ledger(j, max_pending_rows=300)   # most rows also spill: the journal is all there is
for i in range({n}):
    ledger.record(rec({uid}, {kid}, 1000 + i, rid="crash-{tag}-%05d" % i))
frame = encode(rec({uid}, {kid}, 5, rid="crash-{tag}-torn"))
os.write(j._current.fd, frame[: len(frame) // 2])    # killed mid-write
print("ready", flush=True)
time.sleep(60)
"""


async def test_replay_after_kill_9_lands_every_row_exactly_once(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    jdir = tmp_path / "journal"
    uid, (kid,) = await make_account(pg, balance=10**10)
    n, tag = 3000, uuid.uuid4().hex[:8]
    script = _CRASHER.format(repo=str(REPO), dir=str(jdir), n=n, uid=uid, kid=kid, tag=tag)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(script), stdout=asyncio.subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"ready"
        assert replay(jdir) == []  # alive: its segments are locked
    finally:
        # Once, and never through Process.kill(): see tests/children.py.
        returncode = await stop(proc, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    rows = replay(jdir)
    assert [r.request_id for r in rows] == [f"crash-{tag}-{i:05d}" for i in range(n)]
    backup = tmp_path / "backup"
    shutil.copytree(jdir, backup)

    ledger = Ledger(Journal(jdir), flush_rows=500)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=500)
    flusher.start()
    assert await flusher.stop(timeout=30)
    assert flusher.replayed_rows == n and flusher.flushed_rows == n
    assert [p for p in os.listdir(jdir) if p.endswith(jn.SUFFIX)] == []
    want = 10**10 - sum(1000 + i for i in range(n))
    assert await balance(pg, uid) == want

    # The same segments once more (a second worker racing on them, say): nothing changes.
    for p in backup.iterdir():
        shutil.copy(p, jdir / p.name)
    ledger = Ledger(Journal(jdir), flush_rows=500)
    flusher = Flusher(ledger, pg_dsn, flush_interval_ms=10, flush_rows=500)
    flusher.start()
    assert await flusher.stop(timeout=30)
    assert flusher.replayed_rows == n and flusher.flushed_rows == 0
    assert flusher.duplicate_rows == n
    assert await balance(pg, uid) == want
    counts = await pg.fetch(
        "SELECT count(*) AS c FROM usage_log WHERE request_id LIKE $1 GROUP BY request_id",
        f"crash-{tag}-%")
    assert len(counts) == n and {r["c"] for r in counts} == {1}


def test_a_restarted_worker_of_the_same_name_leaves_its_predecessors_rows_for_replay(
    tmp_path: Path,
) -> None:
    dead = Journal(tmp_path, name="worker-0")
    rows = [rec(1, 1, i) for i in range(3)]
    for r in rows:
        dead.append(r)
    dead.close()  # killed: the file stays, unlocked
    alive = Journal(tmp_path, name="worker-0")
    alive.append(rec(1, 1, 99))
    assert len(alive.paths) == 1 and alive.paths[0] not in dead.paths
    assert replay(tmp_path) == rows  # the predecessor's rows, not mixed with ours
    alive.close(delete=True)
    assert replay(tmp_path) == rows


# --- checkpoints of streams in flight -------------------------------------------------

# One admission time for every stream of these tests: recent, as a replay's rows are
# (a time past the retention would land in a day partition a flusher drops).
TS = round(time.time() - 60, 3)


def ck(uid: int, kid: int, rid: str, cost: int) -> tuple[object, ...]:
    """A checkpoint row: the flat row the stream would settle with now."""
    r = rec(uid, kid, cost, rid=rid, ts=TS)
    r.usage_source = "interrupted"
    return r.row()


def checkpoints_in(paths: list[str]) -> list[jn.UsageRecord]:
    out = []
    for p in paths:
        out += jn.parse_all(Path(p).read_bytes())[1]
    return out


def test_checkpoints_take_no_sequence_number_and_are_not_read_back_as_rows(tmp_path: Path) -> None:
    j = Journal(tmp_path, name="t")
    start = j.tail()
    rows = []
    for i in range(20):
        r = rec(1, 1, i)
        assert j.append(r)
        rows.append(r)
        j.checkpoint(f"live-{i}", jn.encode_checkpoint(ck(1, 1, f"live-{i}", i)))
    assert j.seq == 20 and j._current.count == 20
    got, cur = j.read(start, 7)  # a cut between rows, checkpoints between them
    more, cur = j.read(cur, 100)
    assert got + more == rows and cur == j.tail()
    data = Path(j.paths[0]).read_bytes()
    assert parse(data) == (rows, len(data), 0)
    got_rows, cps, skipped = jn.parse_all(data)
    assert got_rows == rows and skipped == 0
    assert [c.request_id for c in cps] == [f"live-{i}" for i in range(20)]
    assert {c.usage_source for c in cps} == {"interrupted"}
    j.close(delete=True)


def test_rotation_carries_each_live_streams_latest_checkpoint_into_the_new_segment(
    tmp_path: Path,
) -> None:
    j = Journal(tmp_path, name="t", segment_bytes=4096)
    j.checkpoint("a", jn.encode_checkpoint(ck(1, 1, "a", 10)))
    j.checkpoint("b", jn.encode_checkpoint(ck(1, 1, "b", 5)))
    j.checkpoint("a", jn.encode_checkpoint(ck(1, 1, "a", 20)))  # supersedes a's first
    j.forget_checkpoint("b")  # b settles: its row follows
    j.append(rec(1, 1, 500, rid="b", ts=TS))
    for i in range(100):
        j.append(rec(1, 1, i))
    assert len(j.paths) > 3
    for p in j.paths[1:]:  # every later segment opens with a's latest checkpoint alone
        assert [(c.request_id, c.cost_nano) for c in checkpoints_in([p])] == [("a", 20)]
    j.committed(j.seq)  # every row is in Postgres: the segments holding them go
    assert len(j.paths) == 1
    assert [(c.request_id, c.cost_nano) for c in checkpoints_in(j.paths)] == [("a", 20)]
    j.close()  # the worker dies with `a` still streaming
    (segs,) = list(jn.dead_journals(tmp_path))
    owed = segs[0].records[:segs[0].interrupted]
    assert [(r.request_id, r.cost_nano) for r in owed] == [("a", 20)]
    for s in segs:
        s.release(delete=False)


def test_a_settled_row_supersedes_checkpoints_in_older_segments(tmp_path: Path) -> None:
    j = Journal(tmp_path, name="t", segment_bytes=2048)
    j.checkpoint("a", jn.encode_checkpoint(ck(1, 1, "a", 10)))
    j.checkpoint("c", jn.encode_checkpoint(ck(1, 1, "c", 30)))
    j.forget_checkpoint("a")
    for i in range(30):  # a's row lands segments after its checkpoint
        j.append(rec(1, 1, i))
    j.append(rec(1, 1, 99, rid="a", ts=TS))
    j.close()
    (segs,) = list(jn.dead_journals(tmp_path))
    assert len(segs) > 2
    owed = segs[0].records[:segs[0].interrupted]
    assert [(r.request_id, r.cost_nano) for r in owed] == [("c", 30)]
    # Rows stay where they were, after what is owed.
    assert [r.cost_nano for s in segs for r in s.records][1:] == [*range(30), 99]
    for s in segs:
        s.release(delete=False)


def test_a_journal_partly_held_by_another_adopter_is_left_to_it(tmp_path: Path) -> None:
    j = Journal(tmp_path, name="t", segment_bytes=2048)
    for i in range(30):
        j.append(rec(1, 1, i))
    j.close()
    other = os.open(j.paths[-1] if j.paths else sorted(tmp_path.iterdir())[-1], os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert list(jn.dead_journals(tmp_path)) == []  # whole or nothing
    finally:
        os.close(other)
    (segs,) = list(jn.dead_journals(tmp_path))
    assert [r.cost_nano for s in segs for r in s.records] == list(range(30))
    for s in segs:
        s.release(delete=False)


async def test_a_dead_workers_interrupted_streams_are_charged_their_last_checkpoint_once(
    pg: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    jdir = tmp_path / "journal"
    uid, (kid,) = await make_account(pg, balance=10**10)
    tag = uuid.uuid4().hex[:8]
    x = [f"x-{tag}-{i}" for i in range(10)]  # cut by the crash
    y = [f"y-{tag}-{i}" for i in range(5)]  # settled after checkpoints
    z = f"z-{tag}"  # cut, but its row reached Postgres already (an earlier replay's commit)
    j = Journal(jdir, name="w", segment_bytes=8192)
    ledger = Ledger(j)
    settled = []
    for k in range(3):
        for i, rid in enumerate(x):
            ledger.checkpoint(ck(uid, kid, rid, (k + 1) * 100 + i))
        for rid in y:
            ledger.checkpoint(ck(uid, kid, rid, 7))
        ledger.checkpoint(ck(uid, kid, z, 40))
        for i in range(40):  # rotations between checkpoints
            r = rec(uid, kid, 1000 + i)
            ledger.record(r)
            settled.append(r)
    for rid in y:
        ledger.forget_checkpoint(rid)
        ledger.record(rec(uid, kid, 500, rid=rid, ts=TS))
    assert len(j.paths) > 2
    await write_batch_once(pg, ck(uid, kid, z, 40))
    j.close()  # the worker dies; no flusher ever ran
    backup = tmp_path / "backup"
    shutil.copytree(jdir, backup)

    def charged() -> int:
        return sum(r.cost_nano for r in settled) + 500 * len(y) + sum(300 + i for i in range(10)) + 40

    for attempt in range(2):  # the second time: the same files again, nothing changes
        if attempt:
            for p in backup.iterdir():
                shutil.copy(p, jdir / p.name)
        flusher = Flusher(Ledger(Journal(jdir)), pg_dsn, flush_interval_ms=10, flush_rows=500)
        flusher.start()
        assert flusher.interrupted_rows == len(x) + 1
        assert await flusher.stop(timeout=30)
        assert flusher.flushed_rows == (0 if attempt else len(settled) + len(y) + len(x))
        assert [p for p in os.listdir(jdir) if p.endswith(jn.SUFFIX)] == []
        assert await balance(pg, uid) == 10**10 - charged()
    got = {r["request_id"]: (r["c"], r["cost"], r["src"]) for r in await pg.fetch(
        "SELECT request_id, count(*) AS c, sum(cost_nano) AS cost, max(usage_source) AS src"
        " FROM usage_log WHERE user_id = $1 GROUP BY request_id", uid)}
    assert len(got) == len(settled) + len(x) + len(y) + 1
    for i, rid in enumerate(x):
        assert got[rid] == (1, 300 + i, "interrupted")
    for rid in y:
        assert got[rid] == (1, 500, "upstream")
    assert got[z] == (1, 40, "interrupted")


async def write_batch_once(pg: asyncpg.Connection, row: tuple[object, ...]) -> None:
    from accounting.ledger import prepare, write_batch
    await prepare(pg)
    res = await write_batch(pg, [row])
    assert res.inserted == 1
