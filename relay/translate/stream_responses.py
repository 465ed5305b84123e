"""Responses API stream events made from an OpenAI chat chunk stream (or an Anthropic one).

`OpenAIChatToResponsesStream` turns chat.completion.chunk payloads into the Responses event
sequence Codex CLI and the OpenAI SDK expect: response.created / in_progress, one output item
per reasoning run, text run, function call or custom tool call (added, deltas, done), then
response.completed
(or response.incomplete) carrying all items and the usage. Every event has a
`sequence_number`. `AnthropicToResponsesStream` composes the Anthropic -> chat mapper with it
at the dict level (no re-serialization in between). Item text is joined once, when the item
closes. No I/O.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import orjson

from accounting.records import Usage
from relay.translate.common import JSON, named_frame, new_id, usage_from_openai
from relay.translate.responses import (
    INCOMPLETE_REASON,
    chat_usage_to_responses,
    custom_tool_call_item,
    function_call_item,
    message_item,
    reasoning_item,
    response_envelope,
)
from relay.translate.stream_chat_anthropic import AnthropicToOpenAIChatStream


class _Item:
    __slots__ = ("call_id", "id", "kind", "name", "output_index", "parts")

    def __init__(self, kind: str, item_id: str, output_index: int, call_id: str = "", name: str = ""):
        self.kind = kind  # "message" | "reasoning" | "function_call" | "custom_tool_call"
        self.id = item_id
        self.output_index = output_index
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []


class OpenAIChatToResponsesStream:
    """OpenAI chat chunk payloads in, Responses API events out."""

    __slots__ = (
        "_created_at",
        "_current",
        "_done",
        "_finish_reason",
        "_id",
        "_model",
        "_output",
        "_seq",
        "_started",
        "_tools",
        "_usage",
        "final_usage",
        "text_parts",
        "usage",
    )

    def __init__(self, model: str, *, created_at: int | None = None) -> None:
        self._model = model
        self._id = new_id("resp_")
        self._created_at = int(time.time()) if created_at is None else created_at
        self._seq = 0
        self._started = False
        self._done = False
        self._current: _Item | None = None
        self._output: list[JSON] = []  # finished items, by output_index
        self._tools: dict[int, _Item] = {}
        self._finish_reason: str | None = None
        self._usage: JSON | None = None
        self.usage = Usage()
        self.final_usage = False
        self.text_parts: list[str] = []

    def _emit(self, out: list[JSON], event: JSON) -> None:
        event["sequence_number"] = self._seq
        self._seq += 1
        out.append(event)

    def _envelope(self, status: str, reason: str | None = None) -> JSON:
        output = self._output if status != "in_progress" else []
        usage = self._usage if status != "in_progress" else None
        return response_envelope(self._id, self._model, self._created_at, status, output, usage, reason)

    def _start(self, out: list[JSON]) -> None:
        self._started = True
        self._emit(out, {"type": "response.created", "response": self._envelope("in_progress")})
        self._emit(out, {"type": "response.in_progress", "response": self._envelope("in_progress")})

    def _open(self, out: list[JSON], kind: str, call_id: str = "", name: str = "") -> _Item:
        self._close(out)
        prefix = {"message": "msg_", "reasoning": "rs_", "function_call": "fc_", "custom_tool_call": "ctc_"}[kind]
        item = _Item(kind, new_id(prefix), len(self._output), call_id, name)
        self._output.append({})  # placeholder keeps output_index stable
        self._current = item
        if kind == "message":
            added: JSON = {"id": item.id, "type": "message", "status": "in_progress",
                           "role": "assistant", "content": []}
        elif kind == "reasoning":
            added = {"id": item.id, "type": "reasoning", "summary": []}
        elif kind == "custom_tool_call":
            added = custom_tool_call_item(item.id, call_id, name, "", "in_progress")
        else:
            added = function_call_item(item.id, call_id, name, "", "in_progress")
        self._emit(out, {"type": "response.output_item.added", "output_index": item.output_index,
                         "item": added})
        ref = {"item_id": item.id, "output_index": item.output_index}
        if kind == "message":
            self._emit(out, {"type": "response.content_part.added", **ref, "content_index": 0,
                             "part": {"type": "output_text", "text": "", "annotations": []}})
        elif kind == "reasoning":
            self._emit(out, {"type": "response.reasoning_summary_part.added", **ref, "summary_index": 0,
                             "part": {"type": "summary_text", "text": ""}})
        return item

    def _close(self, out: list[JSON]) -> None:
        item = self._current
        if item is None:
            return
        self._current = None
        text = "".join(item.parts)
        ref = {"item_id": item.id, "output_index": item.output_index}
        if item.kind == "message":
            done = message_item(item.id, text)
            self._emit(out, {"type": "response.output_text.done", **ref, "content_index": 0,
                             "text": text, "logprobs": []})
            self._emit(out, {"type": "response.content_part.done", **ref, "content_index": 0,
                             "part": done["content"][0]})
        elif item.kind == "reasoning":
            done = reasoning_item(item.id, text)
            self._emit(out, {"type": "response.reasoning_summary_text.done", **ref, "summary_index": 0,
                             "text": text})
            self._emit(out, {"type": "response.reasoning_summary_part.done", **ref, "summary_index": 0,
                             "part": done["summary"][0]})
        elif item.kind == "custom_tool_call":
            done = custom_tool_call_item(item.id, item.call_id, item.name, text)
            self._emit(out, {"type": "response.custom_tool_call_input.done", **ref, "input": text})
        else:
            done = function_call_item(item.id, item.call_id, item.name, text)
            self._emit(out, {"type": "response.function_call_arguments.done", **ref,
                             "name": item.name, "arguments": text})
        self._output[item.output_index] = done
        self._emit(out, {"type": "response.output_item.done", "output_index": item.output_index,
                         "item": done})

    def _delta(self, out: list[JSON], delta: JSON) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            item = self._current
            if item is None or item.kind != "reasoning":
                item = self._open(out, "reasoning")
            item.parts.append(reasoning)
            self.text_parts.append(reasoning)
            self._emit(out, {"type": "response.reasoning_summary_text.delta", "item_id": item.id,
                             "output_index": item.output_index, "summary_index": 0, "delta": reasoning})
        text = delta.get("content")
        if isinstance(text, str) and text:
            item = self._current
            if item is None or item.kind != "message":
                item = self._open(out, "message")
            item.parts.append(text)
            self.text_parts.append(text)
            self._emit(out, {"type": "response.output_text.delta", "item_id": item.id,
                             "output_index": item.output_index, "content_index": 0, "delta": text,
                             "logprobs": []})
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0)
            fn = call.get("function") or {}
            custom = call.get("custom") or {}
            tool = self._tools.get(index)
            if tool is None:
                # Some servers echo an empty `custom: {}` beside function deltas: the type,
                # else a custom name, decides.
                kind = "custom_tool_call" if call.get("type") == "custom" or (
                    call.get("type") is None and custom.get("name") and not fn.get("name")) else "function_call"
                name = (custom if kind == "custom_tool_call" else fn).get("name") or ""
                self.text_parts.append(name)
                tool = self._open(out, kind, call.get("id") or new_id("call_"), name)
                self._tools[index] = tool
            if tool.kind == "custom_tool_call":
                piece = custom.get("input")
                event = "response.custom_tool_call_input.delta"
            else:
                piece = fn.get("arguments")
                event = "response.function_call_arguments.delta"
            if piece:
                tool.parts.append(piece)
                self.text_parts.append(piece)
                self._emit(out, {"type": event, "item_id": tool.id, "output_index": tool.output_index,
                                 "delta": piece})

    def feed(self, data: bytes) -> bytes:
        """One OpenAI SSE `data:` payload (a chunk or `[DONE]`) -> client bytes."""
        return b"".join([named_frame(e) for e in self.feed_events(data)])

    def feed_events(self, data: bytes) -> list[JSON]:
        if self._done:
            return []
        if data.strip() == b"[DONE]":
            return self.finish_events()
        return self.feed_chunk(orjson.loads(data))

    def feed_chunk(self, chunk: JSON) -> list[JSON]:
        """One parsed chat chunk (or `{"error": {...}}`) -> Responses events."""
        if self._done:
            return []
        out: list[JSON] = []
        err = chunk.get("error")
        if isinstance(err, dict):
            self._done = True
            self._emit(out, {"type": "error", "code": err.get("code"), "message": err.get("message", ""),
                             "param": err.get("param")})
            return out
        if not self._started:
            self._start(out)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            self._delta(out, choice.get("delta") or {})
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = chat_usage_to_responses(usage)
            self.usage = usage_from_openai(usage)
            self.final_usage = True
        return out

    def finish_events(self) -> list[JSON]:
        """The closing events: the open item's done events, then response.completed/incomplete."""
        if self._done:
            return []
        self._done = True
        out: list[JSON] = []
        if not self._started:
            self._start(out)
        self._close(out)
        reason = INCOMPLETE_REASON.get(self._finish_reason or "")
        if reason:
            self._emit(out, {"type": "response.incomplete", "response": self._envelope("incomplete", reason)})
        else:
            self._emit(out, {"type": "response.completed", "response": self._envelope("completed")})
        return out

    def finish(self) -> bytes:
        """Bytes still owed when the upstream stream ended (nothing if `[DONE]` was fed)."""
        return b"".join([named_frame(e) for e in self.finish_events()])


class AnthropicToResponsesStream:
    """Anthropic Messages events in, Responses API events out (Anthropic -> chat -> Responses).

    `usage`, `final_usage` and `text_parts` come from the Anthropic side, which alone knows
    cache writes. `custom_tools` names the request's custom tools (their `tool_use` blocks
    become `custom_tool_call` items).
    """

    __slots__ = ("_chat", "_responses")

    def __init__(self, model: str, *, custom_tools: Collection[str] = ()) -> None:
        self._chat = AnthropicToOpenAIChatStream(model, include_usage=True, custom_tools=custom_tools)
        self._responses = OpenAIChatToResponsesStream(model)

    @property
    def usage(self) -> Usage:
        return self._chat.usage

    @property
    def final_usage(self) -> bool:
        return self._chat.final_usage

    @property
    def text_parts(self) -> list[str]:
        return self._chat.text_parts

    def feed(self, event: str, data: bytes) -> bytes:
        """One Anthropic SSE event (its `event:` name and `data:` payload) -> client bytes."""
        out: list[JSON] = []
        for chunk in self._chat.feed_chunks(event, data):
            out.extend(self._responses.feed_chunk(chunk))
        if (event or orjson.loads(data).get("type")) == "message_stop":
            out.extend(self._responses.finish_events())
        return b"".join([named_frame(e) for e in out])

    def finish(self) -> bytes:
        out: list[JSON] = []
        for chunk in self._chat.finish_chunks():
            out.extend(self._responses.feed_chunk(chunk))
        out.extend(self._responses.finish_events())
        return b"".join([named_frame(e) for e in out])
