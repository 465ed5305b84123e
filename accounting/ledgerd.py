"""The ledger process: one per host, it flushes every worker's journal to Postgres.

With `[ledger] process = true` a worker runs `Ledger(keep=False)`: a settled row costs
it the row's encoding and a share of one `os.write` per loop iteration, and nothing
else (bench/RESULTS.md, "Ledger", round 7: the flusher, the rows held in memory and the
frames swapped into them cost the worker more than the journal write itself). This
process tails the workers' journal segments, flushes them with the same `Flusher`
(COPY, aggregated deltas, idempotent by request id) and tells each worker, over a unix
socket, what it committed:

- `{"t": "b"}` before a batch's transactions begin, and
- `{"t": "d", "s": segment, "o": offset, "at": unix time, "u": {...}, "k": {...},
  "p": {...}}` after they committed: the rows before byte `o` of segment `s` are in
  Postgres, and these are their per-user, per-key and per-subscription sums.

The worker's limiter moves those sums out of "unflushed" (what `on_flushed` does for an
in-process flusher), it skips a budget snapshot that straddles a "b" and its "d", and it
deletes the segments (so does this process, for a worker that is not listening).

Checkpoints of streams in flight (accounting.journal, "Checkpoints") are skipped while
their worker lives. Once a dead worker's journal has been read to its end, the last
checkpoint of each request id with no settled row in what is left of the journal is
charged like a row of it (checked against usage_log first, so once), before any of its
segments is deleted. Segments this process deleted earlier hold nothing owed: their rows
are committed, and every live stream's latest checkpoint is in the worker's newest
segment.

Liveness: a worker holds `flock` on its segments. A journal whose newest segment could
be locked on two scans in a row belongs to a dead worker (a worker creating a segment
waits for a probe's lock, see Journal._open_segment, and holds it microseconds later): it
is adopted (every segment locked), read to its end, flushed and deleted. On start,
every row already in a segment is treated as possibly logged (write_batch's existing-row
check), so a restart of this process, like a replay, charges nothing twice.

This module never runs in a worker except `LedgerLink`, the worker's end of the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from accounting.journal import (
    HEADER_SIZE,
    SUFFIX,
    _read_fd,
    interrupted,
    is_checkpoint,
    parse_all,
    parse_frames,
)
from accounting.ledger import _TS_MAX, _TS_MIN, MAX_STATS, Flusher, Ledger, LedgerSettings
from accounting.records import UsageRecord

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^(?P<journal>.+)-(?P<no>\d{6})" + re.escape(SUFFIX) + "$")
_READ = 4 << 20  # bytes per read of a segment


def socket_address(journal_dir: str) -> str:
    """The ledger process's socket: abstract (no file, no path-length limit), one per
    journal directory."""
    digest = hashlib.sha1(os.path.realpath(journal_dir).encode()).hexdigest()[:20]
    return f"\0tollway-ledger-{digest}"


@dataclass(slots=True)
class _Segment:
    no: int
    path: str
    fd: int  # read-only, or the adopted lock of a dead worker's segment
    old_until: int  # bytes below this were there when this process started
    offset: int = 0
    locked: bool = False


_START = HEADER_SIZE + 4  # after `[1,"`: where the request id starts
_PREFIX = b'[1,"'


def _plain(f: bytes) -> bool:
    """`_csv_ready` read off the frame's bytes, without decoding it (which was a third
    of this process's CPU): no backslash, so the id ends at the first quote; a
    non-empty id without a comma; a time written as a float, in range."""
    if not f.startswith(_PREFIX, HEADER_SIZE) or f.find(b"\\", HEADER_SIZE) >= 0:
        return False
    q = f.find(b'"', _START)
    if q <= _START or f.find(b",", _START, q) >= 0:
        return False
    c = f.find(b",", q + 2)
    ts = f[q + 2:c]
    if c < 0 or f[q + 1] != 0x2C or not (b"." in ts or b"e" in ts):
        return False
    try:
        return _TS_MIN <= float(ts) <= _TS_MAX
    except ValueError:
        return False


class _TailLedger(Ledger):
    """A Ledger without a journal whose commits the tail maps back to file positions."""

    __slots__ = ("tail",)
    tail: Tail

    def committed(self, n: int) -> None:
        super().committed(n)
        self.tail.on_committed(self.head_seq)


class Tail:
    """One worker's journal: its segments, read in order, and the flusher for them."""

    def __init__(self, daemon: LedgerDaemon, name: str) -> None:
        self.daemon = daemon
        self.name = name
        self.segments: dict[int, _Segment] = {}
        s = daemon.settings
        self.ledger = _TailLedger(None, max_pending_rows=s.max_pending_rows,
                                  flush_rows=s.flush_rows)
        self.ledger.tail = self
        self.flusher = Flusher.from_settings(self.ledger, daemon.dsn, s, self._flushed)
        self.flusher.on_plans_flushed = self._plans_flushed
        self.flusher.on_flush_start = self._begin
        self.flusher.adopt_dead = False
        self.flusher.deadletter_path = os.path.join(daemon.directory, f"deadletter-{name}.jsonl")
        # (rows read so far after this chunk, segment, offset after it)
        self.positions: deque[tuple[int, int, int]] = deque()
        self.read_seq = 0
        self.users: dict[int, int] = {}
        self.keys: dict[int, int] = {}
        self.plans: dict[int, int] = {}
        self.committed_at = 0.0
        self.probes = 0  # consecutive scans that could lock the newest segment
        self.dead = False
        self.writer: asyncio.StreamWriter | None = None
        self.position: tuple[int, int] | None = None  # last committed (segment, offset)
        self.skipped_frames = 0
        # A dead worker's interrupted streams have been read and queued (see the module
        # docstring); its segments are deleted only after.
        self.owed_queued = False

    # --- reading -------------------------------------------------------------------

    def scan(self, files: dict[int, str], first: bool) -> None:
        for no, path in files.items():
            if no not in self.segments:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                self.segments[no] = _Segment(no, path, fd, os.fstat(fd).st_size if first else 0)
        for no in [n for n in self.segments if n not in files]:
            # Deleted by its worker (committed, see LedgerLink) or by us.
            self._close(self.segments.pop(no))
        if not self.segments:
            return
        if not self.dead:
            self._probe(max(self.segments))
        ledger = self.ledger
        room = ledger._max - len(ledger.pending)
        newest = max(self.segments)
        for no in sorted(self.segments):
            seg = self.segments[no]
            complete = self.dead or no < newest
            size = os.fstat(seg.fd).st_size
            while seg.offset < size and room > 0:
                buf = os.pread(seg.fd, min(size - seg.offset, _READ), seg.offset)
                if not buf:
                    break
                final = complete and seg.offset + len(buf) >= size
                frames, used, skipped = parse_frames(buf, final=final)
                if used == 0:
                    break
                old = seg.offset < seg.old_until
                n = self._take(frames)
                seg.offset += used
                self.read_seq += n
                if n:
                    self.positions.append((self.read_seq, no, seg.offset))
                if old:
                    # Maybe logged by this process's previous life: checked before insert.
                    self.flusher._tried_seq = max(self.flusher._tried_seq, self.read_seq)
                if skipped:
                    log.warning("ledger: %d corrupt bytes skipped in %s", skipped, seg.path)
                room -= n
            if seg.offset < size or not complete:
                break  # in order: nothing from a later segment before this one is read
        if self.dead and not self.owed_queued and all(
                seg.offset >= os.fstat(seg.fd).st_size for seg in self.segments.values()):
            self._queue_owed()
        if len(ledger.pending) >= ledger._flush_rows:
            self.flusher._wake.set()
        if self.dead:
            self._delete_committed()

    def _queue_owed(self) -> None:
        """The dead worker's journal is read to its end: queue, after its rows, the last
        checkpoint of each stream it never settled, to be checked against usage_log
        (the write path for rows that may be logged) and charged once."""
        self.owed_queued = True
        rows, checkpoints = [], []
        for no in sorted(self.segments):
            r, c, _ = parse_all(_read_fd(self.segments[no].fd))
            rows += r
            checkpoints += c
        owed = interrupted(rows, checkpoints)
        if not owed:
            return
        self.ledger.pending.extend(owed)
        self.read_seq += len(owed)
        newest = self.segments[max(self.segments)]
        self.positions.append((self.read_seq, newest.no, newest.offset))
        self.flusher._tried_seq = max(self.flusher._tried_seq, self.read_seq)
        self.flusher.interrupted_rows += len(owed)
        self.flusher._wake.set()
        log.info("ledger: journal %s owes %d interrupted streams their last checkpoint",
                 self.name, len(owed))

    def _take(self, frames: list[bytes]) -> int:
        pending = self.ledger.pending
        n0 = len(pending)
        for f in frames:
            if _plain(f):
                pending.append(f)
                continue
            if is_checkpoint(f):
                continue  # never flushed while its worker lives; see _queue_owed
            try:
                # Not CSV-ready (_plain agrees with ledger._csv_ready): typed.
                row = UsageRecord.from_row(orjson.loads(memoryview(f)[HEADER_SIZE:]))
            except (ValueError, TypeError, IndexError, KeyError):
                self.skipped_frames += 1  # CRC-valid but not a usage row of ours
                continue
            pending.append(row)
        return len(pending) - n0

    def _probe(self, no: int) -> None:
        """Count scans on which the newest segment's lock was free; adopt at two (or at
        one while stopping: no worker is left to create a segment)."""
        seg = self.segments[no]
        try:
            fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.probes = 0
            os.close(fd)
            return
        os.close(fd)  # releases the probe's lock at once
        self.probes += 1
        if self.probes >= (1 if self.daemon.stopping else 2):
            self._adopt()

    def _adopt(self) -> None:
        locked: list[tuple[_Segment, int]] = []
        for seg in self.segments.values():
            try:
                fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (FileNotFoundError, BlockingIOError):
                # Held after all (a worker's own flusher replaying it): not ours.
                for _seg, f in locked:
                    os.close(f)
                self.probes = 0
                return
            locked.append((seg, fd))
        for seg, fd in locked:
            os.close(seg.fd)
            seg.fd, seg.locked = fd, True
        self.dead = True
        log.info("ledger: journal %s belongs to a dead worker; adopted", self.name)

    # --- commits -------------------------------------------------------------------

    def _begin(self) -> None:
        self._send(b'{"t":"b"}\n')

    def _flushed(self, users: dict[int, int], keys: dict[int, int]) -> None:
        for i, d in users.items():
            self.users[i] = self.users.get(i, 0) + d
        for i, d in keys.items():
            self.keys[i] = self.keys.get(i, 0) + d
        self.committed_at = time.time()

    def _plans_flushed(self, plans: dict[int, int]) -> None:
        for i, d in plans.items():
            self.plans[i] = self.plans.get(i, 0) + d
        self.committed_at = time.time()

    def on_committed(self, head_seq: int) -> None:
        last = None
        while self.positions and self.positions[0][0] <= head_seq:
            last = self.positions.popleft()
        if last is None:
            return
        _, no, offset = last
        self.position = (no, offset)
        self.report()
        self._delete_committed()

    def _delete_committed(self) -> None:
        """Delete the segments whose rows are all in Postgres: those before the last
        committed position's, and, once the worker is dead, every segment read to its
        end when nothing read is still waiting."""
        if self.dead and self.owed_queued and not self.positions and not self.ledger.pending:
            done = [n for n, seg in self.segments.items()
                    if seg.offset >= os.fstat(seg.fd).st_size]
        elif self.position is not None:
            done = [n for n in self.segments if n < self.position[0]]
        else:
            return
        for n in done:
            seg = self.segments.pop(n)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)  # before unlocking: nobody re-adopts it
            self._close(seg)

    def report(self) -> None:
        """Send what was committed since the last report. With no worker listening (not
        connected yet, reconnecting) the sums add up until one is: none is lost."""
        if self.position is None or not self._send(orjson.dumps(
                {"t": "d", "s": self.position[0], "o": self.position[1],
                 "at": self.committed_at or time.time(),
                 "u": self.users, "k": self.keys, "p": self.plans},
                option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)):
            return
        self.users, self.keys, self.plans = {}, {}, {}

    def _send(self, data: bytes) -> bool:
        w = self.writer
        if w is None:
            return False
        if w.is_closing():
            self.writer = None
            return False
        w.write(data)
        return True

    @staticmethod
    def _close(seg: _Segment) -> None:
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    @property
    def finished(self) -> bool:
        """A dead worker's journal wholly in Postgres (its files deleted)."""
        return self.dead and not self.segments and not self.ledger.pending

    def close(self) -> None:
        for seg in self.segments.values():
            self._close(seg)
        self.segments = {}


class LedgerDaemon:
    """Scans the journal directory every flush interval and runs a Tail per journal."""

    def __init__(self, directory: str, dsn: str, settings: LedgerSettings) -> None:
        self.directory = directory
        self.dsn = dsn
        self.settings = settings
        self.tails: dict[str, Tail] = {}
        self.stopping = False
        self._retired: dict[str, float] = {}  # counters of the tails that are gone
        self._first = True
        self._server: asyncio.AbstractServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take the directory's socket, then tail its journals. While another ledger
        process holds the socket (one left draining by a supervisor that died, see
        relay.server), wait for it to go rather than flush beside it."""
        os.makedirs(self.directory, exist_ok=True)
        waited = False
        while True:
            try:
                self._server = await asyncio.start_unix_server(
                    self._client, path=socket_address(self.directory))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if not waited:
                    log.warning("ledger: another ledger process serves %s; waiting for it"
                                " to exit", self.directory)
                    waited = True
                await asyncio.sleep(0.2)
        if waited:
            log.warning("ledger: the other ledger process has exited; taking over %s",
                        self.directory)
        self.scan()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-scan")

    def _tail(self, name: str) -> Tail:
        tail = self.tails.get(name)
        if tail is None:
            tail = self.tails[name] = Tail(self, name)
            tail.flusher.start()
        return tail

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = orjson.loads(await reader.readline())
            name = str(hello["journal"])
        except (ValueError, TypeError, KeyError, ConnectionError):
            writer.close()
            return
        tail = self._tail(name)
        tail.writer = writer
        tail.report()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # the worker sends nothing more; EOF when it goes
        writer.close()

    def scan(self) -> None:
        by_journal: dict[str, dict[int, str]] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            names = []
        for fn in names:
            m = _SEGMENT.match(fn)
            if m:
                by_journal.setdefault(m["journal"], {})[int(m["no"])] = (
                    os.path.join(self.directory, fn))
        for name, files in by_journal.items():
            self._tail(name).scan(files, self._first)
        for name, tail in self.tails.items():
            if name not in by_journal:
                tail.scan({}, self._first)
        self._first = False

    async def _run(self) -> None:
        interval = max(self.settings.flush_interval_ms, 1) / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                self.scan()
            except OSError as exc:  # a full or vanished directory: try again next tick
                log.warning("ledger: journal scan failed: %s", exc)
            for name in [n for n, t in self.tails.items() if t.finished]:
                tail = self.tails.pop(name)
                for k, v in tail.flusher.stats().items():
                    if k.endswith("_total"):  # counters never go back when a tail goes
                        self._retired[k] = self._retired.get(k, 0) + v
                self._retired["skipped_frames_total"] = (
                    self._retired.get("skipped_frames_total", 0) + tail.skipped_frames)
                await tail.flusher.stop(timeout=5)
                tail.close()

    def journals_left(self) -> bool:
        """Whether any journal segment is in the directory."""
        try:
            return any(_SEGMENT.match(fn) for fn in os.listdir(self.directory))
        except FileNotFoundError:
            return False

    async def stop(self, timeout: float = 30.0) -> bool:  # noqa: ASYNC109
        """Flush every journal left (the workers have exited), then stop. False if rows
        were left (Postgres away): they stay in the journals for the next start."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.scan()
            if all(t.dead and not t.ledger.pending and not t.segments for t in self.tails.values()):
                break
            for t in self.tails.values():
                if t.ledger.pending:
                    t.flusher._wake.set()
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        ok = True
        for tail in self.tails.values():
            left = max(0.0, deadline - time.monotonic())
            ok = await tail.flusher.stop(timeout=left) and ok and not tail.segments
            tail.close()
        return ok

    def stats(self) -> dict[str, float]:
        """The flushers' stats summed (Flusher.stats), with the journals' bytes on disk;
        the slowest of their last batches, as `last_flush_seconds`."""
        out: dict[str, float] = dict(self._retired)
        for t in self.tails.values():
            for k, v in t.flusher.stats().items():
                out[k] = max(out.get(k, 0), v) if k in MAX_STATS else out.get(k, 0) + v
            size = 0
            for seg in t.segments.values():
                with contextlib.suppress(OSError):
                    size += os.fstat(seg.fd).st_size
            out["journal_bytes"] = out.get("journal_bytes", 0) + size
            out["skipped_frames_total"] = out.get("skipped_frames_total", 0) + t.skipped_frames
        return out


class LedgerLink:
    """A worker's end of the ledger process's socket (see the module docstring).

    Synchronous on purpose: `drain()` reads whatever has arrived without awaiting, so a
    budget snapshot can check, right after its query returns, whether a batch began
    meanwhile (the ledger process sends "b" before its transactions begin, so any
    commit a snapshot can see was announced before the snapshot's reply arrived).
    """

    def __init__(self, directory: str, journal: str,
                 on_begin: Callable[[], None], on_done: Callable[[dict[str, Any]], None]) -> None:
        self._address = socket_address(directory)
        self._journal = journal
        self._on_begin = on_begin
        self._on_done = on_done
        self._sock: socket.socket | None = None
        self._buf = b""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> bool:
        if self._sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)
            sock.connect(self._address)
            sock.sendall(orjson.dumps({"journal": self._journal}) + b"\n")
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self._sock = sock
        self._buf = b""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self.drain)
        return True

    def drain(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.close()
                break
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                try:
                    msg = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if msg.get("t") == "b":
                    self._on_begin()
                elif msg.get("t") == "d":
                    self._on_done(msg)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
