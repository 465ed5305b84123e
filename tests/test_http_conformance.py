"""HTTP/1.1 at the wire, with raw sockets: what a careful client or a hostile one sends.

Keep-alive, pipelining, chunked bodies, broken framing (Content-Length and
Transfer-Encoding games, smuggling), header limits and injection, unknown methods and
paths, HTTP/1.0, Expect: 100-continue and slowloris. Every answer must be a well-formed
response (or a closed connection) and never a 5xx or a hang.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from tests.gateway import Harness

CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def gw(pg_dsn: str):
    h = await Harness().start(pg_dsn, server={"header_timeout_s": 1.0})
    yield h
    await h.stop()


@pytest.fixture
async def key(gw: Harness) -> str:
    return (await gw.user_and_key())[2]


class Resp:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


async def _read_one(reader: asyncio.StreamReader) -> Resp:
    """One response: head, then a Content-Length or chunked body."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [(k.strip().lower(), v.strip()) for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)]
        if status != 100:
            break
    resp = Resp(status, headers, b"")
    if resp.header("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        resp.body = b"".join(parts)
    else:
        resp.body = await reader.readexactly(int(resp.header("content-length") or 0))
    return resp


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, gw: Harness) -> Conn:
        r, w = await asyncio.open_connection("127.0.0.1", gw.worker.port)  # type: ignore[union-attr]
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, within: float = 5) -> Resp:
        async with asyncio.timeout(within):
            return await _read_one(self.reader)

    async def closed(self, within: float = 3) -> bool:
        """True when the server closed the connection (EOF or reset) within the time."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    def close(self) -> None:
        self.writer.transport.abort()


def chat_request(key: str, body: bytes = CHAT, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer " + key.encode()
            + b"\r\ncontent-type: application/json\r\n" + extra
            + b"content-length: %d\r\n\r\n" % len(body) + body)


def assert_openai_error(resp: Resp, status: int) -> None:
    assert resp.status == status
    assert "error" in orjson.loads(resp.body)


# --- connection reuse and ordering ------------------------------------------------------


async def test_keep_alive_reuses_the_connection(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        for i in range(3):
            await c.send(chat_request(key, extra=b"x-request-id: ka-%d\r\n" % i))
            r = await c.response()
            assert r.status == 200 and r.header("x-request-id") == f"ka-{i}"
            assert r.header("connection") != "close"
        assert gw.mock.stats.connections_opened >= 1
    finally:
        c.close()


async def test_pipelined_model_request_then_health_in_order(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        slow = orjson.dumps({**orjson.loads(CHAT), "mock": {"ttfb_ms": 200}})
        await c.send(chat_request(key, slow, b"x-request-id: first\r\n")
                     + b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        a, h = await c.response(), await c.response()
        assert (a.status, a.header("x-request-id"), h.status) == (200, "first", 200)
        assert orjson.loads(h.body) == {"status": "ok"}
    finally:
        c.close()


async def test_two_pipelined_model_requests_answered_in_order(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(chat_request(key, extra=b"x-request-id: first\r\n")
                     + chat_request(key, extra=b"x-request-id: second\r\n"))
        a = await c.response()
        assert (a.status, a.header("x-request-id")) == (200, "first")
        b = await c.response()
        assert (b.status, b.header("x-request-id")) == (200, "second")
    finally:
        c.close()


async def test_chunked_request_body(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        pieces = [CHAT[:10], CHAT[10:11], CHAT[11:]]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
                     + key.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n" + body)
        r = await c.response()
        assert r.status == 200
        assert orjson.loads(r.body)["object"] == "chat.completion"
    finally:
        c.close()


async def test_http10_without_keep_alive_closes(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        r = await c.response()
        assert r.status == 200
        assert await c.closed()
    finally:
        c.close()


async def test_expect_100_continue_is_answered(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
                     + key.encode() + b"\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(CHAT))
        async with asyncio.timeout(0.8):
            interim = await c.reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100")
    finally:
        c.close()


async def test_expect_100_continue_body_still_served(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
                     + key.encode() + b"\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(CHAT))
        await asyncio.sleep(0.1)
        await c.send(CHAT)
        r = await c.response()
        assert r.status == 200
        # Expect is hop-by-hop: it never reaches the upstream.
        assert "expect" not in gw.mock.stats.last_headers
    finally:
        c.close()


# --- broken framing ---------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [[b"abc"], [b"-5"], [b"10", b"11"], [b"1e3"], [b"0x10"],
                                     [b"99999999999999999999999"]])
async def test_bad_content_length_is_400_and_closes(gw: Harness, key: str, lengths: list[bytes]) -> None:
    c = await Conn.open(gw)
    try:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer " + key.encode()
                + b"\r\n" + b"".join(b"content-length: %s\r\n" % v for v in lengths) + b"\r\n")
        await c.send(head + CHAT)
        r = await c.response()
        assert r.status in (400, 413)
        assert "error" in orjson.loads(r.body)
        assert await c.closed()
    finally:
        c.close()


@pytest.mark.parametrize("te", [b"chunked", b"gzip, chunked", b"chunked, identity", b"xchunked",
                                b" chunked", b"CHUNKED"])
async def test_content_length_with_transfer_encoding_never_smuggles(gw: Harness, key: str,
                                                                    te: bytes) -> None:
    """A body that, read by Content-Length, hides a second request must never yield two answers."""
    smuggled = b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-smuggled: 1\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    body = chunked + smuggled
    c = await Conn.open(gw)
    try:
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer " + key.encode()
                     + b"\r\ncontent-length: %d\r\ntransfer-encoding: %s\r\n\r\n" % (len(chunked), te) + body)
        first = await c.response()
        # Both framings at once is ambiguous: refuse it and close, so nothing after
        # the head can be read as a request of its own.
        assert first.status == 400
        assert "error" in orjson.loads(first.body)
        assert await c.closed()
        assert gw.mock.stats.requests_total == 0
    finally:
        c.close()


async def test_transfer_encoding_other_than_chunked_is_refused(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer " + key.encode()
                     + b"\r\ntransfer-encoding: gzip\r\n\r\n" + CHAT)
        r = await c.response()
        assert 400 <= r.status < 500
        assert gw.mock.stats.requests_total == 0
    finally:
        c.close()


async def test_duplicate_headers_answered_sanely(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nhost: b\r\nauthorization: Bearer "
                     + key.encode() + b"\r\nauthorization: Bearer sk-other\r\nx-request-id: dup-1\r\n"
                     b"x-request-id: dup-2\r\ncontent-length: %d\r\n\r\n" % len(CHAT) + CHAT)
        r = await c.response()
        assert r.status < 500
        assert r.header("x-request-id") in ("dup-1", "dup-2") or (r.header("x-request-id") or "").startswith("req_")
        # Our own auth never travels upstream, whichever copy was used.
        last = gw.mock.stats.last_headers
        assert "sk-other" not in str(last) and key not in str(last)
    finally:
        c.close()


async def test_oversized_headers_are_431(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * (65 * 1024) + b"\r\n\r\n")
        r = await c.response()
        assert r.status == 431
        assert await c.closed()
    finally:
        c.close()
    c = await Conn.open(gw)
    try:
        many = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 400) for i in range(200))
        await c.send(b"GET /healthz HTTP/1.1\r\nhost: t\r\n" + many + b"\r\n")
        assert (await c.response()).status == 431
    finally:
        c.close()


@pytest.mark.parametrize("value", [b"a\rx-injected: 1", b"a\nx-injected: 1", b"a\r\n x-injected: 1",
                                   b"a\x00x-injected: 1"])
async def test_crlf_injection_in_header_values(gw: Harness, key: str, value: bytes) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(chat_request(key, extra=b"x-request-id: " + value + b"\r\nx-passthrough: " + value + b"\r\n"))
        try:
            r = await c.response()
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # dropped: acceptable
        assert r.status < 500
        assert r.header("x-injected") is None
        if r.status == 200:
            assert "x-injected" not in gw.mock.stats.last_headers
    finally:
        c.close()


# --- methods and paths ------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"BREW", b"PURGE", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE"])
async def test_unknown_or_wrong_methods(gw: Harness, key: str, method: bytes) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(method + b" /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
                     + key.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(CHAT) + CHAT)
        r = await c.response()
        assert 400 <= r.status < 500
        assert "error" in orjson.loads(r.body)
        assert gw.mock.stats.requests_total == 0
    finally:
        c.close()


@pytest.mark.parametrize("path,anthropic", [(b"/nope", False), (b"/v1/chat/completions/x", False),
                                            (b"/v1/messages/nope", True), (b"/%00", False),
                                            (b"/v1/../v1/chat/completions", False), (b"*", False)])
async def test_unknown_paths(gw: Harness, key: str, path: bytes, anthropic: bool) -> None:
    c = await Conn.open(gw)
    try:
        await c.send(b"POST " + path + b" HTTP/1.1\r\nhost: t\r\nx-api-key: " + key.encode()
                     + b"\r\ncontent-length: %d\r\n\r\n" % len(CHAT) + CHAT)
        r = await c.response()
        assert r.status in (400, 404)
        obj = orjson.loads(r.body)
        if anthropic:
            assert obj["type"] == "error"
        else:
            assert "error" in obj
        assert gw.mock.stats.requests_total == 0
    finally:
        c.close()


# --- slowloris --------------------------------------------------------------------------


async def test_slowloris_head_gets_408_within_the_header_timeout(gw: Harness, key: str) -> None:
    c = await Conn.open(gw)
    head = chat_request(key)[:-len(CHAT)]
    t0 = time.monotonic()
    got = b""
    try:
        for byte in head:
            try:
                await c.send(bytes([byte]))
            except ConnectionError:
                break
            await asyncio.sleep(0.2)
            if c.reader.at_eof() or c.reader._buffer:  # type: ignore[attr-defined]
                break
            if time.monotonic() - t0 > 3:
                break
        async with asyncio.timeout(2):
            got = await c.reader.read(65536)
        elapsed = time.monotonic() - t0
        assert got.startswith(b"HTTP/1.1 408"), got
        assert elapsed < 1.8, elapsed
        assert await c.closed()
    finally:
        c.close()


async def test_idle_connection_without_a_request_gets_408(gw: Harness) -> None:
    c = await Conn.open(gw)
    try:
        t0 = time.monotonic()
        r = await c.response(within=3)
        assert r.status == 408
        assert time.monotonic() - t0 < 1.8
        assert await c.closed()
    finally:
        c.close()
