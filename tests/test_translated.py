"""The translated path through a real gateway: each SDK against a channel of the other protocol."""

from __future__ import annotations

from typing import Any

import anthropic
import asyncpg
import openai
import pytest

from tests.gateway import Harness

TOOLS_OPENAI = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOLS_ANTHROPIC = [{"name": "get_weather", "description": "Weather for a city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                     "required": ["city"]}}]


@pytest.fixture
async def gw(pg_dsn: str):
    h = await Harness().start(pg_dsn, channels=[
        {"name": "only-openai", "protocol": "openai", "base_url": "http://127.0.0.1:{port}/v1",
         "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["gpt-*"], "responses_api": False},
        {"name": "only-anthropic", "protocol": "anthropic", "base_url": "http://127.0.0.1:{port}",
         "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["claude-*"]},
    ])
    yield h
    await h.stop()


async def _rows(h: Harness, key_id: int) -> list[asyncpg.Record]:
    await h.flush()
    conn = await asyncpg.connect(h.dsn)
    try:
        return await conn.fetch("SELECT * FROM usage_log WHERE key_id = $1 ORDER BY ts", key_id)
    finally:
        await conn.close()


async def test_openai_sdk_to_anthropic_channel_stream_with_tools(gw: Harness) -> None:
    _, key_id, secret = await gw.user_and_key()
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    stream = await client.chat.completions.create(
        model="claude-sonnet-4-6", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "weather in Paris? use the tool"}],
        tools=TOOLS_OPENAI)
    names, args, usage, finish = [], "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
    assert names == ["get_weather"]
    assert args.startswith("{")
    assert finish == "tool_calls"
    assert usage is not None and usage.completion_tokens > 0
    # The upstream got an Anthropic request, with the system prompt moved where it belongs.
    body = gw.mock.stats.last_body
    assert body["system"] and body["tools"][0]["name"] == "get_weather"
    assert "x-api-key" in gw.mock.stats.last_headers
    rows = await _rows(gw, key_id)
    assert rows[-1]["usage_source"] == "upstream"
    assert rows[-1]["channel"] == "only-anthropic"
    assert rows[-1]["output_tokens"] == usage.completion_tokens
    assert rows[-1]["cost_nano"] > 0


async def test_openai_sdk_to_anthropic_channel_non_stream(gw: Harness) -> None:
    _, _, secret = await gw.user_and_key()
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    resp = await client.chat.completions.create(
        model="claude-sonnet-4-6", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens == 5


async def test_anthropic_sdk_to_openai_channel_stream_with_tools(gw: Harness) -> None:
    _, key_id, secret = await gw.user_and_key()
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=secret, max_retries=0)
    async with client.messages.stream(
        model="gpt-4o-mini", max_tokens=256, system="be brief", tools=TOOLS_ANTHROPIC,
        messages=[{"role": "user", "content": "weather in Paris? use the tool"}],
    ) as stream:
        final = await stream.get_final_message()
    tool_uses = [b for b in final.content if b.type == "tool_use"]
    assert tool_uses and tool_uses[0].name == "get_weather"
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens > 0
    body = gw.mock.stats.last_body
    assert body["messages"][0]["role"] == "system"
    assert body["stream_options"] == {"include_usage": True}
    rows = await _rows(gw, key_id)
    assert rows[-1]["usage_source"] == "upstream"
    assert rows[-1]["channel"] == "only-openai"


async def test_anthropic_sdk_to_openai_channel_non_stream_and_count_tokens(gw: Harness) -> None:
    _, _, secret = await gw.user_and_key()
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=secret, max_retries=0)
    msg = await client.messages.create(model="gpt-4o-mini", max_tokens=64,
                                       messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].type == "text"
    assert msg.usage.output_tokens == 5
    count = await client.messages.count_tokens(model="gpt-4o-mini",
                                               messages=[{"role": "user", "content": "hello there"}])
    assert count.input_tokens > 0


async def test_responses_served_by_chat_and_anthropic_channels(gw: Harness) -> None:
    _, key_id, secret = await gw.user_and_key()
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    for model in ("gpt-4o-mini", "claude-sonnet-4-6"):
        resp = await client.responses.create(model=model, input="hi", instructions="be brief")
        assert resp.output_text
        assert resp.usage is not None and resp.usage.output_tokens == 5
        stream = await client.responses.create(model=model, input="hi", stream=True)
        types = [ev.type async for ev in stream]
        assert types[0] == "response.created" and types[-1] == "response.completed"
    rows = await _rows(gw, key_id)
    assert [r["usage_source"] for r in rows] == ["upstream"] * 4


async def test_translated_errors_keep_the_client_protocol(gw: Harness) -> None:
    _, _, secret = await gw.user_and_key()
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=secret, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(model="gpt-4o-mini", max_tokens=64,
                                     messages=[{"role": "user", "content": "hi"}],
                                     extra_headers={"x-mock-status": "400"})
    assert info.value.body["type"] == "error"
    oclient = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.BadRequestError) as oinfo:
        await oclient.chat.completions.create(model="claude-sonnet-4-6",
                                              messages=[{"role": "user", "content": "hi"}],
                                              extra_headers={"x-mock-status": "400"})
    assert oinfo.value.code == "invalid_request_error" or oinfo.value.type == "invalid_request_error"


async def test_openai_sdk_custom_tool_to_anthropic_channel(gw: Harness) -> None:
    """A chat client's custom (freeform) tool on an Anthropic channel: sent as a tool with one
    string property, answered as a custom tool call holding the raw text, whole and streamed."""
    _, _, secret = await gw.user_and_key()
    patch = '*** Begin Patch\n*** Add File: a.txt\n+"quoted" \\ \u00e9\n*** End Patch\n'
    messages: Any = [{"role": "user", "content": "please use the tool apply_patch\n" + patch}]
    tools: Any = [{"type": "custom", "custom": {"name": "apply_patch", "description": "Edit files",
                                                "format": {"type": "grammar", "grammar": {
                                                    "syntax": "lark", "definition": "start: /.+/s"}}}}]
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0) as client:
        resp = await client.chat.completions.create(model="claude-sonnet-4-6", messages=messages, tools=tools)
        call: Any = (resp.choices[0].message.tool_calls or [])[0]
        assert call.type == "custom" and (call.custom.name, call.custom.input) == ("apply_patch", patch)
        sent = gw.mock.stats.last_body["tools"][0]
        assert sent["input_schema"]["required"] == ["input"] and "start: /.+/s" in sent["description"]
        stream = await client.chat.completions.create(model="claude-sonnet-4-6", messages=messages, tools=tools,
                                                      stream=True, extra_body={"mock": {"chunks": 9}})
        pieces, kinds = [], []
        async for chunk in stream:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                custom = (tc.model_extra or {}).get("custom") or {}
                kinds.append(tc.type)
                pieces.append(custom.get("input") or "")
    assert kinds[0] == "custom" and "".join(pieces) == patch and len(pieces) > 2
