"""The model routes: one exchange per request, from admission to settlement.

Flow (one task per request; the body moves by callbacks, not awaits):

    parse model/stream ─▶ auth ─▶ route ─▶ limits.admit ─▶ upstream.send
        upstream bytes ─▶ Exchange.on_body ─▶ client transport  (tap looks at usage events)
    done | failed | client gone ─▶ settle: price, lease.release, ledger.record

Bytes pass unmodified (DESIGN invariant 1). The only edit to a stream is withholding
the usage-only chunk the gateway itself asked for (OpenAI `stream_options`) from a
client that did not ask; the SSE framer keeps that edit byte-exact around it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from accounting import usage as usage_mod
from relay import errors as E
from relay.errors import GatewayError
from relay.httpserver import HttpConnection, Request
from relay.requestids import first_id
from relay.sse import SSEFramer, fields, has_usage_object
from relay.upstream import HOP_BY_HOP, UpstreamConnection
from relay.upstream_errors import status_error

if TYPE_CHECKING:
    from relay.app import Gateway, Route
    from relay.credit import OutputCredit
    from relay.routing import Channel

JSON_CT = (b"content-type", b"application/json")

# Stream handling modes
NONSTREAM = 0
TAP = 1  # forward each upstream chunk as is; frame a copy to find usage events
WITHHOLD = 2  # forward event by event, dropping the usage-only chunk we asked for

INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'

# The upstream's request id (OpenAI `x-request-id`, Anthropic `request-id`) is not sent
# on: the client gets one id, the gateway's; the upstream's is kept in the usage row.
UPSTREAM_IDS = frozenset({b"request-id", b"x-request-id"})
NOT_COPIED = HOP_BY_HOP | UPSTREAM_IDS


class Exchange:
    """One client request's trip to an upstream; the upstream connection's sink."""

    __slots__ = (
        "_limits", "_watchdog", "aborted", "body_chunks", "bytes_out", "client", "credit",
        "done", "error", "error_body", "error_headers", "first_byte", "framer", "gw",
        "headers_out", "last_activity", "loop", "mode", "next_check", "protocol", "response_id",
        "route", "started", "status", "tap", "upstream", "upstream_rid", "upstream_status",
    )

    def __init__(self, gw: Gateway, client: HttpConnection, route: Route, mode: int,
                 headers_out: list[tuple[bytes, bytes]]) -> None:
        self.gw = gw
        self.loop = gw.loop
        self.client = client
        self.route = route
        self.protocol = route.protocol
        self.mode = mode
        self.headers_out = headers_out
        self.framer: SSEFramer | None = SSEFramer() if mode != NONSTREAM else None
        self.tap: Any = None
        # Non-stream: the whole body (usage is read from it). Stream: only the chunks
        # since the last credit check (relay.credit), so memory stays bounded.
        self.body_chunks: list[bytes] = []
        self.credit: OutputCredit | None = None
        self.next_check = 1 << 62  # bytes_out past which the credit is checked
        self.bytes_out = 0
        self.status = 0
        self.upstream_status = 0
        self.started = False  # response head sent to the client
        self.first_byte = 0.0
        self.last_activity = 0.0
        self.error: GatewayError | None = None
        self.error_body: list[bytes] | None = None
        self.error_headers: list[tuple[bytes, bytes]] = []  # a held error's head
        self.upstream_rid = b""  # the upstream's own request id, for the usage row
        self.response_id = ""  # set where the client's body is not the upstream's (translation)
        self.aborted = False  # the client went away
        self.upstream: UpstreamConnection | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._watchdog: asyncio.TimerHandle | None = None
        self._limits = (0.0, 0.0, 0.0, 0.0)

    # --- Sink ------------------------------------------------------------------------

    def _head(self, status: int) -> bool:
        """What every exchange does first with a response head. False: the status is
        decided at on_done (retry elsewhere, or render); nothing reaches the client yet."""
        now = self.loop.time()
        self.first_byte = self.last_activity = now
        self.upstream_status = status
        self._rearm(now)
        if status >= 500 or status == 429 or 300 <= status < 400:
            self.error_body = []
            return False
        self.status = status
        return True

    def _start_client(self, out: list[tuple[bytes, bytes]], length: int | None) -> None:
        """Send the head, and tie the client's flow control to the upstream's reading."""
        self.client.start(self.status, out, length)
        self.started = True
        up = self.upstream
        if up is not None:
            self.client.on_pause = up.pause
            self.client.on_resume = up.resume
            if self.client.write_paused:
                up.pause()

    def _body_consumed(self, data: bytes) -> bool:
        """Activity bookkeeping; True when `data` belongs to an error body being held."""
        self.last_activity = self.loop.time()
        eb = self.error_body
        if eb is None:
            return False
        if sum(map(len, eb)) < 65536:
            eb.append(data)
        return True

    def _held(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Keep a held error's head: its Retry-After and rate-limit headers reach the
        client if no other attempt answers, and its request id goes in the usage row."""
        self.error_headers = headers
        for k, v in headers:
            if k in UPSTREAM_IDS:
                self.upstream_rid = v

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        if not self._head(status):
            self._held(headers)
            return
        out = self.headers_out
        for k, v in headers:
            if k not in NOT_COPIED:
                out.append((k, v))
            elif k in UPSTREAM_IDS:
                self.upstream_rid = v
        if status >= 400:
            self.mode = NONSTREAM  # an upstream 4xx passes through unchanged
        if self.mode == WITHHOLD:
            length = None  # we may drop bytes: the length is no longer known
        self._start_client(out, length)

    def on_body(self, data: bytes) -> None:
        if self._body_consumed(data):
            return
        self.body_chunks.append(data)
        mode = self.mode
        if mode == NONSTREAM:
            self.bytes_out += len(data)
            self.client.write(data)
            return
        framer = self.framer
        assert framer is not None
        # Fast path: a read that holds whole events and no usage object needs no framing:
        # the framer stays at an event boundary and the bytes go out as they came.
        whole = not framer.pending and data[-2:] == b"\n\n" and not has_usage_object(data)
        if mode == TAP:
            self.bytes_out += len(data)
            self.client.write(data)
            if not whole:
                for block in framer.feed(data):
                    if has_usage_object(block):
                        self._feed_tap(block)
        elif whole:
            self.bytes_out += len(data)
            self.client.write(data)
        else:
            out = []
            for block in framer.feed(data):
                if has_usage_object(block):
                    self._feed_tap(block)
                    if usage_mod.is_usage_only_chunk(fields(block)[1]):
                        continue
                out.append(block)
            if out:
                payload = out[0] if len(out) == 1 else b"".join(out)
                self.bytes_out += len(payload)
                self.client.write(payload)
        if self.bytes_out > self.next_check:
            self._check_credit()

    def emitted_tokens(self) -> int:
        """Output tokens this stream emitted so far, by its credit's count (relay.credit)."""
        if self.credit is None:
            return 0
        self._check_credit()
        return self.credit.counted

    def _check_credit(self) -> None:
        """The stream passed its next check: count what it emitted since the last; at
        the end of its credit, extend it if its scopes allow, else end it (billed for
        what was emitted)."""
        credit = self.credit
        if credit is None:
            self.next_check = 1 << 62
            return
        chunks = self.body_chunks
        self.body_chunks = []
        if not self.response_id and chunks:
            self.response_id = first_id(chunks)  # the first bytes go now (relay.requestids)
        step = credit.count(chunks, self.bytes_out)
        if step < 0:
            step = credit.extend(self.bytes_out)  # the only branch an extension costs
            if step < 0:
                self._cut()
                return
        self.next_check = self.bytes_out + step

    def _cut(self) -> None:
        """End a stream no grant could extend, with one error event (relay.credit)."""
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.abort()
        self.next_check = 1 << 62
        self.on_fail(E.InsufficientQuota(
            "The response reached the output this request reserved, and no more could "
            "be reserved (balance, plan credit or key cap, or too many extensions); it "
            "was ended and is billed for what was sent"))

    def _feed_tap(self, block: bytes) -> None:
        event, data = fields(block)
        tap = self.tap
        if tap is None:
            tap = self.tap = self.route.new_tap()
        if tap is not None:
            try:
                tap.feed_event(data, event)
            except (ValueError, TypeError, KeyError):
                pass  # a malformed usage event is estimated at settlement, never fatal

    def on_done(self) -> None:
        self.upstream = None
        if self.error_body is not None and self.error is None:
            self.error = status_error(self.upstream_status, b"".join(self.error_body),
                                      self.error_headers, self.protocol, self.protocol)
        if self.started:
            if self.framer is not None and self.mode == WITHHOLD and self.framer.pending:
                pending = self.framer.pending
                self.bytes_out += len(pending)
                self.client.write(pending)
            self.client.end()
        self._finish()

    def on_fail(self, exc: GatewayError) -> None:
        self.upstream = None
        if self.error is None:
            self.error = exc
        if self.started and not self.aborted:
            # Mid-stream failure: one error event in the route's protocol, then the end.
            if self.mode != NONSTREAM:
                if self.framer is not None and self.mode == WITHHOLD and self.framer.pending:
                    self.client.write(self.framer.pending)
                self.client.write(E.render_stream_event(exc, self.protocol))
                self.client.end()
            else:
                self.client.abort()
        self._finish()

    def _finish(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self.done.done():
            self.done.set_result(None)

    # --- lifecycle --------------------------------------------------------------------

    def cork(self) -> None:
        self.client.cork()

    def uncork(self) -> None:
        self.client.uncork()

    def client_gone(self) -> None:
        """The client disconnected: cancel the upstream request at once."""
        self.aborted = True
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.abort()
        if self.error is None:
            self.error = _CLIENT_GONE
        self._finish()

    def arm(self, first_byte_timeout: float, idle_timeout: float, total_timeout: float) -> None:
        """One timer per exchange, re-armed at the first byte and then only when it fires
        (it checks `last_activity`), so chunks never touch a timer."""
        self._limits = (self.loop.time(), first_byte_timeout, idle_timeout, total_timeout)
        self.last_activity = 0.0
        self._watchdog = self.loop.call_at(self._limits[0] + first_byte_timeout, self._check)

    def _rearm(self, now: float) -> None:
        """The first byte came: the watchdog now guards the idle and total limits. The
        first-byte timer already set fires no later than that deadline unless the idle
        limit is the shorter (a reasoning model's long first-byte limit): only then is
        it replaced. Otherwise it stays, and `_check` re-arms from `last_activity` when
        it fires (a request that ends first never touches a second timer)."""
        wd = self._watchdog
        if wd is not None:
            start, first_byte_timeout, idle, total = self._limits
            deadline = min(now + idle, start + total)
            if start + first_byte_timeout <= deadline:
                return
            wd.cancel()
            self._watchdog = self.loop.call_at(deadline, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if self.done.done():
            return
        start, first_byte_timeout, idle_timeout, total_timeout = self._limits
        now = self.loop.time()
        if now - start >= total_timeout:
            self._timeout(f"Upstream did not finish within {total_timeout:g}s")
        elif self.first_byte == 0.0:
            if now - start >= first_byte_timeout:
                self._timeout(f"Upstream sent no response within {first_byte_timeout:g}s")
            else:
                self._watchdog = self.loop.call_at(start + first_byte_timeout, self._check)
        elif now - self.last_activity >= idle_timeout:
            self._timeout(f"Upstream stream stalled for {idle_timeout:g}s")
        else:
            nxt = min(self.last_activity + idle_timeout, start + total_timeout)
            self._watchdog = self.loop.call_at(nxt, self._check)

    def _timeout(self, message: str) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.abort()
        self.on_fail(E.UpstreamTimeout(message))


class _ClientGone(GatewayError):
    status = 499
    openai_code = "client_closed_request"


_CLIENT_GONE = _ClientGone("Client closed the connection")


# --- request helpers ---------------------------------------------------------------


def extract_secret(req: Request) -> bytes | None:
    for k, v in req.headers:
        if k == b"authorization":
            if v[:7].lower() == b"bearer ":
                return v[7:].strip()
            return v.strip()
        if k == b"x-api-key" or k == b"api-key":
            return v.strip()
    return None


def upstream_headers(req: Request, channel: Channel, translated: bool = False) -> list[tuple[bytes, bytes]]:
    out = channel.header_policy.filter(req.headers, translated)
    if translated:
        out.append(JSON_CT)
        if channel.protocol == "anthropic":
            out.append((b"anthropic-version", b"2023-06-01"))
    out.extend(channel.auth_headers)
    out.extend(channel.extra_headers)
    return out


def inject_include_usage(raw: bytes) -> bytes:
    """Ask an OpenAI upstream for the usage chunk without re-serialising the body."""
    i = raw.find(b"{")
    return raw[: i + 1] + INCLUDE_USAGE + raw[i + 1 :]
