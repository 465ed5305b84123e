"""OpenAI Chat Completions bodies <-> Anthropic Messages bodies (requests and whole responses).

Two pairings use it: an OpenAI client served by an Anthropic channel
(`openai_chat_to_anthropic_request`, `anthropic_response_to_openai_chat`) and an Anthropic client
served by an OpenAI channel (`anthropic_to_openai_chat_request`,
`openai_chat_response_to_anthropic`). Streams live in `stream_chat_anthropic`; the native
same-protocol path never comes here. Pure functions over dicts: no I/O, no clocks except the
`created` stamp, and the input is never mutated.

Choices made where the protocols disagree (OpenAI client -> Anthropic upstream):
- system and developer messages, wherever they appear, are joined in order into `system`
  (Anthropic has one system prompt and no mid-conversation system role).
- consecutive messages of one role, including `tool` messages (which become user
  `tool_result` blocks), are merged into one turn; tool results come first in that turn as
  Anthropic requires.
- `max_completion_tokens`, else `max_tokens`, else 4096 (Anthropic requires the field).
- `temperature` is clamped to Anthropic's 0..1; when both `temperature` and `top_p` are given
  only `temperature` is sent (current Claude models reject the pair).
- `stop` -> `stop_sequences`, dropping whitespace-only entries (Anthropic rejects them).
- `reasoning_effort` -> `thinking.budget_tokens`: minimal 1024, low 2048, medium 8192,
  high 16384, xhigh 32768; "none" or absent: no thinking. The budget counts inside
  `max_tokens` on both sides, so it is capped below `max_tokens` (thinking is dropped when
  that leaves less than Anthropic's minimum of 1024), and with no explicit limit `max_tokens`
  becomes budget + 4096. With thinking on, Anthropic rejects `temperature`, `top_k`,
  `top_p` < 0.95 and forced tool choice, so those are dropped; thinking is also dropped when
  the turn continues a tool call, because OpenAI clients cannot send back the signed
  thinking block Anthropic then requires.
- `user` -> `metadata.user_id`; `parallel_tool_calls: false` -> `disable_parallel_tool_use`.
- custom (freeform) tools -> normal tools with one string property, `input`, the format and
  grammar spelled out in the description; custom tool calls in history -> `tool_use` with
  `{"input": <raw text>}`. Replies map back only for the names the request declared custom
  (`custom_tools`), since a `tool_use` alone cannot say which kind of tool it called.
- Anthropic rejects unknown fields, so only the fields above (and `top_k`) are forwarded.
  Dropped: frequency_penalty, presence_penalty, logit_bias, logprobs, top_logprobs, seed,
  n (n > 1 is an error), response_format, stream_options, store, metadata, service_tier,
  modalities, audio, prediction, web_search_options, verbosity, prompt_cache_key.

Anthropic client -> OpenAI upstream: `max_tokens` -> `max_completion_tokens` (OpenAI reasoning
models reject `max_tokens`); `thinking` is ignored (non-reasoning models reject
`reasoning_effort`); `top_k` is dropped (OpenAI rejects it); server tools cannot be served and
are an error; thinking blocks in history are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from accounting import usage as usage_mod
from accounting.records import Usage
from relay.translate.common import (
    JSON,
    TranslationError,
    dumps_str,
    loads_object,
    new_id,
    openai_usage_from,
    usage_from_openai,
)

DEFAULT_MAX_TOKENS = 4096
MIN_THINKING_BUDGET = 1024
THINKING_BUDGET = {
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 32768,
}

ANTHROPIC_STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

FINISH_TO_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


# ---------------------------------------------------------------- OpenAI chat -> Anthropic


def _parse_data_url(url: str, param: str) -> tuple[str, str]:
    """`data:<media>;base64,<data>` -> (media_type, data)."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise TranslationError("only base64 data URLs are supported", param)
    return head[5:-7], data


def _image_block(url: str, param: str) -> JSON:
    if url.startswith("data:"):
        media_type, data = _parse_data_url(url, param)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _text_of(content: Any, param: str) -> str:
    """Plain text of a system/developer/tool content (string or text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TranslationError("only text parts are supported here", f"{param}[{i}]")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise TranslationError("content must be a string or a list of parts", param)


def _user_blocks(content: Any, param: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of parts", param)
    blocks: list[JSON] = []
    for i, part in enumerate(content):
        p = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = str(part.get("text", ""))
            if text:
                block: JSON = {"type": "text", "text": text}
                if "cache_control" in part:
                    block["cache_control"] = part["cache_control"]
                blocks.append(block)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise TranslationError("image_url.url is required", p)
            blocks.append(_image_block(url, p))
        elif kind == "file":
            file = part.get("file") or {}
            data_url = file.get("file_data")
            if not isinstance(data_url, str):
                raise TranslationError("only inline file_data files are supported", p)
            media_type, data = _parse_data_url(data_url, p)
            if media_type != "application/pdf":
                raise TranslationError("only PDF files are supported", p)
            blocks.append(
                {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
            )
        else:
            raise TranslationError(f"content part type {kind!r} is not supported", p)
    return blocks


def _assistant_blocks(msg: JSON, param: str) -> list[JSON]:
    blocks: list[JSON] = []
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "refusal"):
                raise TranslationError(
                    f"assistant content part type {kind!r} is not supported", f"{param}.content[{i}]"
                )
            text = str(part.get(kind, ""))
            if text:
                blocks.append({"type": "text", "text": text})
    elif content is not None:
        raise TranslationError("content must be a string or a list of parts", f"{param}.content")
    for i, call in enumerate(msg.get("tool_calls") or ()):
        p = f"{param}.tool_calls[{i}]"
        if call.get("type") == "custom":
            custom = call.get("custom") or {}
            blocks.append({"type": "tool_use", "id": call.get("id"), "name": custom.get("name"),
                           "input": {CUSTOM_INPUT: custom.get("input") or ""}})
            continue
        fn = call.get("function") or {}
        args = loads_object(fn.get("arguments"))
        if args is None:
            raise TranslationError("tool call arguments must be a JSON object", f"{p}.function.arguments")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": args})
    return blocks


def _tool_result_block(msg: JSON, param: str) -> JSON:
    content = msg.get("content")
    block: JSON = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id")}
    if isinstance(content, list):
        parts = _user_blocks(content, f"{param}.content")
        if parts:
            block["content"] = parts
    else:
        text = _text_of(content, f"{param}.content")
        if text:
            block["content"] = text
    return block


def _append_turn(turns: list[JSON], role: str, blocks: list[JSON]) -> None:
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        prev = turns[-1]["content"]
        # Anthropic wants tool results before any other content of the user turn.
        if role == "user" and blocks[0]["type"] == "tool_result":
            n = 0
            while n < len(prev) and prev[n]["type"] == "tool_result":
                n += 1
            prev[n:n] = blocks
        else:
            prev.extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


# Anthropic has no freeform tools: a custom tool becomes a normal tool whose one string
# property carries the raw text, with the format spelled out in the description (the model
# cannot be held to a grammar there, so it is told). The tool_use comes back as a custom call
# holding that string, for the names the request declared custom.
CUSTOM_INPUT = "input"


def _custom_schema() -> JSON:
    return {
        "type": "object",
        "properties": {CUSTOM_INPUT: {"type": "string", "description": "The raw input text for the tool, exactly "
                                      "as the tool's format requires."}},
        "required": [CUSTOM_INPUT],
        "additionalProperties": False,
    }


def _custom_tool_spec(custom: JSON) -> JSON:
    notes = [custom["description"]] if custom.get("description") else []
    notes.append(f"This is a freeform tool: call it with one argument, `{CUSTOM_INPUT}`, a string holding the "
                 "raw input text (that string is the only JSON around it).")
    fmt = custom.get("format") or {}
    grammar = (fmt.get("grammar") or {}) if fmt.get("type") == "grammar" else {}
    if grammar.get("definition"):
        notes.append(f"The text in `{CUSTOM_INPUT}` must match this {grammar.get('syntax') or ''} grammar:\n"
                     f"{grammar['definition']}")
    return {"name": custom.get("name"), "description": "\n\n".join(notes), "input_schema": _custom_schema()}


def custom_input_text(tool_input: Any) -> str:
    """A custom tool's raw input from the `tool_use` input Anthropic returned: the `input`
    string; when the model ignored the schema, what it wrote, as JSON (the client's parser
    then reports it, as it would a malformed call)."""
    if isinstance(tool_input, dict):
        text = tool_input.get(CUSTOM_INPUT)
        if isinstance(text, str):
            return text
        if not tool_input:
            return ""
    return dumps_str(tool_input)


def _anthropic_tools(tools: list[JSON]) -> list[JSON]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") == "custom":
            out.append(_custom_tool_spec(tool.get("custom") or {}))
            continue
        if tool.get("type", "function") != "function":
            raise TranslationError(f"tool type {tool.get('type')!r} is not supported", f"tools[{i}]")
        fn = tool.get("function") or {}
        spec: JSON = {
            "name": fn.get("name"),
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            spec["description"] = fn["description"]
        out.append(spec)
    return out


def _anthropic_tool_choice(choice: Any) -> JSON | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        name = (choice.get(choice["type"]) or {}).get("name")
        if name:
            return {"type": "tool", "name": name}
    raise TranslationError("unsupported tool_choice", "tool_choice")


def _continues_tool_call(turns: list[JSON]) -> bool:
    """True when the last assistant turn ends in tool calls (a tool loop is in progress)."""
    for turn in reversed(turns):
        if turn["role"] == "assistant":
            return any(b["type"] == "tool_use" for b in turn["content"])
    return False


def openai_chat_to_anthropic_request(body: JSON, upstream_model: str) -> JSON:
    """An OpenAI chat completions request body as an Anthropic Messages request body."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages must be a list", "messages")
    if (body.get("n") or 1) != 1:
        raise TranslationError("n > 1 is not supported by this model", "n")

    system_blocks: list[JSON] = []
    turns: list[JSON] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise TranslationError("each message must be an object", param)
        role = msg.get("role")
        if role in ("system", "developer"):
            content = msg.get("content")
            if isinstance(content, list):
                for part in _user_blocks(content, f"{param}.content"):
                    if part["type"] != "text":
                        raise TranslationError("system content must be text", f"{param}.content")
                    system_blocks.append(part)
            else:
                text = _text_of(content, f"{param}.content")
                if text:
                    system_blocks.append({"type": "text", "text": text})
        elif role == "user":
            _append_turn(turns, "user", _user_blocks(msg.get("content"), f"{param}.content"))
        elif role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(msg, param))
        elif role in ("tool", "function"):
            _append_turn(turns, "user", [_tool_result_block(msg, param)])
        else:
            raise TranslationError(f"unknown role {role!r}", f"{param}.role")

    # Anthropic rejects a final assistant (prefill) turn that ends in whitespace.
    if turns and turns[-1]["role"] == "assistant":
        last = turns[-1]["content"][-1]
        if last["type"] == "text":
            last["text"] = last["text"].rstrip()
            if not last["text"]:
                turns[-1]["content"].pop()
                if not turns[-1]["content"]:
                    turns.pop()

    out: JSON = {"model": upstream_model, "messages": turns}
    if system_blocks:
        if len(system_blocks) == 1 and "cache_control" not in system_blocks[0]:
            out["system"] = system_blocks[0]["text"]
        elif any("cache_control" in b for b in system_blocks):
            out["system"] = system_blocks
        else:
            out["system"] = "\n\n".join(b["text"] for b in system_blocks)

    explicit_max = body.get("max_completion_tokens")
    if explicit_max is None:
        explicit_max = body.get("max_tokens")
    max_tokens = int(explicit_max) if explicit_max is not None else DEFAULT_MAX_TOKENS

    tools = body.get("tools")
    tool_choice = None
    if tools:
        out["tools"] = _anthropic_tools(tools)
        tool_choice = _anthropic_tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False:
            if tool_choice is None:
                tool_choice = {"type": "auto"}
            if tool_choice["type"] != "none":
                tool_choice["disable_parallel_tool_use"] = True

    budget = THINKING_BUDGET.get(str(body.get("reasoning_effort")))
    if budget is not None and (
        (tool_choice is not None and tool_choice["type"] in ("any", "tool"))
        or _continues_tool_call(turns)
    ):
        budget = None
    if budget is not None:
        if explicit_max is None:
            max_tokens = budget + DEFAULT_MAX_TOKENS
        else:
            budget = min(budget, max_tokens - 1)
            if budget < MIN_THINKING_BUDGET:
                budget = None

    out["max_tokens"] = max_tokens
    if budget is not None:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if tool_choice is not None:
        out["tool_choice"] = tool_choice

    temperature = body.get("temperature")
    top_p = body.get("top_p")
    if budget is None:
        if temperature is not None:
            out["temperature"] = min(max(float(temperature), 0.0), 1.0)
        elif top_p is not None:
            out["top_p"] = top_p
        if body.get("top_k") is not None:
            out["top_k"] = body["top_k"]
    elif top_p is not None and top_p >= 0.95:
        out["top_p"] = top_p

    stop = body.get("stop")
    if stop is not None:
        seqs = [stop] if isinstance(stop, str) else list(stop)
        seqs = [s for s in seqs if isinstance(s, str) and s.strip()]
        if seqs:
            out["stop_sequences"] = seqs
    if body.get("stream"):
        out["stream"] = True
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def anthropic_response_to_openai_chat(
    resp: JSON, model: str, created: int | None = None, *, custom_tools: Collection[str] = (),
) -> JSON:
    """A non-stream Anthropic Message as an OpenAI chat.completion object; `tool_use` blocks
    of the request's `custom_tools` become custom tool calls."""
    texts: list[str] = []
    thinking: list[str] = []
    tool_calls: list[JSON] = []
    for block in resp.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use" and block.get("name") in custom_tools:
            tool_calls.append({"id": block.get("id"), "type": "custom", "custom": {
                "name": block.get("name"), "input": custom_input_text(block.get("input"))}})
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": dumps_str(block.get("input") or {})},
                }
            )
    message: JSON = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = resp.get("usage") or {}
    return {
        "id": resp.get("id") or new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": ANTHROPIC_STOP_TO_FINISH.get(resp.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": anthropic_usage_to_openai(usage),
    }


def anthropic_usage_from(usage: JSON) -> Usage:
    """Anthropic usage (input already excludes cache reads and writes) as accounting's
    Usage, read by the one extractor (accounting.usage)."""
    u = usage_mod.anthropic_usage(usage if isinstance(usage, dict) else {})
    details = usage.get("output_tokens_details") if isinstance(usage, dict) else None
    if isinstance(details, dict):
        u.reasoning = usage_mod.count(details.get("thinking_tokens"))
    return u


def anthropic_usage_to_openai(usage: JSON) -> JSON:
    """Anthropic usage (input excludes cache) as OpenAI usage (prompt includes cache)."""
    return openai_usage_from(anthropic_usage_from(usage))


# ---------------------------------------------------------------- Anthropic -> OpenAI chat


def _openai_image_part(block: JSON, param: str) -> JSON:
    source = block.get("source") or {}
    url: Any
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = source.get("url")
    else:
        raise TranslationError("unsupported image source", f"{param}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _openai_user_part(block: JSON, param: str) -> JSON | None:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    if kind == "image":
        return _openai_image_part(block, param)
    if kind == "document":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            file: JSON = {"file_data": f"data:{source.get('media_type')};base64,{source.get('data')}"}
            file["filename"] = block.get("title") or "document.pdf"
            return {"type": "file", "file": file}
        if source.get("type") == "text":
            return {"type": "text", "text": source.get("data", "")}
        raise TranslationError("unsupported document source", f"{param}.source")
    if kind in ("thinking", "redacted_thinking"):
        return None
    raise TranslationError(f"content block type {kind!r} is not supported", param)


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n\n".join(str(b.get("text", "")) for b in system if b.get("type") == "text")
    raise TranslationError("system must be a string or a list of text blocks", "system")


def _tool_message(block: JSON, param: str) -> tuple[JSON, list[JSON]]:
    """A tool_result block -> (the OpenAI tool message, image parts OpenAI tool messages can't hold)."""
    content = block.get("content")
    images: list[JSON] = []
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image":
                images.append(_openai_image_part(part, f"{param}.content[{j}]"))
            else:
                raise TranslationError("tool_result content must be text or images", f"{param}.content[{j}]")
        text = "\n".join(texts)
    else:
        text = "" if content is None else str(content)
    if block.get("is_error") and not text:
        text = "error"
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}, images


def anthropic_to_openai_chat_request(body: JSON, upstream_model: str) -> JSON:
    """An Anthropic Messages request body as an OpenAI chat completions request body."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages: field required", "messages")
    out_msgs: list[JSON] = []
    system = _system_text(body.get("system"))
    if system:
        out_msgs.append({"role": "system", "content": system})
    for i, msg in enumerate(messages):
        param = f"messages.{i}"
        role = msg.get("role")
        content = msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise TranslationError("content must be a string or a list of blocks", f"{param}.content")
        if role == "user":
            parts: list[JSON] = []
            for j, block in enumerate(blocks):
                p = f"{param}.content.{j}"
                if block.get("type") == "tool_result":
                    tool_msg, images = _tool_message(block, p)
                    out_msgs.append(tool_msg)
                    parts.extend(images)
                else:
                    part = _openai_user_part(block, p)
                    if part is not None:
                        parts.append(part)
            if parts:
                if all(p["type"] == "text" for p in parts):
                    out_msgs.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
                else:
                    out_msgs.append({"role": "user", "content": parts})
        elif role == "assistant":
            texts: list[str] = []
            calls: list[JSON] = []
            for j, block in enumerate(blocks):
                kind = block.get("type")
                if kind == "text":
                    texts.append(block.get("text", ""))
                elif kind == "tool_use":
                    calls.append(
                        {
                            "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": dumps_str(block.get("input") or {})},
                        }
                    )
                elif kind not in ("thinking", "redacted_thinking"):
                    raise TranslationError(f"content block type {kind!r} is not supported", f"{param}.content.{j}")
            out: JSON = {"role": "assistant", "content": "".join(texts) if texts else None}
            if calls:
                out["tool_calls"] = calls
            if texts or calls:
                out_msgs.append(out)
        elif role == "system":
            # Not in Anthropic's documented shape, but clients send it mid-conversation
            # (Claude Code lists agents and skills this way): keep it where it stands.
            text = _system_text(content)
            if text:
                out_msgs.append({"role": "system", "content": text})
        else:
            raise TranslationError(f"unknown role {role!r}", f"{param}.role")

    req: JSON = {"model": upstream_model, "messages": out_msgs}
    if body.get("max_tokens") is not None:
        req["max_completion_tokens"] = body["max_tokens"]
    tools = body.get("tools")
    if tools:
        req_tools = []
        for i, tool in enumerate(tools):
            if tool.get("type", "custom") != "custom":
                raise TranslationError(f"tool type {tool.get('type')!r} is not supported", f"tools.{i}")
            fn: JSON = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {"type": "object"}}
            if tool.get("description"):
                fn["description"] = tool["description"]
            req_tools.append({"type": "function", "function": fn})
        req["tools"] = req_tools
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            if kind == "auto":
                req["tool_choice"] = "auto"
            elif kind == "any":
                req["tool_choice"] = "required"
            elif kind == "none":
                req["tool_choice"] = "none"
            elif kind == "tool":
                req["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
            else:
                raise TranslationError("unsupported tool_choice", "tool_choice")
            if choice.get("disable_parallel_tool_use") and kind != "none":
                req["parallel_tool_calls"] = False
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            req[key] = body[key]
    if body.get("stop_sequences"):
        req["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user:
        req["user"] = user
    return req


def anthropic_usage_of(usage: Usage) -> JSON:
    """accounting's Usage as Anthropic usage."""
    return {
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "cache_creation_input_tokens": usage.cache_write,
        "cache_read_input_tokens": usage.cache_read,
    }


def openai_usage_to_anthropic(usage: JSON) -> JSON:
    """OpenAI usage (prompt includes cache) as Anthropic usage (input excludes cache)."""
    return anthropic_usage_of(usage_from_openai(usage))


def openai_chat_response_to_anthropic(resp: JSON, model: str) -> JSON:
    """A non-stream OpenAI chat.completion as an Anthropic Message."""
    choices = resp.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[JSON] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    if message.get("refusal"):
        content.append({"type": "text", "text": message["refusal"]})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        # An unparsable arguments string from the model is sent as an empty input: the
        # client's tool validation then reports it, as it would for a bad call.
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": fn.get("name"),
                "input": loads_object(fn.get("arguments")) or {},
            }
        )
    finish = choice.get("finish_reason")
    return {
        "id": resp.get("id") or new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": FINISH_TO_ANTHROPIC_STOP.get(finish or "", "end_turn"),
        "stop_sequence": None,
        "usage": openai_usage_to_anthropic(resp.get("usage") or {}),
    }
