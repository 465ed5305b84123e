"""Per-worker append-only journal of settled usage rows, so a kill -9 loses nothing.

Every row the ledger records is written here as one framed record (magic, length,
CRC-32, orjson payload) with `os.write` on an O_APPEND file descriptor: once the call
returns the bytes are in the OS page cache, so they survive the death of the process.
While a flusher runs, the rows settled in one event-loop iteration are encoded and
written together by one callback at the end of that iteration (`append_deferred`),
which hands the frames back (`on_encoded`): a kill -9 can lose the rows of the iteration it interrupts,
nothing older. Only `fdatasync` is deferred to the flusher's timer
(`journal_fsync_ms`): a power loss or kernel crash can lose at most that window of
rows not yet committed in Postgres; a killed process loses none.

Each worker owns its own files `<name>-<segment>.wal` and holds an exclusive
`flock` on each for as long as it lives; a file nobody holds a lock on belongs to a
dead worker and is replayed (rows are idempotent by (request_id, ts), so replaying
twice is harmless). A segment is deleted once every row in it is committed. A torn
or corrupt record (crash mid-write) is skipped by length/CRC and the reader
resynchronises on the next valid frame.

Checkpoints (a crash mid-stream still bills what was emitted). A stream in flight has
no settled row yet; about once a second the gateway journals a *checkpoint* of it: the
full flat row it would settle with now (`checkpoint`). A checkpoint frame is a row frame
whose payload is `["checkpoint", <row>]`, so it takes no sequence number (`seq`,
`Segment.count` and `read` see rows only) and a reader that does not know it skips it as
"CRC-valid but not ours". The rules, for a request id:
- a later checkpoint supersedes an earlier one; a settled row supersedes every checkpoint
  of its id, wherever it is in the journal;
- a checkpoint is never flushed while its writer lives (only rows are);
- when a dead worker's journal is adopted (`dead_journals`: worker start-up, flusher
  adoption; accounting.ledgerd for the ledger process), each id whose last word is a
  checkpoint (`interrupted`) is charged that checkpoint's row, through the same
  idempotent insert as rows (its request id and admission time are the settled row's,
  so it lands once, and never beside a settled row that reached Postgres).

Segment deletion stays what it was (a segment goes once its rows are committed), which
would lose a live stream's only checkpoint in an old segment. Instead of keeping such
segments, the journal keeps each live stream's latest checkpoint frame in memory (until
`forget_checkpoint`, which the gateway calls before it settles the stream) and writes
them all at the head of every new segment (`_rotate`). So the newest segment, which
nothing deletes while its writer lives, always holds the latest checkpoint of every live
stream, and an older segment's checkpoints are superseded or belong to settled streams.
The cost is one write of the live streams' frames per rotation (a few hundred bytes per
stream, once per 8 MiB of journal); the hot path is untouched.

This module does file I/O only: it never talks to Postgres and never awaits.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from accounting.records import UsageRecord, UsageRow

MAGIC = 0x5754  # b"TW" little-endian: where a frame starts
_HDR = struct.Struct("<HII")  # magic, payload length, crc32(payload)
_HDR_SIZE = _HDR.size
HEADER_SIZE = _HDR_SIZE  # a frame is this header, then its payload
_MAX_PAYLOAD = 1 << 20  # a usage row is ~400 bytes; anything larger is corruption
SUFFIX = ".wal"
_MAGIC_BYTES = struct.pack("<H", MAGIC)
CHECKPOINT = "checkpoint"  # first element of a checkpoint frame's payload
_CHECKPOINT_PREFIX = b'["checkpoint",'


# What orjson raises on a row it cannot encode (a lone surrogate, an int past 64 bits,
# a field of the wrong kind): the row cannot be journaled as it is.
UNENCODABLE = (AttributeError, TypeError, ValueError)


def encode(rec: UsageRecord | UsageRow) -> bytes:
    """One framed record (raises one of UNENCODABLE if orjson cannot encode a field).
    Positional (a flat UsageRow, not a dict): half the bytes, twice the speed."""
    payload = orjson.dumps(rec if isinstance(rec, tuple) else rec.row())
    return _HDR.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def encode_checkpoint(row: UsageRow) -> bytes:
    """One framed checkpoint of a stream in flight (raises one of UNENCODABLE)."""
    payload = orjson.dumps((CHECKPOINT, row))
    return _HDR.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def is_checkpoint(frame: bytes) -> bool:
    """Whether a frame (header included) is a checkpoint rather than a settled row."""
    return frame.startswith(_CHECKPOINT_PREFIX, _HDR_SIZE)


def decode(payload: bytes) -> UsageRecord:
    return UsageRecord.from_row(orjson.loads(payload))


_UNDECODABLE = (ValueError, TypeError, IndexError, KeyError, orjson.JSONDecodeError)


def parse(buf: bytes, *, final: bool = True) -> tuple[list[UsageRecord], int, int]:
    """Decode the settled rows in `buf`: (records, bytes consumed, bytes skipped as
    corrupt). Checkpoints are not rows and are left out (see `parse_all`).

    With `final=False` an incomplete frame at the end is left unconsumed (the caller
    reads more); with `final=True` it is a torn write and counted as skipped.
    """
    frames, pos, skipped = parse_frames(buf, final=final)
    out: list[UsageRecord] = []
    for f in frames:
        if is_checkpoint(f):
            continue
        try:
            out.append(decode(f[_HDR_SIZE:]))
        except _UNDECODABLE:
            pass  # CRC-valid but not ours: skip the frame
    return out, pos, skipped


def parse_all(buf: bytes) -> tuple[list[UsageRecord], list[UsageRecord], int]:
    """The settled rows and the checkpoints in `buf` (a whole segment), each in file
    order, and the bytes skipped as corrupt."""
    frames, _, skipped = parse_frames(buf, final=True)
    rows: list[UsageRecord] = []
    checkpoints: list[UsageRecord] = []
    for f in frames:
        try:
            if is_checkpoint(f):
                _, row = orjson.loads(memoryview(f)[_HDR_SIZE:])
                checkpoints.append(UsageRecord.from_row(row))
            else:
                rows.append(decode(f[_HDR_SIZE:]))
        except _UNDECODABLE:
            pass  # CRC-valid but not ours: skip the frame
    return rows, checkpoints, skipped


def interrupted(rows: Iterable[UsageRecord], checkpoints: Iterable[UsageRecord]) -> list[UsageRecord]:
    """What a dead writer's journal owes for its streams cut by the crash: for each
    request id with a checkpoint and no settled row (in `rows`, the whole journal's),
    its last checkpoint (`checkpoints` in journal order)."""
    settled = {r.request_id for r in rows}
    last: dict[str, UsageRecord] = {}
    for c in checkpoints:
        if c.request_id not in settled:
            last[c.request_id] = c
    return list(last.values())


def parse_frames(buf: bytes, *, final: bool = True) -> tuple[list[bytes], int, int]:
    """The CRC-valid frames in `buf` as they are (header included): (frames, bytes
    consumed, bytes skipped as corrupt); `final` as in `parse`."""
    out: list[bytes] = []
    pos = 0
    skipped = 0
    end = len(buf)
    while pos + _HDR_SIZE <= end:
        magic, length, crc = _HDR.unpack_from(buf, pos)
        start = pos + _HDR_SIZE
        if magic == MAGIC and length <= _MAX_PAYLOAD:
            if start + length > end:
                break  # incomplete: more bytes to come, or a torn tail
            if zlib.crc32(buf[start:start + length]) == crc:
                out.append(buf[pos:start + length])
                pos = start + length
                continue
        # Corrupt frame: resynchronise on the next magic and try again from there.
        nxt = buf.find(_MAGIC_BYTES, pos + 1)
        nxt = end if nxt < 0 else nxt
        skipped += nxt - pos
        pos = nxt
    if final and pos < end:
        skipped += end - pos
        pos = end
    return out, pos, skipped


@dataclass(slots=True)
class Segment:
    no: int
    path: str
    fd: int
    first_seq: int  # journal sequence number of the first row written here
    count: int = 0
    size: int = 0


@dataclass(slots=True, frozen=True)
class Cursor:
    """A read position in this journal's own segments (used to read spilled rows back)."""

    segment: int
    offset: int
    seq: int


def _try_lock(path: str) -> int | None:
    """Open and exclusively lock `path` if no live process holds it; else None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        b = os.pread(fd, 1 << 20, offset)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        offset += len(b)


@dataclass(slots=True)
class DeadSegment:
    """A segment left by a dead worker, locked by us until its rows are committed."""

    path: str
    fd: int
    records: list[UsageRecord]
    skipped_bytes: int
    checkpoints: list[UsageRecord] = field(default_factory=list)
    interrupted: int = 0  # leading `records` that are interrupted streams' checkpoints

    def release(self, *, delete: bool) -> None:
        if self.fd < 0:
            return
        if delete:
            try:
                os.unlink(self.path)  # unlink before unlocking: nobody re-adopts it
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = -1


def _segment_files(directory: str | os.PathLike[str]) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names if n.endswith(SUFFIX)]


def dead_segments(directory: str | os.PathLike[str], exclude: Iterable[str] = ()) -> Iterator[DeadSegment]:
    """Yield, locked and parsed, each segment in `directory` that no live process holds."""
    skip = set(exclude)
    for path in _segment_files(directory):
        if path in skip:
            continue
        fd = _try_lock(path)
        if fd is None:
            continue
        records, checkpoints, skipped = parse_all(_read_fd(fd))
        yield DeadSegment(path, fd, records, skipped, checkpoints)


def journal_of(path: str) -> str:
    """The journal a segment file belongs to (`<journal>-<segment no>.wal`)."""
    return os.path.basename(path).rsplit("-", 1)[0]


def dead_journals(directory: str | os.PathLike[str],
                  exclude: Iterable[str] = ()) -> Iterator[list[DeadSegment]]:
    """Yield, per journal that no live process holds, its segments, locked and parsed,
    in order; the first one's `records` begin with what the journal owes for its
    interrupted streams (`interrupted`), so those are committed before any of its
    segments is deleted. A journal is taken whole or not at all: with part of it held
    by another adopter, a checkpoint could be charged here while its settled row is
    flushed there."""
    by_journal: dict[str, list[str]] = {}
    skip = set(exclude)
    for path in _segment_files(directory):
        if path not in skip:
            by_journal.setdefault(journal_of(path), []).append(path)
    for paths in by_journal.values():
        fds: list[int] = []
        for path in paths:
            fd = _try_lock(path)
            if fd is None:
                break
            fds.append(fd)
        if len(fds) < len(paths):
            for fd in fds:
                os.close(fd)
            continue
        segs = []
        for path, fd in zip(paths, fds, strict=True):
            records, checkpoints, skipped = parse_all(_read_fd(fd))
            segs.append(DeadSegment(path, fd, records, skipped, checkpoints))
        owed = interrupted((r for s in segs for r in s.records),
                           (c for s in segs for c in s.checkpoints))
        segs[0].records[:0] = owed
        segs[0].interrupted = len(owed)
        yield segs


def replay(directory: str | os.PathLike[str]) -> list[UsageRecord]:
    """Every row in segments left by dead workers (read only: nothing is deleted).

    The flusher adopts and deletes these itself on start; this is for inspection and
    tests. Safe to call any number of times.
    """
    out: list[UsageRecord] = []
    for seg in dead_segments(directory):
        out.extend(seg.records)
        seg.release(delete=False)
    return out


class Journal:
    """This worker's journal: `append` on the hot path, the rest from the flusher.

    Two ways to append. `append()` writes the frame at once. `append_deferred()` adds the
    row to a buffer that a callback the event loop runs once per iteration (see
    `defer()`) encodes and writes with one `os.write`: the hot-path call is a list
    append, and a burst of rows settled in one iteration costs one syscall. The price is a window: a kill -9 of the worker loses the rows
    settled in the current loop iteration, before its end (microseconds to a
    millisecond), whose clients may already have had their last byte. The ledger uses
    deferred appends only while a flusher runs; during a spill (rows that live only in
    the journal) it appends at once.
    """

    __slots__ = (
        "_buf", "_checkpoints", "_current", "_dirty", "_live", "_name", "_next_no",
        "_schedule", "_segment_bytes", "_segments", "checkpoint_errors", "directory",
        "on_encoded", "on_unwritten", "seq", "write_errors",
    )

    def __init__(
        self,
        directory: str | os.PathLike[str],
        name: str | None = None,
        segment_bytes: int = 8 << 20,
    ) -> None:
        self.directory = str(directory)
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        # pid alone could be reused by a later worker; the start time makes it unique.
        self._name = name or f"w{os.getpid()}-{time.time_ns() // 1_000_000:x}"
        self._segment_bytes = segment_bytes
        self._segments: list[Segment] = []
        self._next_no = 0
        self._dirty = False
        self._buf: list[UsageRecord | UsageRow] = []  # rows for the write at the end of the iteration
        # Called by write_buffered with the first buffered row's seq and each row's
        # frame (None: not encodable), so the caller can keep the bytes (Ledger does).
        self.on_encoded: Callable[[int, list[bytes | None]], None] | None = None
        # Called by write_buffered with the rows that are not on disk (not encodable, or
        # the write failed), for a caller that keeps no other copy (Ledger(keep=False)).
        self.on_unwritten: Callable[[list[UsageRecord | UsageRow]], None] | None = None
        self._schedule: Callable[[Callable[[], None]], object] | None = None
        self.seq = 0  # rows appended so far (written, or buffered to be written)
        self.write_errors = 0
        # Checkpoints (see the module docstring): each live stream's latest frame, written
        # again at the head of every new segment, and the frames to write at the end of
        # this loop iteration.
        self._live: dict[str, bytes] = {}
        self._checkpoints: list[bytes] = []
        self.checkpoint_errors = 0
        self._current = self._open_segment()

    @property
    def name(self) -> str:
        return self._name

    # --- hot path ------------------------------------------------------------------

    def append(self, rec: UsageRecord | UsageRow) -> bool:
        """Write one row now (page cache); False if it could not be written in full."""
        return self.append_frame(encode(rec))

    def append_frame(self, data: bytes) -> bool:
        """Write one framed row (`encode()`) now; False if it could not be written in full."""
        if self._buf:
            self.write_buffered()  # keep the file in append order
        seg = self._current
        if seg.size >= self._segment_bytes:
            seg = self._rotate()
        try:
            n = os.write(seg.fd, data)
        except OSError:
            n = -1
        if n != len(data):
            # Disk full or similar: cut the partial frame so the file stays parseable.
            self.write_errors += 1
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                pass
            return False
        seg.size += n
        seg.count += 1
        self.seq += 1
        self._dirty = True
        return True

    def append_deferred(self, rec: UsageRecord | UsageRow) -> None:
        """Take one row for the write at the end of this loop iteration (encoded then
        too, in one tight loop, so this call costs a list append).

        The row takes its sequence number now. If the later write fails, or the row
        cannot be encoded, it keeps its place in the sequence without bytes on disk
        (counted in `write_errors`): the caller must hold such rows in memory until
        they are committed. The caller must not change `rec` afterwards.
        """
        buf = self._buf
        if not buf:
            if self._schedule is None:
                raise RuntimeError("append_deferred without defer()")
            self._schedule(self.write_buffered)
        buf.append(rec)
        self.seq += 1

    def defer(self, schedule: Callable[[Callable[[], None]], object] | None) -> None:
        """Enable deferred appends with `schedule` (e.g. `loop.call_soon`), or disable them
        (None: the buffer is written now)."""
        if schedule is None:
            self.write_buffered()
        self._schedule = schedule

    def write_buffered(self) -> None:
        """Write the deferred rows with one `os.write`, then the checkpoints taken in this
        iteration with another; idempotent when there are none."""
        buf = self._buf
        if not buf:
            if self._checkpoints:
                self._write_checkpoints()
            return
        frames: list[bytes | None] = []
        for rec in buf:
            try:
                frames.append(encode(rec))
            except UNENCODABLE:
                frames.append(None)
        rows = len(buf)
        first = self.seq - rows
        self._buf = []  # `buf` is kept for on_unwritten
        unencoded = frames.count(None)
        data = b"".join([f for f in frames if f is not None] if unencoded else frames)  # type: ignore[arg-type]
        self.write_errors += unencoded
        seg = self._current
        if seg.size >= self._segment_bytes:
            seg = self._rotate(first_seq=first)
        try:
            n = os.write(seg.fd, data)
        except OSError:
            n = -1
        seg.count += rows
        if n != len(data):
            self.write_errors += rows - unencoded
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                pass
            if self.on_unwritten is not None:
                self.on_unwritten(buf)
        else:
            seg.size += n
            self._dirty = True
            if unencoded and self.on_unwritten is not None:
                self.on_unwritten([r for r, f in zip(buf, frames, strict=True) if f is None])
        if self.on_encoded is not None:
            self.on_encoded(first, frames)
        if self._checkpoints:
            self._write_checkpoints()

    # --- checkpoints (about once a second, off the per-row path) ------------------------

    def checkpoint(self, request_id: str, frame: bytes) -> None:
        """Journal a stream's checkpoint (`encode_checkpoint`): with deferred writes at
        the end of this loop iteration, with the iteration's other checkpoints in one
        `os.write`; otherwise now. It supersedes the id's earlier checkpoint and is
        written again at the head of each new segment until `forget_checkpoint`."""
        self._live[request_id] = frame
        if self._schedule is None:
            self._checkpoints.append(frame)
            self._write_checkpoints()
            return
        if not self._checkpoints and not self._buf:
            self._schedule(self.write_buffered)
        self._checkpoints.append(frame)

    def forget_checkpoint(self, request_id: str) -> None:
        """The stream is over (its settled row follows, or nothing is owed): its
        checkpoint is no longer carried into new segments."""
        self._live.pop(request_id, None)

    @property
    def live_checkpoints(self) -> int:
        return len(self._live)

    def _write_checkpoints(self) -> None:
        frames, self._checkpoints = self._checkpoints, []
        if self._current.size >= self._segment_bytes:
            self._rotate()  # writes every live stream's latest checkpoint, these included
            return
        self._write_frames(self._current, b"".join(frames))

    def _write_frames(self, seg: Segment, data: bytes) -> None:
        """Write checkpoint frames (no sequence numbers) at the end of `seg`. Best effort:
        a failed write is cut off and counted; the stream's next checkpoint, or its
        settled row, comes along anyway."""
        try:
            n = os.write(seg.fd, data)
        except OSError:
            n = -1
        if n != len(data):
            self.checkpoint_errors += 1
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                pass
            return
        seg.size += n
        self._dirty = True

    # --- flusher side -----------------------------------------------------------------

    def _open_segment(self, first_seq: int | None = None) -> Segment:
        # Never an existing file: one left by a dead worker of the same name (a restarted
        # worker N) holds rows still to be replayed, and must stay unlocked and apart.
        while True:
            no = self._next_no
            self._next_no += 1
            path = os.path.join(self.directory, f"{self._name}-{no:06d}{SUFFIX}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                             0o600)
            except FileExistsError:
                continue
            break
        # Blocking: nobody else can hold a file created just now but a ledger process's
        # liveness probe (accounting.ledgerd), which lets go at once.
        fcntl.flock(fd, fcntl.LOCK_EX)
        seg = Segment(no=no, path=path, fd=fd,
                      first_seq=self.seq - len(self._buf) if first_seq is None else first_seq)
        self._segments.append(seg)
        return seg

    def _rotate(self, first_seq: int | None = None) -> Segment:
        self._current = self._open_segment(first_seq)
        if self._live:
            # The newest segment holds every live stream's latest checkpoint, so older
            # segments can go once their rows are committed (module docstring).
            self._checkpoints = []
            self._write_frames(self._current, b"".join(self._live.values()))
        # Segments a ledger process deleted (accounting.ledgerd) leave only our fd.
        gone = [seg for seg in self._segments[:-1] if _unlinked(seg.fd)]
        for seg in gone:
            self._segments.remove(seg)
            os.close(seg.fd)
        return self._current

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self._segments]

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def tail(self) -> Cursor:
        """The position the next appended row will get."""
        self.write_buffered()
        seg = self._current
        return Cursor(seg.no, seg.size, self.seq)

    def committed(self, upto_seq: int) -> int:
        """Rows with seq < upto_seq are in Postgres: delete segments wholly below it."""
        return self._delete(lambda seg: seg.first_seq + seg.count <= upto_seq)

    def committed_through(self, segment: int, offset: int) -> int:
        """A ledger process committed every row of this journal before byte `offset` of
        segment number `segment` (and of every segment before it): delete what is wholly
        committed, as `committed` does."""
        return self._delete(lambda seg: seg.no < segment or (seg.no == segment and offset >= seg.size))

    def _delete(self, done: Callable[[Segment], bool]) -> int:
        """Delete the segments whose rows are all committed (`done`); return how many."""
        deleted = 0
        keep = []
        cur = self._current
        for seg in self._segments:
            if seg is not cur and done(seg):
                _drop(seg.path, seg.fd)
                deleted += 1
            else:
                keep.append(seg)
        self._segments = keep
        # A fully committed current segment past a quarter of its size is recycled
        # now rather than waiting for it to fill: keeps the directory small.
        if cur.count and done(cur) and cur.size >= self._segment_bytes // 4:
            self._rotate()
            self._segments.remove(cur)
            _drop(cur.path, cur.fd)
            deleted += 1
        return deleted

    def read(self, cursor: Cursor, max_rows: int) -> tuple[list[UsageRecord], Cursor]:
        """Rows from `cursor` on (at most `max_rows`), and the cursor after them."""
        out: list[UsageRecord] = []
        segs = {s.no: s for s in self._segments}
        no, offset, seq = cursor.segment, cursor.offset, cursor.seq
        while len(out) < max_rows:
            seg = segs.get(no)
            if seg is None:
                # Its rows were all committed and it is gone: go on with the next one.
                later = [n for n in segs if n > no]
                if not later:
                    break
                no, offset = min(later), 0
                continue
            if offset >= seg.size:
                if seg is self._current:
                    break
                no, offset = no + 1, 0
                continue
            want = min(seg.size - offset, 1 << 20)
            buf = os.pread(seg.fd, want, offset)
            recs, used, _ = parse(buf, final=False)
            if not recs and used == 0:
                break  # should not happen for our own writes; stop rather than spin
            room = max_rows - len(out)
            if len(recs) > room:
                # Re-parse to find where the room-th record ends.
                recs = recs[:room]
                used = _frame_end(buf, room)
            out.extend(recs)
            offset += used
            seq += len(recs)
        return out, Cursor(no, offset, seq)

    def fsync(self) -> None:
        """fdatasync every segment written since the last call (run it off the loop;
        call `write_buffered` on the loop first)."""
        if not self._dirty:
            return
        self._dirty = False
        for seg in list(self._segments):
            try:
                os.fdatasync(seg.fd)
            except OSError:
                pass  # closed by a concurrent delete: nothing left to make durable

    def close(self, *, delete: bool = False) -> None:
        """Release every segment; keep the files (for replay) unless `delete`."""
        self.write_buffered()
        self._schedule = None
        for seg in self._segments:
            if delete:
                _drop(seg.path, seg.fd)
            else:
                try:
                    os.fdatasync(seg.fd)
                except OSError:
                    pass
                os.close(seg.fd)
        self._segments = []


def _frame_end(buf: bytes, n: int) -> int:
    """Byte offset just past the n-th row frame in `buf` (our own, well-formed writes;
    checkpoint frames are not rows)."""
    pos = 0
    while n:
        _, length, _ = _HDR.unpack_from(buf, pos)
        if not buf.startswith(_CHECKPOINT_PREFIX, pos + _HDR_SIZE):
            n -= 1
        pos += _HDR_SIZE + length
    return pos


def _unlinked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


def _drop(path: str, fd: int) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)
