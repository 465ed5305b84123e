"""Shared pieces of the protocol translators: SSE frame encoding, ids, the translation error.

Only what every translator needs lives here: how one event becomes wire bytes (orjson, one
allocation per frame), how a fresh id is made, and the one exception a translator raises when
a request cannot be expressed in the target protocol. No parsing of streams, no I/O.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from accounting import usage as usage_mod
from accounting.records import Usage

JSON = dict[str, Any]

OPENAI_DONE = b"data: [DONE]\n\n"


class TranslationError(ValueError):
    """A request that cannot be expressed in the target protocol.

    The gateway renders it as its own 400 (`invalid_request` / `invalid_request_error`);
    `param` names the offending field in the client's protocol, as OpenAI's `error.param` does.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def openai_frame(obj: JSON) -> bytes:
    """One OpenAI SSE frame: `data: {json}\\n\\n`."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def named_frame(obj: JSON) -> bytes:
    """One named SSE frame (Anthropic and Responses style): `event: <type>\\ndata: {json}\\n\\n`."""
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def new_id(prefix: str) -> str:
    """A fresh id in the shape providers use (`msg_...`, `chatcmpl-...`, `resp_...`)."""
    return prefix + secrets.token_hex(12)


def loads_object(raw: str | bytes | None) -> JSON | None:
    """Parse a JSON object (tool arguments); None when it is not valid JSON or not an object."""
    if raw is None or raw == "" or raw == b"":
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def dumps_str(value: Any) -> str:
    return orjson.dumps(value).decode()


def custom_tool_names(body: JSON) -> frozenset[str]:
    """Names of the custom (freeform) tools a client request declares, Responses shape
    (`{"type": "custom", "name": ...}`) or chat shape (`{"type": "custom", "custom": {...}}`).

    An Anthropic channel has no custom tools: they travel as normal tools, and only these
    names tell the reply's `tool_use` blocks that must go back as custom tool calls.
    """
    tools = body.get("tools")
    if not isinstance(tools, list):
        return frozenset()
    names = set()
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "custom":
            continue
        spec = tool.get("custom")
        name = spec.get("name") if isinstance(spec, dict) else tool.get("name")
        if isinstance(name, str):
            names.add(name)
    return frozenset(names)


def usage_from_openai(usage: JSON) -> Usage:
    """OpenAI usage (chat or Responses names) as accounting's Usage: `input` excludes the
    cached and cache-written tokens that OpenAI counts inside the prompt. The one
    extractor (accounting.usage) reads it, as it does on the native path."""
    return usage_mod.openai_usage(usage if isinstance(usage, dict) else {})


def openai_usage_from(usage: Usage) -> JSON:
    """accounting's Usage as OpenAI chat usage (the prompt counts cached and cache-written tokens)."""
    prompt = usage.input + usage.cache_read + usage.cache_write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output,
        "total_tokens": prompt + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read, "cache_write_tokens": usage.cache_write},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
    }
