"""Custom (freeform, grammar) tools across the translations: Codex CLI's `apply_patch`.

Codex declares `apply_patch` on /v1/responses as `{"type": "custom", ..., "format": {"type":
"grammar", ...}}`, the model answers with a `custom_tool_call` whose `input` is the raw patch,
and Codex sends back a `custom_tool_call_output`. These tests carry that turn through
Responses -> chat completions (where custom tools are native) and Responses -> Anthropic
(where a custom tool is a normal tool with one string property, `input`), requests and
responses, whole and streamed, checked against the official SDKs' types and accumulators.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from relay.translate.chat_anthropic import (
    anthropic_response_to_openai_chat,
    openai_chat_to_anthropic_request,
)
from relay.translate.common import custom_tool_names
from relay.translate.responses import (
    anthropic_response_to_responses,
    openai_chat_response_to_responses,
    responses_to_anthropic_request,
    responses_to_openai_chat_request,
)
from relay.translate.stream_chat_anthropic import AnthropicToOpenAIChatStream
from relay.translate.stream_responses import AnthropicToResponsesStream, OpenAIChatToResponsesStream

RESPONSES_EVENT = TypeAdapter(ResponseStreamEvent)

# As Codex CLI 0.171.0 sends it (captured from a real run against the bundled mock).
LARK = (
    'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF\nend_patch: "*** End Patch" LF?\n\n'
    'hunk: add_hunk | delete_hunk | update_hunk\nadd_hunk: "*** Add File: " filename LF add_line+\n'
    'delete_hunk: "*** Delete File: " filename LF\n'
    'update_hunk: "*** Update File: " filename LF change_move? change?\n\nfilename: /(.+)/\n'
    'add_line: "+" /(.*)/ LF -> line\n\n%import common.LF\n'
)
APPLY_PATCH = {
    "type": "custom", "name": "apply_patch",
    "description": "The `apply_patch` tool can be used to edit files. This is a FREEFORM tool, "
                   "so do not wrap the patch in JSON.",
    "format": {"type": "grammar", "syntax": "lark", "definition": LARK},
}
SHELL = {"type": "function", "name": "exec_command", "description": "Run a command",
         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
         "strict": False}
# Quotes, backslashes, tabs, non-ASCII and a character outside the BMP: everything a JSON
# string escape can do to the text on its way through Anthropic's input_json_delta.
PATCH = '*** Begin Patch\n*** Add File: hello.txt\n+h\u00e9llo "world" \\ \t \U0001f600\n*** End Patch\n'


def _codex_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-5.5", "instructions": "You are Codex.", "stream": False,
        "tools": [SHELL, APPLY_PATCH, {"type": "web_search"}], "tool_choice": "auto",
        "parallel_tool_calls": True,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "add hello.txt"}]},
            {"type": "custom_tool_call", "id": "ctc_1", "status": "completed", "call_id": "call_p1",
             "name": "apply_patch", "input": PATCH},
            {"type": "custom_tool_call_output", "call_id": "call_p1",
             "output": "Success. Updated the following files:\nA hello.txt\n"},
        ],
        **extra,
    }


# ------------------------------------------------------------------ requests


def test_custom_tool_names_of_both_request_shapes() -> None:
    assert custom_tool_names(_codex_body()) == frozenset({"apply_patch"})
    chat = {"tools": [{"type": "custom", "custom": {"name": "apply_patch"}},
                      {"type": "function", "function": {"name": "f"}}]}
    assert custom_tool_names(chat) == frozenset({"apply_patch"})
    assert custom_tool_names({}) == frozenset() == custom_tool_names({"tools": "junk"})


def test_responses_custom_tool_to_chat_request() -> None:
    out = responses_to_openai_chat_request(_codex_body(tool_choice={"type": "custom", "name": "apply_patch"}), "gpt-up")
    assert out["tools"] == [
        {"type": "function", "function": {"name": "exec_command", "description": "Run a command",
                                          "parameters": SHELL["parameters"], "strict": False}},
        {"type": "custom", "custom": {
            "name": "apply_patch", "description": APPLY_PATCH["description"],
            "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": LARK}}}},
    ]
    assert out["tool_choice"] == {"type": "custom", "custom": {"name": "apply_patch"}}
    assert out["messages"][1:] == [
        {"role": "user", "content": "add hello.txt"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_p1", "type": "custom", "custom": {"name": "apply_patch", "input": PATCH}}]},
        {"role": "tool", "tool_call_id": "call_p1", "content": "Success. Updated the following files:\nA hello.txt\n"},
    ]
    text = responses_to_openai_chat_request(
        {"input": "x", "tools": [{"type": "custom", "name": "note", "format": {"type": "text"}},
                                 {"type": "custom", "name": "bare"}]}, "g")
    assert text["tools"] == [{"type": "custom", "custom": {"name": "note", "format": {"type": "text"}}},
                             {"type": "custom", "custom": {"name": "bare"}}]


def test_responses_custom_tool_to_anthropic_request() -> None:
    out = responses_to_anthropic_request(_codex_body(), "claude-up")
    shell, patch = out["tools"]
    assert shell["name"] == "exec_command"
    assert patch["name"] == "apply_patch"
    assert patch["input_schema"] == {"type": "object", "properties": {"input": {"type": "string", "description": patch[
        "input_schema"]["properties"]["input"]["description"]}}, "required": ["input"], "additionalProperties": False}
    # The model must see what the tool is for, that it is freeform, and the grammar itself.
    assert APPLY_PATCH["description"] in patch["description"]
    assert LARK in patch["description"] and "lark" in patch["description"]
    assert "`input`" in patch["description"]
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "add hello.txt"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_p1", "name": "apply_patch", "input": {"input": PATCH}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_p1",
             "content": "Success. Updated the following files:\nA hello.txt\n"}]},
    ]
    forced = responses_to_anthropic_request(_codex_body(tool_choice={"type": "custom", "name": "apply_patch"}), "c")
    assert forced["tool_choice"] == {"type": "tool", "name": "apply_patch"}


def test_chat_custom_tool_to_anthropic_request() -> None:
    """An OpenAI chat client with a custom tool, served by an Anthropic channel."""
    out = openai_chat_to_anthropic_request({"model": "gpt", "tools": [
        {"type": "custom", "custom": {"name": "sql", "description": "Run SQL",
                                      "format": {"type": "grammar", "grammar": {"syntax": "regex",
                                                                                "definition": "SELECT .+"}}}},
        {"type": "custom", "custom": {"name": "note"}}],
        "tool_choice": {"type": "custom", "custom": {"name": "sql"}},
        "messages": [{"role": "user", "content": "count"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "1"}]}, "claude-up")
    sql, note = out["tools"]
    assert sql["description"].startswith("Run SQL") and "SELECT .+" in sql["description"]
    assert "regex" in sql["description"]
    assert note["input_schema"]["required"] == ["input"] and note["description"]
    assert out["tool_choice"] == {"type": "tool", "name": "sql"}
    assert out["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "sql", "input": {"input": "SELECT 1"}}]}


# ------------------------------------------------------------------ whole responses

ANTHROPIC_PATCH_MESSAGE = {
    "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-up",
    "content": [
        {"type": "text", "text": "Adding it."},
        {"type": "tool_use", "id": "toolu_01A", "name": "apply_patch", "input": {"input": PATCH}},
        {"type": "tool_use", "id": "toolu_01B", "name": "exec_command", "input": {"cmd": "ls"}},
    ],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 50, "output_tokens": 20, "cache_read_input_tokens": 0,
              "cache_creation_input_tokens": 0},
}


def test_anthropic_tool_use_back_to_custom_tool_call() -> None:
    r = Response.model_validate(anthropic_response_to_responses(
        ANTHROPIC_PATCH_MESSAGE, "gpt-5.5", custom_tools=frozenset({"apply_patch"})))
    assert [o.type for o in r.output] == ["message", "custom_tool_call", "function_call"]
    call = r.output[1]
    assert call.type == "custom_tool_call"
    assert (call.call_id, call.name, call.input) == ("toolu_01A", "apply_patch", PATCH)
    assert call.id and call.id.startswith("ctc_")
    fn = r.output[2]
    assert fn.type == "function_call" and orjson.loads(fn.arguments) == {"cmd": "ls"}
    # Without the request's custom tool names the call stays a function call (nothing guessed).
    plain = Response.model_validate(anthropic_response_to_responses(ANTHROPIC_PATCH_MESSAGE, "g"))
    assert [o.type for o in plain.output] == ["message", "function_call", "function_call"]


@pytest.mark.parametrize(("tool_input", "expected"), [
    ({"input": "raw"}, "raw"),
    ({}, ""),
    ({"patch": "x"}, '{"patch":"x"}'),  # the model ignored the schema: hand over what it wrote
    ({"input": 5}, '{"input":5}'),
])
def test_anthropic_custom_input_shapes(tool_input: dict[str, Any], expected: str) -> None:
    msg = {**ANTHROPIC_PATCH_MESSAGE, "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "apply_patch", "input": tool_input}]}
    chat = anthropic_response_to_openai_chat(msg, "gpt", custom_tools=frozenset({"apply_patch"}))
    call = chat["choices"][0]["message"]["tool_calls"][0]
    assert call == {"id": "toolu_1", "type": "custom", "custom": {"name": "apply_patch", "input": expected}}
    ChatCompletion.model_validate(chat)


def test_chat_custom_tool_call_to_responses() -> None:
    chat = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-up",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": "call_9", "type": "custom", "custom": {"name": "apply_patch", "input": PATCH}},
                {"id": "call_8", "type": "function", "function": {"name": "exec_command", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    ChatCompletion.model_validate(chat)
    r = Response.model_validate(openai_chat_response_to_responses(chat, "gpt-5.5"))
    assert [o.type for o in r.output] == ["custom_tool_call", "function_call"]
    call = r.output[0]
    assert call.type == "custom_tool_call" and (call.call_id, call.name, call.input) == ("call_9", "apply_patch", PATCH)


# ------------------------------------------------------------------ streams


def _check_responses_stream(events: list[dict[str, Any]]) -> Response:
    """Every event valid for the SDK, numbered in order, accumulated by the SDK's own state."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[], text_format=omit)
    final = None
    for e in events:
        for parsed in state.handle_event(RESPONSES_EVENT.validate_python(e)):
            if parsed.type == "response.completed":
                final = parsed.response
    assert final is not None
    return final


def _frames(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in raw.split(b"\n\n")[:-1]:
        head, data = frame.split(b"\n")
        obj = orjson.loads(data[6:])
        assert head == b"event: " + obj["type"].encode()
        out.append(obj)
    return out


def _custom_events(events: list[dict[str, Any]]) -> tuple[str, str, list[str]]:
    """(input from the deltas, input of the done event, the event types of the custom item)."""
    added = [e for e in events if e["type"] == "response.output_item.added"
             and e["item"]["type"] == "custom_tool_call"]
    assert len(added) == 1
    item_id = added[0]["item"]["id"]
    mine = [e for e in events if e.get("item_id") == item_id or e.get("item", {}).get("id") == item_id]
    deltas = "".join(e["delta"] for e in mine if e["type"] == "response.custom_tool_call_input.delta")
    done = [e["input"] for e in mine if e["type"] == "response.custom_tool_call_input.done"]
    assert len(done) == 1
    return deltas, done[0], [e["type"] for e in mine]


def _anthropic_stream(partials: list[str], name: str = "apply_patch") -> list[tuple[str, bytes]]:
    def ev(kind: str, data: dict[str, Any]) -> tuple[str, bytes]:
        return kind, orjson.dumps({"type": kind, **data})

    return [
        ev("message_start", {"message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-up", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 50, "output_tokens": 1}}}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Adding it."}}),
        ev("content_block_stop", {"index": 0}),
        ev("content_block_start", {"index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_01A", "name": name, "input": {}}}),
        *[ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}})
          for p in partials],
        ev("content_block_stop", {"index": 1}),
        ev("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"output_tokens": 20}}),
        ev("message_stop", {}),
    ]


def _run_anthropic_to_responses(partials: list[str]) -> list[dict[str, Any]]:
    mapper = AnthropicToResponsesStream("gpt-5.5", custom_tools=frozenset({"apply_patch"}))
    raw = b"".join(mapper.feed(e, d) for e, d in _anthropic_stream(partials)) + mapper.finish()
    return _frames(raw)


def test_anthropic_stream_to_custom_tool_call_events() -> None:
    arguments = orjson.dumps({"input": PATCH}).decode()
    partials = [arguments[i:i + 7] for i in range(0, len(arguments), 7)]
    events = _run_anthropic_to_responses(partials)
    deltas, done, kinds = _custom_events(events)
    assert deltas == done == PATCH
    assert kinds[0] == "response.output_item.added" and kinds[-2:] == [
        "response.custom_tool_call_input.done", "response.output_item.done"]
    assert kinds.count("response.custom_tool_call_input.delta") > 5  # streamed, not held to the end
    final = _check_responses_stream(events)
    assert final.output_text == "Adding it."
    call = final.output[1]
    assert call.type == "custom_tool_call" and (call.call_id, call.name, call.input) == ("toolu_01A", "apply_patch", PATCH)


@pytest.mark.parametrize("ascii_only", [False, True])
def test_anthropic_stream_custom_input_split_anywhere(ascii_only: bool) -> None:
    """The JSON string is decoded as it streams, whatever the cut: inside an escape, inside
    a \\uXXXX, between the two halves of a surrogate pair, inside the key."""
    arguments = orjson.dumps({"input": PATCH}).decode()
    if ascii_only:
        arguments = arguments.encode("ascii", "backslashreplace").decode().replace("\\U0001f600", "\\ud83d\\ude00")
        arguments = arguments.replace("\\xe9", "\\u00e9")
        assert orjson.loads(arguments) == {"input": PATCH}
    for cut in range(len(arguments) + 1):
        events = _run_anthropic_to_responses([arguments[:cut], arguments[cut:]])
        deltas, done, _ = _custom_events(events)
        assert deltas == done == PATCH, cut
    one_by_one = _run_anthropic_to_responses(list(arguments))
    assert _custom_events(one_by_one)[:2] == (PATCH, PATCH)


@pytest.mark.parametrize("arguments", [
    '{"why": "because", "input": "x"}',  # another key first: decoded at the end instead
    '{ "input" : "x" }',
    "{}",
    '{"input": 5}',
])
def test_anthropic_stream_custom_input_unusual_json(arguments: str) -> None:
    events = _run_anthropic_to_responses([arguments])
    deltas, done, _ = _custom_events(events)
    expected = anthropic_response_to_openai_chat(
        {"content": [{"type": "tool_use", "id": "t", "name": "apply_patch", "input": orjson.loads(arguments)}]},
        "g", custom_tools=frozenset({"apply_patch"}))["choices"][0]["message"]["tool_calls"][0]["custom"]["input"]
    assert deltas == done == expected


def test_anthropic_stream_custom_input_bad_escape_is_passed_on() -> None:
    """Invalid JSON from the upstream never wedges the stream: the characters go on as sent."""
    events = _run_anthropic_to_responses(['{"input": "a\\uZZZZ', 'b\\ud83dxxxxxxxx', 'c"}'])
    deltas, done, _ = _custom_events(events)
    assert deltas == done == "a\\uZZZZb\\ud83dxxxxxxxxc"


def test_anthropic_stream_function_tool_unchanged_next_to_custom() -> None:
    mapper = AnthropicToResponsesStream("gpt-5.5", custom_tools=frozenset({"apply_patch"}))
    raw = b"".join(mapper.feed(e, d) for e, d in _anthropic_stream(['{"cmd": "ls"}'], name="exec_command"))
    final = _check_responses_stream(_frames(raw + mapper.finish()))
    assert [o.type for o in final.output] == ["message", "function_call"]


def test_anthropic_stream_to_chat_custom_tool_call_chunks() -> None:
    mapper = AnthropicToOpenAIChatStream("gpt", True, custom_tools=frozenset({"apply_patch"}))
    arguments = orjson.dumps({"input": PATCH}).decode()
    chunks = []
    for e, d in _anthropic_stream([arguments[:20], arguments[20:]]):
        chunks += mapper.feed_chunks(e, d)
    calls = [c for ch in chunks for choice in ch["choices"] for c in choice["delta"].get("tool_calls") or []]
    assert calls[0] == {"index": 0, "id": "toolu_01A", "type": "custom", "custom": {"name": "apply_patch", "input": ""}}
    assert all(set(c) == {"index", "custom"} and set(c["custom"]) == {"input"} for c in calls[1:])
    assert "".join(c["custom"]["input"] for c in calls[1:]) == PATCH


def _chat_chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                         "model": "gpt-up", "choices": choices, "usage": usage})


def test_chat_stream_custom_tool_call_to_responses_events() -> None:
    """The chat stream shape for custom tools (openai/openai-openapi#576): a first delta with
    `type: custom` and the name, then `custom.input` pieces."""
    stream = [
        _chat_chunk({"role": "assistant", "content": None}),
        _chat_chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "custom",
                                     "custom": {"name": "apply_patch", "input": ""}}]}),
        *[_chat_chunk({"tool_calls": [{"index": 0, "custom": {"input": PATCH[i:i + 9]}}]})
          for i in range(0, len(PATCH), 9)],
        _chat_chunk({"tool_calls": [{"index": 1, "id": "call_8", "type": "function",
                                     "function": {"name": "exec_command", "arguments": "{}"}}]}),
        _chat_chunk({}, "tool_calls"),
        _chat_chunk(None, usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}),
        b"[DONE]",
    ]
    mapper = OpenAIChatToResponsesStream("gpt-5.5")
    events = _frames(b"".join(mapper.feed(c) for c in stream) + mapper.finish())
    deltas, done, _ = _custom_events(events)
    assert deltas == done == PATCH
    final = _check_responses_stream(events)
    assert [o.type for o in final.output] == ["custom_tool_call", "function_call"]
    call = final.output[0]
    assert call.type == "custom_tool_call" and (call.call_id, call.name, call.input) == ("call_9", "apply_patch", PATCH)
    assert PATCH in "".join(mapper.text_parts)  # a stream cut midway is estimated from it
