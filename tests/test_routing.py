"""Retries, fallbacks, timeouts and cancellation, end to end.

A real gateway with several channels: the harness's mock upstream, upstreams of our own
that fail in one way each (refuse, answer 429/500/400, hang before headers, black-hole
the connect), and the usage log in Postgres to show what each request cost and where
it went."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from accounting.pricing import cost_nano
from accounting.records import Usage
from tests.gateway import Harness, read_request

KEY_ENV = "TOLLWAY_TEST_UPSTREAM_KEY"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


class BadUpstream:
    """An upstream that fails every request the same way.

    mode: "status" (answer `status` with an OpenAI-shaped error body), "hang" (read the
    request, never answer). Counts requests and requests whose client (the gateway)
    closed the connection while waiting.
    """

    def __init__(self, mode: str = "status", status: int = 500) -> None:
        self.mode = mode
        self.status = status
        self.requests = 0
        self.aborted = 0
        self.answered = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> BadUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                self.requests += 1
                if self.mode == "hang":
                    if not await reader.read(1):
                        self.aborted += 1  # the gateway gave up on us and closed
                    return
                body = b'{"error":{"message":"bad upstream","type":"server_error"}}'
                extra = b"retry-after: 1\r\n" if self.status == 429 else b""
                writer.write(b"HTTP/1.1 %d Error\r\ncontent-type: application/json\r\n" % self.status
                             + extra + b"content-length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                self.answered.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: further SYNs are dropped, connects hang."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.settimeout(0.2)
        fillers.append(s)
        try:
            s.connect(lsock.getsockname())
        except (TimeoutError, OSError):
            break
    return lsock, fillers


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def ch(name: str, port: int | str, models: list[str], protocol: str = "openai", **kw: Any) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}" + ("/v1" if protocol == "openai" else "")
    return {"name": name, "protocol": protocol, "base_url": base, "api_key_env": KEY_ENV,
            "models": models, **kw}


GOOD = ch("rt-good", "{port}", ["gpt-*", "o3-mini"])


@contextlib.asynccontextmanager
async def gateway(pg_dsn: str, channels: list[dict[str, Any]], **sections: Any) -> Any:
    up = {"max_attempts": 3, "retry_deadline_s": 10.0, **sections.pop("upstream", {})}
    h = await Harness().start(pg_dsn, channels=channels, upstream=up, **sections)
    try:
        yield h
    finally:
        await h.stop()


async def bad(mode: str = "status", status: int = 500) -> BadUpstream:
    return await BadUpstream(mode, status).start()


async def post(h: Harness, secret: str, body: dict[str, Any], path: str = "/v1/chat/completions"
               ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.post(
            h.url + path, data=orjson.dumps(body),
            headers={"authorization": f"Bearer {secret}", "content-type": "application/json"}) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def row(h: Harness, rid: str) -> asyncpg.Record:
    await h.flush()
    conn = await asyncpg.connect(h.dsn)
    try:
        r = await conn.fetchrow("SELECT * FROM usage_log WHERE request_id = $1", rid)
    finally:
        await conn.close()
    assert r is not None, f"no usage row for {rid}"
    return r


async def last_row(h: Harness, key_id: int) -> asyncpg.Record:
    await h.flush()
    conn = await asyncpg.connect(h.dsn)
    try:
        r = await conn.fetchrow("SELECT * FROM usage_log WHERE key_id = $1 ORDER BY ts DESC LIMIT 1", key_id)
    finally:
        await conn.close()
    assert r is not None
    return r


def idle(h: Harness) -> bool:
    gw = h.worker.gw  # type: ignore[union-attr]
    assert gw is not None and gw.limiter is not None
    return gw.in_flight == 0 and gw.limiter.inflight == 0


async def settled(h: Harness, within: float = 2.0) -> float:
    """Wait until the gateway holds nothing for the request; returns the time it took."""
    t0 = time.monotonic()
    while not idle(h):
        assert time.monotonic() - t0 < within, "request still in flight"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


# --- retries before the first byte -------------------------------------------------------


@pytest.mark.parametrize("failure", ["refuse", "500", "429", "hang"])
async def test_retry_on_another_channel(pg_dsn: str, failure: str) -> None:
    b = await bad("hang" if failure == "hang" else "status", int(failure) if failure.isdigit() else 500)
    port = closed_port() if failure == "refuse" else b.port
    chans = [ch("rt-bad", port, ["gpt-*"], priority=10), GOOD]
    async with gateway(pg_dsn, chans, upstream={"first_byte_timeout_s": 0.3}) as h:
        _, _, secret = await h.user_and_key()
        status, headers, body = await post(h, secret, {**CHAT, "stream": True})
        assert status == 200, body
        assert body.endswith(b"data: [DONE]\n\n")
        r = await row(h, headers["x-request-id"])
        assert r["attempts"] == 2
        assert r["channels_tried"] == "rt-bad,rt-good"
        assert r["channel"] == "rt-good" and r["status"] == 200
        assert r["cost_nano"] > 0 and r["usage_source"] == "upstream"
        if failure != "refuse":
            assert b.requests == 1
        if failure == "hang":
            await asyncio.sleep(0.05)
            assert b.aborted == 1  # the first-byte timeout closed the hung attempt
        assert h.mock.stats.requests_total == 1
    await b.close()


async def test_4xx_other_than_429_is_not_retried(pg_dsn: str) -> None:
    b = await bad("status", 400)
    async with gateway(pg_dsn, [ch("rt-bad", b.port, ["gpt-*"], priority=10), GOOD]) as h:
        _, _, secret = await h.user_and_key()
        status, headers, body = await post(h, secret, CHAT)
        assert status == 400
        assert orjson.loads(body)["error"]["message"] == "bad upstream"  # passed through
        r = await row(h, headers["x-request-id"])
        assert (r["attempts"], r["channels_tried"], r["cost_nano"]) == (1, "rt-bad", 0)
        assert h.mock.stats.requests_total == 0
        # A client error is not the channel's fault: the breaker does not count it.
        ch_ = h.worker.gw.router.channel("rt-bad")  # type: ignore[union-attr]
        assert ch_ is not None and ch_.breaker.errors == 0
    await b.close()


async def test_attempts_capped_never_the_same_channel_twice(pg_dsn: str) -> None:
    bads = [await bad("status", 500) for _ in range(3)]
    chans = [ch(f"rt-bad{i}", b.port, ["gpt-*"], priority=10) for i, b in enumerate(bads)]
    async with gateway(pg_dsn, [*chans, GOOD], upstream={"max_attempts": 2}) as h:
        _, _, secret = await h.user_and_key()
        status, headers, body = await post(h, secret, CHAT)
        assert status == 502
        assert orjson.loads(body)["error"]["code"] == "upstream_error"
        r = await row(h, headers["x-request-id"])
        tried = r["channels_tried"].split(",")
        assert r["attempts"] == 2 and len(set(tried)) == 2
        assert all(t.startswith("rt-bad") for t in tried)
        assert sum(b.requests for b in bads) == 2
        assert r["cost_nano"] == 0
        assert h.mock.stats.requests_total == 0
    for b in bads:
        await b.close()


async def test_upstream_429_everywhere_passes_429_through(pg_dsn: str) -> None:
    b1, b2 = await bad("status", 429), await bad("status", 429)
    async with gateway(pg_dsn, [ch("rt-a", b1.port, ["gpt-*"]), ch("rt-b", b2.port, ["gpt-*"])]) as h:
        _, _, secret = await h.user_and_key()
        status, headers, _ = await post(h, secret, CHAT)
        assert status == 429
        r = await row(h, headers["x-request-id"])
        assert r["attempts"] == 2 and set(r["channels_tried"].split(",")) == {"rt-a", "rt-b"}
        assert b1.requests == b2.requests == 1 and r["cost_nano"] == 0
    await b1.close()
    await b2.close()


async def test_retry_deadline_stops_retrying(pg_dsn: str) -> None:
    b = await bad("hang")
    chans = [ch("rt-hang", b.port, ["gpt-*"], priority=10), GOOD]
    async with gateway(pg_dsn, chans, upstream={"first_byte_timeout_s": 0.4,
                                                "retry_deadline_s": 0.2}) as h:
        _, _, secret = await h.user_and_key()
        status, headers, body = await post(h, secret, CHAT)
        assert status == 504
        assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
        r = await row(h, headers["x-request-id"])
        assert (r["attempts"], r["channels_tried"]) == (1, "rt-hang")
        assert h.mock.stats.requests_total == 0
    await b.close()


async def test_retries_back_off(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.app

    class Full:
        @staticmethod
        def random() -> float:
            return 1.0

    monkeypatch.setattr(relay.app, "random", Full)
    bads = [await bad("status", 503) for _ in range(3)]
    chans = [ch(f"rt-bad{i}", b.port, ["gpt-*"], priority=10 - i) for i, b in enumerate(bads)]
    async with gateway(pg_dsn, [*chans, GOOD], upstream={"max_attempts": 4}) as h:
        _, _, secret = await h.user_and_key()
        t0 = time.monotonic()
        status, headers, _b = await post(h, secret, CHAT)
        took = time.monotonic() - t0
        assert status == 200, _b
        r = await row(h, headers["x-request-id"])
        assert r["attempts"] == 4 and r["channels_tried"] == "rt-bad0,rt-bad1,rt-bad2,rt-good"
        # Exponential: 0.05 + 0.1 + 0.2 s of backoff at full jitter.
        assert took >= 0.35
    for b in bads:
        await b.close()


# --- nothing is retried after the first byte ---------------------------------------------


@pytest.mark.parametrize("fail", ["stall", "reset"])
async def test_mid_stream_failure_is_not_retried_and_billed(pg_dsn: str, fail: str) -> None:
    chans = [ch("rt-one", "{port}", ["gpt-*"], priority=10), ch("rt-two", "{port}", ["gpt-*"])]
    async with gateway(pg_dsn, chans, upstream={"idle_timeout_s": 0.3}) as h:
        _, _, secret = await h.user_and_key()
        body = {**CHAT, "stream": True, "mock": {"fail": fail, "fail_after": 3, "chunks": 8}}
        status, headers, out = await post(h, secret, body)
        assert status == 200
        events = [e for e in out.split(b"\n\n") if e]
        assert b'"content":"hello "' in events[1]
        last = orjson.loads(events[-1].removeprefix(b"data: "))
        assert "error" in last  # one error event, then the end
        assert b"[DONE]" not in out
        assert h.mock.stats.requests_total == 1  # never a second channel
        r = await row(h, headers["x-request-id"])
        assert r["attempts"] == 1
        assert r["error_code"] == ("upstream_timeout" if fail == "stall" else "upstream_error")
        assert r["usage_source"] == "estimated" and r["output_tokens"] > 0
        assert r["cost_nano"] > 0  # billed for what was emitted
        await settled(h)


# --- fallbacks ---------------------------------------------------------------------------


async def test_fallback_model_answers_and_is_billed_at_its_price(pg_dsn: str) -> None:
    b = await bad("status", 529)
    chans = [ch("rt-sonnet", b.port, ["claude-sonnet-*"], protocol="anthropic"),
             ch("rt-haiku", "{port}", ["claude-haiku-*"], protocol="anthropic")]
    async with gateway(pg_dsn, chans, fallbacks={"claude-sonnet-4-6": ["claude-haiku-4-5"]},
                       prices={"claude-haiku-4-5": {"input": "1", "output": "5"}}) as h:
        _, _, secret = await h.user_and_key()
        status, headers, body = await post(h, secret, MSG, "/v1/messages")
        assert status == 200, body
        r = await row(h, headers["x-request-id"])
        assert r["model"] == "claude-sonnet-4-6"  # what the client asked for
        assert r["upstream_model"] == "claude-haiku-4-5"  # what answered
        assert (r["attempts"], r["channels_tried"], r["channel"]) == (2, "rt-sonnet,rt-haiku", "rt-haiku")
        pb = h.worker.gw.pricebook  # type: ignore[union-attr]
        usage = Usage(input=r["input_tokens"], output=r["output_tokens"])
        from fractions import Fraction
        assert r["cost_nano"] == cost_nano(usage, pb.lookup("claude-haiku-4-5"), Fraction(1))
        assert r["cost_nano"] != cost_nano(usage, pb.lookup("claude-sonnet-4-6"), Fraction(1))
        assert r["price_version"] == pb.lookup("claude-haiku-4-5").version
    await b.close()


async def test_fallback_asks_the_upstream_for_the_fallback_model(pg_dsn: str) -> None:
    b = await bad("status", 500)
    chans = [ch("rt-sonnet", b.port, ["claude-sonnet-*"], protocol="anthropic"),
             ch("rt-haiku", "{port}", ["claude-haiku-*"], protocol="anthropic")]
    async with gateway(pg_dsn, chans, fallbacks={"claude-sonnet-4-6": ["claude-haiku-4-5"]}) as h:
        _, _, secret = await h.user_and_key()
        for stream in (False, True):
            status, _, body = await post(h, secret, {**MSG, "stream": stream}, "/v1/messages")
            assert status == 200, body
            assert h.mock.stats.last_body["model"] == "claude-haiku-4-5"
    await b.close()


async def test_fallback_not_used_when_the_model_answers(pg_dsn: str) -> None:
    chans = [ch("rt-sonnet", "{port}", ["claude-*"], protocol="anthropic")]
    async with gateway(pg_dsn, chans, fallbacks={"claude-sonnet-4-6": ["claude-haiku-4-5"]}) as h:
        _, _, secret = await h.user_and_key()
        status, headers, _ = await post(h, secret, MSG, "/v1/messages")
        assert status == 200
        r = await row(h, headers["x-request-id"])
        assert (r["upstream_model"], r["attempts"]) == ("claude-sonnet-4-6", 1)


async def test_every_fallback_failing_ends_in_one_error(pg_dsn: str) -> None:
    b1, b2 = await bad("status", 500), await bad("status", 500)
    chans = [ch("rt-sonnet", b1.port, ["claude-sonnet-*"], protocol="anthropic"),
             ch("rt-haiku", b2.port, ["claude-haiku-*"], protocol="anthropic")]
    async with gateway(pg_dsn, chans, fallbacks={"claude-sonnet-4-6": ["claude-haiku-4-5"]}) as h:
        _, _, secret = await h.user_and_key()
        status, headers, body = await post(h, secret, MSG, "/v1/messages")
        assert status == 502
        assert orjson.loads(body)["error"]["type"] == "api_error"
        r = await row(h, headers["x-request-id"])
        assert (r["attempts"], r["channels_tried"], r["cost_nano"]) == (2, "rt-sonnet,rt-haiku", 0)
    await b1.close()
    await b2.close()


# --- timeouts ----------------------------------------------------------------------------


async def test_first_byte_timeout_per_model_class(pg_dsn: str) -> None:
    async with gateway(pg_dsn, [GOOD], upstream={"first_byte_timeout_s": 0.2,
                                                 "first_byte_timeout_reasoning_s": 3.0}) as h:
        _, _, secret = await h.user_and_key()
        slow = {"mock": {"ttfb_ms": 600}}
        status, headers, body = await post(h, secret, {**CHAT, **slow})
        assert status == 504 and b"0.2s" in body
        r = await row(h, headers["x-request-id"])
        assert r["cost_nano"] == 0 and r["error_code"] == "upstream_timeout"
        # o3-mini is a reasoning model: it may think for longer before its first byte.
        status, _, _ = await post(h, secret, {**CHAT, "model": "o3-mini", **slow})
        assert status == 200
        await asyncio.sleep(0.05)
        assert h.mock.stats.requests_aborted_by_client == 1


async def test_total_timeout_ends_stream_with_error_and_bills(pg_dsn: str) -> None:
    async with gateway(pg_dsn, [GOOD], upstream={"total_timeout_s": 0.5}) as h:
        _, _, secret = await h.user_and_key()
        body = {**CHAT, "stream": True, "mock": {"chunks": 40, "delay_ms": 50}}
        t0 = time.monotonic()
        status, headers, out = await post(h, secret, body)
        assert status == 200 and time.monotonic() - t0 < 1.5
        assert b"did not finish within 0.5s" in out
        r = await row(h, headers["x-request-id"])
        assert r["error_code"] == "upstream_timeout" and r["cost_nano"] > 0
        assert 0 < r["output_tokens"] < 40
        await asyncio.sleep(0.05)
        assert h.mock.stats.streams_aborted_by_client == 1  # the upstream was cancelled


# --- channel selection -------------------------------------------------------------------


async def test_concurrency_cap_spills_to_next_channel(pg_dsn: str) -> None:
    chans = [ch("rt-capped", "{port}", ["gpt-*"], priority=10, max_concurrency=1),
             ch("rt-spill", "{port}", ["gpt-*"])]
    async with gateway(pg_dsn, chans) as h:
        _, _, secret = await h.user_and_key()
        slow = {**CHAT, "mock": {"ttfb_ms": 400}}
        first = asyncio.create_task(post(h, secret, slow))
        await asyncio.sleep(0.15)
        second = await post(h, secret, slow)
        one = await first
        r1, r2 = await row(h, one[1]["x-request-id"]), await row(h, second[1]["x-request-id"])
        assert (r1["channel"], r2["channel"]) == ("rt-capped", "rt-spill")
        assert r2["attempts"] == 1


# --- cancellation: the client leaves in every state ---------------------------------------


async def raw_request(h: Harness, secret: str, body: dict[str, Any]
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", h.worker.port)  # type: ignore[union-attr]
    data = orjson.dumps(body)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"authorization: Bearer " + secret.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(data)
                 + data)
    await writer.drain()
    return reader, writer


async def gone(writer: asyncio.StreamWriter, rst: bool = True) -> None:
    """The client leaves. rst: as a killed process or a timed-out SDK does (RST); else an
    orderly close (FIN), which the gateway only notices if it reads the socket."""
    sock = writer.get_extra_info("socket")
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await asyncio.sleep(0)


async def test_client_gone_while_connecting(pg_dsn: str) -> None:
    lsock, fillers = blackhole()
    chans = [ch("rt-blackhole", lsock.getsockname()[1], ["gpt-*"], priority=10), GOOD]
    try:
        async with gateway(pg_dsn, chans, upstream={"connect_timeout_s": 5.0}) as h:
            _, key_id, secret = await h.user_and_key()
            _, writer = await raw_request(h, secret, {**CHAT, "stream": True})
            await asyncio.sleep(0.3)
            assert not idle(h)  # still connecting
            await gone(writer)
            assert await settled(h) < 1.0  # long before the connect timeout
            r = await last_row(h, key_id)
            assert (r["attempts"], r["cost_nano"], r["usage_source"]) == (1, 0, "none")
            assert h.mock.stats.requests_total == 0  # no retry for a client that left
    finally:
        for s in fillers:
            s.close()
        lsock.close()


async def test_client_gone_while_waiting_for_headers(pg_dsn: str) -> None:
    async with gateway(pg_dsn, [GOOD]) as h:
        _, key_id, secret = await h.user_and_key()
        _, writer = await raw_request(h, secret, {**CHAT, "stream": True, "mock": {"ttfb_ms": 5000}})
        await asyncio.sleep(0.3)
        await gone(writer)
        await settled(h)
        await asyncio.sleep(0.05)
        assert h.mock.stats.streams_aborted_by_client == 1
        r = await last_row(h, key_id)
        assert (r["cost_nano"], r["attempts"], r["usage_source"]) == (0, 1, "none")


async def test_client_gone_before_response_is_logged_499(pg_dsn: str) -> None:
    async with gateway(pg_dsn, [GOOD]) as h:
        _, key_id, secret = await h.user_and_key()
        _, writer = await raw_request(h, secret, {**CHAT, "stream": True, "mock": {"ttfb_ms": 2000}})
        await asyncio.sleep(0.2)
        await gone(writer)
        await settled(h)
        r = await last_row(h, key_id)
        assert (r["status"], r["error_code"]) == (499, "client_closed_request")


async def test_client_closing_while_waiting_for_headers(pg_dsn: str) -> None:
    async with gateway(pg_dsn, [GOOD]) as h:
        _, key_id, secret = await h.user_and_key()
        _, writer = await raw_request(h, secret, {**CHAT, "stream": True, "mock": {"ttfb_ms": 1500}})
        await asyncio.sleep(0.3)
        await gone(writer, rst=False)
        await settled(h, within=1.0)
        await asyncio.sleep(0.05)
        assert h.mock.stats.streams_aborted_by_client == 1
        r = await last_row(h, key_id)
        assert r["cost_nano"] == 0


async def test_client_gone_while_upstream_hangs(pg_dsn: str) -> None:
    b = await bad("hang")
    async with gateway(pg_dsn, [ch("rt-hang", b.port, ["gpt-*"], priority=10), GOOD]) as h:
        _, _, secret = await h.user_and_key()
        _, writer = await raw_request(h, secret, CHAT)
        await asyncio.sleep(0.3)
        assert b.requests == 1
        await gone(writer)
        await settled(h)
        await asyncio.sleep(0.05)
        assert b.aborted == 1 and h.mock.stats.requests_total == 0
    await b.close()


async def test_client_gone_mid_stream(pg_dsn: str) -> None:
    async with gateway(pg_dsn, [GOOD]) as h:
        _, key_id, secret = await h.user_and_key()
        reader, writer = await raw_request(h, secret, {**CHAT, "stream": True,
                                                       "mock": {"chunks": 100, "delay_ms": 50}})
        got = b""
        while b'"content":"hello "' not in got:
            got += await reader.read(65536)
        await gone(writer)
        await settled(h)
        await asyncio.sleep(0.05)
        assert h.mock.stats.streams_aborted_by_client == 1
        assert h.mock.stats.streams_completed == 0
        r = await last_row(h, key_id)
        assert r["cost_nano"] > 0 and 0 < r["output_tokens"] < 100  # billed for what was emitted


async def test_client_gone_during_backoff(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.app

    class Full:
        @staticmethod
        def random() -> float:
            return 1.0

    monkeypatch.setattr(relay.app, "random", Full)
    real_sleep = asyncio.sleep
    sleeping = asyncio.Event()
    cancelled: list[float] = []

    async def spy(delay: float, result: Any = None) -> Any:
        # The first backoff (0.05 * 2**0 at full jitter); the ledger's loop sleeps 0.05 too.
        if delay == 0.05 and sys._getframe(1).f_code.co_name == "_model_request":
            sleeping.set()
            try:
                # Held long enough that the client's leaving surely lands inside it.
                return await real_sleep(2.0, result)
            except asyncio.CancelledError:
                cancelled.append(delay)
                raise
        return await real_sleep(delay, result)

    b = await bad("status", 500)
    async with gateway(pg_dsn, [ch("rt-bad", b.port, ["gpt-*"], priority=10), GOOD]) as h:
        _, key_id, secret = await h.user_and_key()
        monkeypatch.setattr(asyncio, "sleep", spy)
        try:
            _, writer = await raw_request(h, secret, CHAT)
            await asyncio.wait_for(sleeping.wait(), 2)
            await gone(writer)
            await settled(h)
        finally:
            monkeypatch.setattr(asyncio, "sleep", real_sleep)
        assert cancelled == [0.05]  # the backoff sleep was where the client left
        assert b.requests == 1
        assert h.mock.stats.requests_total == 0  # no further attempt
        r = await last_row(h, key_id)
        assert (r["attempts"], r["channels_tried"], r["cost_nano"]) == (1, "rt-bad", 0)
    await b.close()
