"""The mock upstream answers like the real providers, exactly as its controls say.

Driven over real loopback sockets with aiohttp, raw asyncio streams (to see RST, pipelining
and backpressure) and the official openai and anthropic SDKs.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from bench.mock_shapes import count_input_tokens
from bench.mock_upstream import MockServer, start

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "Say hello to the world, twice, politely."}]
TOOLS_OAI = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}]
TOOLS_ANT = [{"name": "get_weather", "description": "weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}]


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await start()
    yield server
    await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def oai(mock: MockServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(api_key="sk-upstream", base_url=mock.url + "/v1", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def ant(mock: MockServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(api_key="sk-ant-upstream", base_url=mock.url,
                                      max_retries=0)
    yield client
    await client.close()


AUTH = {"authorization": "Bearer sk-test"}


def sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) per SSE event; "[DONE]" stays a string."""
    out: list[tuple[str | None, Any]] = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        name = None
        data = b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, "[DONE]" if data == b"[DONE]" else orjson.loads(data)))
    return out


async def post(http: aiohttp.ClientSession, mock: MockServer, path: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    async with http.post(mock.url + path, data=orjson.dumps(body),
                         headers=headers if headers is not None else AUTH) as resp:
        return resp.status, resp.headers, await resp.read()


# --- OpenAI chat ------------------------------------------------------------------------------


async def test_chat_non_stream_usage_is_exact(mock: MockServer, http: aiohttp.ClientSession):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES,
            "mock": {"chunks": 4, "tokens_per_chunk": 2, "cached_tokens": 3,
                     "reasoning_tokens": 5, "chunk_text": "ab"}}
    status, headers, raw = await post(http, mock, "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["x-request-id"].startswith("req_")
    out = orjson.loads(raw)
    n_in = len(orjson.dumps(MESSAGES)) // 4
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == "gpt-4o-mini" and abs(out["created"] - time.time()) < 5
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "abababab",
                                                       "refusal": None, "annotations": []},
                               "logprobs": None, "finish_reason": "stop"}]
    usage = out["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        n_in, 4 * 2 + 5, n_in + 13)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 3
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 5


async def test_chat_stream_include_usage_rules(mock: MockServer, http: aiohttp.ClientSession):
    base = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
            "mock": {"chunks": 3, "input_tokens": 40, "cached_tokens": 10}}
    status, headers, raw = await post(http, mock, "/v1/chat/completions",
                                      {**base, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [data for _, data in sse(raw)]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 1 + 3 + 1 + 1
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["hello "] * 3
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 40
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 10
    assert len({c["id"] for c in chunks}) == 1

    status, _, raw = await post(http, mock, "/v1/chat/completions", base)
    events = [data for _, data in sse(raw)]
    assert events[-1] == "[DONE]" and len(events) == 1 + 3 + 1 + 1
    assert not any("usage" in c for c in events[:-1])
    assert mock.stats.streams_completed == 2 and mock.stats.streams_started == 2


async def test_chat_with_openai_sdk(oai: openai.AsyncOpenAI, mock: MockServer):
    done = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                             extra_body={"mock": {"chunks": 2}})
    assert done.choices[0].message.content == "hello hello "
    assert done.usage is not None and done.usage.completion_tokens == 2
    assert done.usage.prompt_tokens == count_input_tokens({"messages": MESSAGES})

    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, max_completion_tokens=100,
        extra_headers={"x-mock-chunks": "7", "x-mock-reasoning-tokens": "4"})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "hello " * 7
    assert usage is not None and usage.completion_tokens == 11
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 4
    # The SDK's key reached the upstream as a bearer credential.
    assert mock.stats.last_headers["authorization"] == "Bearer sk-upstream"
    assert mock.stats.last_body["max_completion_tokens"] == 100


async def test_chat_length_limit(mock: MockServer, http: aiohttp.ClientSession):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 3,
            "mock": {"chunks": 10, "reasoning_tokens": 1}}
    _, _, raw = await post(http, mock, "/v1/chat/completions", body)
    out = orjson.loads(raw)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["message"]["content"] == "hello hello "
    assert out["usage"]["completion_tokens"] == 3
    _, _, raw = await post(http, mock, "/v1/chat/completions",
                           {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [d for _, d in sse(raw)][:-1]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_chat_tool_call(oai: openai.AsyncOpenAI):
    done = await oai.chat.completions.create(
        model="gpt-4o-mini", tools=TOOLS_OAI,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "please use the tool"}])
    call = done.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert done.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"city": "hello", "days": 1}  # type: ignore[union-attr]

    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", tools=TOOLS_OAI, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        extra_body={"mock": {"tool_call": True, "chunks": 3}})
    args, name, finish, deltas = "", None, None, 0
    async for chunk in stream:
        choice = chunk.choices[0]
        for tc in choice.delta.tool_calls or []:
            if tc.function and tc.function.name:
                name = tc.function.name
            if tc.function and tc.function.arguments:
                args += tc.function.arguments
                deltas += 1
        finish = choice.finish_reason or finish
    assert (name, finish, deltas) == ("get_weather", "tool_calls", 3)
    assert orjson.loads(args) == {"city": "hello", "days": 1}

    # Without tools, the trigger text is just text.
    plain = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "use the tool"}])
    assert plain.choices[0].message.tool_calls is None


# --- OpenAI legacy completions, Responses, embeddings, models ----------------------------------


async def test_completions_with_sdk(oai: openai.AsyncOpenAI):
    done = await oai.completions.create(model="gpt-4o-mini", prompt="Once upon",
                                        extra_body={"mock": {"chunks": 3, "cached_tokens": 1}})
    assert done.object == "text_completion" and done.choices[0].text == "hello " * 3
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (
        max(1, len(b'"Once upon"') // 4), 3)
    stream = await oai.completions.create(model="gpt-4o-mini", prompt="Once upon", stream=True,
                                          max_tokens=2, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert (text, finish) == ("hello hello ", "length")
    assert usage is not None and usage.completion_tokens == 2


async def test_responses_with_sdk(oai: openai.AsyncOpenAI):
    done = await oai.responses.create(model="gpt-4o-mini", input="hi there",
                                      extra_body={"mock": {"chunks": 2, "cached_tokens": 1,
                                                           "reasoning_tokens": 3}})
    assert done.object == "response" and done.status == "completed"
    assert done.output_text == "hello hello "
    assert done.usage is not None
    assert done.usage.input_tokens == max(1, len(b'"hi there"') // 4)
    assert done.usage.input_tokens_details.cached_tokens == 1
    assert (done.usage.output_tokens, done.usage.output_tokens_details.reasoning_tokens) == (5, 3)
    assert done.usage.total_tokens == done.usage.input_tokens + 5

    stream = await oai.responses.create(model="gpt-4o-mini", input="hi", stream=True,
                                        extra_body={"mock": {"chunks": 3, "input_tokens": 9}})
    kinds, seqs, text, final = [], [], "", None
    async for event in stream:
        kinds.append(event.type)
        seqs.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * 3 + [
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert seqs == list(range(len(kinds)))
    assert text == "hello " * 3
    assert final is not None and final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 3)


async def test_responses_function_call_and_limit(oai: openai.AsyncOpenAI):
    tools = [{"type": "function", "name": "lookup",
              "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    done = await oai.responses.create(model="gpt-4o-mini", input="use the tool now",
                                      tools=tools)  # type: ignore[arg-type]
    item = done.output[0]
    assert item.type == "function_call" and item.name == "lookup"
    assert orjson.loads(item.arguments) == {"q": "hello"}
    stream = await oai.responses.create(model="gpt-4o-mini", input="x", stream=True,
                                        tools=tools,  # type: ignore[arg-type]
                                        extra_body={"mock": {"tool_call": True}})
    args = ""
    async for event in stream:
        if event.type == "response.function_call_arguments.delta":
            args += event.delta
    assert orjson.loads(args) == {"q": "hello"}

    cut = await oai.responses.create(model="gpt-4o-mini", input="x", max_output_tokens=16,
                                     extra_body={"mock": {"chunks": 20}})
    assert cut.status == "incomplete" and cut.usage is not None
    assert cut.usage.output_tokens == 16 and cut.output_text == "hello " * 16


async def test_named_tool_with_dictated_input(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic):
    """"use the tool NAME" calls that tool; the lines after the phrase are its input, verbatim
    for a custom (freeform) tool, as the one string parameter of a function tool."""
    patch = '*** Begin Patch\n*** Add File: a.txt\n+"hi"\n*** End Patch\n'
    prompt = "please use the tool apply_patch:\n" + patch
    custom = {"type": "custom", "name": "apply_patch", "format": {"type": "text"}}
    tools: Any = [{"type": "function", "name": "lookup",
                   "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}, custom]
    done = await oai.responses.create(model="gpt-4o-mini", input=prompt, tools=tools)
    item = done.output[0]
    assert item.type == "custom_tool_call" and (item.name, item.input) == ("apply_patch", patch)
    stream = await oai.responses.create(model="gpt-4o-mini", input=prompt, tools=tools, stream=True)
    deltas, final_input = "", None
    async for event in stream:
        if event.type == "response.custom_tool_call_input.delta":
            deltas += event.delta
        elif event.type == "response.custom_tool_call_input.done":
            final_input = event.input
    assert deltas == final_input == patch
    chat_tools: Any = [{"type": "custom", "custom": {"name": "apply_patch"}}]
    chat = await oai.chat.completions.create(model="gpt-4o-mini", tools=chat_tools,
                                             messages=[{"role": "user", "content": prompt}])
    call: Any = chat.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.type == "custom" and (call.custom.name, call.custom.input) == ("apply_patch", patch)
    chunks = await oai.chat.completions.create(model="gpt-4o-mini", tools=chat_tools, stream=True,
                                               messages=[{"role": "user", "content": prompt}])
    streamed = ""
    async for chunk in chunks:
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            streamed += (tc.model_extra or {}).get("custom", {}).get("input", "")
    assert streamed == patch
    # A function tool with one string parameter gets the dictated text in it.
    one = await oai.responses.create(model="gpt-4o-mini", input="use the tool lookup\nwhat is 2+2",
                                     tools=tools)
    assert one.output[0].type == "function_call"
    assert orjson.loads(one.output[0].arguments) == {"q": "what is 2+2"}
    msg = await ant.messages.create(model="claude-sonnet-4-6", max_tokens=50, tools=[
        {"name": "apply_patch", "input_schema": {"type": "object", "properties": {"input": {"type": "string"}}}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": prompt}]}])
    block = msg.content[0]
    assert block.type == "tool_use" and block.input == {"input": patch}


async def test_embeddings_float_and_base64(oai: openai.AsyncOpenAI, mock: MockServer,
                                           http: aiohttp.ClientSession):
    floats = await oai.embeddings.create(model="text-embedding-3-small", input=["a", "bb"],
                                         encoding_format="float", dimensions=64)
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 64
    assert floats.usage.prompt_tokens == max(1, len(b'["a","bb"]') // 4)
    # The SDK asks for base64 by default and decodes little-endian float32 itself.
    decoded = await oai.embeddings.create(model="text-embedding-3-small", input="a",
                                          dimensions=64)
    assert mock.stats.last_body["encoding_format"] == "base64"
    assert decoded.data[0].embedding == floats.data[0].embedding
    _, _, raw = await post(http, mock, "/v1/embeddings", {
        "model": "text-embedding-3-small", "input": "a", "encoding_format": "base64"})
    blob = base64.b64decode(orjson.loads(raw)["data"][0]["embedding"])
    assert len(blob) == 1536 * 4
    assert list(struct.unpack("<4f", blob[:16])) == [-0.5, (37 - 512) / 1024,
                                                      (74 - 512) / 1024, (111 - 512) / 1024]


async def test_models(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic):
    ids = [m.id async for m in oai.models.list()]
    assert "gpt-4o-mini" in ids and "claude-sonnet-4-6" in ids
    assert (await oai.models.retrieve("gpt-4o-mini")).owned_by == "system"
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("no-such-model")
    claude = [m.id async for m in ant.models.list()]
    assert "claude-sonnet-4-6" in claude and "gpt-4o-mini" not in claude


# --- Anthropic -------------------------------------------------------------------------------


async def test_messages_with_sdk(ant: anthropic.AsyncAnthropic, mock: MockServer):
    controls = {"mock": {"chunks": 3, "input_tokens": 100, "cached_tokens": 60,
                         "cache_write_tokens": 30, "reasoning_tokens": 2}}
    done = await ant.messages.create(model="claude-sonnet-4-6", max_tokens=50,
                                     messages=MESSAGES[1:], extra_body=controls)  # type: ignore[arg-type]
    assert done.id.startswith("msg_") and done.stop_reason == "end_turn"
    assert done.content[0].type == "text" and done.content[0].text == "hello " * 3
    u = done.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens,
            u.output_tokens) == (10, 60, 30, 5)
    # The SDK's key reached the upstream (this SDK version sends it as a bearer token).
    sent = mock.stats.last_headers
    assert sent.get("x-api-key") == "sk-ant-upstream" or (
        sent.get("authorization") == "Bearer sk-ant-upstream")

    async with ant.messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                   messages=MESSAGES[1:], extra_body=controls) as stream:  # type: ignore[arg-type]
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert final.content[0].text == "hello " * 3  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens,
            final.usage.output_tokens) == (10, 60, 5)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_delta") == 3 and "message_delta" in kinds


async def test_messages_raw_stream_shape(mock: MockServer, http: aiohttp.ClientSession):
    body = {"model": "claude-sonnet-4-6", "max_tokens": 2, "stream": True,
            "system": "terse", "messages": MESSAGES[1:], "mock": {"chunks": 5}}
    status, headers, raw = await post(http, mock, "/v1/messages?beta=true", body,
                                      {"x-api-key": "k"})
    assert status == 200 and headers["request-id"].startswith("req_")
    events = sse(raw)
    assert [n for n, _ in events] == ["message_start", "ping", "content_block_start",
                                      "content_block_delta", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop"]
    start_usage = events[0][1]["message"]["usage"]
    n_in = (len(orjson.dumps(MESSAGES[1:])) + len(b'"terse"')) // 4
    assert start_usage["input_tokens"] == n_in and start_usage["output_tokens"] == 1
    assert start_usage["cache_read_input_tokens"] == 0
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "hello "}
    assert events[6][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[6][1]["usage"] == {"output_tokens": 2}
    assert mock.stats.requests["/v1/messages"] == 1


async def test_messages_tool_use(ant: anthropic.AsyncAnthropic):
    done = await ant.messages.create(model="claude-sonnet-4-6", max_tokens=50, tools=TOOLS_ANT,  # type: ignore[arg-type]
                                     messages=[{"role": "user", "content": "use the tool"}])
    assert done.stop_reason == "tool_use" and done.content[0].type == "tool_use"
    assert done.content[0].name == "get_weather"
    assert done.content[0].input == {"city": "hello", "days": 1}
    partial = 0
    async with ant.messages.stream(model="claude-sonnet-4-6", max_tokens=50, tools=TOOLS_ANT,  # type: ignore[arg-type]
                                   messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"mock": {"tool_call": True}}) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial += 1
        final = await stream.get_final_message()
    assert partial == 5 and final.stop_reason == "tool_use"
    assert final.content[0].input == {"city": "hello", "days": 1}  # type: ignore[union-attr]


async def test_count_tokens(ant: anthropic.AsyncAnthropic):
    got = await ant.messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES[1:],  # type: ignore[arg-type]
                                          system="sys")
    assert got.input_tokens == count_input_tokens({"messages": MESSAGES[1:], "system": "sys"})


# --- errors and credentials ------------------------------------------------------------------


async def test_credentials_required(mock: MockServer, http: aiohttp.ClientSession):
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 5}
    status, _, raw = await post(http, mock, "/v1/chat/completions", body, {})
    assert status == 401
    assert orjson.loads(raw)["error"]["code"] == "invalid_api_key"
    status, _, raw = await post(http, mock, "/v1/messages", body, {"authorization": "Basic x"})
    assert status == 401
    out = orjson.loads(raw)
    assert out["type"] == "error" and out["error"]["type"] == "authentication_error"
    status, _, _ = await post(http, mock, "/v1/messages", body, {"authorization": "Bearer k"})
    assert status == 200
    status, _, _ = await post(http, mock, "/v1/chat/completions", body, {"x-api-key": "k"})
    assert status == 200
    async with http.get(mock.url + "/v1/models") as resp:
        assert resp.status == 401


async def test_status_injection(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic,
                                mock: MockServer, http: aiohttp.ClientSession):
    with pytest.raises(openai.RateLimitError) as rate:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                          extra_body={"mock": {"status": 429, "retry_after": 7}})
    assert rate.value.response.headers["retry-after"] == "7"
    assert rate.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    with pytest.raises(anthropic.InternalServerError) as over:
        await ant.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES[1:],  # type: ignore[arg-type]
                                  extra_headers={"x-mock-status": "529"})
    assert over.value.status_code == 529
    assert over.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    # A streamed request fails before the stream starts, as providers do.
    status, headers, raw = await post(http, mock, "/v1/chat/completions", {
        "model": "m", "messages": MESSAGES, "stream": True, "mock": {"status": 500}})
    assert status == 500 and headers["Content-Type"] == "application/json"
    assert set(orjson.loads(raw)["error"]) == {"message", "type", "param", "code"}
    assert mock.stats.streams_started == 0


async def test_body_controls_win_over_headers(mock: MockServer, http: aiohttp.ClientSession):
    _, _, raw = await post(http, mock, "/v1/chat/completions",
                           {"model": "m", "messages": MESSAGES, "mock": {"chunks": 2}},
                           {**AUTH, "x-mock-chunks": "9", "x-mock-chunk-size": "3"})
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "helhel"
    status, _, raw = await post(http, mock, "/v1/chat/completions",
                                {"model": "m", "messages": MESSAGES, "mock": {"fail": "boom"}})
    assert status == 400 and "fail" in orjson.loads(raw)["error"]["message"]
    status, _, raw = await post(http, mock, "/v1/chat/completions", {"messages": MESSAGES})
    assert status == 400


async def test_no_usage(mock: MockServer, http: aiohttp.ClientSession):
    for path, body in [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/messages", {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 9}),
        ("/v1/responses", {"model": "m", "input": "x", "stream": True}),
        ("/v1/responses", {"model": "m", "input": "x"}),
        ("/v1/embeddings", {"model": "m", "input": "x"}),
    ]:
        _, _, raw = await post(http, mock, path, {**body, "mock": {"no_usage": True}})
        assert b"usage" not in raw, path


# --- failure modes ---------------------------------------------------------------------------


async def raw_request(port: int, body: dict[str, Any], path: str = "/v1/chat/completions",
                      extra: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = orjson.dumps(body)
    writer.write(b"POST %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n"
                 b"content-length: %d\r\n%s\r\n%s" % (path.encode(), len(data), extra, data))
    await writer.drain()
    return reader, writer


STREAM = {"model": "m", "messages": MESSAGES, "stream": True}


async def test_fail_reset_sends_rst_after_chunks(mock: MockServer):
    reader, writer = await raw_request(mock.port, {**STREAM, "mock": {"fail": "reset"}})
    got = b""
    with pytest.raises(ConnectionResetError):
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break  # a FIN would land here and fail the test
            got += chunk
    writer.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body.count(b"data: ") == 2 and b"0\r\n\r\n" not in body
    assert mock.stats.faults_injected == 1 and mock.stats.streams_aborted_by_client == 0


async def test_fail_close_ends_without_last_chunk(mock: MockServer, http: aiohttp.ClientSession):
    got = b""
    async with http.post(mock.url + "/v1/chat/completions", headers=AUTH,
                         data=orjson.dumps({**STREAM, "mock": {"fail": "close",
                                                               "fail_after": 3}})) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                got += line
    assert got.count(b"data: ") == 3
    # Non-stream: headers promise the full length, half the body arrives.
    reader, writer = await raw_request(mock.port, {"model": "m", "messages": MESSAGES,
                                                   "mock": {"fail": "close"}})
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    assert 0 < len(body) < length


async def test_fail_error_event_mid_stream(oai: openai.AsyncOpenAI,
                                          ant: anthropic.AsyncAnthropic, mock: MockServer,
                                          http: aiohttp.ClientSession):
    stream = await oai.chat.completions.create(model="m", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                               extra_body={"mock": {"fail": "error"}})
    seen = 0
    with pytest.raises(openai.APIError, match="injected"):
        async for _ in stream:
            seen += 1
    assert seen == 2
    with pytest.raises(anthropic.APIStatusError) as exc:
        async with ant.messages.stream(model="c", max_tokens=9, messages=MESSAGES[1:],  # type: ignore[arg-type]
                                       extra_headers={"x-mock-fail": "error",
                                                      "x-mock-fail-after": "3"}) as events:
            async for _ in events:
                pass
    assert "overloaded_error" in str(exc.value.body)
    # The body ends cleanly (last chunk sent) and the connection stays usable.
    async with http.post(mock.url + "/v1/messages", headers=AUTH, data=orjson.dumps(
            {**STREAM, "max_tokens": 9, "mock": {"fail": "error", "fail_after": 1}})) as resp:
        events = sse(await resp.read())
    assert [n for n, _ in events] == ["message_start", "error"]
    status, _, raw = await post(http, mock, "/v1/messages", {
        "model": "m", "messages": MESSAGES, "max_tokens": 9, "mock": {"fail": "error"}})
    assert status == 500 and orjson.loads(raw)["error"]["type"] == "api_error"
    assert mock.stats.streams_completed == 0 and mock.stats.faults_injected == 3


async def test_fail_stall_then_client_gives_up(mock: MockServer):
    reader, writer = await raw_request(mock.port, {**STREAM, "mock": {"fail": "stall",
                                                                      "fail_after": 1}})
    got = b""
    with pytest.raises(TimeoutError):
        while True:
            got += await asyncio.wait_for(reader.read(65536), 0.3)
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"data: ") == 1
    assert mock.stats.streams_aborted_by_client == 0
    writer.close()
    await wait_for(lambda: mock.stats.streams_aborted_by_client == 1)
    assert mock.stats.streams_completed == 0


async def test_fail_hang_never_sends_headers(mock: MockServer):
    reader, writer = await raw_request(mock.port, {"model": "m", "messages": MESSAGES,
                                                   "mock": {"fail": "hang"}})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.3)
    writer.close()
    await wait_for(lambda: mock.stats.requests_aborted_by_client == 1)


async def test_client_disconnect_mid_stream_is_counted(mock: MockServer,
                                                       http: aiohttp.ClientSession):
    async with http.post(mock.url + "/v1/chat/completions", headers=AUTH, data=orjson.dumps(
            {**STREAM, "mock": {"chunks": 100, "delay_ms": 20}})) as resp:
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        resp.close()
    await wait_for(lambda: mock.stats.streams_aborted_by_client == 1)
    assert mock.stats.streams_completed == 0


async def test_ttfb_and_pacing(mock: MockServer, http: aiohttp.ClientSession):
    t0 = time.monotonic()
    async with http.post(mock.url + "/v1/chat/completions", headers=AUTH, data=orjson.dumps(
            {**STREAM, "mock": {"ttfb_ms": 150, "chunks": 4, "delay_ms": 50}})) as resp:
        t_head = time.monotonic() - t0
        await resp.read()
    t_all = time.monotonic() - t0
    assert 0.14 <= t_head < 1.0
    # role + 4 content + finish + [DONE] = 7 parts, 6 gaps of 50 ms.
    assert t_all >= 0.15 + 6 * 0.05 - 0.02


async def test_many_paced_streams_concurrently(mock: MockServer):
    n = 300

    async def one() -> bytes:
        reader, writer = await raw_request(mock.port, {**STREAM, "mock": {
            "chunks": 5, "delay_ms": 30}}, extra=b"connection: close\r\n")
        data = await reader.read()
        writer.close()
        return data

    t0 = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.monotonic() - t0
    assert all(r.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") for r in results)
    assert mock.stats.streams_completed == n
    assert elapsed < 5, elapsed


async def test_backpressure_bounds_buffering(mock: MockServer):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", mock.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    body = orjson.dumps({**STREAM, "mock": {"chunks": 4000, "chunk_size": 1000}})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nx-api-key: k\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await asyncio.sleep(0.3)
    # ~4 MB of events; unread, the mock must have stopped at its high-water mark.
    assert mock.stats.write_pauses >= 1 and mock.stats.streams_completed == 0
    total = 0
    while True:
        chunk = await reader.read(1 << 20)
        total += len(chunk)
        if chunk.endswith(b"0\r\n\r\n") or not chunk:
            break
    writer.close()
    assert total > 4000 * 1000
    await wait_for(lambda: mock.stats.streams_completed == 1)


# --- HTTP details, stats, CLI ----------------------------------------------------------------


async def test_keepalive_pipelining_and_chunked_body(mock: MockServer):
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    b1 = orjson.dumps({"model": "m", "messages": MESSAGES, "mock": {"chunk_text": "one"}})
    b2 = orjson.dumps({"model": "m", "messages": MESSAGES, "mock": {"chunk_text": "two"}})
    half = len(b2) // 2
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nx-api-key: k\r\ncontent-length: %d\r\n\r\n%s"
        b"POST /v1/chat/completions HTTP/1.1\r\nx-api-key: k\r\ntransfer-encoding: chunked\r\n"
        b"\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(b1), b1, half, b2[:half], len(b2) - half, b2[half:]))
    texts = []
    for _ in range(2):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        texts.append(orjson.loads(await reader.readexactly(length))
                     ["choices"][0]["message"]["content"])
    writer.close()
    assert texts == ["one" * 5, "two" * 5]
    assert mock.stats.connections_opened == 1
    assert mock.stats.last_body["mock"] == {"chunk_text": "two"}


async def test_path_prefixes(mock: MockServer, http: aiohttp.ClientSession):
    status, _, _ = await post(http, mock, "/openai/v1/chat/completions",
                              {"model": "m", "messages": MESSAGES})
    assert status == 200
    status, _, _ = await post(http, mock, "/anthropic/v1/messages/count_tokens",
                              {"model": "m", "messages": MESSAGES})
    assert status == 200
    status, _, raw = await post(http, mock, "/v1/nothing", {})
    assert status == 404 and "error" in orjson.loads(raw)
    assert mock.stats.requests == {"/v1/chat/completions": 1, "/v1/messages/count_tokens": 1}


async def test_stats_endpoint_and_reset(mock: MockServer, http: aiohttp.ClientSession):
    await post(http, mock, "/v1/chat/completions", {"model": "m", "messages": MESSAGES,
                                                    "extra_field": [1]},
               {**AUTH, "x-trace": "abc"})
    async with http.get(mock.url + "/_mock/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == {"/v1/chat/completions": 1} and stats["requests_total"] == 1
    assert stats["last_headers"]["x-trace"] == "abc"
    assert stats["last_body"]["extra_field"] == [1]
    async with http.post(mock.url + "/_mock/reset") as resp:
        assert resp.status == 200
    assert mock.stats.requests == {} and mock.stats.last_body is None
    assert mock.stats.connections_open == 1  # the gauge survives a reset


def test_cli_workers_and_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "bench.mock_upstream", "--port", "0",
                             "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("mock upstream listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])

        async def hit() -> set[str]:
            seen = set()
            async with aiohttp.ClientSession() as http:
                for _ in range(40):
                    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         headers={**AUTH, "connection": "close"},
                                         data=b'{"model":"m","messages":[]}') as resp:
                        assert resp.status == 200
                        seen.add((await resp.json())["id"][9:19])
            return seen

        async def reset() -> bytes:
            reader, writer = await raw_request(port, {**STREAM, "mock": {"fail": "reset"}})
            got = b""
            try:
                while chunk := await reader.read(65536):
                    got += chunk
            finally:
                writer.close()
            return got

        prefixes = asyncio.run(hit())
        assert len(prefixes) == 2  # both workers answered (per-process id prefix)
        with pytest.raises(ConnectionResetError):  # RST under uvloop too
            asyncio.run(reset())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        if proc.stdout:
            proc.stdout.close()


async def wait_for(cond: Any) -> None:
    """Poll a condition the server reaches asynchronously (after a socket event), up to 2 s."""
    deadline = time.monotonic() + 2.0
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)

