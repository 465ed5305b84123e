"""Token usage out of provider responses and streams, into `accounting.records.Usage`.

The one extractor: the native and the translated paths (relay.translate) both read
upstream usage through these functions, so a count means the same on every path.

Pure and cheap: functions over already-parsed dicts or raw SSE event bytes, no I/O,
no logging. The stream taps are fed by the proxy ONLY with events whose bytes contain
b'"usage"', so they parse at most a handful of events per stream, and must accept any
such event (a content delta that merely mentions "usage", an error, a null usage)
without raising. They never modify or re-serialize what the client receives.

Normalisation (see records.Usage): `input` is UNCACHED input.
- OpenAI chat/completions/embeddings: `prompt_tokens` INCLUDES
  `prompt_tokens_details.cached_tokens` (and `cache_write_tokens`, where a relay
  reports them), so input = prompt - cached - written.
  (DeepSeek's `prompt_cache_hit_tokens` is read the same way when no details exist.)
- OpenAI Responses: `input_tokens` includes `input_tokens_details.cached_tokens`.
- Anthropic: `input_tokens` already excludes `cache_read_input_tokens` and
  `cache_creation_input_tokens`.
- Reasoning tokens are recorded but are already part of output.

`text_from_events` rebuilds the emitted text of a stream that was cut before usage
arrived, so output tokens can be estimated; it joins once, at the end.
"""

from __future__ import annotations

from typing import Any

import orjson

from accounting.records import Usage


def _n(value: Any) -> int:
    """A token count from JSON: non-negative int (or integral float), anything else 0
    (on every path: the translated one reads counts through here too)."""
    if type(value) is int:
        return value if value > 0 else 0
    if type(value) is float and value.is_integer() and value > 0:
        return int(value)
    return 0


count = _n  # for the translation layer's own usage fields


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def openai_usage(u: dict[str, Any]) -> Usage:
    """Usage from an OpenAI `usage` object, chat/completions/embeddings or Responses shape."""
    if "input_tokens" in u and "prompt_tokens" not in u:
        # Responses API
        details = _d(u.get("input_tokens_details"))
        total_in = _n(u.get("input_tokens"))
        cached = min(_n(details.get("cached_tokens")), total_in)
        written = min(_n(details.get("cache_write_tokens")), total_in - cached)
        return Usage(
            input=total_in - cached - written,
            output=_n(u.get("output_tokens")),
            cache_read=cached,
            cache_write=written,
            reasoning=_n(_d(u.get("output_tokens_details")).get("reasoning_tokens")),
        )
    # Every settled OpenAI request reads this: the common case (non-negative ints, no
    # cache or reasoning counts) is written out rather than a call per field.
    prompt = u.get("prompt_tokens")
    if type(prompt) is not int or prompt < 0:
        prompt = _n(prompt)
    output = u.get("completion_tokens")
    if type(output) is not int or output < 0:
        output = _n(output)
    pd: Any = u.get("prompt_tokens_details")
    details = pd if type(pd) is dict else _NO_DETAILS
    hit = details["cached_tokens"] if "cached_tokens" in details else u.get("prompt_cache_hit_tokens")
    cached = _n(hit) if hit else 0
    if cached > prompt:
        cached = prompt
    # Relays that front Anthropic report cache writes inside the prompt, as OpenAI
    # counts cached tokens: they are billed at the cache-write price, not as input.
    w = details.get("cache_write_tokens")
    written = _n(w) if w else 0
    if written > prompt - cached:
        written = prompt - cached
    reasoning = 0
    cd = u.get("completion_tokens_details")
    if type(cd) is dict:
        r = cd.get("reasoning_tokens")
        if r:
            reasoning = _n(r)
    return Usage(prompt - cached - written, output, cached, written, reasoning)


_NO_DETAILS: dict[str, Any] = {}  # read only


def anthropic_usage(u: dict[str, Any]) -> Usage:
    """Usage from an Anthropic `usage` object (cache tokens are outside input_tokens)."""
    return Usage(
        input=_n(u.get("input_tokens")),
        output=_n(u.get("output_tokens")),
        cache_read=_n(u.get("cache_read_input_tokens")),
        cache_write=_n(u.get("cache_creation_input_tokens")),
    )


def from_openai_body(obj: dict[str, Any]) -> Usage | None:
    """Usage of a non-streamed OpenAI response (chat, completions, embeddings, Responses)."""
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return None
    return openai_usage(u)


def from_anthropic_body(obj: dict[str, Any]) -> Usage | None:
    """Usage of a non-streamed Anthropic Messages response."""
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return None
    return anthropic_usage(u)


# --- stream taps ----------------------------------------------------------------------


class OpenAIChatStreamTap:
    """Chat and completions streams: the chunk with a non-null `usage` (usually the last)."""

    __slots__ = ("usage",)

    def __init__(self) -> None:
        self.usage: Usage | None = None

    def feed_event(self, data: bytes, event: bytes = b"") -> None:
        obj = _loads(data)
        if obj is None:
            return
        u = obj.get("usage")
        if isinstance(u, dict):
            self.usage = openai_usage(u)


_RESPONSES_FINAL = frozenset(("response.completed", "response.incomplete", "response.failed"))
_RESPONSES_FINAL_B = frozenset(k.encode() for k in _RESPONSES_FINAL)


class ResponsesStreamTap:
    """Responses streams: `response.usage` of the terminal event (completed/incomplete/failed)."""

    __slots__ = ("usage",)

    def __init__(self) -> None:
        self.usage: Usage | None = None

    def feed_event(self, data: bytes, event: bytes = b"") -> None:
        obj = _loads(data)
        if obj is None:
            return
        kind = obj.get("type")
        if not (isinstance(kind, str) and kind in _RESPONSES_FINAL) and event not in _RESPONSES_FINAL_B:
            return
        u = _d(obj.get("response")).get("usage")
        if isinstance(u, dict):
            self.usage = openai_usage(u)


class AnthropicStreamTap:
    """Messages streams: message_start gives input and cache counts, message_delta the output.

    message_delta's `output_tokens` is cumulative, so the latest wins. Some
    OpenAI-compatible relays (and newer Anthropic responses) also put input or cache
    counts in message_delta; those replace the message_start values when present.
    """

    __slots__ = ("usage",)

    def __init__(self) -> None:
        self.usage: Usage | None = None

    def feed_event(self, data: bytes, event: bytes = b"") -> None:
        obj = _loads(data)
        if obj is None:
            return
        kind = obj.get("type")
        if kind == "message_start":
            u = _d(obj.get("message")).get("usage")
            if isinstance(u, dict):
                self.usage = anthropic_usage(u)
        elif kind == "message_delta":
            u = obj.get("usage")
            if not isinstance(u, dict):
                return
            cur = self.usage
            if cur is None:
                cur = self.usage = Usage()
            if "output_tokens" in u:
                cur.output = _n(u["output_tokens"])
            if u.get("input_tokens") is not None:
                cur.input = _n(u["input_tokens"])
            if u.get("cache_read_input_tokens") is not None:
                cur.cache_read = _n(u["cache_read_input_tokens"])
            if u.get("cache_creation_input_tokens") is not None:
                cur.cache_write = _n(u["cache_creation_input_tokens"])


def is_usage_only_chunk(data: bytes) -> bool:
    """An OpenAI chat chunk with empty `choices` and a non-null `usage` (the include_usage chunk)."""
    obj = _loads(data)
    if obj is None:
        return False
    return obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


# --- emitted text of a cut stream -------------------------------------------------------


def _payload(raw: bytes) -> bytes:
    """The data of one SSE event, given either its data alone or the whole event block."""
    stripped = raw.lstrip()
    if stripped[:1] in (b"{", b"["):
        return stripped
    parts = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value[:1] == b" " else value)
    return b"\n".join(parts)


def _openai_chat_text(obj: dict[str, Any], out: list[str]) -> None:
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")  # legacy completions
        if isinstance(text, str):
            out.append(text)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        for key in ("content", "reasoning_content", "reasoning", "refusal"):
            v = delta.get(key)
            if isinstance(v, str):
                out.append(v)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = _d(_d(call).get("function"))
                for key in ("name", "arguments"):
                    v = fn.get(key)
                    if isinstance(v, str):
                        out.append(v)


_RESPONSES_TEXT = frozenset(
    (
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
    )
)

_ANTHROPIC_DELTA_KEYS = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


def text_from_events(protocol: str, route: str, events: list[bytes]) -> str:
    """Text a stream emitted (content, tool-call arguments, reasoning) from its raw events.

    `protocol` is "openai" or "anthropic"; `route` "chat", "completions", "responses"
    or "messages". Used only to estimate output tokens of a stream cut before usage.
    """
    out: list[str] = []
    for raw in events:
        obj = _loads(_payload(raw))
        if obj is None:
            continue
        if protocol == "anthropic":
            if obj.get("type") != "content_block_delta":
                continue
            delta = _d(obj.get("delta"))
            kind = delta.get("type")
            key = _ANTHROPIC_DELTA_KEYS.get(kind) if isinstance(kind, str) else None
            v = delta.get(key) if key else None
            if isinstance(v, str):
                out.append(v)
        elif route == "responses":
            kind = obj.get("type")
            if isinstance(kind, str) and kind in _RESPONSES_TEXT:
                v = obj.get("delta")
                if isinstance(v, str):
                    out.append(v)
        else:
            _openai_chat_text(obj, out)
    return "".join(out)


def text_from_body(protocol: str, route: str, obj: dict[str, Any]) -> str:
    """Text a non-streamed response carries (content, tool calls, reasoning), to estimate
    the output of a reply that came without a `usage` object."""
    out: list[str] = []
    if protocol == "anthropic":
        for block in obj.get("content") or ():
            if not isinstance(block, dict):
                continue
            for key in ("text", "thinking"):
                v = block.get(key)
                if isinstance(v, str):
                    out.append(v)
            if block.get("type") in ("tool_use", "server_tool_use"):
                name = block.get("name")
                if isinstance(name, str):
                    out.append(name)
                out.append(orjson.dumps(block.get("input")).decode())
    elif route == "responses":
        for item in obj.get("output") or ():
            if not isinstance(item, dict):
                continue
            for key in ("arguments", "input", "name"):
                v = item.get(key)
                if isinstance(v, str):
                    out.append(v)
            for key in ("content", "summary"):
                parts = item.get(key)
                if isinstance(parts, list):
                    out.extend(p["text"] for p in parts
                               if isinstance(p, dict) and isinstance(p.get("text"), str))
    else:
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                text = choice.get("text")
                if isinstance(text, str):
                    out.append(text)
                msg = choice.get("message")
                if isinstance(msg, dict):
                    # The message has the same fields as a stream's delta.
                    _openai_chat_text({"choices": [{"delta": msg}]}, out)
    return "".join(out)
