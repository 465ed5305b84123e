"""Counting a stream's output as it passes: for its checkpoints, its credit, its bill.

Telecom online charging reserves units, reports use as it happens and grants a final
unit; a stream here does the same with one reservation. Counting every event as it
passes would put a JSON parse and tiktoken on every chunk (about 7 us a chunk, more
than relaying it), which is what the byte path exists to avoid. So the meter
(relay.checkpoints.OutputMeter, the same one a stream's checkpoints read) counts
exactly over a stream's first CALIBRATE_BYTES and extrapolates per event after that.

`OutputCredit` is a native stream's meter with its limit. The cheap bound: an output
token is at least one byte, so until `bytes_out` passes the reserved tokens nothing can
have overrun; the exchange holds the chunks since the last count (never more than
`WINDOW` bytes, so memory is bounded however long the stream) and counts them when it
passes the next check. An upstream that honours the bound it was sent never reaches
the end of its credit (the slack absorbs the extrapolation's error); one that overruns
it is ended with one error event and billed for what it emitted, and settlement never
charges more than the reservation (accounting.settlement). The count is also the
estimate a stream without upstream usage is billed for, and what its checkpoints say.
"""

from __future__ import annotations

from relay.checkpoints import CALIBRATE_BYTES, OutputMeter

WINDOW = 64 * 1024  # at most this many stream bytes are held uncounted
MIN_STEP = 1024

class OutputCredit:
    """A native stream's output meter and the output it reserved (0: no limit)."""

    __slots__ = ("limit", "meter")

    def __init__(self, protocol: str, route: str, limit: int) -> None:
        self.meter = OutputMeter(protocol, route)
        # The reserved output plus slack for the extrapolation's error and tokenizers
        # that count a little differently from ours.
        self.limit = limit + limit // 4 + 64 if limit else 0

    @property
    def counted(self) -> int:
        return self.meter.tokens

    def first_step(self) -> int:
        # Never below MIN_STEP: the first count also hands the stream's first bytes, which
        # hold its response id, to relay.requestids.
        return max(min(self.limit, CALIBRATE_BYTES), MIN_STEP) if self.limit else CALIBRATE_BYTES

    def count(self, chunks: list[bytes], sent: int) -> int:
        """Count the chunks since the last count (`sent`: the stream's bytes so far);
        return the bytes to the next check, or -1 when the stream overran its credit."""
        m = self.meter
        n = m.count_chunks(chunks, sent)
        if not self.limit:
            return WINDOW
        left = self.limit - n
        if left < 0:
            return -1
        if m.calibrated:  # past calibration, counting events: a window at a time
            step = WINDOW
        else:  # counting exactly: no fewer than `left` tokens fit in `left` bytes
            step = min(left, CALIBRATE_BYTES)
        return min(max(step, MIN_STEP), WINDOW)

    def finish(self, chunks: list[bytes], sent: int) -> int:
        """Every output token the stream emitted, by this count (a cut stream's estimate)."""
        return self.meter.finish(chunks, sent)
