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
the end of its credit (the slack absorbs the extrapolation's error), and nothing below
runs for it. The count is also the estimate a stream without upstream usage is billed
for, and what its checkpoints say.

One that overruns it reaches the end of its credit, and is then EXTENDED while the
key cap and the balance or plan allow it (`extend`), as online charging grants
further units: a grant of max(reserved output, EXTEND_MIN_TOKENS) tokens plus what was
emitted past the reservation, priced at the request's output price (its long-context tier's, when the
price has one) x the group's multiplier and rounded up
(accounting.pricing.estimate_max_cost, as admission prices it), reserved with `Lease.extend` (synchronous: the stream never waits on anything).
A grant the scopes cannot cover is halved, down to EXTEND_MIN_TOKENS. Once extended,
the next grant is asked for a quarter of a grant before the reservation runs out (and
the checks come closer there, at the rate the stream has shown), so the reservation
stays ahead of the output and a stream that completes is billed exactly its upstream's
report. At most MAX_EXTENSIONS grants per stream: a runaway upstream cannot hold a
stream (or a balance) forever. When no grant fits (or none is left) the stream is
ended at its reservation with one error event in the client's protocol and billed for
what it emitted; settlement never charges more than the reservation, extensions
included (accounting.settlement), so no scope goes below zero.

Translated streams (relay.translated) have no credit: they are not cut nor extended,
and settlement caps them at the admission's reservation.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

from accounting.pricing import estimate_max_cost
from relay.checkpoints import CALIBRATE_BYTES, OutputMeter

if TYPE_CHECKING:
    from relay.seams import Lease

WINDOW = 64 * 1024  # at most this many stream bytes are held uncounted
MIN_STEP = 1024
BYTES_PER_TOKEN = 200  # the most SSE bytes a streamed token takes, as providers frame them
# A grant is the reserved output again, at least this many tokens (a stream asked for 1
# token must not come back for more every few events).
EXTEND_MIN_TOKENS = 256
# Grants per stream. With the reserved output R, a stream emits at most about
# R + R/4 + 64 + MAX_EXTENSIONS x max(R, EXTEND_MIN_TOKENS) tokens: 9 x R for a large R.
MAX_EXTENSIONS = 8


class OutputCredit:
    """A native stream's output meter and the output it reserved (0: no limit)."""

    __slots__ = ("_meter", "_protocol", "_route", "base", "cut", "extensions", "limit",
                 "reserved", "terms")
    # Set by the first grant (`extend`): the output the lease covers now, and the count
    # past which, with no further grant, the stream ends.
    reserved: int
    cut: int

    def __init__(self, protocol: str, route: str, limit: int,
                 terms: tuple[Lease, Any, Fraction] | None = None) -> None:
        # The meter is made at the first count: most streams end before one.
        self._meter: OutputMeter | None = None
        self._protocol = protocol
        self._route = route
        # The reserved output plus slack for the extrapolation's error and tokenizers
        # that count a little differently from ours.
        self.limit = limit + limit // 4 + 64 if limit else 0
        # What an extension needs, read only when the credit runs out: the request's
        # lease, price and multiplier (None: never extended). Not the request's record
        # (relay.call.ModelCall), which holds the exchange that holds this credit: that
        # cycle left every stream to the cyclic garbage collector.
        self.terms = terms
        self.base = limit  # the output admission reserved, in tokens
        self.extensions = 0

    @property
    def meter(self) -> OutputMeter:
        m = self._meter
        if m is None:
            m = self._meter = OutputMeter(self._protocol, self._route)
        return m

    @property
    def counted(self) -> int:
        return self._meter.tokens if self._meter is not None else 0

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
        return the bytes to the next check, or -1 when the stream reached the end of
        its credit (then `extend`, or end it)."""
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
        if not m.calibrated:
            return min(max(left, MIN_STEP), WINDOW)
        if not self.extensions:
            return WINDOW
        return self._step(left, n, sent)

    @staticmethod
    def _step(left: int, n: int, sent: int) -> int:
        """Bytes to the next check of an extended (calibrated) stream: half the way to
        its limit at the bytes per token it has shown, so the grant stays ahead."""
        return min(max(left * sent // (2 * n), MIN_STEP), WINDOW) if n else MIN_STEP

    def extend(self, sent: int) -> int:
        """The stream reached the end of its credit: reserve a further grant. Returns the
        bytes to the next check, or -1: end the stream now (nothing was reserved).

        Runs only on that branch (never per chunk): at most MAX_EXTENSIONS successful
        grants, each one to a few `Lease.extend` calls (halving a grant that did not
        fit). A refused stream still covered by its reservation runs to it first (a
        grant may fit by then, once another request has settled)."""
        terms = self.terms
        n = self.meter.tokens
        if self.extensions:
            reserved, cut = self.reserved, self.cut
        else:
            reserved, cut = self.base, self.limit
        if terms is not None and self.extensions < MAX_EXTENSIONS:
            lease, price, multiplier = terms
            if price is not None and price.long_context is not None:
                # Whether this request is in the long-context tier is known only from
                # its usage: reserve at the tier's output price (never below the base).
                price = price.long_context
            grant = max(self.base, EXTEND_MIN_TOKENS)
            covered = reserved if reserved > n else n
            while True:
                # The output past the reservation so far, and a grant beyond it.
                extra = covered + grant - reserved
                nano = estimate_max_cost(0, extra, price, multiplier) if price is not None else 0
                if lease.extend(nano):
                    self.extensions += 1
                    self.reserved = self.cut = cut = covered + grant
                    self.limit = cut - grant // 4
                    break
                if grant <= EXTEND_MIN_TOKENS:
                    break
                grant = max(grant // 2, EXTEND_MIN_TOKENS)
        if n > self.limit:
            if n >= cut:
                return -1
            self.limit = cut  # refused, still covered: run to the reservation
        left = self.limit - n
        if not self.meter.calibrated:
            return min(max(left, MIN_STEP), WINDOW)
        return self._step(left, n, sent)

    def finish(self, chunks: list[bytes], sent: int) -> int:
        """Every output token the stream emitted, by this count (a cut stream's estimate)."""
        return self.meter.finish(chunks, sent)
