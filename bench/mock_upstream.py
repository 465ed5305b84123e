"""A scripted model provider on loopback: real HTTP/1.1, OpenAI and Anthropic shapes.

The gateway's tests, the quick start and the load benchmarks point channels here. It must
stay cheap, because under load it shares two cores with the gateway it measures: a naive
aiohttp app spends more CPU per request than the gateway itself and would become the
bottleneck being measured. So it is an asyncio Protocol that parses with llhttp (httptools,
as uvicorn does), answers from callbacks without creating a task per request, renders each
repeated stream event once, paces streams with `call_later` chains and stops writing while
the transport's buffer is above its high-water mark. It keeps counters, never logs per
request, and never serves anything but loopback test traffic.

What a request gets is steered by its `"mock"` body object or `x-mock-<key-with-dashes>`
headers (the body wins); the bodies themselves are rendered by `bench.mock_shapes`:

  chunks (5)            content deltas (or tool-argument deltas) to emit
  chunk_size (6)        bytes per delta, "hello " repeated; chunk_text overrides the text
  tokens_per_chunk (1)  output tokens = emitted deltas * tokens_per_chunk + reasoning_tokens
  input_tokens          whole-prompt tokens; default max(1, len(compact JSON of
                        messages+input+prompt+system) // 4)
  cached_tokens (0)     OpenAI: inside prompt_tokens; Anthropic: cache_read_input_tokens,
                        and input_tokens = input - cached - cache_write
  cache_write_tokens (0) Anthropic cache_creation_input_tokens
  reasoning_tokens (0)  inside completion/output tokens
  ttfb_ms, delay_ms (0) delay before the response head / between stream parts
  status                answer with this status and the provider's error body
                        (429 carries retry-after: retry_after, default 1)
  fail                  reset | hang | stall | close | error, after fail_after (2) stream
                        parts; a non-stream body is cut after half its bytes. "error" ends
                        a stream cleanly with the provider's in-stream error event (a 500
                        error body when not streaming)
  tool_call (false)     call the request's first tool (also when the last user message
                        says "use the tool"; "use the tool NAME" calls that one, and the
                        lines after the phrase are its input, verbatim for a custom tool:
                        see `mock_shapes._pick_tool`)
  no_usage (false)      omit usage everywhere
  overrun (false)       ignore the request's output bound, as a misbehaving upstream would
max_tokens / max_completion_tokens / max_output_tokens cut the output: finish_reason
"length", stop_reason "max_tokens", Responses status "incomplete", and the output tokens
reported equal the limit.

GET /_mock/stats returns `Stats.as_dict()`; POST /_mock/reset clears it. Neither needs a key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
from collections import deque
from http import HTTPStatus
from typing import Any, cast

import httptools
import orjson

from bench import mock_shapes as shapes
from bench.mock_shapes import BadRequest, Options, Plan

__all__ = ["MockServer", "Stats", "main", "start"]

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_STATUS_LINES[529] = b"HTTP/1.1 529 Overloaded\r\n"
_JSON = b"content-type: application/json\r\n"
_SSE = b"content-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n"
                b"connection: close\r\n\r\nbad request")
_RST_LINGER = struct.pack("ii", 1, 0)
_HIGH_WATER = 64 * 1024
# What providers send when a stream fails after it started (then they end the body).
_STREAM_ERROR_OPENAI = shapes.sse_data(
    b'{"error":{"message":"mock: injected error","type":"server_error","param":null,"code":null}}')
_STREAM_ERROR_ANTHROPIC = shapes.sse_event(
    b"error", b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
_MAX_PIPELINED = 16


class Stats:
    """Counters of one server process (each worker of `--workers N` keeps its own)."""

    __slots__ = ("connections_open", "connections_opened", "faults_injected", "last_body",
                 "last_headers", "last_route", "requests", "requests_aborted_by_client",
                 "requests_total", "streams_aborted_by_client", "streams_completed",
                 "streams_started", "write_pauses")

    def __init__(self) -> None:
        self.connections_open = 0
        self.reset()

    def reset(self) -> None:
        """Clear every counter except the gauge of open connections."""
        self.requests: dict[str, int] = {}
        self.requests_total = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_aborted_by_client = 0
        self.requests_aborted_by_client = 0
        self.faults_injected = 0
        self.write_pauses = 0
        self.connections_opened = 0
        self.last_route: str | None = None
        self.last_headers: dict[str, str] = {}
        self.last_body: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class _State:
    __slots__ = ("conns", "stats")

    def __init__(self) -> None:
        self.stats = Stats()
        self.conns: set[_Conn] = set()


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "url")

    def __init__(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes, keep_alive: bool) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


# Job states: waiting for ttfb, hanging, sending the body, stalled on purpose, finished,
# ended by an injected fault (the mock, not the client, cut it).
_PENDING, _HANG, _BODY, _STALLED, _DONE, _FAULTED = range(6)


class _Job:
    """Writes one response: head, parts (paced by delay, gated by backpressure), tail."""

    __slots__ = ("conn", "delay", "fail", "fail_after", "head", "i", "keep_alive", "parts",
                 "state", "stream", "tail", "timer", "ttfb", "waiting")

    def __init__(self, conn: _Conn, head: bytes, parts: list[bytes], tail: bytes, *,
                 stream: bool, keep_alive: bool, ttfb: float = 0.0, delay: float = 0.0,
                 fail: str | None = None, fail_after: int = 0) -> None:
        self.conn = conn
        self.head = head
        self.parts = parts
        self.tail = tail
        self.stream = stream
        self.keep_alive = keep_alive
        self.ttfb = ttfb
        self.delay = delay
        self.fail = fail
        self.fail_after = fail_after
        self.i = 0
        self.state = _PENDING
        self.timer: asyncio.TimerHandle | None = None
        self.waiting = False

    def start(self) -> None:
        if self.stream:
            self.conn.state.stats.streams_started += 1
        if self.ttfb > 0:
            self.timer = self.conn.loop.call_later(self.ttfb, self._send_head)
        else:
            self._send_head()

    def _send_head(self) -> None:
        self.timer = None
        if self.fail == "hang":
            self.state = _HANG
            self.conn.state.stats.faults_injected += 1
            return
        self.state = _BODY
        if (self.delay <= 0 and self.fail is None and not self.conn.write_paused
                and sum(map(len, self.parts)) < _HIGH_WATER):
            # The common case: one write for the whole response. Larger bodies go part by
            # part so that backpressure can stop them.
            self.i = len(self.parts)
            self.conn.transport.write(b"".join((self.head, *self.parts, self.tail)))
            self._finish()
            return
        self.conn.transport.write(self.head)
        if self.fail is not None and self.fail_after == 0:
            self._inject()
            return
        self._pump()

    def _pump(self) -> None:
        conn = self.conn
        parts = self.parts
        while self.i < len(parts):
            if conn.closed or conn.transport.is_closing():
                return
            if conn.write_paused:
                self.waiting = True
                return
            conn.transport.write(parts[self.i])
            self.i += 1
            if self.fail is not None and self.i == self.fail_after:
                self._inject()
                return
            if self.delay > 0 and self.i < len(parts):
                self.timer = conn.loop.call_later(self.delay, self._tick)
                return
        if self.fail is not None:
            self._inject()
            return
        conn.transport.write(self.tail)
        self._finish()

    def _tick(self) -> None:
        self.timer = None
        self._pump()

    def resume(self) -> None:
        if self.waiting:
            self.waiting = False
            self._pump()

    def _inject(self) -> None:
        self.conn.state.stats.faults_injected += 1
        transport = self.conn.transport
        if self.fail == "stall":
            self.state = _STALLED
            return
        self.state = _FAULTED
        if self.fail == "error":
            transport.write(self.tail)  # the error event, then the last chunk
            self.conn.job_done(self)
        elif self.fail == "reset":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
            transport.abort()
        else:
            transport.close()

    def _finish(self) -> None:
        self.state = _DONE
        if self.stream:
            self.conn.state.stats.streams_completed += 1
        self.conn.job_done(self)

    def abandon(self) -> None:
        """The connection is gone: stop timers, count a client abort if the client cut it."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.state in (_PENDING, _HANG, _BODY, _STALLED):
            stats = self.conn.state.stats
            if self.stream:
                stats.streams_aborted_by_client += 1
            else:
                stats.requests_aborted_by_client += 1
        self.state = _DONE


class _Conn(asyncio.Protocol):
    """One client connection: parse requests, answer them one at a time in arrival order."""

    __slots__ = ("body", "closed", "headers", "job", "loop", "parser", "queue",
                 "reading_paused", "state", "transport", "url", "write_paused")

    def __init__(self, state: _State) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.queue: deque[_Request] = deque()
        self.job: _Job | None = None
        self.closed = False
        self.write_paused = False
        self.reading_paused = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        stats = self.state.stats
        stats.connections_opened += 1
        stats.connections_open += 1
        self.state.conns.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request()
        except httptools.HttpParserError:
            self._bad_request()

    def eof_received(self) -> bool:
        return False  # a half-closed client is a gone client: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.stats.connections_open -= 1
        self.state.conns.discard(self)
        self.queue.clear()
        if self.job is not None:
            self.job.abandon()
            self.job = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.state.stats.write_pauses += 1

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.job is not None:
            self.job.resume()

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.transport.write(_CONTINUE)
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req = _Request(self.parser.get_method(), self.url, self.headers, b"".join(self.body),
                       self.parser.should_keep_alive())
        if self.job is None and not self.queue:
            self._dispatch(req)
        else:
            self.queue.append(req)
            if len(self.queue) >= _MAX_PIPELINED and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()

    # --- responses ---

    def _bad_request(self) -> None:
        if not self.closed:
            self.transport.write(_BAD_REQUEST)
            self.transport.close()
            self.closed = True

    def _dispatch(self, req: _Request) -> None:
        job = _respond(self, req)
        self.job = job
        job.start()

    def job_done(self, job: _Job) -> None:
        self.job = None
        if self.closed:
            return
        if not job.keep_alive:
            self.transport.close()
            self.closed = True
            return
        if self.queue:
            self._dispatch(self.queue.popleft())
        elif self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()


def _head(status: int, content_type: bytes, extra: bytes, length: int | None,
          keep_alive: bool) -> bytes:
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Status\r\n" % status
    framing = _CHUNKED if length is None else b"content-length: %d\r\n" % length
    return line + content_type + extra + framing + (b"" if keep_alive else _CLOSE) + b"\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _plain(conn: _Conn, req: _Request, status: int, body: bytes, anthropic: bool,
           extra: bytes = b"", opts: Options | None = None) -> _Job:
    rid = b"request-id: " if anthropic else b"x-request-id: "
    extra += rid + shapes.request_id() + b"\r\n"
    head = _head(status, _JSON, extra, len(body), req.keep_alive)
    if opts is None:
        return _Job(conn, head, [body], b"", stream=False, keep_alive=req.keep_alive)
    parts = [body]
    if opts.fail in ("reset", "close", "stall"):  # "error" never gets here
        # A non-stream fault cuts the body in half: headers and half the bytes arrive.
        half = len(body) // 2
        parts = [body[:half], body[half:]]
    return _Job(conn, head, parts, b"", stream=False, keep_alive=req.keep_alive,
                ttfb=opts.ttfb_ms / 1000, fail=opts.fail, fail_after=1)


def _error(conn: _Conn, req: _Request, status: int, message: str, anthropic: bool,
           opts: Options | None = None) -> _Job:
    extra = b""
    if status == 429:
        extra = b"retry-after: %d\r\n" % (opts.retry_after if opts else 1)
    job = _plain(conn, req, status, shapes.error(anthropic, status, message), anthropic, extra)
    if opts is not None:
        job.ttfb = opts.ttfb_ms / 1000
    return job


_GENERATIONS = {
    "/v1/chat/completions": (shapes.chat, "max_tokens", False),
    "/v1/completions": (shapes.completions, "max_tokens", False),
    "/v1/responses": (shapes.responses, "max_output_tokens", False),
    "/v1/messages": (shapes.messages, "max_tokens", True),
}


def _route(path: str) -> tuple[str, str | None]:
    """(route name, model id) for a path with any prefix before the provider's route."""
    p = path.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/responses", "/embeddings",
                   "/messages/count_tokens", "/messages", "/models"):
        if p.endswith(suffix):
            return "/v1" + suffix, None
    at = p.find("/models/")
    if at >= 0:
        return "/v1/models/{id}", p[at + 8:]
    return "", None


def _respond(conn: _Conn, req: _Request) -> _Job:
    stats = conn.state.stats
    path = req.url.split(b"?", 1)[0].decode("latin-1")
    if path.endswith("/_mock/stats"):
        return _plain(conn, req, 200, orjson.dumps(stats.as_dict()), False)
    if path.endswith("/_mock/reset"):
        stats.reset()
        return _plain(conn, req, 200, b'{"ok":true}', False)

    route, model_id = _route(path)
    headers = req.headers
    anthropic = route.startswith("/v1/messages") or (
        route.startswith("/v1/models") and any(n == b"anthropic-version" for n, _ in headers))
    stats.requests_total += 1
    stats.last_route = route or path
    stats.last_headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in headers}
    stats.last_body = None
    if not route:
        return _error(conn, req, 404, f"Unknown request URL: {req.method.decode()} {path}.",
                      anthropic)
    stats.requests[route] = stats.requests.get(route, 0) + 1

    if not _has_credential(headers):
        msg = ("x-api-key header is required" if anthropic else
               "You didn't provide an API key. You need to provide your API key in an "
               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        return _error(conn, req, 401, msg, anthropic)

    want_get = route.startswith("/v1/models")
    if (req.method == b"GET") != want_get:
        return _error(conn, req, 405, f"Method {req.method.decode()} not allowed on {route}",
                      anthropic)
    if route == "/v1/models":
        return _plain(conn, req, 200,
                      shapes.ANTHROPIC_MODELS if anthropic else shapes.OPENAI_MODELS, anthropic)
    if route == "/v1/models/{id}":
        if model_id not in shapes.MODELS:
            return _error(conn, req, 404, f"The model '{model_id}' does not exist", anthropic)
        return _plain(conn, req, 200, shapes.model(model_id or "", anthropic), anthropic)

    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        return _error(conn, req, 400, "We could not parse the JSON body of your request.",
                      anthropic)
    stats.last_body = body
    if not isinstance(body, dict):
        return _error(conn, req, 400, "The request body must be a JSON object.", anthropic)
    try:
        opts = shapes.parse_options(headers, body)
        if opts.status is not None and opts.status >= 400 and opts.fail != "hang":
            return _error(conn, req, opts.status, f"mock: status {opts.status} as requested",
                          anthropic, opts)
        if opts.fail == "error" and body.get("stream") is not True:
            return _error(conn, req, 500, "mock: injected error", anthropic, opts)
        if route == "/v1/embeddings":
            return _plain(conn, req, 200, shapes.embeddings(body, opts), False, opts=opts)
        if route == "/v1/messages/count_tokens":
            return _plain(conn, req, 200, shapes.count_tokens(body, opts), True, opts=opts)
        render, limit_key, _ = _GENERATIONS[route]
        plan = Plan(body, opts, limit_key)
        events = render(body, plan)
    except BadRequest as exc:
        return _error(conn, req, 400, str(exc), anthropic)
    if not plan.stream:
        return _plain(conn, req, 200, events[0], anthropic, opts=opts)

    rid = (b"request-id: " if anthropic else b"x-request-id: ") + shapes.request_id() + b"\r\n"
    head = _head(200, _SSE, rid, None, req.keep_alive)
    framed: list[bytes] = []
    prev_raw, prev = b"", b""
    for ev in events:
        if ev is not prev_raw:  # repeated events are the same object: frame them once
            prev_raw, prev = ev, _chunk(ev)
        framed.append(prev)
    tail = _LAST_CHUNK
    if opts.fail == "error":
        tail = _chunk(_STREAM_ERROR_ANTHROPIC if anthropic else _STREAM_ERROR_OPENAI) + tail
    return _Job(conn, head, framed, tail, stream=True, keep_alive=req.keep_alive,
                ttfb=opts.ttfb_ms / 1000, delay=opts.delay_ms / 1000, fail=opts.fail,
                fail_after=opts.fail_after)


def _has_credential(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return True
        elif name == b"x-api-key" and value.strip():
            return True
    return False


class MockServer:
    """A running mock upstream in this event loop."""

    def __init__(self, server: asyncio.Server, state: _State, host: str) -> None:
        self._server = server
        self._state = state
        self.host = host
        self.port: int = server.sockets[0].getsockname()[1]

    @property
    def stats(self) -> Stats:
        return self._state.stats

    @property
    def url(self) -> str:
        """Base URL as the Anthropic SDK takes it; the OpenAI SDK wants `url + "/v1"`."""
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        self._server.close()
        for conn in list(self._state.conns):
            conn.transport.abort()
        await self._server.wait_closed()


async def start(host: str = "127.0.0.1", port: int = 0, *,
                sock: socket.socket | None = None) -> MockServer:
    state = _State()
    loop = asyncio.get_running_loop()
    if sock is not None:
        server = await loop.create_server(lambda: _Conn(state), sock=sock, backlog=1024)
    else:
        server = await loop.create_server(lambda: _Conn(state), host, port, backlog=1024)
    return MockServer(server, state, host)


# --- command line ---------------------------------------------------------------------------


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve(sock: socket.socket, host: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start(host, sock=sock)
    await stop.wait()
    await server.close()


def _run(sock: socket.socket, host: str) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stdlib loop still works
        asyncio.run(_serve(sock, host))
    else:
        uvloop.run(_serve(sock, host))


def _die_with_parent() -> None:
    """A worker must not outlive a parent killed with SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.mock_upstream",
                                 description="Mock OpenAI/Anthropic upstream for tests and benchmarks.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    workers = max(1, args.workers)
    socks = [_listen(args.host, args.port, workers > 1)]
    port = socks[0].getsockname()[1]
    socks += [_listen(args.host, port, True) for _ in range(workers - 1)]
    children: list[int] = []
    for sock in socks[1:]:
        pid = os.fork()
        if pid == 0:
            shapes.reseed_ids()  # ids must stay unique across workers
            _die_with_parent()
            for other in socks:
                if other is not sock:
                    other.close()
            _run(sock, args.host)
            os._exit(0)
        children.append(pid)
        sock.close()
    print(f"mock upstream listening on http://{args.host}:{port}", flush=True)
    try:
        _run(socks[0], args.host)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    main()
