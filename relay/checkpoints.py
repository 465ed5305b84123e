"""Checkpoints of streams in flight, so a crash mid-stream still bills what was emitted.

A stream is settled (and its usage row recorded) only when it ends; a worker killed
mid-stream would leave nothing to bill for what its clients already received. So the
gateway keeps one `StreamCheckpoints` per worker: a stream registers when its exchange
starts (`add(key, row_fn)`) and leaves right before it settles (`discard(key)`). One
loop timer, about once a second and only while some stream is registered, calls each
`row_fn` and hands the rows it returns to the ledger (`Ledger.checkpoint`), which
journals them together at the end of that loop iteration. A `row_fn` returns the row the
stream would settle with now (the flat row of accounting.records, usage_source
"interrupted"), or None when it emitted nothing new since its last call. The journal
never flushes a checkpoint while this process lives; whoever adopts the journal after
a crash charges each unsettled stream its last one, once (accounting.journal).

Nothing here runs per chunk or per request beyond a dict insert and delete: the cost is
the timer's, proportional to the streams in flight, once a second. `OutputMeter`
counts what a stream emitted for the rows: exactly over its first bytes, then at that
rate per event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from accounting import tokens
from accounting import usage as usage_mod
from accounting.records import UsageRow
from relay.sse import SSEFramer

log = logging.getLogger("tollway.relay")

RowFn = Callable[[], UsageRow | None]


class CheckpointLedger(Protocol):
    """What this module needs of accounting.ledger.Ledger."""

    def checkpoint(self, row: UsageRow) -> None: ...
    def forget_checkpoint(self, request_id: str) -> None: ...


class StreamCheckpoints:
    """The live streams of one worker and the timer that checkpoints them."""

    __slots__ = ("_entries", "_handle", "_interval", "_ledger", "_loop", "_rids", "failures",
                 "written")

    def __init__(self, ledger: CheckpointLedger, loop: asyncio.AbstractEventLoop,
                 interval: float = 1.0) -> None:
        self._ledger = ledger
        self._loop = loop
        self._interval = interval
        self._entries: dict[Any, RowFn] = {}
        # key -> request id of the last row journaled for it, to forget on discard.
        self._rids: dict[Any, str] = {}
        self._handle: asyncio.TimerHandle | None = None
        self.written = 0  # checkpoints handed to the ledger
        self.failures = 0  # row_fn calls that raised

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: Any, row_fn: RowFn) -> None:
        """Checkpoint this stream from the next tick on (replaces `key`'s earlier entry:
        a retry on another channel starts a new exchange for the same request)."""
        self._entries[key] = row_fn
        if self._handle is None:
            self._handle = self._loop.call_later(self._interval, self._tick)

    def discard(self, key: Any) -> None:
        """The stream is settling now (its row supersedes every checkpoint) or owes
        nothing: stop checkpointing it. Call it before the settled row is recorded."""
        self._entries.pop(key, None)
        rid = self._rids.pop(key, None)
        if rid is not None:
            self._ledger.forget_checkpoint(rid)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        ledger = self._ledger
        for key, row_fn in list(self._entries.items()):
            try:
                row = row_fn()
            except Exception:
                self.failures += 1
                if self.failures == 1:  # once: a bug here must not flood the log
                    log.exception("stream checkpoint failed (further failures are counted)")
                continue
            if row is not None:
                self._rids[key] = row[1]
                ledger.checkpoint(row)
                self.written += 1
        if self._entries:
            self._handle = self._loop.call_later(self._interval, self._tick)


# Output counted exactly over a stream's first bytes, then extrapolated (OutputMeter).
CALIBRATE_BYTES = 16384


class OutputMeter:
    """Output tokens a stream has emitted so far, for its checkpoints.

    Exact over the stream's first CALIBRATE_BYTES bytes sent (its chunks framed, their
    text extracted and counted with tiktoken, each chunk once); from then on, the events
    since at the rate counted per event over those first ones. Counting every chunk of
    a long stream costs about 7 us a chunk (framing, a JSON parse per event, tiktoken),
    more than relaying it; counting event separators is a C scan. Per event rather than
    per byte: a stream's closing events repeat its whole text (Responses' `.done` and
    `response.completed`), and by bytes they would count it again. Settlement still
    counts a cut stream exactly; only a crash is billed from this estimate.

    `chunks` is the exchange's list of stream bytes in the protocol and route given
    (for a translated stream, the upstream's); `sent` is the exchange's `bytes_out`. An
    exchange may replace its list between calls (handing the chunks on, unchanged): the
    meter keeps the old one until then and counts what was added to it too.
    """

    __slots__ = ("_base", "_base_events", "_carry", "_events", "_framer", "_i", "_list",
                 "_protocol", "_route", "tokens")

    def __init__(self, protocol: str, route: str) -> None:
        self._protocol = protocol
        self._route = route
        self._framer = SSEFramer()
        self._list: list[bytes] | None = None
        self._i = 0
        self._events = 0  # events seen
        self._base_events = 0  # events seen when calibration ended (0: still counting)
        self._base = 0
        self._carry = ""  # the last word seen, counted with what follows it
        self.tokens = 0

    def count_chunks(self, chunks: list[bytes], sent: int) -> int:
        old = self._list
        if chunks is old:
            if len(chunks) < self._i:  # emptied in place: what was in it is gone
                self._i = 0
            new = chunks[self._i:]
        else:
            # The exchange replaced its list (it hands the chunks on, as credit checks
            # do): the rest of the old one, then the new one from its start.
            new = (old[self._i:] if old is not None else []) + chunks
            self._list = chunks
        self._i = len(chunks)
        if self._base_events:
            self._events += sum(c.count(b"\n\n") + c.count(b"\r\n\r\n") for c in new)
            events = self._events - self._base_events
            self.tokens = self._base + (events * self._base + self._base_events - 1) // self._base_events
            return self.tokens
        if new:
            framed: list[bytes] = []
            for chunk in new:
                framed.extend(self._framer.feed(chunk))
            if framed:
                self._events += len(framed)
                self._count(usage_mod.text_from_events(self._protocol, self._route, framed))
        if sent >= CALIBRATE_BYTES and self.tokens > 0 and self._events > 0:
            self._base_events, self._base = self._events, self.tokens
        return self.tokens

    def _count(self, text: str) -> None:
        """Count `text`, but keep its last word for the next call: a word cut between two
        calls counted as two pieces would count a token too many each time."""
        text = self._carry + text
        cut = max(text.rfind(" "), text.rfind("\n"))
        if cut <= 0 and len(text) < 256:
            self._carry = text
            return
        if cut <= 0:
            cut = len(text)
        self._carry = text[cut:]
        self.tokens += tokens.count_text(text[:cut])

    @property
    def calibrated(self) -> bool:
        return self._base_events > 0

    def finish(self, chunks: list[bytes], sent: int) -> int:
        """The count at the stream's end: what `count_chunks` gives, plus the last word
        it kept back and an unterminated last event (a cut stream's estimate)."""
        n = self.count_chunks(chunks, sent)
        if self._base_events:
            return n
        tail = self._framer.pending
        text = self._carry
        if tail:
            self._framer = SSEFramer()
            text += usage_mod.text_from_events(self._protocol, self._route, [tail])
        self._carry = ""
        if text:
            self.tokens = n = n + tokens.count_text(text)
        return n
