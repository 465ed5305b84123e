"""HTTP/1.1 server side: an asyncio Protocol over llhttp (httptools), as uvicorn does.

Why not aiohttp's web server for the model routes: its Request, StreamResponse and
middleware objects cost more CPU per request than Tollway's whole budget (see
bench/RESULTS.md). This module parses requests, enforces the head and body limits,
keeps connections alive, serialises pipelined requests, and gives the application a
`Request` plus the connection itself as the response writer. It knows nothing about
models, keys or money.

Response writing is push-based: the application either sends a whole response
(`send`) or starts one (`start`) and pushes body bytes (`write`, `end`). Flow control
is callback-driven like uvicorn's flow_control.py: when the client's transport buffer
passes the high-water mark, `on_pause` is called so the producer (the upstream
connection) stops reading; `on_resume` lets it continue. No await per chunk.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


log = logging.getLogger("tollway.http")



class Request:
    __slots__ = (
        "body", "client_ip", "headers", "keep_alive", "method", "path", "query", "request_id",
        "upgrade",
    )

    def __init__(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        client_ip: str,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # names lower-cased, values raw, in arrival order
        self.body = body
        self.keep_alive = keep_alive
        self.client_ip = client_ip
        self.request_id = ""
        self.upgrade = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


Handler = Callable[[Request, "HttpConnection"], Awaitable[None]]


class _HeadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ServerState:
    """Per-worker state shared by all connections: limits, live connections, drain flag."""

    __slots__ = (
        "connections", "draining", "error_body", "handler", "header_timeout", "keepalive_timeout",
        "max_body", "max_header", "proxies",
    )

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int,
        max_header: int,
        header_timeout: float,
        keepalive_timeout: float,
        error_body: Callable[[int, str, Request | None], tuple[bytes, list[tuple[bytes, bytes]]]],
        proxies: Any = None,
    ) -> None:
        self.handler = handler
        # relay.clientaddr.TrustedProxies, or None: a request's client_ip is the peer's.
        self.proxies = proxies
        self.max_body = max_body
        self.max_header = max_header
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.error_body = error_body
        self.connections: set[HttpConnection] = set()
        self.draining = False


class HttpConnection(asyncio.Protocol):
    """One client connection. Also the response writer handed to the application."""

    __slots__ = (
        "_body",
        "_body_size",
        "_chunked_out",
        "_client_ip",
        "_cork",
        "_cork_body",
        "_cur",
        "_head_timer",
        "_header_size",
        "_headers",
        "_idle_timer",
        "_keep_alive",
        "_loop",
        "_parser",
        "_pipeline",
        "_response_done",
        "_response_started",
        "_state",
        "_task",
        "_trusted_peer",
        "_url",
        "closed",
        "on_disconnect",
        "on_pause",
        "on_resume",
        "transport",
        "write_paused",
    )

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._client_ip = ""
        self._trusted_peer = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._pipeline: deque[Request] = deque()
        self._cur: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._keep_alive = True
        self._response_started = False
        self._response_done = False
        self._chunked_out = False
        self._cork: list[bytes] | None = None
        self._cork_body: list[bytes] = []
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.write_paused = False
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None
        self.on_disconnect: Callable[[], None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._client_ip = peer[0] if peer else ""
        proxies = self._state.proxies
        self._trusted_peer = proxies is not None and proxies.trusts(self._client_ip)
        self._state.connections.add(self)
        self._head_timer = self._loop.call_later(self._state.header_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._state.connections.discard(self)
        self._cancel_timers()
        cb = self.on_disconnect
        if cb is not None and not self._response_done:
            self.on_disconnect = None
            cb()
        task = self._task
        if task is not None and not task.done() and not self._response_done:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "Protocol upgrades are not supported")
        except _HeadError as exc:
            self._reject(exc.status, exc.message)
        except httptools.HttpParserError as exc:
            # llhttp wraps what a callback raised; our own limit errors keep their status.
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, _HeadError):
                self._reject(cause.status, cause.message)
            else:
                self._reject(400, "Malformed HTTP request")

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.on_resume is not None:
            self.on_resume()

    def eof_received(self) -> bool | None:
        # A client's FIN means it is gone (HTTP/1.1 clients do not half-close and wait):
        # let the transport close, so connection_lost cancels the upstream at once.
        return None

    # --- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_size = 0
        self._body = []
        self._body_size = 0
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(self._state.header_timeout, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_size += len(url)
        if self._header_size > self._state.max_header:
            raise _HeadError(431, "Request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self._state.max_header or len(self._headers) >= 200:
            raise _HeadError(431, "Request header fields too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._parser.should_upgrade():
            raise _HeadError(400, "Protocol upgrades are not supported")
        for k, v in self._headers:
            if k == b"expect" and v.lower() == b"100-continue" and not self._pipeline:
                # The client waits for this before sending its body.
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    raise _HeadError(400, "Invalid Content-Length")
                if n > self._state.max_body:
                    raise _HeadError(413, f"Request body exceeds {self._state.max_body} bytes")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._state.max_body:
            raise _HeadError(413, f"Request body exceeds {self._state.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = self._url
        q = url.find(b"?")
        if q >= 0:
            path, query = url[:q], url[q + 1 :]
        else:
            path, query = url, b""
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        req = Request(
            self._parser.get_method(),
            path,
            query,
            self._headers,
            body,
            self._parser.should_keep_alive(),
            self._client_ip if not self._trusted_peer
            else self._state.proxies.client(self._client_ip, self._headers),
        )
        if self._cur is None:
            self._dispatch(req)
        else:
            # Pipelined: answer in order; stop reading until the backlog drains.
            self._pipeline.append(req)
            self.transport.pause_reading()

    # --- dispatch ------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        self._cur = req
        self._keep_alive = req.keep_alive and not self._state.draining
        self._response_started = False
        self._response_done = False
        self._chunked_out = False
        self.on_pause = self.on_resume = self.on_disconnect = None
        self._task = self._loop.create_task(self._run(req))

    async def _run(self, req: Request) -> None:
        # `self._cur is req` tells whether this request still owns the connection: once
        # its response is done, a pipelined successor may already be running.
        try:
            await self._state.handler(req, self)
        except asyncio.CancelledError:
            if not self.closed and self._cur is req:
                self._abort_response()
            raise
        except Exception:
            # The application renders its own errors; reaching here is a bug, and the
            # client still gets a well-formed 500 instead of a hang.
            log.exception("unhandled error in request handler")
            if self._cur is req:
                self._abort_response(internal=True)
            return
        if self._cur is req and not self._response_done:
            self._abort_response(internal=True)

    def _abort_response(self, internal: bool = False) -> None:
        if self.closed:
            return
        if not self._response_started and internal:
            self._keep_alive = False
            self.send_error(500, "Internal gateway error", self._cur)
        else:
            # A response half-written cannot be completed truthfully: close.
            self._keep_alive = False
            self._response_done = True
            self.uncork()
            self.transport.close()

    def _finish_response(self) -> None:
        self._response_done = True
        self._response_started = False  # the next request on this connection starts afresh
        self._cur = None
        self._task = None
        self.on_pause = self.on_resume = self.on_disconnect = None
        if self.closed:
            return
        if not self._keep_alive:
            self.uncork()
            self.transport.close()
            return
        if self._pipeline:
            nxt = self._pipeline.popleft()
            if not self._pipeline:
                self.transport.resume_reading()
            self._dispatch(nxt)
        else:
            self._idle_timer = self._loop.call_later(
                self._state.keepalive_timeout, self._idle_timeout
            )

    def _reject(self, status: int, message: str) -> None:
        """Parse-level failure: answer once, then close (the stream is unusable)."""
        if self.closed:
            return
        self._keep_alive = False
        if self._cur is None and not self._response_started:
            url = self._url
            path = url[: url.find(b"?")] if b"?" in url else url
            self.send_error(status, message, Request(b"", path, b"", self._headers, b"", False,
                                                     self._client_ip))
        else:
            self.transport.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._cur is None and not self.closed:
            self._reject(408, "Request head not received in time")

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self._cur is None and not self.closed:
            self.transport.close()

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close_if_idle(self) -> None:
        """Drain: idle keep-alive connections close now, busy ones after their response."""
        self._keep_alive = False
        if self._cur is None and not self.closed:
            self.transport.close()

    # --- response writer -----------------------------------------------------------

    def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A complete response in one write."""
        if self._response_started or self.closed:
            return
        self._response_started = True
        parts = [status_line(status)]
        for k, v in headers:
            parts += (k, b": ", v, b"\r\n")
        parts.append(b"content-length: %d\r\n" % len(body))
        if not self._keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self._emit(b"".join(parts))
        self._finish_response()

    def send_error(self, status: int, message: str, req: Request | None) -> None:
        body, headers = self._state.error_body(status, message, req)
        self.send(status, headers, body)

    def start(
        self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None
    ) -> None:
        """Send the response head; body follows through write() and end()."""
        if self._response_started or self.closed:
            return
        self._response_started = True
        parts = [status_line(status)]
        for k, v in headers:
            parts += (k, b": ", v, b"\r\n")
        if content_length is None:
            self._chunked_out = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            parts.append(b"content-length: %d\r\n" % content_length)
        if not self._keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self._emit(b"".join(parts))

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self._cork is not None:
            self._cork_body.append(data)
        elif self._chunked_out:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def end(self) -> None:
        if self._response_done:
            return
        if not self.closed and self._chunked_out:
            self._emit(b"0\r\n\r\n")
        self._finish_response()

    def abort(self) -> None:
        """The body cannot be completed (e.g. the upstream vanished mid-body): close."""
        self._keep_alive = False
        self._response_done = True
        if not self.closed:
            self.uncork()
            self.transport.close()

    # Corking: while the upstream's bytes from one read pass through (head, any number of
    # body pieces, the end), they are gathered and written with one send() at uncork, and
    # the body pieces become one chunk. It adds no latency: uncork runs before the loop
    # waits again. Without it a read holding 20 events cost 20 syscalls.

    def cork(self) -> None:
        if self._cork is None:
            self._cork = []

    def uncork(self) -> None:
        parts = self._cork
        if parts is None:
            return
        self._flush_cork_body()
        self._cork = None
        if parts and not self.closed:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _flush_cork_body(self) -> None:
        body = self._cork_body
        if not body:
            return
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        assert self._cork is not None
        if self._chunked_out:
            self._cork += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._cork.append(data)

    def _emit(self, data: bytes) -> None:
        if self._cork is not None:
            self._flush_cork_body()
            self._cork.append(data)
        else:
            self.transport.write(data)

    @property
    def response_started(self) -> bool:
        return self._response_started


def make_factory(state: ServerState) -> Callable[[], HttpConnection]:
    def factory() -> HttpConnection:
        return HttpConnection(state)

    return factory


async def drain(state: ServerState, grace: float) -> None:
    """Stop keep-alive and wait (up to `grace`) for in-flight responses to finish."""
    state.draining = True
    for conn in list(state.connections):
        conn.close_if_idle()
    deadline = asyncio.get_running_loop().time() + grace
    # Polling keeps connections free of drain bookkeeping on the hot path.
    while state.connections and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for conn in list(state.connections):
        if conn.transport is not None:
            conn.transport.abort()
