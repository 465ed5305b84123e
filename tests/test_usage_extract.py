"""Usage extraction from provider-shaped bodies and SSE event sequences."""

from __future__ import annotations

import orjson
import pytest

from accounting.records import Usage
from accounting.usage import (
    AnthropicStreamTap,
    OpenAIChatStreamTap,
    ResponsesStreamTap,
    from_anthropic_body,
    from_openai_body,
    is_usage_only_chunk,
    text_from_events,
)

# --- non-streamed bodies (shapes as the providers return them) ------------------------------

OPENAI_CHAT = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "The image shows a wooden boardwalk.", "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

OPENAI_REASONING_CHAT = {
    "object": "chat.completion",
    "model": "o3-mini-2025-01-31",
    "choices": [],
    "usage": {
        "prompt_tokens": 2048,
        "completion_tokens": 1500,
        "total_tokens": 3548,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 1344},
    },
}

OPENAI_COMPLETIONS = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "model": "gpt-3.5-turbo-instruct",
    "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

OPENAI_EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": [0.0023064255, -0.009327292], "index": 0}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

OPENAI_RESPONSE = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "model": "o4-mini-2025-04-16",
    "output": [],
    "usage": {
        "input_tokens": 5000,
        "input_tokens_details": {"cached_tokens": 4864},
        "output_tokens": 900,
        "output_tokens_details": {"reasoning_tokens": 640},
        "total_tokens": 5900,
    },
}

DEEPSEEK_CHAT = {
    "object": "chat.completion",
    "model": "deepseek-chat",
    "choices": [],
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "total_tokens": 110,
        "prompt_cache_hit_tokens": 64,
        "prompt_cache_miss_tokens": 36,
    },
}

ANTHROPIC_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 2048,
        "cache_read_input_tokens": 10000,
        "cache_creation": {"ephemeral_5m_input_tokens": 2048, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 6,
        "service_tier": "standard",
    },
}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (OPENAI_CHAT, Usage(input=93, output=46, cache_read=1024)),
        (OPENAI_REASONING_CHAT, Usage(input=2048, output=1500, reasoning=1344)),
        (OPENAI_COMPLETIONS, Usage(input=5, output=7)),
        (OPENAI_EMBEDDINGS, Usage(input=8)),
        (OPENAI_RESPONSE, Usage(input=136, output=900, cache_read=4864, reasoning=640)),
        (DEEPSEEK_CHAT, Usage(input=36, output=10, cache_read=64)),
    ],
    ids=["chat-cached", "chat-reasoning", "completions", "embeddings", "responses", "deepseek"],
)
def test_openai_bodies(body: dict, expected: Usage) -> None:
    assert from_openai_body(body) == expected


def test_anthropic_body_keeps_cache_outside_input() -> None:
    assert from_anthropic_body(ANTHROPIC_MESSAGE) == Usage(input=12, output=6, cache_read=10000, cache_write=2048)
    # older responses carry null cache fields
    body = {"type": "message", "usage": {"input_tokens": 3, "output_tokens": 4,
                                         "cache_creation_input_tokens": None, "cache_read_input_tokens": None}}
    assert from_anthropic_body(body) == Usage(input=3, output=4)


@pytest.mark.parametrize(
    "body",
    [{}, {"usage": None}, {"usage": "12"}, {"error": {"message": "x"}}, [], "usage"],
)
def test_bodies_without_usage(body: object) -> None:
    assert from_openai_body(body) is None  # type: ignore[arg-type]
    assert from_anthropic_body(body) is None  # type: ignore[arg-type]


def test_malformed_counts_are_not_trusted() -> None:
    body = {"usage": {"prompt_tokens": -5, "completion_tokens": "7", "prompt_tokens_details": {"cached_tokens": 99}}}
    assert from_openai_body(body) == Usage()
    # cached above prompt (a buggy relay) never makes input negative
    body = {"usage": {"prompt_tokens": 10, "completion_tokens": 2.0, "prompt_tokens_details": {"cached_tokens": 50}}}
    assert from_openai_body(body) == Usage(input=0, output=2, cache_read=10)


# --- stream taps -------------------------------------------------------------------------------


def _j(obj: object) -> bytes:
    return orjson.dumps(obj)


def test_openai_chat_tap_takes_the_non_null_usage_chunk() -> None:
    tap = OpenAIChatStreamTap()
    # include_usage streams send "usage": null on every content chunk
    tap.feed_event(_j({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}], "usage": None}))
    assert tap.usage is None
    # a content chunk whose text merely mentions "usage"
    tap.feed_event(_j({"choices": [{"index": 0, "delta": {"content": 'the "usage" field'}}], "usage": None}))
    tap.feed_event(b'{"broken": "usage"')
    tap.feed_event(b'["usage"]')
    assert tap.usage is None
    tap.feed_event(_j({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": {
        "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 12}}}))
    assert tap.usage == Usage(input=93, output=46, cache_read=1024, reasoning=12)
    tap.feed_event(_j({"choices": [], "usage": None}))  # a later null never erases it
    assert tap.usage == Usage(input=93, output=46, cache_read=1024, reasoning=12)


def test_responses_tap_reads_the_terminal_event() -> None:
    tap = ResponsesStreamTap()
    tap.feed_event(_j({"type": "response.created", "response": {"id": "r", "status": "in_progress", "usage": None}}),
                   b"response.created")
    tap.feed_event(_j({"type": "response.output_text.delta", "delta": '"usage": 5'}), b"response.output_text.delta")
    assert tap.usage is None
    tap.feed_event(_j({"type": "response.completed", "sequence_number": 42, "response": {
        "id": "r", "status": "completed", "usage": OPENAI_RESPONSE["usage"]}}), b"response.completed")
    assert tap.usage == Usage(input=136, output=900, cache_read=4864, reasoning=640)


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_responses_tap_incomplete_and_failed(kind: str) -> None:
    tap = ResponsesStreamTap()
    tap.feed_event(_j({"type": kind, "response": {"status": kind.split(".")[1], "usage": {
        "input_tokens": 20, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0}}}}))
    assert tap.usage == Usage(input=20, output=7)


def test_anthropic_tap_combines_start_and_delta() -> None:
    tap = AnthropicStreamTap()
    tap.feed_event(_j({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-20250514",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 472, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 5000,
                  "output_tokens": 2, "service_tier": "standard"}}}), b"message_start")
    assert tap.usage == Usage(input=472, output=2, cache_read=5000, cache_write=1000)
    tap.feed_event(_j({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "usage"}}))
    tap.feed_event(_j({"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 40}}))
    tap.feed_event(_j({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}), b"message_delta")
    assert tap.usage == Usage(input=472, output=89, cache_read=5000, cache_write=1000)


def test_anthropic_tap_takes_input_from_message_delta_when_present() -> None:
    tap = AnthropicStreamTap()
    # an OpenAI-compatible relay that reports zero input in message_start...
    tap.feed_event(_j({"type": "message_start", "message": {"usage": {"input_tokens": 0, "output_tokens": 0}}}))
    # ...and the real counts at the end (as newer Anthropic responses also do)
    tap.feed_event(_j({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
        "input_tokens": 300, "cache_creation_input_tokens": None, "cache_read_input_tokens": 128, "output_tokens": 15}}))
    assert tap.usage == Usage(input=300, output=15, cache_read=128)


def test_anthropic_tap_delta_without_start_and_junk() -> None:
    tap = AnthropicStreamTap()
    tap.feed_event(b"not json usage")
    tap.feed_event(_j({"type": "error", "error": {"type": "overloaded_error", "message": "usage"}}))
    tap.feed_event(_j({"type": "message_delta", "usage": None}))
    assert tap.usage is None
    tap.feed_event(_j({"type": "message_delta", "usage": {"output_tokens": 9}}))
    assert tap.usage == Usage(output=9)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1}}', True),
        (b'{"id":"c","choices": [ ],"usage":{"prompt_tokens":9}}', True),
        (b'{"id":"c","choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":9}}', False),
        (b'{"id":"c","choices":[],"usage":null}', False),
        (b'{"id":"c","usage":{"prompt_tokens":9}}', False),  # no choices at all: not a chat chunk
        (b'{"choices":[],"usage":', False),
        (b'[DONE] "usage"', False),
    ],
)
def test_is_usage_only_chunk(data: bytes, expected: bool) -> None:
    assert is_usage_only_chunk(data) is expected


# --- emitted text of a cut stream ----------------------------------------------------------------


def test_text_from_openai_chat_events() -> None:
    events = [
        _j({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        _j({"choices": [{"index": 0, "delta": {"reasoning_content": "thinking. "}}]}),
        _j({"choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
        b"data: " + _j({"choices": [{"index": 0, "delta": {"content": " world"}}]}) + b"\n\n",
        _j({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}),
        _j({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]}),
        _j({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]}),
        b"[DONE]",
        b": keep-alive",
    ]
    assert text_from_events("openai", "chat", events) == 'thinking. Hello worldget_weather{"city":"Paris"}'


def test_text_from_completions_events() -> None:
    events = [_j({"choices": [{"text": "Once", "index": 0}]}), _j({"choices": [{"text": " upon", "index": 0}]})]
    assert text_from_events("openai", "completions", events) == "Once upon"


def test_text_from_responses_events() -> None:
    events = [
        b"event: response.created\ndata: " + _j({"type": "response.created", "response": {}}),
        _j({"type": "response.reasoning_summary_text.delta", "delta": "Plan. "}),
        _j({"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hi"}),
        _j({"type": "response.output_text.delta", "item_id": "msg_1", "delta": " there"}),
        _j({"type": "response.output_text.done", "text": "Hi there"}),  # not counted twice
        _j({"type": "response.function_call_arguments.delta", "delta": '{"a":1}'}),
    ]
    assert text_from_events("openai", "responses", events) == 'Plan. Hi there{"a":1}'


def test_text_from_anthropic_events() -> None:
    events = [
        b"event: message_start\ndata: " + _j({"type": "message_start", "message": {"usage": {}}}),
        _j({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        _j({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me see."}}),
        _j({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}}),
        _j({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Answer"}}),
        _j({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"q":'}}),
        _j({"type": "content_block_delta", "index": 2, "delta": {"type": ["odd"]}}),
        b"event: ping\ndata: {\"type\": \"ping\"}",
    ]
    assert text_from_events("anthropic", "messages", events) == 'Let me see.Answer{"q":'
