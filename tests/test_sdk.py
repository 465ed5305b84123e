"""The official OpenAI and Anthropic Python SDKs against a real gateway.

Each test drives the SDK's async client exactly as an application would, so what is proven
is what users see: the SDK parses our bodies and streams into its own types, its stream
helpers assemble streamed tool calls, and our errors raise the SDK's own exception classes
with our error body and request id attached. The mock upstream's usage numbers are
deterministic, so the tests compare them exactly with what the SDK and the usage log saw.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import asyncpg
import openai
import pytest

from tests.gateway import Harness

GPT = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-6"
HI: list[Any] = [{"role": "user", "content": "hi"}]
# Fix the mock's prompt size so every reported number is known in advance.
IN = 17
OUT = 5  # the mock's default: five deltas, one token each
FIXED = {"mock": {"input_tokens": IN}}
WEATHER_FN = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}
WEATHER_ARGS = {"city": "hello", "days": 1}  # what the mock fills in for string/integer properties
WEATHER_TOOL = {"name": "get_weather", "description": "Weather of a city",
                "input_schema": WEATHER_FN["function"]["parameters"]}  # type: ignore[index]


@pytest.fixture
async def gw(pg_dsn: str) -> AsyncIterator[Harness]:
    h = await Harness().start(pg_dsn)
    yield h
    await h.stop()


@pytest.fixture
async def ident(gw: Harness) -> tuple[int, int, str]:
    return await gw.user_and_key()


@pytest.fixture
async def oai(gw: Harness, ident: tuple[int, int, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ident[2], max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def ant(gw: Harness, ident: tuple[int, int, str]) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=ident[2], max_retries=0)
    yield client
    await client.close()


def _openai(gw: Harness, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)


def _anthropic(gw: Harness, secret: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=secret, max_retries=0)


# --- OpenAI chat ---------------------------------------------------------------------------


async def test_chat_non_stream(oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(model=GPT, messages=HI, extra_body=FIXED)
    assert raw.headers["x-request-id"].startswith("req_")
    c = raw.parse()
    assert c.object == "chat.completion"
    assert c.choices[0].message.content == "hello " * OUT
    assert c.choices[0].finish_reason == "stop"
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (IN, OUT, IN + OUT)


async def test_chat_stream_with_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model=GPT, messages=HI, stream=True,
                                               stream_options={"include_usage": True}, extra_body=FIXED)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello " * OUT
    usage_only = [c for c in chunks if not c.choices]
    assert len(usage_only) == 1
    assert usage_only[0] is chunks[-1]
    u = usage_only[0].usage
    assert u is not None
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (IN, OUT, IN + OUT)


async def test_chat_stream_without_usage_hides_the_gateways_usage_chunk(
        gw: Harness, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model=GPT, messages=HI, stream=True, extra_body=FIXED)
    chunks = [c async for c in stream]
    # The gateway asked the upstream for usage (to bill) ...
    assert gw.mock.stats.last_body["stream_options"] == {"include_usage": True}
    # ... but the SDK sees no usage-only chunk and no usage on any chunk.
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello " * OUT


async def test_chat_tool_call_non_stream(oai: openai.AsyncOpenAI) -> None:
    c = await oai.chat.completions.create(model=GPT, messages=HI, tools=[WEATHER_FN],  # type: ignore[list-item]
                                          extra_body={"mock": {"tool_call": True}})
    assert c.choices[0].finish_reason == "tool_calls"
    calls = c.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS


async def test_chat_streamed_tool_call_assembled_by_sdk_helper(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
            model=GPT, messages=HI, tools=[WEATHER_FN],  # type: ignore[list-item]
            stream_options={"include_usage": True},
            extra_body={"mock": {"tool_call": True, "chunks": 7, "input_tokens": IN}}) as stream:
        done_events = [e async for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = await stream.get_final_completion()
    assert len(done_events) == 1
    assert done_events[0].name == "get_weather"
    assert json.loads(done_events[0].arguments) == WEATHER_ARGS
    calls = final.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == WEATHER_ARGS
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (IN, 7)


async def test_chat_stream_helper_text(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(model=GPT, messages=HI, extra_body=FIXED) as stream:
        deltas = [e.delta async for e in stream if e.type == "content.delta"]
        final = await stream.get_final_completion()
    assert "".join(deltas) == "hello " * OUT
    assert final.choices[0].message.content == "hello " * OUT
    # The client did not ask for usage, so none reached it.
    assert final.usage is None


# --- OpenAI responses, completions, embeddings, models ------------------------------------


async def test_responses_non_stream(oai: openai.AsyncOpenAI) -> None:
    r = await oai.responses.create(model=GPT, input="hi", instructions="be brief", extra_body=FIXED)
    assert r.status == "completed"
    assert r.output_text == "hello " * OUT
    assert r.instructions == "be brief"
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (IN, OUT, IN + OUT)


async def test_responses_stream_create(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(model=GPT, input="hi", stream=True, extra_body=FIXED)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "hello " * OUT
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.usage is not None
    assert (done.response.usage.input_tokens, done.response.usage.output_tokens) == (IN, OUT)


async def test_responses_stream_helper(oai: openai.AsyncOpenAI) -> None:
    async with oai.responses.stream(model=GPT, input="hi", extra_body=FIXED) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "hello " * OUT
    assert final.output_text == "hello " * OUT
    assert final.usage is not None and final.usage.output_tokens == OUT


async def test_responses_stream_tool_call(oai: openai.AsyncOpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "Weather of a city",
            "parameters": WEATHER_FN["function"]["parameters"], "strict": False}  # type: ignore[index]
    async with oai.responses.stream(model=GPT, input="hi", tools=[tool],  # type: ignore[list-item]
                                    extra_body={"mock": {"tool_call": True, "chunks": 4}}) as stream:
        arg_deltas = [e.delta async for e in stream if e.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    assert len(arg_deltas) == 4
    call = final.output[0]
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == WEATHER_ARGS


@pytest.mark.parametrize("stream", [False, True])
async def test_completions(oai: openai.AsyncOpenAI, stream: bool) -> None:
    if stream:
        s = await oai.completions.create(model=GPT, prompt="hi", stream=True,
                                         stream_options={"include_usage": True}, extra_body=FIXED)
        chunks = [c async for c in s]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello " * OUT
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == OUT
    else:
        c = await oai.completions.create(model=GPT, prompt="hi", extra_body=FIXED)
        assert c.object == "text_completion"
        assert c.choices[0].text == "hello " * OUT
        assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (IN, OUT)


def _mock_vector(dims: int) -> list[float]:
    # The mock's deterministic embedding (exact in float32).
    return [((i * 37) % 1024 - 512) / 1024 for i in range(dims)]


async def test_embeddings_sdk_default_base64(gw: Harness, oai: openai.AsyncOpenAI) -> None:
    e = await oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=8)
    # The SDK asks for base64 by default and decodes it to floats itself.
    assert gw.mock.stats.last_body["encoding_format"] == "base64"
    assert [d.index for d in e.data] == [0, 1]
    assert e.data[0].embedding == _mock_vector(8)
    assert e.usage.prompt_tokens > 0


async def test_embeddings_float(gw: Harness, oai: openai.AsyncOpenAI) -> None:
    e = await oai.embeddings.create(model="text-embedding-3-small", input="a", dimensions=8,
                                    encoding_format="float")
    assert gw.mock.stats.last_body["encoding_format"] == "float"
    assert e.data[0].embedding == _mock_vector(8)


async def test_embeddings_explicit_base64_left_to_the_caller(oai: openai.AsyncOpenAI) -> None:
    e = await oai.embeddings.create(model="text-embedding-3-small", input="a", dimensions=4,
                                    encoding_format="base64")
    raw = e.data[0].embedding
    assert isinstance(raw, str)
    assert list(struct.unpack("<4f", base64.b64decode(raw))) == _mock_vector(4)


async def test_models_list_and_retrieve(gw: Harness, oai: openai.AsyncOpenAI) -> None:
    # Channels list their concrete names and mapped aliases, plus every priced model a
    # channel pattern ("gpt-*", "claude-*") serves; the pattern itself is not listable.
    # (Other tests in this session may add prices: only require ours, in sorted order.)
    ids = [m.id async for m in oai.models.list()]
    assert ids == sorted(ids)
    assert {"claude-sonnet-4-6", "gpt-4o-mini", "gpt-mapped", "o3-mini"} <= set(ids)
    assert "gpt-*" not in ids and "default" not in ids
    m = await oai.models.retrieve("o3-mini")
    assert (m.id, m.object) == ("o3-mini", "model")
    _, _, scoped = await gw.user_and_key(models=[GPT])
    async with _openai(gw, scoped) as client:
        assert [m.id async for m in client.models.list()] == [GPT]
        assert (await client.models.retrieve(GPT)).id == GPT
        with pytest.raises(openai.NotFoundError) as ei:
            await client.models.retrieve(CLAUDE)
    assert ei.value.body["code"] == "model_not_found"  # type: ignore[index]


async def test_models_retrieve_a_usable_pattern_model(oai: openai.AsyncOpenAI) -> None:
    await oai.chat.completions.create(model=GPT, messages=HI)  # usable ...
    m = await oai.models.retrieve(GPT)  # ... so retrievable
    assert m.id == GPT


# --- Anthropic messages --------------------------------------------------------------------


async def test_messages_non_stream(ant: anthropic.AsyncAnthropic) -> None:
    raw = await ant.messages.with_raw_response.create(model=CLAUDE, max_tokens=64, messages=HI,
                                                      extra_body=FIXED)
    assert raw.headers["x-request-id"].startswith("req_")
    m = await raw.parse()
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text == "hello " * OUT
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (IN, OUT)


async def test_messages_stream_helper(ant: anthropic.AsyncAnthropic) -> None:
    async with ant.messages.stream(model=CLAUDE, max_tokens=64, messages=HI, extra_body=FIXED) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "hello " * OUT
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (IN, OUT)


async def test_messages_stream_raw_events(ant: anthropic.AsyncAnthropic) -> None:
    stream = await ant.messages.create(model=CLAUDE, max_tokens=64, messages=HI, stream=True, extra_body=FIXED)
    types = [e.type async for e in stream]
    assert types[0] == "message_start"
    assert types[-2:] == ["message_delta", "message_stop"]
    assert types.count("content_block_delta") == OUT


async def test_messages_tool_use(ant: anthropic.AsyncAnthropic) -> None:
    m = await ant.messages.create(model=CLAUDE, max_tokens=64, messages=HI, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                  extra_body={"mock": {"tool_call": True}})
    assert m.stop_reason == "tool_use"
    block = m.content[0]
    assert block.type == "tool_use"
    assert block.name == "get_weather" and block.input == WEATHER_ARGS
    assert block.id.startswith("toolu_")


async def test_messages_streamed_tool_use_assembled_by_sdk(ant: anthropic.AsyncAnthropic) -> None:
    async with ant.messages.stream(model=CLAUDE, max_tokens=64, messages=HI,
                                   tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                   extra_body={"mock": {"tool_call": True, "chunks": 6}}) as stream:
        partials = [e.partial_json async for e in stream if e.type == "input_json"]
        final = await stream.get_final_message()
    assert len(partials) == 6
    block = final.content[0]
    assert block.type == "tool_use"
    assert block.name == "get_weather" and block.input == WEATHER_ARGS
    assert final.stop_reason == "tool_use"


async def test_count_tokens(gw: Harness, ant: anthropic.AsyncAnthropic) -> None:
    r = await ant.messages.count_tokens(model=CLAUDE, messages=HI, system="be brief",
                                        extra_body={"mock": {"input_tokens": 123}})
    assert r.input_tokens == 123
    assert gw.mock.stats.last_route is not None and "count_tokens" in gw.mock.stats.last_route


async def test_beta_messages_with_beta_header(gw: Harness, ant: anthropic.AsyncAnthropic) -> None:
    betas = ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"]
    m = await ant.beta.messages.create(model=CLAUDE, max_tokens=64, messages=HI, betas=betas,
                                       extra_body=FIXED)
    assert m.content[0].type == "text" and m.content[0].text == "hello " * OUT
    # The long-context flag is priced differently by the provider: the channel does not
    # list it, so it stays behind (relay.headers); the others pass.
    assert gw.mock.stats.last_headers["anthropic-beta"] == betas[0]
    async with ant.beta.messages.stream(model=CLAUDE, max_tokens=64, messages=HI, betas=betas,
                                        extra_body=FIXED) as stream:
        final = await stream.get_final_message()
    assert final.usage.output_tokens == OUT
    assert gw.mock.stats.last_headers["anthropic-beta"] == betas[0]


async def test_anthropic_models_list(gw: Harness) -> None:
    _, _, scoped = await gw.user_and_key(models=[CLAUDE, "claude-haiku-4-5"])
    async with _anthropic(gw, scoped) as client:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["claude-haiku-4-5", CLAUDE]
        assert all(m.type == "model" for m in page.data)
        m = await client.models.retrieve(CLAUDE)
        assert (m.id, m.type) == (CLAUDE, "model")
        with pytest.raises(anthropic.NotFoundError) as ei:
            await client.models.retrieve(GPT)
    assert ei.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


# --- errors raise the SDKs' own classes with our body ----------------------------------------


async def test_openai_error_classes(gw: Harness, oai: openai.AsyncOpenAI) -> None:
    async def expect(client: openai.AsyncOpenAI, cls: type[openai.APIStatusError], status: int, code: str,
                     **kw: Any) -> openai.APIStatusError:
        args: dict[str, Any] = {"model": GPT, "messages": HI, **kw}
        with pytest.raises(cls) as ei:
            await client.chat.completions.create(**args)
        exc = ei.value
        assert exc.status_code == status
        # The SDK unwraps the "error" object into .body; our error shape has all four fields.
        assert isinstance(exc.body, dict)
        assert exc.body["code"] == code, exc.body
        assert set(exc.body) == {"message", "type", "param", "code"}
        assert exc.code == code
        assert exc.response.headers["x-request-id"].startswith("req_")
        assert exc.request_id == exc.response.headers["x-request-id"]
        return exc

    async with _openai(gw, "sk-" + "x" * 48) as bad:
        await expect(bad, openai.AuthenticationError, 401, "invalid_api_key")
    _, _, scoped = await gw.user_and_key(models=["gpt-4o"])
    async with _openai(gw, scoped) as c:
        await expect(c, openai.PermissionDeniedError, 403, "model_not_allowed")
    await expect(oai, openai.NotFoundError, 404, "model_not_found", model="no-such-model")
    _, _, slow = await gw.user_and_key(rpm=1)
    async with _openai(gw, slow) as c:
        await c.chat.completions.create(model=GPT, messages=HI)
        exc = await expect(c, openai.RateLimitError, 429, "rate_limit_exceeded")
    assert exc.response.headers["retry-after"]
    await expect(oai, openai.BadRequestError, 400, "invalid_request", model="")
    _, _, broke = await gw.user_and_key(balance="0")
    async with _openai(gw, broke) as c:
        exc = await expect(c, openai.APIStatusError, 402, "insufficient_quota")
    # 402 has no dedicated class in the SDK: it is the base class itself.
    assert type(exc) is openai.APIStatusError


async def test_anthropic_error_classes(gw: Harness, ant: anthropic.AsyncAnthropic) -> None:
    async def expect(client: anthropic.AsyncAnthropic, cls: type[anthropic.APIStatusError], status: int,
                     etype: str, **kw: Any) -> anthropic.APIStatusError:
        args: dict[str, Any] = {"model": CLAUDE, "max_tokens": 16, "messages": HI, **kw}
        with pytest.raises(cls) as ei:
            await client.messages.create(**args)
        exc = ei.value
        assert exc.status_code == status
        assert isinstance(exc.body, dict)
        assert exc.body["type"] == "error"
        assert exc.body["error"]["type"] == etype, exc.body
        assert exc.response.headers["x-request-id"].startswith("req_")
        return exc

    async with _anthropic(gw, "sk-" + "x" * 48) as bad:
        await expect(bad, anthropic.AuthenticationError, 401, "authentication_error")
    _, _, scoped = await gw.user_and_key(models=[GPT])
    async with _anthropic(gw, scoped) as c:
        await expect(c, anthropic.PermissionDeniedError, 403, "permission_error")
    await expect(ant, anthropic.NotFoundError, 404, "not_found_error", model="nope-0")
    _, _, slow = await gw.user_and_key(rpm=1)
    async with _anthropic(gw, slow) as c:
        await c.messages.create(model=CLAUDE, max_tokens=16, messages=HI)
        exc = await expect(c, anthropic.RateLimitError, 429, "rate_limit_error")
    assert exc.response.headers["retry-after"]
    await expect(ant, anthropic.BadRequestError, 400, "invalid_request_error", model="")
    _, _, broke = await gw.user_and_key(balance="0")
    async with _anthropic(gw, broke) as c:
        exc = await expect(c, anthropic.APIStatusError, 402, "billing_error")
    # This SDK has a class of its own for 402.
    assert type(exc) is anthropic.PaymentRequiredError


async def test_upstream_and_size_errors_map_to_sdk_classes(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, server={"max_body_bytes": 4096},
                              upstream={"first_byte_timeout_s": 0.3, "max_attempts": 1})
    try:
        _, _, k = await h.user_and_key()
        msg: dict[str, Any] = {"model": CLAUDE, "max_tokens": 16, "messages": HI}
        async with _openai(h, k) as o, _anthropic(h, k) as a:
            # An upstream 5xx becomes our 502.
            with pytest.raises(openai.InternalServerError) as o502:
                await o.chat.completions.create(model=GPT, messages=HI, extra_body={"mock": {"status": 500}})
            assert (o502.value.status_code, o502.value.code) == (502, "upstream_error")
            with pytest.raises(anthropic.InternalServerError) as a502:
                await a.messages.create(**msg, extra_body={"mock": {"status": 500}})
            assert a502.value.status_code == 502
            assert a502.value.body["error"]["type"] == "api_error"  # type: ignore[index]
            # No first byte in time: 504.
            with pytest.raises(openai.InternalServerError) as o504:
                await o.chat.completions.create(model=GPT, messages=HI, extra_body={"mock": {"ttfb_ms": 2000}})
            assert (o504.value.status_code, o504.value.code) == (504, "upstream_timeout")
            with pytest.raises(anthropic.GatewayTimeoutError) as a504:
                await a.messages.create(**msg, extra_body={"mock": {"ttfb_ms": 2000}})
            assert a504.value.body["error"]["type"] == "api_error"  # type: ignore[index]
            # An upstream's own 4xx passes through unchanged: the provider's body reaches the SDK.
            with pytest.raises(openai.RateLimitError) as o429:
                await o.chat.completions.create(model=GPT, messages=HI, extra_body={"mock": {"status": 429}})
            assert o429.value.body["type"] == "requests"  # type: ignore[index]
            with pytest.raises(anthropic.RateLimitError) as a429:
                await a.messages.create(**msg, extra_body={"mock": {"status": 429}})
            assert a429.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        # Too large a body: 413 (a fresh client: see the keep-alive case below).
        async with _openai(h, k) as o:
            with pytest.raises(openai.APIStatusError) as o413:
                await o.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "x" * 8000}])
        assert (o413.value.status_code, o413.value.code) == (413, "request_too_large")
        async with _anthropic(h, k) as a:
            with pytest.raises(anthropic.ContentTooLargeError):
                await a.messages.create(**{**msg, "messages": [{"role": "user", "content": "x" * 8000}]})
    finally:
        await h.stop()


async def test_413_on_messages_is_anthropic_shaped(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, server={"max_body_bytes": 4096})
    try:
        _, _, k = await h.user_and_key()
        async with _anthropic(h, k) as a:
            with pytest.raises(anthropic.ContentTooLargeError) as ei:
                await a.messages.create(model=CLAUDE, max_tokens=16,
                                        messages=[{"role": "user", "content": "x" * 8000}])
        assert ei.value.body == {"type": "error", "error": {"type": "request_too_large",
                                                           "message": "Request body exceeds 4096 bytes"}}
        assert ei.value.response.headers["x-request-id"]
    finally:
        await h.stop()


async def test_413_on_a_reused_connection(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, server={"max_body_bytes": 4096})
    try:
        _, _, k = await h.user_and_key()
        async with _openai(h, k) as o:
            await o.chat.completions.create(model=GPT, messages=HI)  # leaves a keep-alive connection
            with pytest.raises(openai.APIStatusError) as oe:  # gets APIConnectionError instead
                await o.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "x" * 8000}])
        assert oe.value.status_code == 413
    finally:
        await h.stop()


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_rate_limit_retry_after_is_one_number(gw: Harness, sdk: str) -> None:
    _, _, slow = await gw.user_and_key(rpm=1)
    exc: openai.APIStatusError | anthropic.APIStatusError
    if sdk == "openai":
        async with _openai(gw, slow) as c:
            await c.chat.completions.create(model=GPT, messages=HI)
            with pytest.raises(openai.RateLimitError) as oei:
                await c.chat.completions.create(model=GPT, messages=HI)
        exc = oei.value
    else:
        async with _anthropic(gw, slow) as a:
            await a.messages.create(model=CLAUDE, max_tokens=16, messages=HI)
            with pytest.raises(anthropic.RateLimitError) as aei:
                await a.messages.create(model=CLAUDE, max_tokens=16, messages=HI)
        exc = aei.value
    values = exc.response.headers.get_list("retry-after")
    assert len(values) == 1, values
    # The SDKs' retry loop parses it as a number of seconds (float), else ignores it.
    assert 1 <= float(values[0]) <= 60


async def test_openai_stream_error_before_start_raises(gw: Harness) -> None:
    # A refused streaming request is a plain HTTP error: the SDK raises before iterating.
    async with _openai(gw, "sk-" + "y" * 48) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model=GPT, messages=HI, stream=True)


# --- billing of SDK traffic -------------------------------------------------------------------


async def test_sdk_calls_are_billed_with_upstream_usage(gw: Harness, ident: tuple[int, int, str],
                                                        oai: openai.AsyncOpenAI,
                                                        ant: anthropic.AsyncAnthropic) -> None:
    _, key_id, _ = ident
    await oai.chat.completions.create(model=GPT, messages=HI, extra_body=FIXED)
    s = await oai.chat.completions.create(model=GPT, messages=HI, stream=True, extra_body=FIXED)
    _ = [c async for c in s]
    await oai.responses.create(model=GPT, input="hi", extra_body=FIXED)
    async with ant.messages.stream(model=CLAUDE, max_tokens=64, messages=HI,
                                   extra_body={"mock": {"input_tokens": IN, "cached_tokens": 4}}) as st:
        await st.get_final_message()
    await gw.flush()
    conn = await asyncpg.connect(gw.dsn)
    try:
        rows = await conn.fetch("SELECT route, stream, status, input_tokens, output_tokens, cache_read_tokens,"
                                " usage_source, cost_nano FROM usage_log WHERE key_id = $1 ORDER BY ts",
                                key_id)
    finally:
        await conn.close()
    got = sorted((r["route"], r["stream"], r["status"], r["input_tokens"], r["output_tokens"],
                  r["cache_read_tokens"], r["usage_source"]) for r in rows)
    assert got == sorted([
        ("chat", False, 200, IN, OUT, 0, "upstream"),
        ("chat", True, 200, IN, OUT, 0, "upstream"),
        ("responses", False, 200, IN, OUT, 0, "upstream"),
        # Anthropic reports input_tokens without the cached part; the log holds the whole
        # prompt split into classes: 13 uncached + 4 cache reads (the mock's 17).
        ("messages", True, 200, IN - 4, OUT, 4, "upstream"),
    ])
    assert all(r["cost_nano"] > 0 for r in rows)


# --- other client configurations ------------------------------------------------------------


async def test_openai_base_url_without_v1(gw: Harness, ident: tuple[int, int, str]) -> None:
    async with openai.AsyncOpenAI(base_url=gw.url, api_key=ident[2], max_retries=0) as client:
        c = await client.chat.completions.create(model=GPT, messages=HI, extra_body=FIXED)
    assert c.usage is not None and c.usage.completion_tokens == OUT


async def test_anthropic_auth_token_is_bearer(gw: Harness, ident: tuple[int, int, str]) -> None:
    # ANTHROPIC_AUTH_TOKEN (Claude Code's proxy setting) sends Authorization: Bearer.
    async with anthropic.AsyncAnthropic(base_url=gw.url, auth_token=ident[2], api_key=None,
                                        max_retries=0) as client:
        m = await client.messages.create(model=CLAUDE, max_tokens=64, messages=HI, extra_body=FIXED)
    assert m.usage.output_tokens == OUT
    assert gw.mock.stats.last_headers["x-api-key"] == "upstream-secret-credential"
    assert "authorization" not in gw.mock.stats.last_headers


# --- failures after the stream started ---------------------------------------------------------


async def test_openai_mid_stream_failure_raises_in_the_sdk(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model=GPT, messages=HI, stream=True,
                                               extra_body={"mock": {"fail": "reset", "fail_after": 2}})
    got: list[Any] = []
    with pytest.raises(openai.APIError) as ei:
        async for chunk in stream:
            got.append(chunk)  # noqa: PERF401 - the parts before the error are the point
    assert got  # the first parts arrived before the error event
    assert isinstance(ei.value.body, dict)
    assert ei.value.body["code"] == "upstream_error"


async def test_anthropic_mid_stream_failure_raises_in_the_sdk(ant: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as ei:
        async with ant.messages.stream(model=CLAUDE, max_tokens=64, messages=HI,
                                       extra_body={"mock": {"fail": "reset", "fail_after": 2}}) as stream:
            await stream.get_final_message()
    assert isinstance(ei.value.body, dict)
    assert ei.value.body["type"] == "error"
    assert ei.value.body["error"]["type"] in ("api_error", "overloaded_error")


# --- one SDK, the other protocol's channel (translated) -----------------------------------------
# A translated body is rebuilt in the other protocol, so the unknown "mock" field does not
# survive; the mock's header controls do.
FIXED_H = {"x-mock-input-tokens": str(IN)}
TOOL_H = {**FIXED_H, "x-mock-tool-call": "1"}


async def test_openai_sdk_chat_on_an_anthropic_model(oai: openai.AsyncOpenAI) -> None:
    c = await oai.chat.completions.create(model=CLAUDE, messages=HI, extra_headers=FIXED_H)
    assert c.choices[0].message.content == "hello " * OUT
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (IN, OUT)
    async with oai.chat.completions.stream(model=CLAUDE, messages=HI, tools=[WEATHER_FN],  # type: ignore[list-item]
                                           stream_options={"include_usage": True},
                                           extra_headers=TOOL_H) as s:
        final = await s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == WEATHER_ARGS
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.prompt_tokens == IN


async def test_anthropic_sdk_on_an_openai_model(ant: anthropic.AsyncAnthropic) -> None:
    m = await ant.messages.create(model=GPT, max_tokens=64, messages=HI, extra_headers=FIXED_H)
    assert m.content[0].type == "text" and m.content[0].text == "hello " * OUT
    assert (m.usage.input_tokens, m.usage.output_tokens) == (IN, OUT)
    async with ant.messages.stream(model=GPT, max_tokens=64, messages=HI, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                   extra_headers=TOOL_H) as stream:
        final = await stream.get_final_message()
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == WEATHER_ARGS
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == IN


async def test_openai_responses_on_an_anthropic_model(oai: openai.AsyncOpenAI) -> None:
    async with oai.responses.stream(model=CLAUDE, input="hi", instructions="be brief", extra_headers=FIXED_H) as s:
        deltas = [e.delta async for e in s if e.type == "response.output_text.delta"]
        final = await s.get_final_response()
    assert "".join(deltas) == "hello " * OUT
    assert final.output_text == "hello " * OUT
    assert final.usage is not None and final.usage.output_tokens == OUT
