"""OpenAI Responses API bodies served by a chat-completions or Anthropic channel (non-stream).

A Responses request becomes a chat completions request (and, for an Anthropic channel, an
Anthropic request by composing with `chat_anthropic`); the channel's reply comes back as a
Responses `response` object. The stream side lives in `stream_responses`. Pure functions over
dicts, no I/O.

Stateless by necessity: `previous_response_id` and `item_reference` items need stored
responses, which the gateway does not keep, so they are errors. Reasoning items in the input
are dropped (their encrypted content only means something to OpenAI). Hosted tools
(web_search, file_search, code_interpreter, computer use, mcp, tool_search, ...) cannot run
on a chat channel and are dropped; function tools are kept, and so are custom (freeform)
tools such as Codex CLI's `apply_patch`: chat completions has them natively (the grammar
nests under `format.grammar`), `custom_tool_call` items become custom tool calls and their
`custom_tool_call_output` items tool messages; on an Anthropic channel `chat_anthropic`
turns them into normal tools with one string property. `store`, `include`, `truncation`,
`metadata`, `prompt_cache_key`, `service_tier` and `background` are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from relay.translate.chat_anthropic import (
    anthropic_response_to_openai_chat,
    openai_chat_to_anthropic_request,
)
from relay.translate.common import JSON, TranslationError, new_id, usage_from_openai


def _chat_part(part: JSON, param: str) -> JSON:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text", "")}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal", "")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise TranslationError("input_image needs image_url (file_id is not supported)", param)
        image: JSON = {"url": url}
        if part.get("detail") in ("low", "high"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        data = part.get("file_data")
        if not isinstance(data, str):
            raise TranslationError("input_file needs file_data (file_id is not supported)", param)
        return {"type": "file", "file": {"file_data": data, "filename": part.get("filename") or "file"}}
    raise TranslationError(f"content part type {kind!r} is not supported", param)


def _chat_content(content: Any, param: str) -> Any:
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of parts", param)
    parts = [_chat_part(p, f"{param}[{i}]") for i, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _chat_format(fmt: Any) -> JSON | None:
    """A custom tool's input format, Responses shape -> chat shape (grammar nested)."""
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "grammar":
        return {"type": "grammar", "grammar": {"syntax": fmt.get("syntax"), "definition": fmt.get("definition")}}
    return {"type": fmt.get("type") or "text"}


def _chat_tools(tools: list[JSON]) -> list[JSON]:
    out = []
    for tool in tools:
        kind = tool.get("type")
        if kind == "function":
            fn: JSON = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object"}}
            if tool.get("description"):
                fn["description"] = tool["description"]
            if tool.get("strict") is not None:
                fn["strict"] = tool["strict"]
            out.append({"type": "function", "function": fn})
        elif kind == "custom":
            custom: JSON = {"name": tool.get("name")}
            if tool.get("description"):
                custom["description"] = tool["description"]
            fmt = _chat_format(tool.get("format"))
            if fmt is not None:
                custom["format"] = fmt
            out.append({"type": "custom", "custom": custom})
    return out


def _assistant_call(messages: list[JSON], call: JSON) -> None:
    # Parallel calls arrive as consecutive items; chat wants them on one assistant turn,
    # together with any text the assistant said just before.
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def responses_to_openai_chat_request(body: JSON, model: str) -> JSON:
    """A Responses API request body as an OpenAI chat completions request body."""
    if body.get("previous_response_id"):
        raise TranslationError("previous_response_id is not supported on this model", "previous_response_id")
    messages: list[JSON] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise TranslationError("input must be a string or a list of items", "input")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise TranslationError(f"unknown role {role!r}", f"{param}.role")
            content = _chat_content(item.get("content"), f"{param}.content")
            if role == "assistant" and messages and messages[-1]["role"] == "assistant" \
                    and isinstance(messages[-1].get("content"), str | None) and isinstance(content, str):
                messages[-1]["content"] = (messages[-1].get("content") or "") + content
            else:
                messages.append({"role": role, "content": content})
        elif kind == "function_call":
            _assistant_call(messages, {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            })
        elif kind == "custom_tool_call":
            _assistant_call(messages, {
                "id": item.get("call_id"),
                "type": "custom",
                "custom": {"name": item.get("name"), "input": item.get("input") or ""},
            })
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            if isinstance(output, list):
                output = _chat_content(output, f"{param}.output")
                if not isinstance(output, str):
                    output = [p for p in output if p["type"] == "text"]
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output or ""})
        elif kind == "reasoning":
            continue
        else:
            raise TranslationError(f"input item type {kind!r} is not supported", param)

    req: JSON = {"model": model, "messages": messages}
    if body.get("max_output_tokens") is not None:
        req["max_completion_tokens"] = body["max_output_tokens"]
    tools = _chat_tools(body.get("tools") or [])
    if tools:
        req["tools"] = tools
        choice = body.get("tool_choice")
        if choice in ("auto", "none", "required"):
            req["tool_choice"] = choice
        elif isinstance(choice, dict) and choice.get("type") == "function":
            req["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif isinstance(choice, dict) and choice.get("type") == "custom":
            req["tool_choice"] = {"type": "custom", "custom": {"name": choice.get("name")}}
        if body.get("parallel_tool_calls") is not None:
            req["parallel_tool_calls"] = body["parallel_tool_calls"]
    for key in ("temperature", "top_p", "user", "safety_identifier"):
        if body.get(key) is not None:
            req[key] = body[key]
    effort = (body.get("reasoning") or {}).get("effort")
    if effort:
        req["reasoning_effort"] = effort
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        req["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt.get("type") == "json_object":
        req["response_format"] = {"type": "json_object"}
    if body.get("stream"):
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return req


def responses_to_anthropic_request(body: JSON, upstream_model: str) -> JSON:
    """A Responses API request body as an Anthropic Messages request body."""
    chat = responses_to_openai_chat_request(body, upstream_model)
    return openai_chat_to_anthropic_request(chat, upstream_model)


def chat_usage_to_responses(usage: JSON) -> JSON:
    """Chat completions usage as Responses usage (both count cached tokens inside input)."""
    u = usage_from_openai(usage)
    prompt = u.input + u.cache_read + u.cache_write
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": u.cache_read, "cache_write_tokens": u.cache_write},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": prompt + u.output,
    }


def response_envelope(
    resp_id: str, model: str, created_at: int, status: str, output: list[JSON], usage: JSON | None,
    incomplete_reason: str | None = None,
) -> JSON:
    """A Responses `response` object; the fields the client sent are not echoed (not kept)."""
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "temperature": None,
        "top_p": None,
    }


INCOMPLETE_REASON = {"length": "max_output_tokens", "content_filter": "content_filter"}


def message_item(item_id: str, text: str, status: str = "completed") -> JSON:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def reasoning_item(item_id: str, text: str) -> JSON:
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> JSON:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def custom_tool_call_item(item_id: str, call_id: str, name: str, text: str, status: str = "completed") -> JSON:
    return {"id": item_id, "type": "custom_tool_call", "status": status, "call_id": call_id, "name": name,
            "input": text}


def openai_chat_response_to_responses(resp: JSON, model: str, created_at: int | None = None) -> JSON:
    """A non-stream chat.completion as a Responses `response` object."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[JSON] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        output.append(reasoning_item(new_id("rs_"), reasoning))
    text = message.get("content")
    if isinstance(text, str) and text:
        output.append(message_item(new_id("msg_"), text))
    for call in message.get("tool_calls") or ():
        call_id = call.get("id") or new_id("call_")
        if call.get("type") == "custom":
            custom = call.get("custom") or {}
            output.append(custom_tool_call_item(new_id("ctc_"), call_id, custom.get("name") or "",
                                                custom.get("input") or ""))
            continue
        fn = call.get("function") or {}
        output.append(function_call_item(new_id("fc_"), call_id, fn.get("name") or "", fn.get("arguments") or ""))
    reason = INCOMPLETE_REASON.get(choice.get("finish_reason") or "")
    return response_envelope(
        new_id("resp_"),
        model,
        int(time.time()) if created_at is None else created_at,
        "incomplete" if reason else "completed",
        output,
        chat_usage_to_responses(resp.get("usage") or {}),
        reason,
    )


def anthropic_response_to_responses(
    resp: JSON, model: str, created_at: int | None = None, *, custom_tools: Collection[str] = (),
) -> JSON:
    """A non-stream Anthropic Message as a Responses `response` object; `tool_use` blocks of
    the request's `custom_tools` come back as `custom_tool_call` items."""
    chat = anthropic_response_to_openai_chat(resp, model, custom_tools=custom_tools)
    return openai_chat_response_to_responses(chat, model, created_at)
