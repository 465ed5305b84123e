"""Upstream HTTP/1.1 client: keep-alive connection pools over llhttp, push-based.

Why not aiohttp's ClientSession: per request it builds a ClientRequest, a
ClientResponse, a StreamReader and a timer context, and every chunk goes through a
queue and an await. Here a response's bytes travel from `data_received` through the
parser straight into a sink's callbacks (the proxy's exchange), which writes them to
the client's transport in the same call: no task switch per chunk.

This is the only module that translates socket and parser failures into the relay's
error family (UpstreamError, UpstreamTimeout). It never follows redirects and never
asks for compression (the tap must see plaintext usage events).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from relay.errors import GatewayError, UpstreamError, UpstreamTimeout

# Response headers that describe this hop only (RFC 9110 §7.6.1) or that we rewrite.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"set-cookie",
        b"alt-svc", b"server", b"date", b"x-request-id",
    }
)


class Sink(Protocol):
    """What an upstream connection reports to, in order: head, body*, done | fail."""

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_done(self) -> None: ...
    def on_fail(self, exc: GatewayError) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...


class Origin:
    """Scheme, host and port of a channel's base URL, plus the bytes we reuse per request."""

    __slots__ = ("host", "host_header", "key", "path_prefix", "port", "ssl")

    def __init__(self, base_url: str) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        default_port = 443 if u.scheme == "https" else 80
        host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        self.host_header = host_header.encode()
        self.path_prefix = u.path.rstrip("/").encode()
        self.key = (u.scheme, self.host, self.port)


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers", "_length", "_loop", "_parser", "_pool", "_status", "bytes_in", "closed",
        "origin", "reading_paused", "reused", "sink", "transport",
    )

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.sink: Sink | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._status = 0
        self.closed = False
        self.reused = False
        self.reading_paused = False
        self.bytes_in = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.on_fail(UpstreamError("Upstream closed the connection before the response ended"))

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        sink = self.sink
        if sink is not None:
            sink.cork()  # everything this read produces leaves in one write
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            failed = self.sink
            self.sink = None
            self.transport.abort()
            if failed is not None:
                failed.on_fail(UpstreamError("Upstream sent a malformed HTTP response"))
        finally:
            if sink is not None:
                sink.uncork()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost reports unfinished bodies

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []
        self._length = None

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            try:
                self._length = int(value)
            except ValueError:
                self._length = None
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        if self._status < 200:
            return  # 1xx interim responses are not forwarded
        if self._parser.should_upgrade():
            self._length = None
        sink = self.sink
        if sink is not None:
            sink.on_head(self._status, self._headers, self._length)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_body(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            return
        sink = self.sink
        self.sink = None
        keep = self._parser.should_keep_alive()
        if keep and not self.closed:
            self._pool._release(self)
        else:
            self.transport.close()
        if sink is not None:
            sink.on_done()

    # used by the exchange

    def send(self, sink: Sink, data: bytes) -> None:
        self.sink = sink
        self.transport.write(data)

    def pause(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Cancel: the upstream sees a closed socket at once and stops generating."""
        self.sink = None
        if not self.closed:
            self.closed = True
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per origin, bounded; LIFO so warm ones are reused."""

    def __init__(self, connect_timeout: float, max_idle: int = 256) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, str, int], deque[UpstreamConnection]] = {}
        self.opened = 0

    async def acquire(self, origin: Origin) -> UpstreamConnection:
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return await self.connect(origin)

    async def connect(self, origin: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"Connecting to the upstream timed out after {self.connect_timeout:g}s")
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"Upstream unreachable: {exc.strerror or exc.__class__.__name__}")
        self.opened += 1
        return proto

    def _release(self, conn: UpstreamConnection) -> None:
        conn.resume()
        idle = self._idle.get(conn.origin.key)
        if idle is None:
            idle = self._idle[conn.origin.key] = deque()
        if len(idle) >= self.max_idle:
            conn.closed = True
            conn.transport.close()
            return
        idle.append(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.origin.key)
        if idle:
            try:
                idle.remove(conn)
            except ValueError:
                pass

    def idle_count(self) -> int:
        return sum(len(d) for d in self._idle.values())

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.closed = True
                conn.transport.close()
        self._idle.clear()


def build_request(
    origin: Origin,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    """Serialise one HTTP/1.1 request. `path` is appended to the origin's path prefix."""
    parts = [method, b" ", origin.path_prefix, path, b" HTTP/1.1\r\nhost: ", origin.host_header,
             b"\r\n"]
    for k, v in headers:
        parts += (k, b": ", v, b"\r\n")
    parts.append(b"content-length: %d\r\naccept-encoding: identity\r\n\r\n" % len(body))
    parts.append(body)
    return b"".join(parts)
