"""Streaming translation between OpenAI chat chunks and Anthropic Messages events.

Each mapper is a small state machine fed one parsed upstream SSE event at a time; it returns
the bytes to write to the client (zero or more complete SSE frames) and keeps the usage and
the generated text fragments the gateway needs to settle the request, including a stream cut
midway. The `*_chunks` / `*_events` methods return the same output as dicts so mappers can be
composed without re-parsing. No I/O, no buffering of the whole response: text is never joined
here (the gateway estimates tokens from `text_parts` only when usage never came).
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from typing import Any

import orjson

from accounting import usage as usage_mod
from accounting.records import Usage
from relay.translate.chat_anthropic import (
    ANTHROPIC_STOP_TO_FINISH,
    CUSTOM_INPUT,
    FINISH_TO_ANTHROPIC_STOP,
    anthropic_usage_of,
    custom_input_text,
)
from relay.translate.common import (
    JSON,
    OPENAI_DONE,
    named_frame,
    new_id,
    openai_frame,
    openai_usage_from,
    usage_from_openai,
)
from relay.translate.errors import (
    anthropic_error_object_to_openai,
    openai_error_object_to_anthropic,
)

_CUSTOM_HEAD = '{"' + CUSTOM_INPUT + '":"'
_STRING_STOP = re.compile(r'[\\"]')
_HIGH_SURROGATE = frozenset({"d8", "d9", "da", "db"})  # first two hex digits of \uD800-\uDBFF
_HEAD, _BODY, _TAIL, _WHOLE = range(4)


class CustomInputDecoder:
    """The raw text of a custom tool call, decoded while Anthropic streams its arguments.

    A custom tool travels to Anthropic as a tool with one string property (see
    `chat_anthropic.CUSTOM_INPUT`), so its text arrives as `input_json_delta` fragments of
    `{"input": "<JSON string>"}`, cut anywhere: inside the key, inside an escape, between
    the halves of a surrogate pair. While the arguments keep that shape each fragment yields
    the text it completes (an escape cut in two waits for its second half), so the client
    sees the input stream as it would from OpenAI. Any other shape (another key first, a
    value that is not a string) is kept and decoded once at the block's end, exactly as the
    whole-response mapper does. Only the undecoded tail is held, never the whole text.
    """

    __slots__ = ("_parts", "_pending", "_state")

    def __init__(self) -> None:
        self._state = _HEAD
        self._pending = ""  # head: what came so far; body: an escape still incomplete
        self._parts: list[str] = []  # whole: every fragment, joined at the end

    def feed(self, piece: str) -> str:
        """One `partial_json` fragment -> the text it completes (often "")."""
        if self._state == _BODY:
            return self._body(self._pending + piece)
        if self._state == _WHOLE:
            self._parts.append(piece)
            return ""
        if self._state == _TAIL:
            return ""
        head = self._pending + piece
        compact = "".join(head.split())
        if compact.startswith(_CUSTOM_HEAD):
            # Skip the head in the original text (whitespace may sit between its tokens).
            seen = 0
            for at, ch in enumerate(head):
                if not ch.isspace():
                    seen += 1
                    if seen == len(_CUSTOM_HEAD):
                        self._state = _BODY
                        return self._body(head[at + 1:])
        if _CUSTOM_HEAD.startswith(compact):
            self._pending = head
            return ""
        self._state = _WHOLE
        self._parts.append(head)
        self._pending = ""
        return ""

    def _body(self, text: str) -> str:
        end = len(text)  # where the decodable run stops
        pos = 0
        while True:
            m = _STRING_STOP.search(text, pos)
            if m is None:
                break
            at = m.start()
            if text[at] == '"':  # the string ends here; whatever follows is the closing brace
                self._state = _TAIL
                end = at
                text = text[:at]
                break
            need = 6 if text[at + 1:at + 2] == "u" else 2
            if need == 6 and at + need <= len(text) and text[at + 2:at + 4].lower() in _HIGH_SURROGATE:
                need = 12  # a high surrogate decodes only with its low half
            if at + need > len(text):
                end = at
                break
            pos = at + need
        self._pending = text[end:] if self._state == _BODY else ""
        run = text[:end]
        if not run:
            return ""
        try:
            decoded: str = orjson.loads('"' + run + '"')
        except orjson.JSONDecodeError:
            return run  # not valid JSON from the upstream: pass the characters on as they are
        return decoded

    def finish(self) -> str:
        """Text still owed when the block ends (all of it when the shape was unusual)."""
        if self._state != _WHOLE:
            return ""
        self._state = _TAIL
        raw = "".join(self._parts)
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        return custom_input_text(value)


class AnthropicToOpenAIChatStream:
    """Anthropic Messages stream events in, OpenAI chat.completion.chunk frames out.

    `usage` follows the Anthropic counts (input excludes cache reads and writes);
    `final_usage` turns true once `message_delta` brought the final output count.
    `text_parts` holds every generated fragment: text, thinking and tool arguments.
    `tool_use` blocks of the request's `custom_tools` become custom tool calls whose input
    streams as decoded text.
    """

    __slots__ = (
        "_created",
        "_custom",
        "_custom_tools",
        "_finish_reason",
        "_id",
        "_include_usage",
        "_model",
        "_tools",
        "_usage_sent",
        "final_usage",
        "text_parts",
        "usage",
    )

    def __init__(self, model: str, include_usage: bool, *, created: int | None = None,
                 custom_tools: Collection[str] = ()) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._id = new_id("chatcmpl-")
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._custom_tools = custom_tools
        self._custom: dict[int, CustomInputDecoder] = {}  # Anthropic block index -> its decoder
        self._finish_reason: str | None = None
        self._usage_sent = False
        self.usage = Usage()
        self.final_usage = False
        self.text_parts: list[str] = []

    def _chunk(self, delta: JSON, finish_reason: str | None = None) -> JSON:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def _usage_chunk(self) -> JSON:
        self._usage_sent = True
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": openai_usage_from(self.usage),
        }

    def _take_usage(self, usage: Any) -> None:
        """Anthropic usage fields as the one extractor reads them (accounting.usage):
        present fields replace what message_start said; counts are checked numbers."""
        if not isinstance(usage, dict):
            return
        u = self.usage
        n = usage_mod.count
        if usage.get("input_tokens") is not None:
            u.input = n(usage["input_tokens"])
        if usage.get("cache_read_input_tokens") is not None:
            u.cache_read = n(usage["cache_read_input_tokens"])
        if usage.get("cache_creation_input_tokens") is not None:
            u.cache_write = n(usage["cache_creation_input_tokens"])
        if usage.get("output_tokens") is not None:
            u.output = n(usage["output_tokens"])
        details = usage.get("output_tokens_details")
        if isinstance(details, dict) and details.get("thinking_tokens") is not None:
            u.reasoning = n(details["thinking_tokens"])

    def feed(self, event: str, data: bytes) -> bytes:
        """One Anthropic SSE event (its `event:` name and `data:` payload) -> client bytes."""
        return b"".join([openai_frame(c) for c in self.feed_chunks(event, data)])

    def feed_chunks(self, event: str, data: bytes) -> list[JSON]:
        obj = orjson.loads(data)
        kind = event or obj.get("type", "")
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                text = delta.get("text", "")
                self.text_parts.append(text)
                return [self._chunk({"content": text})]
            if dkind == "input_json_delta":
                partial = delta.get("partial_json", "")
                tool = self._tools.get(obj.get("index", -1))
                if not partial or tool is None:
                    return []
                decoder = self._custom.get(obj.get("index", -1))
                if decoder is not None:
                    return self._custom_input(tool, decoder.feed(partial))
                self.text_parts.append(partial)
                return [self._chunk({"tool_calls": [{"index": tool, "function": {"arguments": partial}}]})]
            if dkind == "thinking_delta":
                thinking = delta.get("thinking", "")
                self.text_parts.append(thinking)
                return [self._chunk({"reasoning_content": thinking})]
            return []  # signature_delta, citations_delta: nothing an OpenAI client can use
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            btype = block.get("type")
            if btype == "tool_use":
                tool = len(self._tools)
                self._tools[obj.get("index", tool)] = tool
                name = block.get("name", "")
                self.text_parts.append(name)
                if name in self._custom_tools:
                    self._custom[obj.get("index", tool)] = CustomInputDecoder()
                    call = {"index": tool, "id": block.get("id"), "type": "custom",
                            "custom": {"name": name, "input": ""}}
                else:
                    call = {"index": tool, "id": block.get("id"), "type": "function",
                            "function": {"name": name, "arguments": ""}}
                return [self._chunk({"tool_calls": [call]})]
            if btype == "text" and block.get("text"):
                self.text_parts.append(block["text"])
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "message_start":
            message = obj.get("message") or {}
            if message.get("id"):
                self._id = message["id"]
            self._take_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "message_delta":
            self._take_usage(obj.get("usage"))
            self.final_usage = True
            stop = (obj.get("delta") or {}).get("stop_reason")
            self._finish_reason = ANTHROPIC_STOP_TO_FINISH.get(stop or "", "stop")
            return [self._chunk({}, self._finish_reason)]
        if kind == "message_stop":
            if self._include_usage and not self._usage_sent:
                return [self._usage_chunk()]
            return []
        if kind == "content_block_stop":
            decoder = self._custom.pop(obj.get("index", -1), None)
            if decoder is not None:
                return self._custom_input(self._tools[obj["index"]], decoder.finish())
            return []
        if kind == "error":
            err = obj.get("error") or {}
            return [anthropic_error_object_to_openai(500, err)]
        return []  # ping

    def _custom_input(self, tool: int, text: str) -> list[JSON]:
        if not text:
            return []
        self.text_parts.append(text)
        return [self._chunk({"tool_calls": [{"index": tool, "custom": {"input": text}}]})]

    def finish_chunks(self) -> list[JSON]:
        """Chunks still owed at end of stream (the usage chunk when message_stop never came)."""
        if self._include_usage and self.final_usage and not self._usage_sent:
            return [self._usage_chunk()]
        return []

    def finish(self) -> bytes:
        """Bytes to send when the upstream stream ended: owed chunks, then `data: [DONE]`."""
        return b"".join([openai_frame(c) for c in self.finish_chunks()]) + OPENAI_DONE


class OpenAIChatToAnthropicStream:
    """OpenAI chat.completion.chunk payloads in, Anthropic Messages events out.

    Content blocks open and close as the chunk stream switches between reasoning, text and
    tool calls. OpenAI reports usage only at the end, so `message_start` carries zeros and the
    real counts travel in `message_delta` (which Anthropic clients read). `usage` excludes
    cached tokens from `input`, as accounting expects.
    """

    __slots__ = (
        "_block",
        "_blocks",
        "_done",
        "_id",
        "_model",
        "_started",
        "_stop_reason",
        "_tools",
        "final_usage",
        "text_parts",
        "usage",
    )

    def __init__(self, model: str) -> None:
        self._model = model
        self._id = new_id("msg_")
        self._started = False
        self._done = False
        self._block: str | int | None = None  # "text" | "thinking" | OpenAI tool index | None
        self._blocks = 0  # Anthropic content block index of the next block
        self._tools: dict[int, int] = {}  # OpenAI tool index -> Anthropic block index
        self._stop_reason: str | None = None
        self.usage = Usage()
        self.final_usage = False
        self.text_parts: list[str] = []

    def _start(self, out: list[JSON]) -> None:
        self._started = True
        out.append(
            {
                "type": "message_start",
                "message": {
                    "id": self._id,
                    "type": "message",
                    "role": "assistant",
                    "model": self._model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            }
        )

    def _close_block(self, out: list[JSON]) -> None:
        if self._block is not None:
            out.append({"type": "content_block_stop", "index": self._blocks - 1})
            self._block = None

    def _open_block(self, out: list[JSON], kind: str | int, block: JSON) -> int:
        self._close_block(out)
        index = self._blocks
        self._blocks += 1
        self._block = kind
        out.append({"type": "content_block_start", "index": index, "content_block": block})
        return index

    def _take_usage(self, usage: JSON) -> None:
        self.usage = usage_from_openai(usage)
        self.final_usage = True

    def _delta(self, out: list[JSON], delta: JSON) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            if self._block != "thinking":
                self._open_block(out, "thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.text_parts.append(reasoning)
            out.append({"type": "content_block_delta", "index": self._blocks - 1,
                        "delta": {"type": "thinking_delta", "thinking": reasoning}})
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self._block != "text":
                self._open_block(out, "text", {"type": "text", "text": ""})
            self.text_parts.append(text)
            out.append({"type": "content_block_delta", "index": self._blocks - 1,
                        "delta": {"type": "text_delta", "text": text}})
        for call in delta.get("tool_calls") or ():
            tool = call.get("index", 0)
            fn = call.get("function") or {}
            index = self._tools.get(tool)
            if index is None:
                name = fn.get("name") or ""
                self.text_parts.append(name)
                block: JSON = {"type": "tool_use", "id": call.get("id") or new_id("toolu_"),
                         "name": name, "input": {}}
                index = self._tools[tool] = self._open_block(out, tool, block)
            args = fn.get("arguments")
            if args:
                self.text_parts.append(args)
                out.append({"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": args}})

    def feed(self, data: bytes) -> bytes:
        """One OpenAI SSE `data:` payload (a chunk or `[DONE]`) -> client bytes."""
        return b"".join([named_frame(e) for e in self.feed_events(data)])

    def feed_events(self, data: bytes) -> list[JSON]:
        if self._done:
            return []
        if data.strip() == b"[DONE]":
            return self.finish_events()
        chunk = orjson.loads(data)
        out: list[JSON] = []
        if isinstance(chunk.get("error"), dict):
            self._done = True
            return [openai_error_object_to_anthropic(500, chunk["error"])]
        if not self._started:
            if chunk.get("id"):
                self._id = chunk["id"]
            self._start(out)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            self._delta(out, choice.get("delta") or {})
            if choice.get("finish_reason"):
                self._stop_reason = FINISH_TO_ANTHROPIC_STOP.get(choice["finish_reason"], "end_turn")
        if isinstance(chunk.get("usage"), dict):
            self._take_usage(chunk["usage"])
        return out

    def finish_events(self) -> list[JSON]:
        """Events closing the message: open block, message_delta (stop, usage), message_stop."""
        if self._done:
            return []
        self._done = True
        out: list[JSON] = []
        if not self._started:
            self._start(out)
        self._close_block(out)
        out.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None},
                "usage": anthropic_usage_of(self.usage),
            }
        )
        out.append({"type": "message_stop"})
        return out

    def finish(self) -> bytes:
        """Bytes still owed when the upstream stream ended (nothing if `[DONE]` was fed)."""
        return b"".join([named_frame(e) for e in self.finish_events()])
