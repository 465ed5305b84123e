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
BYTES_PER_TOKEN = 200  # the most SSE bytes a streamed token takes, as providers frame them

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
        """Bytes before the first count. A stream sends about 100 to 200 bytes a token
        (the SSE framing around each delta), so one that keeps to its bound is not
        counted while it lives unless it passes WINDOW (memory); one that overruns is
        caught near its limit. The count is one framing of the first CALIBRATE_BYTES
        and a scan for event ends after."""
        if not self.limit:
            return WINDOW
        return min(max(self.limit * BYTES_PER_TOKEN, CALIBRATE_BYTES), WINDOW)

    def count(self, chunks: list[bytes], sent: int) -> int:
        """Count the chunks since the last count (`sent`: the stream's bytes so far);
        return the bytes to the next check, or -1 when the stream overran its credit."""
        m = self.meter
        if not m.calibrated and chunks:
            start = sent - sum(map(len, chunks))
            if start < CALIBRATE_BYTES < sent:
                # Frame only the chunks that reach CALIBRATE_BYTES; the meter counts the
                # rest by their event ends, at the rate it found.
                reach, i = start, 0
                while i < len(chunks) and reach < CALIBRATE_BYTES:
                    reach += len(chunks[i])
                    i += 1
                m.count_chunks(chunks[:i], reach)
                chunks = chunks[i:]
        n = m.count_chunks(chunks, sent)
        if not self.limit:
            return WINDOW
        left = self.limit - n
        if left < 0:
            return -1
        return WINDOW if m.calibrated else min(max(left, MIN_STEP), WINDOW)

    def finish(self, chunks: list[bytes], sent: int) -> int:
        """Every output token the stream emitted, by this count (a cut stream's estimate)."""
        return self.meter.finish(chunks, sent)
