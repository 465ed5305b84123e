"""The relay end to end: real mock upstream, real worker, real Postgres, raw HTTP clients."""

from __future__ import annotations

import asyncio
import base64
import socket
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.gateway import Harness, read_request

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw(pg_dsn: str):
    h = await Harness().start(pg_dsn)
    yield h
    await h.stop()


@pytest.fixture
async def key(gw: Harness) -> str:
    return (await gw.user_and_key())[2]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


def bearer(k: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {k}"}


async def post(http: aiohttp.ClientSession, gw: Harness, path: str, body: Any,
               headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(gw.url + path, data=data, headers={"content-type": "application/json", **headers}) as r:
        return r.status, dict(r.headers), await r.read()


# --- every route, stream and non-stream ---------------------------------------------


async def test_chat_non_stream(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    status, headers, body = await post(http, gw, "/v1/chat/completions", CHAT, bearer(key))
    assert status == 200
    obj = orjson.loads(body)
    assert obj["object"] == "chat.completion"
    assert obj["usage"]["completion_tokens"] == 5
    assert headers["X-Request-ID"].startswith("req_")


async def test_chat_stream_withholds_requested_usage_chunk(gw: Harness, key: str,
                                                           http: aiohttp.ClientSession) -> None:
    status, _, body = await post(http, gw, "/v1/chat/completions", {**CHAT, "stream": True}, bearer(key))
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    payloads = [orjson.loads(e[6:]) for e in events[:-1]]
    # The gateway asked for usage; the client did not, so the usage-only chunk is withheld.
    assert all(p["choices"] for p in payloads)
    # ... and the upstream was asked for it.
    assert gw.mock.stats.last_body["stream_options"] == {"include_usage": True}


async def test_chat_stream_with_client_usage(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, _, body = await post(http, gw, "/v1/chat/completions", req, bearer(key))
    assert status == 200
    events = [orjson.loads(e[6:]) for e in body.split(b"\n\n") if e and e != b"data: [DONE]"]
    usage_chunks = [e for e in events if not e["choices"]]
    assert len(usage_chunks) == 1
    assert usage_chunks[0]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True])
async def test_completions(gw: Harness, key: str, http: aiohttp.ClientSession, stream: bool) -> None:
    status, _, body = await post(http, gw, "/v1/completions",
                                 {"model": "gpt-4o-mini", "prompt": "hi", "stream": stream}, bearer(key))
    assert status == 200
    assert (b"data: [DONE]" in body) == stream


@pytest.mark.parametrize("stream", [False, True])
async def test_responses(gw: Harness, key: str, http: aiohttp.ClientSession, stream: bool) -> None:
    status, _, body = await post(http, gw, "/v1/responses",
                                 {"model": "gpt-4o-mini", "input": "hi", "stream": stream}, bearer(key))
    assert status == 200
    if stream:
        assert b"event: response.completed" in body
    else:
        assert orjson.loads(body)["usage"]["output_tokens"] == 5


async def test_embeddings_float_and_base64(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    for fmt in ("float", "base64"):
        status, _, body = await post(http, gw, "/v1/embeddings",
                                     {"model": "text-embedding-3-small", "input": "hi", "encoding_format": fmt},
                                     bearer(key))
        assert status == 200
        emb = orjson.loads(body)["data"][0]["embedding"]
        if fmt == "base64":
            assert len(base64.b64decode(emb)) % 4 == 0
        else:
            assert isinstance(emb[0], float)


@pytest.mark.parametrize("stream", [False, True])
async def test_messages(gw: Harness, key: str, http: aiohttp.ClientSession, stream: bool) -> None:
    status, _, body = await post(http, gw, "/v1/messages?beta=true", {**MSG, "stream": stream},
                                 {"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert status == 200
    if stream:
        assert body.startswith(b"event: message_start")
        assert b"event: message_stop" in body
    else:
        assert orjson.loads(body)["type"] == "message"


async def test_count_tokens(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    status, _, body = await post(http, gw, "/v1/messages/count_tokens",
                                 {"model": "claude-sonnet-4-6", "messages": MSG["messages"]}, {"x-api-key": key})
    assert status == 200
    assert orjson.loads(body)["input_tokens"] > 0


async def test_models_lists_exactly_what_the_key_may_use(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, _, scoped = await gw.user_and_key(models=["gpt-4o-mini"])
    async with http.get(gw.url + "/v1/models", headers=bearer(scoped)) as r:
        assert r.status == 200
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["gpt-4o-mini"]
    async with http.get(gw.url + "/v1/models/gpt-4o-mini", headers=bearer(scoped)) as r:
        assert r.status == 200
        assert (await r.json())["id"] == "gpt-4o-mini"
    async with http.get(gw.url + "/v1/models/claude-sonnet-4-6", headers=bearer(scoped)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "model_not_found"


# --- auth -----------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
async def test_each_auth_header(gw: Harness, key: str, http: aiohttp.ClientSession, header: str) -> None:
    value = f"Bearer {key}" if header == "authorization" else key
    status, _, _ = await post(http, gw, "/v1/chat/completions", CHAT, {header: value})
    assert status == 200


async def test_client_key_never_goes_upstream(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    await post(http, gw, "/v1/chat/completions", CHAT, bearer(key))
    seen = gw.mock.stats.last_headers
    assert seen["authorization"] == "Bearer upstream-secret-credential"
    assert key not in orjson.dumps(seen).decode()
    await post(http, gw, "/v1/messages", MSG, {"x-api-key": key})
    seen = gw.mock.stats.last_headers
    assert seen["x-api-key"] == "upstream-secret-credential"
    assert key not in orjson.dumps(seen).decode()


async def test_disabled_key_refused_within_a_second(gw: Harness, pg_dsn: str,
                                                    http: aiohttp.ClientSession) -> None:
    _, key_id, secret = await gw.user_and_key()
    assert (await post(http, gw, "/v1/chat/completions", CHAT, bearer(secret)))[0] == 200
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("UPDATE keys SET status = 'disabled' WHERE id = $1", key_id)
    await conn.close()
    await asyncio.sleep(1.0)
    status, _, body = await post(http, gw, "/v1/chat/completions", CHAT, bearer(secret))
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "invalid_api_key"


# --- pass-through of what the gateway does not understand -------------------------------


async def test_unknown_fields_and_headers_pass_through(gw: Harness, key: str,
                                                       http: aiohttp.ClientSession) -> None:
    body = {**MSG, "thinking": {"type": "enabled", "budget_tokens": 1024}, "brand_new_field": [1, {"x": None}],
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": [{"type": "text", "text": "c"}]}]}
    raw = orjson.dumps(body)
    await post(http, gw, "/v1/messages", raw, {"x-api-key": key, "anthropic-version": "2023-06-01",
                                               "anthropic-beta": "interleaved-thinking-2025-05-14"})
    assert gw.mock.stats.last_body == body
    assert gw.mock.stats.last_headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert gw.mock.stats.last_headers["anthropic-version"] == "2023-06-01"


async def test_model_mapping_rewrites_only_the_model(gw: Harness, key: str,
                                                     http: aiohttp.ClientSession) -> None:
    status, _, _ = await post(http, gw, "/v1/chat/completions", {**CHAT, "model": "gpt-mapped", "extra": 1},
                              bearer(key))
    assert status == 200
    assert gw.mock.stats.last_body["model"] == "gpt-4o-mini"
    assert gw.mock.stats.last_body["extra"] == 1


# --- the error table -----------------------------------------------------------------


async def _err(http: aiohttp.ClientSession, gw: Harness, path: str, body: Any,
               headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    status, h, raw = await post(http, gw, path, body, headers)
    assert "X-Request-ID" in h
    return status, orjson.loads(raw), h


async def test_errors_openai_shape(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    cases = [
        (b"{not json", bearer(key), 400, "invalid_request"),
        ({"messages": []}, bearer(key), 400, "invalid_request"),
        (CHAT, {}, 401, "invalid_api_key"),
        (CHAT, bearer("sk-" + "x" * 48), 401, "invalid_api_key"),
        ({**CHAT, "model": "no-such-model"}, bearer(key), 404, "model_not_found"),
    ]
    for body, headers, want_status, want_code in cases:
        status, obj, _ = await _err(http, gw, "/v1/chat/completions", body, headers)
        assert status == want_status, (body, obj)
        assert obj["error"]["code"] == want_code
        assert set(obj["error"]) == {"message", "type", "param", "code"}


async def test_errors_anthropic_shape(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    cases = [
        (b"[1,2", {"x-api-key": key}, 400, "invalid_request_error"),
        (MSG, {}, 401, "authentication_error"),
        ({**MSG, "model": "nope-0"}, {"x-api-key": key}, 404, "not_found_error"),
    ]
    for body, headers, want_status, want_type in cases:
        status, obj, _ = await _err(http, gw, "/v1/messages", body, headers)
        assert status == want_status
        assert obj["type"] == "error"
        assert obj["error"]["type"] == want_type


async def test_402_403_429(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, _, broke = await gw.user_and_key(balance="0")
    status, obj, _ = await _err(http, gw, "/v1/chat/completions", CHAT, bearer(broke))
    assert (status, obj["error"]["code"]) == (402, "insufficient_quota")
    status, obj, _ = await _err(http, gw, "/v1/messages", MSG, {"x-api-key": broke})
    assert (status, obj["error"]["type"]) == (402, "billing_error")

    _, _, scoped = await gw.user_and_key(models=["gpt-4o-mini"])
    status, obj, _ = await _err(http, gw, "/v1/messages", MSG, {"x-api-key": scoped})
    assert (status, obj["error"]["type"]) == (403, "permission_error")
    status, obj, _ = await _err(http, gw, "/v1/chat/completions", {**CHAT, "model": "gpt-5.5"}, bearer(scoped))
    assert (status, obj["error"]["code"]) == (403, "model_not_allowed")

    _, _, slow = await gw.user_and_key(rpm=1)
    assert (await post(http, gw, "/v1/chat/completions", CHAT, bearer(slow)))[0] == 200
    status, obj, headers = await _err(http, gw, "/v1/chat/completions", CHAT, bearer(slow))
    assert (status, obj["error"]["code"]) == (429, "rate_limit_exceeded")
    assert int(headers["Retry-After"]) >= 1


async def test_413_body_too_large(pg_dsn: str, http: aiohttp.ClientSession) -> None:
    h = await Harness().start(pg_dsn, server={"max_body_bytes": 1024})
    try:
        _, _, k = await h.user_and_key()
        status, _, raw = await post(http, h, "/v1/chat/completions",
                                     {**CHAT, "pad": "x" * 5000}, bearer(k))
        assert status == 413
        assert orjson.loads(raw)["error"]["code"] == "request_too_large"
    finally:
        await h.stop()


async def test_upstream_4xx_passes_through_unchanged(gw: Harness, key: str,
                                                     http: aiohttp.ClientSession) -> None:
    status, _, raw = await post(http, gw, "/v1/chat/completions", {**CHAT, "mock": {"status": 400}}, bearer(key))
    assert status == 400
    assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"


async def test_upstream_5xx_is_502(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    status, obj, _ = await _err(http, gw, "/v1/chat/completions", {**CHAT, "mock": {"status": 500}}, bearer(key))
    assert (status, obj["error"]["code"]) == (502, "upstream_error")


async def test_upstream_unreachable_502_and_timeout_504(pg_dsn: str, http: aiohttp.ClientSession) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    h = await Harness().start(pg_dsn, upstream={"first_byte_timeout_s": 0.3, "max_attempts": 1})
    try:
        _, _, k = await h.user_and_key()
        status, obj, _ = await _err(http, h, "/v1/chat/completions", {**CHAT, "mock": {"ttfb_ms": 2000}}, bearer(k))
        assert (status, obj["error"]["code"]) == (504, "upstream_timeout")
        status, obj, _ = await _err(http, h, "/v1/messages", {**MSG, "mock": {"fail": "hang"}}, {"x-api-key": k})
        assert (status, obj["error"]["type"]) == (504, "api_error")
    finally:
        await h.stop()
    h = await Harness().start(pg_dsn, channels=[
        {"name": "dead", "protocol": "openai", "base_url": f"http://127.0.0.1:{dead_port}/v1", "models": ["*"]}])
    try:
        _, _, k = await h.user_and_key()
        status, obj, _ = await _err(http, h, "/v1/chat/completions", CHAT, bearer(k))
        assert (status, obj["error"]["code"]) == (502, "upstream_error")
    finally:
        await h.stop()


async def test_mid_stream_failure_sends_one_error_event(gw: Harness, key: str,
                                                        http: aiohttp.ClientSession) -> None:
    status, _, body = await post(http, gw, "/v1/chat/completions",
                                 {**CHAT, "stream": True, "mock": {"fail": "reset", "fail_after": 2}}, bearer(key))
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in body
    status, _, body = await post(http, gw, "/v1/messages",
                                 {**MSG, "stream": True, "mock": {"fail": "reset", "fail_after": 2}}, {"x-api-key": key})
    assert body.rstrip().split(b"\n\n")[-1].startswith(b"event: error\ndata: ")


async def test_client_request_id_is_kept(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    _, headers, _ = await post(http, gw, "/v1/chat/completions", CHAT, {**bearer(key), "x-request-id": "trace-42.a"})
    assert headers["X-Request-ID"] == "trace-42.a"
    _, headers, _ = await post(http, gw, "/v1/chat/completions", CHAT, {**bearer(key), "x-request-id": "bad id!"})
    assert headers["X-Request-ID"].startswith("req_")


async def test_unknown_route_and_method(gw: Harness, key: str, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/v1/chat/completions", headers=bearer(key)) as r:
        assert r.status == 405
    async with http.post(gw.url + "/v2/nothing", headers=bearer(key)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"


async def test_health_and_ready(gw: Harness, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(gw.url + "/readyz") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ready"


# --- byte-exact streaming ----------------------------------------------------------------


async def _scripted_upstream(pieces: list[bytes], head: bytes) -> tuple[asyncio.AbstractServer, int]:
    """An upstream that writes a fixed response in the given pieces, pausing between them."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head)
        for p in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(p), p))
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_stream_bytes_are_exact(pg_dsn: str, http: aiohttp.ClientSession) -> None:
    # Odd but legal SSE: CRLF endings, comments, multi-line data, a UTF-8 character and an
    # event split across writes, extra fields; all must arrive exactly as sent.
    stream = (
        ": keep-alive comment\r\n\r\n"
        "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":"
        "{\"input_tokens\":3,\"output_tokens\":1}}}\r\n\r\n"
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":"
        "{\"type\":\"text_delta\",\"text\":\"h\u00e9llo \u6f22\u5b57 \U0001f600\"}}\n\n"
        "id: 7\nretry: 100\nevent: x-unknown\ndata: line1\ndata: line2\n\n"
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4}}\n\n"
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    ).encode()
    pieces = [stream[i:i + 37] for i in range(0, len(stream), 37)]
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-upstream-extra: 1\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    server, port = await _scripted_upstream(pieces, head)
    h = await Harness().start(pg_dsn, channels=[
        {"name": "scripted", "protocol": "anthropic", "base_url": f"http://127.0.0.1:{port}", "models": ["*"]}])
    try:
        _, key_id, k = await h.user_and_key()
        status, headers, body = await post(http, h, "/v1/messages", {**MSG, "stream": True}, {"x-api-key": k})
        assert status == 200
        assert body == stream
        assert headers["x-upstream-extra"] == "1"
        await h.flush()
        conn = await asyncpg.connect(pg_dsn)
        row = await conn.fetchrow("SELECT input_tokens, output_tokens, usage_source FROM usage_log"
                                  " WHERE key_id = $1", key_id)
        await conn.close()
        assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (3, 4, "upstream")
    finally:
        await h.stop()
        server.close()


# --- disconnects and backpressure ---------------------------------------------------------


async def test_client_disconnect_cancels_upstream(gw: Harness, key: str) -> None:
    before = gw.mock.stats.streams_aborted_by_client
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port)
    body = orjson.dumps({**CHAT, "stream": True, "mock": {"chunks": 200, "delay_ms": 20}})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
                 + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    first = await reader.read(4096)
    assert first.startswith(b"HTTP/1.1 200")
    writer.transport.abort()
    for _ in range(50):
        if gw.mock.stats.streams_aborted_by_client > before:
            break
        await asyncio.sleep(0.02)
    assert gw.mock.stats.streams_aborted_by_client == before + 1
    assert gw.worker.gw.in_flight == 0


async def test_backpressure_pauses_upstream(gw: Harness, key: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port, limit=1024)
    writer.transport.set_write_buffer_limits(0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = orjson.dumps({**CHAT, "stream": True, "mock": {"chunks": 2000, "chunk_size": 32768}})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
                 + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    await reader.read(100)
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    await asyncio.sleep(1.0)
    # 64 MiB cannot hide in socket buffers: the gateway's buffer toward the client stays
    # bounded, it stopped reading the upstream, and so the mock had to pause too.
    conns = list(gw.worker.state.connections)
    buffered = max(c.transport.get_write_buffer_size() for c in conns)
    assert buffered < 1024 * 1024
    assert gw.mock.stats.write_pauses >= 1
    assert gw.mock.stats.streams_completed == 0
    writer.transport.abort()


async def test_price_change_mid_stream_keeps_the_admitted_price(gw: Harness, key: str,
                                                                 http: aiohttp.ClientSession) -> None:
    """DESIGN invariant 3: a request is priced with the version current at its admission."""
    from accounting import pricing
    from relay.config import Price

    model = "gpt-price-change"
    conn = await asyncpg.connect(gw.dsn)
    try:
        old = await pricing.set_price(conn, model, Price(input="1", output="2"), "test")
        await asyncio.sleep(0.7)  # every worker sees it (0.5 s sync)

        async def slow_stream() -> bytes:
            body = {**CHAT, "model": model, "stream": True,
                    "mock": {"chunks": 10, "delay_ms": 100, "input_tokens": 1000}}
            return (await post(http, gw, "/v1/chat/completions", body,
                               {**bearer(key), "x-request-id": "price-change-1"}))[2]

        task = asyncio.create_task(slow_stream())
        await asyncio.sleep(0.3)  # admitted, streaming
        new = await pricing.set_price(conn, model, Price(input="100", output="200"), "test")
        assert new.version > old.version
        await asyncio.sleep(0.7)  # the worker has the new version before the stream ends
        assert gw.worker.gw.pricebook.lookup(model).version == new.version
        assert (await task).rstrip().endswith(b"data: [DONE]")
        await gw.flush()
        row = await conn.fetchrow("SELECT price_version, cost_nano, input_tokens, output_tokens"
                                  " FROM usage_log WHERE client_request_id = 'price-change-1'")
    finally:
        await conn.close()
    assert row["price_version"] == old.version
    # 1,000 input at $1/M + 10 output at $2/M, exactly: 1,000,000 + 20,000 nano.
    assert (row["input_tokens"], row["output_tokens"]) == (1000, 10)
    assert row["cost_nano"] == 1_020_000
