"""The local journal: framing, torn and corrupt records, segments, and replay after a
real kill -9 of a worker process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import textwrap
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
    assert len(t) == 30
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
