"""The money path against a hostile key holder: every finding of the money-path issue.

Each test plays the client that tries to spend more than it paid, through the real
worker, the bundled mock upstream and Postgres, and checks the books afterwards: no
balance below zero, the upstream never asked for more than was reserved, usage billed
on every path.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from accounting.money import parse_usd
from tests.gateway import Harness

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def gw(pg_dsn: str):
    h = await Harness().start(pg_dsn)
    yield h
    await h.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


async def send(http: aiohttp.ClientSession, gw: Harness, path: str, body: Any, secret: str,
               headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    hdrs = {"authorization": f"Bearer {secret}", "content-type": "application/json",
            **(headers or {})}
    async with http.post(gw.url + path, data=data, headers=hdrs) as r:
        raw = await r.read()
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = raw
        return r.status, obj, dict(r.headers)


async def balance(gw: Harness, user_id: int) -> int:
    await gw.flush()
    conn = await asyncpg.connect(gw.dsn)
    try:
        return int(await conn.fetchval("SELECT balance_nano FROM users WHERE id = $1", user_id))
    finally:
        await conn.close()


async def rows(gw: Harness, key_id: int) -> list[asyncpg.Record]:
    await gw.flush()
    conn = await asyncpg.connect(gw.dsn)
    try:
        return await conn.fetch("SELECT * FROM usage_log WHERE key_id = $1 ORDER BY ts", key_id)
    finally:
        await conn.close()


def upstream_body(gw: Harness) -> dict[str, Any]:
    body = gw.mock.stats.last_body
    assert isinstance(body, dict)
    return body


# --- one parse, one truth ------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"model": "claude-sonnet-4-6", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "gpt-4o-mini", "max_tokens": 100000, "max_tokens": 1, "messages": []}',
    b'{"model": "gpt-4o-mini", "messages": [], "stream": true, "stream_options": {"include_usage": true, "include_usage": false}}',
    # Spelled with an escape, and nested: neither slips past.
    b'{"model": "gpt-4o-mini", "max_\\u0074okens": 100000, "max_tokens": 1, "messages": []}',
    b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a", "content": "b"}]}',
])
async def test_duplicate_keys_are_refused(gw: Harness, http: aiohttp.ClientSession, raw: bytes) -> None:
    _, _, secret = await gw.user_and_key()
    gw.mock.stats.requests_total = 0
    status, obj, _ = await send(http, gw, "/v1/chat/completions", raw, secret)
    assert status == 400 and obj["error"]["type"] == "invalid_request_error"
    assert "Duplicate key" in obj["error"]["message"]
    assert gw.mock.stats.requests_total == 0


async def test_duplicate_keys_refused_on_the_anthropic_protocol(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, _, secret = await gw.user_and_key()
    raw = (b'{"model": "claude-sonnet-4-6", "max_tokens": 64000, "max_tokens": 1,'
           b' "messages": [{"role": "user", "content": "hi"}]}')
    status, obj, _ = await send(http, gw, "/v1/messages", raw, secret, {"x-api-key": secret})
    assert status == 400 and obj["type"] == "error"
    assert obj["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "model", "expect"), [
    ("/v1/chat/completions", "gpt-4o-mini", 200),  # native: the bytes go as sent
    ("/v1/messages", "gpt-4o-mini", 400),  # translated: the gateway writes the body
])
async def test_an_integer_beyond_64_bits_is_never_a_500(gw: Harness, http: aiohttp.ClientSession,
                                                       path: str, model: str, expect: int) -> None:
    _, _, secret = await gw.user_and_key()
    # A number the parser takes exactly (a Python int) but no JSON writer of 64-bit
    # integers can write back: the native routes forward the bytes as sent; a route
    # whose body the gateway writes refuses it as the client's error, never a 500.
    raw = (b'{"model": "%s", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}],'
           b' "temperature": 123456789012345678901234567890}' % model.encode())
    status, obj, _ = await send(http, gw, path, raw, secret, {"x-api-key": secret})
    assert status == expect, obj
    if expect == 400:
        assert obj["error"]["type"] == "invalid_request_error"
        assert "64-bit" in obj["error"]["message"]


async def test_a_key_name_inside_a_string_is_not_a_duplicate(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, _, secret = await gw.user_and_key()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "model"}]}
    status, _, _ = await send(http, gw, "/v1/chat/completions", body, secret)
    assert status == 200


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "64000"), ("max_completion_tokens", 1.5), ("n", 2.0), ("n", 0), ("n", 500),
    ("max_tokens", True), ("stream", "yes"), ("max_tokens", -1), ("stream_options", []),
])
async def test_wrong_types_are_400_never_a_default(gw: Harness, http: aiohttp.ClientSession,
                                                   field: str, value: Any) -> None:
    _, _, secret = await gw.user_and_key()
    body = {"model": "gpt-4o-mini", "messages": MSG, field: value}
    status, obj, _ = await send(http, gw, "/v1/chat/completions", body, secret)
    assert status == 400, obj
    assert field in obj["error"]["message"]


# --- the bound is what the upstream may produce ------------------------------------------


async def test_responses_to_claude_reserves_the_bound_actually_sent(
        gw: Harness, http: aiohttp.ClientSession) -> None:
    # Reserved 1 token and sent max_tokens 64000 before: the user ended at -0.96 USD.
    user_id, _, secret = await gw.user_and_key(balance="0.002")
    body = {"model": "claude-sonnet-4-6", "input": "hi", "max_completion_tokens": 1,
            "max_output_tokens": 64000, "mock": {"chunks": 64000}}
    status, obj, _ = await send(http, gw, "/v1/responses", body, secret)
    assert status == 402, obj
    assert "needs" in obj["error"]["message"]
    assert await balance(gw, user_id) == parse_usd("0.002")


async def test_messages_to_openai_reserves_the_bound_actually_sent(gw: Harness, http: aiohttp.ClientSession) -> None:
    # The chat upstream may honour either field: 16,000 tokens at 0.60 USD/M is 0.0096 USD.
    user_id, _, secret = await gw.user_and_key(balance="0.002")
    body = {"model": "gpt-4o-mini", "max_completion_tokens": 1, "max_tokens": 16000,
            "messages": MSG}
    status, obj, _ = await send(http, gw, "/v1/messages", body, secret, {"x-api-key": secret})
    assert status == 402 and obj["error"]["type"] == "billing_error"
    body["max_tokens"] = 1000
    status, obj, _ = await send(http, gw, "/v1/messages", body, secret, {"x-api-key": secret})
    assert status == 200, obj
    sent = upstream_body(gw)
    assert max(sent.get("max_tokens") or 0, sent.get("max_completion_tokens") or 0) <= 1000
    assert await balance(gw, user_id) >= 0


async def test_no_bound_sends_the_reserved_one(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, _, secret = await gw.user_and_key()
    for path, body, field in [
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG}, "max_tokens"),
        ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "hi"}, "max_tokens"),
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}, "max_output_tokens"),
        ("/v1/chat/completions", {"model": "claude-sonnet-4-6", "messages": MSG,
                                  "reasoning_effort": "xhigh"}, "max_tokens"),
    ]:
        status, obj, _ = await send(http, gw, path, body, secret)
        assert status == 200, (path, obj)
        sent = upstream_body(gw)
        assert sent[field] == 4096, (path, sent)
        th = sent.get("thinking")
        if th is not None:
            assert th["budget_tokens"] < sent["max_tokens"]


async def test_choices_multiply_the_reservation(gw: Harness, http: aiohttp.ClientSession) -> None:
    # 1,000 output tokens at 0.60 USD/M is 0.0006 USD; five choices need five times that.
    user_id, _, secret = await gw.user_and_key(balance="0.001")
    body = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 1000}
    status, _, _ = await send(http, gw, "/v1/chat/completions", {**body, "n": 5}, secret)
    assert status == 402
    status, _, _ = await send(http, gw, "/v1/chat/completions", body, secret)
    assert status == 200
    assert await balance(gw, user_id) >= 0


async def test_many_unbounded_streams_never_overdraw(gw: Harness, http: aiohttp.ClientSession) -> None:
    # A balance for a few reservations, many streams that name no bound.
    # 4,096 output tokens at 15 USD/M reserve 0.061 USD: 0.25 USD is four reservations.
    user_id, _, secret = await gw.user_and_key(balance="0.25")
    body = {"model": "claude-sonnet-4-6", "messages": MSG, "stream": True,
            "mock": {"chunks": 400, "chunk_size": 24, "ttfb_ms": 200}}
    results = await asyncio.gather(*[
        send(http, gw, "/v1/messages", body, secret, {"x-api-key": secret}) for _ in range(40)])
    assert any(s == 200 for s, _, _ in results)
    assert any(s == 402 for s, _, _ in results)
    assert await balance(gw, user_id) >= 0


# --- billing without upstream usage --------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
    ("/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 2000, "messages": MSG}),
    ("/v1/chat/completions", {"model": "claude-sonnet-4-6", "messages": MSG}),
    ("/v1/responses", {"model": "claude-sonnet-4-6", "input": "hi"}),
])
async def test_a_reply_without_usage_is_estimated_from_its_text(
        gw: Harness, http: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> None:
    _, key_id, secret = await gw.user_and_key()
    headers = {"x-api-key": secret, "x-mock-no-usage": "true", "x-mock-chunks": "500"}
    status, obj, _ = await send(http, gw, path, body, secret, headers)
    assert status == 200, obj
    (row,) = await rows(gw, key_id)
    assert row["usage_source"] == "estimated"
    assert row["output_tokens"] >= 400  # 500 x "hello " is 500 tokens of text
    assert row["cost_nano"] > 0


# --- an upstream that overruns its bound ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_overrunning_upstream_never_overdraws(
        gw: Harness, http: aiohttp.ClientSession, stream: bool) -> None:
    # The mock ignores max_tokens and sends 20,000 tokens; 30 output tokens were asked for.
    user_id, key_id, secret = await gw.user_and_key(balance="0.01")
    body = {"model": "claude-sonnet-4-6", "max_tokens": 30, "messages": MSG, "stream": stream,
            "mock": {"overrun": True, "chunks": 20000, "tokens_per_chunk": 1}}
    status, obj, _ = await send(http, gw, "/v1/messages", body, secret, {"x-api-key": secret})
    assert status == 200
    if stream:
        assert b"event: error" in obj
    (row,) = await rows(gw, key_id)
    # Not streamed: the upstream's report is past the reservation, which is charged.
    # Streamed: the credit extended it while the balance allowed (0.01 USD is about 650
    # tokens at 15 USD/M), then ended it; what it emitted is charged, never more than
    # the reservation with its extensions (tests/test_stream_extension.py).
    assert row["usage_source"] in (("estimated", "capped") if stream else ("capped",))
    if stream:
        assert row["output_tokens"] < 1000  # ended within the balance, not at 20,000
    assert await balance(gw, user_id) >= 0
    # The reservation: 30 output tokens and the body's bytes of input, at 15 and 3.75 USD/M.
    assert row["cost_nano"] < parse_usd("0.01")


# --- header hygiene ---------------------------------------------------------------------------


async def test_account_selecting_headers_never_reach_the_upstream(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, _, secret = await gw.user_and_key()
    headers = {"OpenAI-Organization": "org-victim", "OpenAI-Project": "proj_victim",
               "X-Custom-Thing": "1", "User-Agent": "OpenAI/Python 1.0"}
    status, _, _ = await send(http, gw, "/v1/chat/completions",
                              {"model": "gpt-4o-mini", "messages": MSG}, secret, headers)
    assert status == 200
    seen = gw.mock.stats.last_headers
    assert "openai-organization" not in seen and "openai-project" not in seen
    assert "x-custom-thing" not in seen
    assert seen["user-agent"] == "OpenAI/Python 1.0"


async def test_priced_anthropic_beta_flags_are_dropped(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, _, secret = await gw.user_and_key()
    headers = {"x-api-key": secret, "anthropic-version": "2023-06-01",
               "anthropic-beta": "context-1m-2025-08-07, interleaved-thinking-2025-05-14"}
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": MSG}
    status, _, _ = await send(http, gw, "/v1/messages", body, secret, headers)
    assert status == 200
    seen = gw.mock.stats.last_headers
    assert seen["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert seen["anthropic-version"] == "2023-06-01"


# --- tight reservations near exhaustion ---------------------------------------------------------


async def test_near_exhaustion_the_input_is_counted_before_refusing(
        gw: Harness, http: aiohttp.ClientSession) -> None:
    # 1 USD; each request costs about 0.05 USD (its prompt, at the default 1 USD/M input),
    # so about 20 are affordable at once; the body's bytes alone would admit 4.
    from accounting.tokens import count_text

    user_id, _, secret = await gw.user_and_key(balance="1")
    prompt = "lorem ipsum dolor sit amet " * 8000
    counted = count_text(prompt)
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1000, "mock": {"ttfb_ms": 400, "input_tokens": counted}}
    results = await asyncio.gather(*[
        send(http, gw, "/v1/chat/completions", body, secret) for _ in range(30)])
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) >= 17, statuses
    assert set(statuses) <= {200, 402}
    assert await balance(gw, user_id) >= 0


# --- a group that opts in to lowered bounds ---------------------------------------------------


async def test_a_fit_output_group_gets_the_affordable_bound_instead_of_402(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, groups=[{"name": "fit", "fit_output": True}])
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "claude-sonnet-4-6", "max_tokens": 64000, "messages": MSG}
            headers = {"x-mock-chunks": "5000"}
            # 64,000 tokens at 15 USD/M is 0.96 USD; 0.01 USD affords about 660.
            _, _, plain = await h.user_and_key(balance="0.01")
            status, obj, _ = await send(http, h, "/v1/messages", body, plain,
                                        {**headers, "x-api-key": plain})
            assert status == 402, obj
            user_id, _, fit = await h.user_and_key(balance="0.01", group="fit")
            status, obj, _ = await send(http, h, "/v1/messages", body, fit,
                                        {**headers, "x-api-key": fit})
            assert status == 200, obj
            assert obj["stop_reason"] == "max_tokens"
            sent = upstream_body(h)
            assert 300 < sent["max_tokens"] <= 666
            assert obj["usage"]["output_tokens"] == sent["max_tokens"]
            assert 0 <= await balance(h, user_id) < parse_usd("0.001")
    finally:
        await h.stop()


# --- what a request leaves behind ------------------------------------------------------------


REQUEST_SCOPED = frozenset((
    "ModelCall", "ModelRequest", "Exchange", "TranslatingExchange", "OutputCredit",
    "OutputMeter", "Lease", "Request", "Usage", "SSEFramer", "OpenAIChatStreamTap",
    "AnthropicStreamTap", "ResponsesStreamTap", "Pending",
))


@pytest.mark.parametrize(("path", "model", "stream"), [
    ("/v1/chat/completions", "gpt-4o-mini", False),
    ("/v1/chat/completions", "gpt-4o-mini", True),
    ("/v1/messages", "claude-sonnet-4-6", True),
    ("/v1/chat/completions", "claude-sonnet-4-6", True),
])
async def test_a_request_leaves_no_reference_cycle(gw: Harness, http: aiohttp.ClientSession,
                                                  path: str, model: str, stream: bool) -> None:
    # A cycle through a request's record (call -> exchange -> credit -> call) left every
    # stream for the cyclic collector, whose passes cost more than the stream's own path.
    import gc

    _, _, secret = await gw.user_and_key()
    body = {"model": model, "max_tokens": 64, "messages": MSG, "stream": stream}
    headers = {"x-api-key": secret} if path == "/v1/messages" else None
    status, _, _ = await send(http, gw, path, body, secret, headers)  # warm: caches fill
    assert status == 200
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            status, _, _ = await send(http, gw, path, body, secret, headers)
            assert status == 200
        await asyncio.sleep(0.05)
        gc.collect()
        # A request's own objects only: a gateway another test tore down meanwhile may
        # leave its long-lived ones to the collector, which says nothing about requests.
        left = sorted({type(o).__name__ for o in gc.garbage
                       if type(o).__name__ in REQUEST_SCOPED})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
