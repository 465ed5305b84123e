"""Protocol translation (relay.translate): bodies, errors and stream mappers, checked against
the official SDKs' own types and stream accumulators."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai import omit
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from accounting.records import Usage
from relay.translate.chat_anthropic import (
    anthropic_response_to_openai_chat,
    anthropic_to_openai_chat_request,
    openai_chat_response_to_anthropic,
    openai_chat_to_anthropic_request,
)
from relay.translate.common import TranslationError
from relay.translate.errors import anthropic_error_to_openai, openai_error_to_anthropic
from relay.translate.responses import (
    anthropic_response_to_responses,
    openai_chat_response_to_responses,
    responses_to_anthropic_request,
    responses_to_openai_chat_request,
)
from relay.translate.stream_chat_anthropic import (
    AnthropicToOpenAIChatStream,
    OpenAIChatToAnthropicStream,
)
from relay.translate.stream_responses import AnthropicToResponsesStream, OpenAIChatToResponsesStream

ANTHROPIC_EVENT = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENT = TypeAdapter(ResponseStreamEvent)
PNG = "iVBORw0KGgo="


# ------------------------------------------------------------------ SSE helpers


def openai_frames(raw: bytes) -> list[Any]:
    """Parse `data: ...\\n\\n` frames strictly; `[DONE]` stays a string."""
    assert raw.endswith(b"\n\n") or raw == b""
    out: list[Any] = []
    for frame in raw.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        payload = frame[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def named_frames(raw: bytes) -> list[dict[str, Any]]:
    """Parse `event: X\\ndata: {...}\\n\\n` frames strictly; the name must equal data.type."""
    assert raw.endswith(b"\n\n") or raw == b""
    out = []
    for frame in raw.split(b"\n\n")[:-1]:
        head, data = frame.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: "), frame
        obj = orjson.loads(data[6:])
        assert head[7:].decode() == obj["type"]
        out.append(obj)
    return out


def sse(event: str, data: dict[str, Any]) -> tuple[str, bytes]:
    return event, orjson.dumps(data)


# Real Anthropic stream shape (docs "Streaming Messages": text, then a tool_use block).
ANTHROPIC_TOOL_STREAM = [
    sse("message_start", {"type": "message_start", "message": {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 472, "cache_creation_input_tokens": 100,
                                         "cache_read_input_tokens": 2000, "output_tokens": 2}}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}),
    sse("ping", {"type": "ping"}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "Okay, let"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "'s check."}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": "{\"location\":"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": " \"Paris\"}"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 89}}),
    sse("message_stop", {"type": "message_stop"}),
]

ANTHROPIC_THINKING_STREAM = [
    sse("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-opus-4-1",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1}}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "thinking_delta", "thinking": "Let me think."}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("content_block_start", {"type": "content_block_start", "index": 1,
                                "content_block": {"type": "text", "text": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "text_delta", "text": "42"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                          "usage": {"output_tokens": 30, "output_tokens_details": {"thinking_tokens": 20}}}),
    sse("message_stop", {"type": "message_stop"}),
]


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return orjson.dumps({"id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion.chunk",
                         "created": 1741570283, "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_fc9f1d7035",
                         "choices": choices, "usage": usage})


# Real OpenAI chat stream shape with stream_options.include_usage (text, then two tool calls).
OPENAI_TOOL_STREAM = [
    _chunk({"role": "assistant", "content": "", "refusal": None}),
    _chunk({"content": "Checking"}),
    _chunk({"content": " both."}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": \"Paris\"}"}}]}),
    _chunk({"tool_calls": [{"index": 1, "id": "call_ABC", "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"}}]}),
    _chunk({}, "tool_calls"),
    _chunk(None, usage={"prompt_tokens": 120, "completion_tokens": 33, "total_tokens": 153,
                        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
                        "completion_tokens_details": {"reasoning_tokens": 5, "audio_tokens": 0}}),
    b"[DONE]",
]


# ------------------------------------------------------------------ OpenAI chat -> Anthropic request


def test_system_and_developer_messages_anywhere_become_system() -> None:
    out = openai_chat_to_anthropic_request({"model": "gpt", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "assistant", "content": "salut"},
        {"role": "user", "content": "again"},
    ]}, "claude-x")
    assert out["model"] == "claude-x"
    assert out["system"] == "Be brief.\n\nAnswer in French."
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][1]["content"] == [{"type": "text", "text": "salut"}]
    assert out["max_tokens"] == 4096


def test_images_data_and_http_urls() -> None:
    out = openai_chat_to_anthropic_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]}]}, "c")
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "what?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_tool_calls_and_merged_tool_results() -> None:
    body = {"messages": [
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "t", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "thanks"},
    ], "tools": [{"type": "function", "function": {"name": "w", "description": "weather",
                                                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
                 {"type": "function", "function": {"name": "t"}}]}
    out = openai_chat_to_anthropic_request(body, "c")
    assert out["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "w", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "t", "input": {}},
    ]}
    assert out["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        {"type": "text", "text": "thanks"},
    ]}
    assert len(out["messages"]) == 3
    assert out["tools"] == [
        {"name": "w", "description": "weather",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "t", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
])
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any]) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}],
                            "tools": [{"type": "function", "function": {"name": "f"}}]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert openai_chat_to_anthropic_request(body, "c")["tool_choice"] == expected


@pytest.mark.parametrize(("fields", "expected"), [
    ({"max_tokens": 100}, {"max_tokens": 100}),
    ({"max_tokens": 100, "max_completion_tokens": 200}, {"max_tokens": 200}),
    ({"temperature": 1.7, "top_p": 0.5}, {"max_tokens": 4096, "temperature": 1.0}),
    ({"top_p": 0.5}, {"max_tokens": 4096, "top_p": 0.5}),
    ({"stop": "END"}, {"max_tokens": 4096, "stop_sequences": ["END"]}),
    ({"stop": ["a", " ", "\n"]}, {"max_tokens": 4096, "stop_sequences": ["a"]}),
    ({"stream": True, "stream_options": {"include_usage": True}}, {"max_tokens": 4096, "stream": True}),
    ({"user": "u-1"}, {"max_tokens": 4096, "metadata": {"user_id": "u-1"}}),
    # reasoning_effort: budget inside max_tokens, sampling knobs Anthropic rejects with thinking dropped
    ({"reasoning_effort": "medium", "temperature": 0.2},
     {"max_tokens": 8192 + 4096, "thinking": {"type": "enabled", "budget_tokens": 8192}}),
    ({"reasoning_effort": "high", "max_completion_tokens": 5000, "top_p": 0.97},
     {"max_tokens": 5000, "thinking": {"type": "enabled", "budget_tokens": 4999}, "top_p": 0.97}),
    ({"reasoning_effort": "low", "max_tokens": 1000}, {"max_tokens": 1000}),
    ({"reasoning_effort": "none"}, {"max_tokens": 4096}),
    # fields Anthropic would reject are not forwarded
    ({"frequency_penalty": 1, "presence_penalty": 1, "logit_bias": {"1": 2}, "seed": 3, "n": 1,
      "response_format": {"type": "json_object"}, "logprobs": False, "store": True,
      "metadata": {"a": "b"}, "service_tier": "auto", "prompt_cache_key": "k"},
     {"max_tokens": 4096}),
])
def test_request_fields(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    out = openai_chat_to_anthropic_request({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}, "c")
    out.pop("messages")
    assert out == {"model": "c", **expected}


def test_thinking_dropped_for_forced_tool_and_tool_loops() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    forced = openai_chat_to_anthropic_request({"messages": [{"role": "user", "content": "x"}], "tools": tools,
                                               "tool_choice": "required", "reasoning_effort": "high"}, "c")
    assert "thinking" not in forced and forced["max_tokens"] == 4096
    loop = openai_chat_to_anthropic_request({"reasoning_effort": "high", "tools": tools, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}, "c")
    assert "thinking" not in loop


def test_prefill_trailing_whitespace_is_trimmed_and_input_not_mutated() -> None:
    body = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Sure: "}]}
    snapshot = orjson.dumps(body)
    out = openai_chat_to_anthropic_request(body, "c")
    assert out["messages"][-1]["content"] == [{"type": "text", "text": "Sure:"}]
    assert orjson.dumps(body) == snapshot


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": "nope"}, "messages"),
    # Custom tools translate (tests/test_translate_custom_tools.py); an unknown tool type does not.
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "computer", "computer": {}}]}, "tools[0]"),
])
def test_untranslatable_requests_raise_with_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(TranslationError) as exc:
        openai_chat_to_anthropic_request(body, "c")
    assert exc.value.param == param


# ------------------------------------------------------------------ Anthropic response -> OpenAI chat

ANTHROPIC_MESSAGE: dict[str, Any] = {
    "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
    ],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 30,
              "cache_read_input_tokens": 40},
}


def test_anthropic_response_to_openai_chat() -> None:
    out = anthropic_response_to_openai_chat(ANTHROPIC_MESSAGE, "claude-alias", created=1)
    cc = ChatCompletion.model_validate(out)
    msg = cc.choices[0].message
    assert msg.content == "Let me check."
    assert msg.tool_calls is not None and msg.tool_calls[0].id == "toolu_1"
    assert orjson.loads(msg.tool_calls[0].function.arguments) == {"location": "Paris"}  # type: ignore[union-attr]
    assert cc.choices[0].finish_reason == "tool_calls"
    assert cc.model == "claude-alias"
    assert cc.usage is not None
    assert (cc.usage.prompt_tokens, cc.usage.completion_tokens, cc.usage.total_tokens) == (80, 20, 100)
    assert cc.usage.prompt_tokens_details is not None and cc.usage.prompt_tokens_details.cached_tokens == 40
    assert cc.usage.prompt_tokens_details.cache_write_tokens == 30
    assert out["choices"][0]["message"]["reasoning_content"] == "hmm"


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), (None, "stop"),
])
def test_stop_reason_to_finish_reason(stop: str | None, finish: str) -> None:
    resp = {**ANTHROPIC_MESSAGE, "content": [{"type": "text", "text": "x"}], "stop_reason": stop}
    cc = ChatCompletion.model_validate(anthropic_response_to_openai_chat(resp, "m"))
    assert cc.choices[0].finish_reason == finish


# ------------------------------------------------------------------ Anthropic request -> OpenAI chat


def test_anthropic_request_to_openai_chat() -> None:
    body = {
        "model": "claude", "max_tokens": 512, "stream": True, "top_k": 5,
        "system": [{"type": "text", "text": "Rule 1.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Rule 2."}],
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "stop_sequences": ["###"], "metadata": {"user_id": "u-9"},
        "tools": [{"name": "w", "description": "weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "P"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "text", "text": "and now?"}]},
        ],
    }
    out = anthropic_to_openai_chat_request(body, "gpt-4o")
    assert out["model"] == "gpt-4o"
    assert out["max_completion_tokens"] == 512
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert out["stop"] == ["###"] and out["user"] == "u-9"
    assert "top_k" not in out and "thinking" not in out and "reasoning_effort" not in out
    assert out["tools"] == [{"type": "function", "function": {"name": "w", "description": "weather",
                                                              "parameters": {"type": "object"}}}]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["messages"] == [
        {"role": "system", "content": "Rule 1.\n\nRule 2."},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": "{\"c\":\"P\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "and now?"},
    ]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "required"),
    ({"type": "tool", "name": "w"}, {"type": "function", "function": {"name": "w"}}),
])
def test_anthropic_tool_choice_to_openai(choice: dict[str, Any], expected: Any) -> None:
    out = anthropic_to_openai_chat_request({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                                            "tools": [{"name": "w", "input_schema": {}}], "tool_choice": choice}, "g")
    assert out["tool_choice"] == expected


def test_anthropic_server_tools_are_refused() -> None:
    with pytest.raises(TranslationError):
        anthropic_to_openai_chat_request({"max_tokens": 1, "messages": [],
                                          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "g")


OPENAI_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-123", "object": "chat.completion", "created": 1, "model": "gpt-4o",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
        "role": "assistant", "content": "On it.", "refusal": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{\"c\":\"P\"}"}}]}}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
              "prompt_tokens_details": {"cached_tokens": 60}},
}


def test_openai_chat_response_to_anthropic() -> None:
    msg = Message.model_validate(openai_chat_response_to_anthropic(OPENAI_COMPLETION, "claude-alias"))
    assert msg.model == "claude-alias" and msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[1].input == {"c": "P"}  # type: ignore[union-attr]
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (40, 60, 7)


@pytest.mark.parametrize(("finish", "stop"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
    ("content_filter", "refusal"), (None, "end_turn"),
])
def test_finish_reason_to_stop_reason(finish: str | None, stop: str) -> None:
    resp = {**OPENAI_COMPLETION, "choices": [{"index": 0, "finish_reason": finish,
                                              "message": {"role": "assistant", "content": "x"}}]}
    assert Message.model_validate(openai_chat_response_to_anthropic(resp, "m")).stop_reason == stop


# ------------------------------------------------------------------ round trips


def test_request_round_trip_openai_anthropic_openai() -> None:
    original = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "r"},
    ], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required", "max_tokens": 50, "stop": ["z"], "temperature": 0.5}
    back = anthropic_to_openai_chat_request(openai_chat_to_anthropic_request(original, "c"), "g")
    assert back["messages"] == original["messages"]
    assert back["tools"] == original["tools"]
    assert (back["tool_choice"], back["max_completion_tokens"], back["stop"], back["temperature"]) == (
        "required", 50, ["z"], 0.5)


def test_response_round_trip_anthropic_openai_anthropic() -> None:
    back = openai_chat_response_to_anthropic(anthropic_response_to_openai_chat(ANTHROPIC_MESSAGE, "m"), "m")
    Message.model_validate(back)
    assert [b for b in back["content"] if b["type"] != "thinking"] == [
        b for b in ANTHROPIC_MESSAGE["content"] if b["type"] != "thinking"]
    assert back["stop_reason"] == "tool_use"
    # cache writes travel in prompt_tokens_details.cache_write_tokens: usage survives exactly
    assert back["usage"] == ANTHROPIC_MESSAGE["usage"]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(("status", "body", "etype", "message"), [
    (400, b'{"error":{"message":"bad field","type":"invalid_request_error","param":"x","code":null}}',
     "invalid_request_error", "bad field"),
    (401, b'{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}',
     "authentication_error", "Incorrect API key"),
    (429, b'{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}',
     "billing_error", "quota"),
    (429, b'{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}',
     "rate_limit_error", "slow down"),
    (503, b"<html>Service Unavailable</html>", "overloaded_error", "<html>Service Unavailable</html>"),
    (500, b"", "api_error", "upstream returned HTTP 500"),
])
def test_openai_error_to_anthropic(status: int, body: bytes, etype: str, message: str) -> None:
    out = orjson.loads(openai_error_to_anthropic(status, body))
    assert out == {"type": "error", "error": {"type": etype, "message": message}}


@pytest.mark.parametrize(("status", "body", "etype", "code", "message"), [
    (400, b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: required"}}',
     "invalid_request_error", "invalid_request", "max_tokens: required"),
    (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}',
     "server_error", "upstream_overloaded", "Overloaded"),
    (429, b'{"type":"error","error":{"type":"rate_limit_error","message":"rl"}}',
     "rate_limit_error", "rate_limit_exceeded", "rl"),
    (502, b"Bad Gateway", "server_error", "upstream_error", "Bad Gateway"),
])
def test_anthropic_error_to_openai(status: int, body: bytes, etype: str, code: str, message: str) -> None:
    out = orjson.loads(anthropic_error_to_openai(status, body))
    assert out == {"error": {"message": message, "type": etype, "param": None, "code": code}}


# ------------------------------------------------------------------ Anthropic stream -> OpenAI chunks


def test_anthropic_stream_to_openai_chunks_with_usage() -> None:
    mapper = AnthropicToOpenAIChatStream("claude-alias", include_usage=True, created=7)
    raw = b"".join(mapper.feed(ev, data) for ev, data in ANTHROPIC_TOOL_STREAM) + mapper.finish()
    frames = openai_frames(raw)
    assert frames[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(f) for f in frames[:-1]]
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(c)
    final = state.get_final_completion()
    msg = final.choices[0].message
    assert msg.content == "Okay, let's check."
    assert msg.tool_calls is not None and msg.tool_calls[0].id == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert orjson.loads(msg.tool_calls[0].function.arguments) == {"location": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 472 + 100 + 2000
    assert chunks[-1].usage.completion_tokens == 89
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 2000  # type: ignore[union-attr]
    assert mapper.usage == Usage(input=472, output=89, cache_read=2000, cache_write=100)
    assert mapper.final_usage
    assert "".join(mapper.text_parts) == "Okay, let's check.get_weather{\"location\": \"Paris\"}"


def test_anthropic_stream_without_include_usage_and_thinking() -> None:
    mapper = AnthropicToOpenAIChatStream("m", include_usage=False)
    raw = b"".join(mapper.feed(ev, data) for ev, data in ANTHROPIC_THINKING_STREAM) + mapper.finish()
    frames = openai_frames(raw)
    chunks = [ChatCompletionChunk.model_validate(f) for f in frames[:-1]]
    assert all(c.usage is None and c.choices for c in chunks)
    assert [f["choices"][0]["delta"].get("reasoning_content") for f in frames[:-1]
            if "reasoning_content" in f["choices"][0]["delta"]] == ["Let me think."]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert mapper.usage == Usage(input=10, output=30, reasoning=20)


def test_anthropic_stream_cut_midway_and_error_event() -> None:
    mapper = AnthropicToOpenAIChatStream("m", include_usage=True)
    for ev, data in ANTHROPIC_TOOL_STREAM[:5]:
        mapper.feed(ev, data)
    assert not mapper.final_usage and mapper.usage.input == 472
    assert mapper.text_parts == ["Okay, let", "'s check."]
    err = mapper.feed("error", b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    assert openai_frames(err) == [{"error": {"message": "Overloaded", "type": "server_error", "param": None,
                                             "code": "upstream_overloaded"}}]
    assert mapper.finish() == b"data: [DONE]\n\n"  # no usage chunk without final usage


# ------------------------------------------------------------------ OpenAI chunks -> Anthropic stream


def _accumulate(events: list[dict[str, Any]]) -> Message:
    snapshot = None
    bufs: dict[int, bytes] = {}
    for e in events:
        snapshot = accumulate_event(event=ANTHROPIC_EVENT.validate_python(e), current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return snapshot


def test_openai_stream_to_anthropic_events() -> None:
    mapper = OpenAIChatToAnthropicStream("claude-alias")
    raw = b"".join(mapper.feed(c) for c in OPENAI_TOOL_STREAM) + mapper.finish()
    events = named_frames(raw)
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    msg = _accumulate(events)
    assert msg.model == "claude-alias" and msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use", "tool_use"]
    assert msg.content[0].text == "Checking both."  # type: ignore[union-attr]
    assert msg.content[1].input == {"location": "Paris"}  # type: ignore[union-attr]
    assert msg.content[1].id == "call_DdmO9pD3xa9XTPNJ32zg2hcA"  # type: ignore[union-attr]
    assert msg.content[2].input == {} and msg.content[2].name == "get_time"  # type: ignore[union-attr]
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (56, 64, 33)
    assert mapper.usage == Usage(input=56, output=33, cache_read=64, reasoning=5)
    assert mapper.final_usage


def test_openai_stream_reasoning_cut_and_error() -> None:
    mapper = OpenAIChatToAnthropicStream("m")
    out = mapper.feed(_chunk({"role": "assistant", "reasoning_content": "think"}))
    out += mapper.feed(_chunk({"content": "ans"}))
    out += mapper.finish()  # upstream ended without finish_reason, usage or [DONE]
    msg = _accumulate(named_frames(out))
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.stop_reason == "end_turn" and not mapper.final_usage
    assert mapper.text_parts == ["think", "ans"]
    assert mapper.finish() == b""
    err = OpenAIChatToAnthropicStream("m").feed(b'{"error":{"message":"boom","type":"server_error","code":null}}')
    assert named_frames(err) == [{"type": "error", "error": {"type": "api_error", "message": "boom"}}]


def test_stream_round_trip_anthropic_openai_anthropic() -> None:
    to_chat = AnthropicToOpenAIChatStream("m", include_usage=True)
    raw = b"".join(to_chat.feed(ev, d) for ev, d in ANTHROPIC_TOOL_STREAM) + to_chat.finish()
    back = OpenAIChatToAnthropicStream("m")
    out = b"".join(back.feed(b"[DONE]" if f == "[DONE]" else orjson.dumps(f)) for f in openai_frames(raw))
    msg = _accumulate(named_frames(out))
    assert msg.content[0].text == "Okay, let's check."  # type: ignore[union-attr]
    assert msg.content[1].input == {"location": "Paris"}  # type: ignore[union-attr]
    assert msg.stop_reason == "tool_use" and msg.usage.output_tokens == 89
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.cache_creation_input_tokens) == (
        472, 2000, 100)
    assert back.usage == to_chat.usage


# ------------------------------------------------------------------ Responses API


def test_responses_request_to_chat() -> None:
    body = {
        "model": "gpt-5", "instructions": "Be terse.", "max_output_tokens": 300, "stream": True,
        "reasoning": {"effort": "low", "summary": "auto"}, "store": False, "include": ["reasoning.encrypted_content"],
        "tools": [{"type": "function", "name": "shell", "description": "run", "parameters": {"type": "object"},
                   "strict": False}, {"type": "web_search"}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "env: linux"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "list"},
                                         {"type": "input_image", "image_url": "https://e.com/x.png"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Running."}]},
            {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{\"cmd\":\"ls\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "shell", "arguments": "{\"cmd\":\"pwd\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a b"},
            {"type": "function_call_output", "call_id": "call_2", "output": "/"},
        ],
    }
    out = responses_to_openai_chat_request(body, "gpt-5-up")
    assert out["model"] == "gpt-5-up" and out["max_completion_tokens"] == 300
    assert out["reasoning_effort"] == "low" and out["stream_options"] == {"include_usage": True}
    assert out["tools"] == [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"},
                                                              "description": "run", "strict": False}}]
    assert out["tool_choice"] == "auto" and out["parallel_tool_calls"] is False
    assert out["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": "env: linux"},
        {"role": "user", "content": [{"type": "text", "text": "list"},
                                     {"type": "image_url", "image_url": {"url": "https://e.com/x.png"}}]},
        {"role": "assistant", "content": "Running.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": "{\"cmd\":\"ls\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "shell", "arguments": "{\"cmd\":\"pwd\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a b"},
        {"role": "tool", "tool_call_id": "call_2", "content": "/"},
    ]
    anth = responses_to_anthropic_request({**body, "input": "hi", "reasoning": None}, "claude-up")
    assert anth["system"] == "Be terse." and anth["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert anth["max_tokens"] == 300 and anth["tools"][0]["name"] == "shell"
    with pytest.raises(TranslationError):
        responses_to_openai_chat_request({"input": "x", "previous_response_id": "resp_1"}, "g")


def test_chat_and_anthropic_responses_to_responses_object() -> None:
    r = Response.model_validate(openai_chat_response_to_responses(OPENAI_COMPLETION, "gpt-alias"))
    assert r.status == "completed" and r.model == "gpt-alias"
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.output_text == "On it."
    assert r.output[1].call_id == "call_1" and r.output[1].arguments == "{\"c\":\"P\"}"  # type: ignore[union-attr]
    assert r.usage is not None and (r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens,
                                    r.usage.output_tokens) == (100, 60, 7)
    a = Response.model_validate(anthropic_response_to_responses({**ANTHROPIC_MESSAGE, "stop_reason": "max_tokens"}, "c"))
    assert a.status == "incomplete" and a.incomplete_details is not None
    assert a.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in a.output] == ["reasoning", "message", "function_call"]
    assert a.usage is not None and a.usage.input_tokens == 80 and a.usage.input_tokens_details.cached_tokens == 40


def _check_responses_stream(events: list[dict[str, Any]]) -> Response:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[], text_format=omit)
    final = None
    for e in events:
        for parsed in state.handle_event(RESPONSES_EVENT.validate_python(e)):
            if parsed.type in ("response.completed", "response.incomplete"):
                final = parsed.response
    assert final is not None
    return final


def test_chat_stream_to_responses_events() -> None:
    mapper = OpenAIChatToResponsesStream("gpt-alias")
    raw = b"".join(mapper.feed(c) for c in OPENAI_TOOL_STREAM) + mapper.finish()
    events = named_frames(raw)
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 2
    assert types.count("response.function_call_arguments.delta") == 3
    final = _check_responses_stream(events)
    assert final.output_text == "Checking both."
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.name, c.call_id, c.arguments) for c in calls] == [
        ("get_weather", "call_DdmO9pD3xa9XTPNJ32zg2hcA", "{\"location\": \"Paris\"}"), ("get_time", "call_ABC", "{}")]
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens, final.usage.output_tokens,
            final.usage.output_tokens_details.reasoning_tokens) == (120, 64, 33, 5)
    assert mapper.usage == Usage(input=56, output=33, cache_read=64, reasoning=5)


def test_anthropic_stream_to_responses_events() -> None:
    mapper = AnthropicToResponsesStream("claude-alias")
    raw = b"".join(mapper.feed(ev, d) for ev, d in ANTHROPIC_THINKING_STREAM) + mapper.finish()
    events = named_frames(raw)
    final = _check_responses_stream(events)
    assert final.status == "incomplete"
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "Let me think."  # type: ignore[union-attr]
    assert final.output_text == "42"
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 20
    assert mapper.usage == Usage(input=10, output=30, reasoning=20) and mapper.final_usage
    tool = AnthropicToResponsesStream("c")
    tool_events = named_frames(b"".join(tool.feed(ev, d) for ev, d in ANTHROPIC_TOOL_STREAM) + tool.finish())
    tfinal = _check_responses_stream(tool_events)
    assert tfinal.usage is not None and tfinal.usage.input_tokens == 2572
    assert [o.type for o in tfinal.output] == ["message", "function_call"]
