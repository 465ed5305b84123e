"""Provider-shaped bodies for the mock upstream: pure functions from a parsed request to bytes.

Given a request body and its mock controls, this module computes the deterministic usage
(the numbers tests compare exactly) and renders the OpenAI (chat, legacy completions,
Responses, embeddings, models) and Anthropic (messages, count_tokens, models) bodies and
stream events as real providers shape them. It knows nothing of sockets, HTTP framing or
timing: the server in `bench.mock_upstream` frames and paces what this returns.
"""

from __future__ import annotations

import base64
import os
import struct
import time
from itertools import count
from typing import Any

import orjson

# Controls a request may set in its `"mock"` object or as `x-mock-<key-with-dashes>` headers.
INT_KEYS = frozenset(
    {
        "chunks",
        "chunk_size",
        "tokens_per_chunk",
        "input_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "status",
        "fail_after",
        "retry_after",
    }
)
FLOAT_KEYS = frozenset({"ttfb_ms", "delay_ms"})
STR_KEYS = frozenset({"chunk_text", "fail"})
BOOL_KEYS = frozenset({"tool_call", "no_usage", "overrun"})
FAIL_MODES = frozenset({"reset", "hang", "stall", "close", "error"})

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini", "text-embedding-3-small",
          "claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-1")
_MODEL_CREATED = 1_715_367_049
_SYSTEM_FINGERPRINT = "fp_mock0b1e2d3"
_WORD = "hello "


class BadRequest(Exception):
    """The request cannot be answered as a provider would answer it (rendered as a 400)."""


class Options:
    """Mock controls of one request, after merging headers (first) and the body's `mock` object."""

    __slots__ = ("cache_write_tokens", "cached_tokens", "chunk_size", "chunk_text", "chunks",
                 "delay_ms", "fail", "fail_after", "input_tokens", "no_usage", "overrun", "reasoning_tokens",
                 "retry_after", "status", "tokens_per_chunk", "tool_call", "ttfb_ms")

    def __init__(self) -> None:
        self.chunks = 5
        self.chunk_size = len(_WORD)
        self.chunk_text: str | None = None
        self.tokens_per_chunk = 1
        self.input_tokens: int | None = None
        self.cached_tokens = 0
        self.cache_write_tokens = 0
        self.reasoning_tokens = 0
        self.ttfb_ms = 0.0
        self.delay_ms = 0.0
        self.status: int | None = None
        self.fail: str | None = None
        self.fail_after = 2
        self.retry_after = 1
        self.tool_call = False
        self.no_usage = False
        self.overrun = False  # ignore the request's output bound (a misbehaving upstream)

    def set(self, key: str, value: Any) -> None:
        try:
            if key in INT_KEYS:
                if isinstance(value, bool):
                    raise ValueError(key)
                v: Any = int(value)
                if v < 0:
                    raise ValueError(key)
            elif key in FLOAT_KEYS:
                v = float(value)
                if v < 0:
                    raise ValueError(key)
            elif key in BOOL_KEYS:
                v = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif key in STR_KEYS:
                v = str(value)
                if key == "fail" and v not in FAIL_MODES:
                    raise ValueError(key)
            else:
                raise BadRequest(f"unknown mock control {key!r}")
        except (TypeError, ValueError):
            raise BadRequest(f"bad value for mock control {key!r}: {value!r}")
        setattr(self, key, v)


def parse_options(headers: list[tuple[bytes, bytes]], body: Any) -> Options:
    opts = Options()
    for name, value in headers:
        if name.startswith(b"x-mock-"):
            opts.set(name[7:].decode("latin-1").replace("-", "_"), value.decode("latin-1"))
    mock = body.get("mock") if isinstance(body, dict) else None
    if mock is not None:
        if not isinstance(mock, dict):
            raise BadRequest("'mock' must be an object")
        for key, value in mock.items():
            opts.set(key, value)
    return opts


# --- ids ------------------------------------------------------------------------------------

_PROCESS = os.urandom(5).hex()
_counter = count(1)


def reseed_ids() -> None:
    """Draw a new process prefix: a forked worker must not repeat its parent's ids."""
    global _PROCESS
    _PROCESS = os.urandom(5).hex()


def new_id() -> str:
    """24 hex characters, unique across worker processes (random prefix) and requests."""
    return f"{_PROCESS}{next(_counter):014x}"


def request_id() -> bytes:
    return b"req_" + new_id().encode()


# --- usage ----------------------------------------------------------------------------------


def count_input_tokens(body: dict[str, Any]) -> int:
    """max(1, bytes of compact JSON of messages + input + prompt + system, // 4)."""
    size = 0
    for key in ("messages", "input", "prompt", "system"):
        if key in body:
            size += len(orjson.dumps(body[key]))
    return max(1, size // 4)


class Plan:
    """What one generation answers: its text or tool call, its length and its usage numbers.

    `input_tokens` is the whole prompt. OpenAI reports it as prompt_tokens with `cached`
    included; Anthropic reports input_tokens = input - cached - cache_write, next to
    cache_read_input_tokens = cached and cache_creation_input_tokens = cache_write.
    """

    __slots__ = ("cache_write", "cached", "custom_tool", "deltas", "input_tokens", "model", "no_usage",
                 "output_tokens", "reasoning", "stream", "tool", "truncated")

    def __init__(self, body: dict[str, Any], opts: Options, limit_key: str) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter")
        self.model = model
        self.stream = body.get("stream") is True
        self.no_usage = opts.no_usage
        n_in = opts.input_tokens if opts.input_tokens is not None else count_input_tokens(body)
        self.input_tokens = n_in
        self.cached = min(opts.cached_tokens, n_in)
        self.cache_write = min(opts.cache_write_tokens, n_in - self.cached)
        picked = _pick_tool(body, opts)
        self.tool = picked[:2] if picked is not None else None
        self.custom_tool = picked is not None and picked[2]  # a freeform call: raw input, no JSON
        if self.tool is not None:
            self.deltas = _split(self.tool[1], max(1, opts.chunks))
        else:
            text = opts.chunk_text if opts.chunk_text is not None else _filler(opts.chunk_size)
            self.deltas = [text] * opts.chunks
        tpc = opts.tokens_per_chunk
        reasoning = opts.reasoning_tokens
        full = len(self.deltas) * tpc + reasoning
        limit = body.get(limit_key)
        if limit_key == "max_tokens" and "max_completion_tokens" in body:
            limit = body["max_completion_tokens"]
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise BadRequest(f"{limit_key} must be a positive integer")
        if opts.overrun:
            limit = None
        self.truncated = limit is not None and full > limit
        if limit is not None and self.truncated:
            reasoning = min(reasoning, limit)
            if tpc:
                self.deltas = self.deltas[: (limit - reasoning) // tpc]
            self.output_tokens = limit
        else:
            self.output_tokens = full
        self.reasoning = reasoning

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def openai_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def responses_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def anthropic_usage(self, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens - self.cached - self.cache_write,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cached,
            "output_tokens": output_tokens,
        }


def _filler(size: int) -> str:
    size = max(1, size)
    return (_WORD * (size // len(_WORD) + 1))[:size]


def _split(s: str, n: int) -> list[str]:
    n = max(1, min(n, len(s)))
    step, extra = divmod(len(s), n)
    out, pos = [], 0
    for i in range(n):
        end = pos + step + (1 if i < extra else 0)
        out.append(s[pos:end])
        pos = end
    return out


def _pick_tool(body: dict[str, Any], opts: Options) -> tuple[str, str, bool] | None:
    """(name, arguments JSON or a custom tool's raw input, custom?) of the tool to call, when
    the request asks for a tool call.

    Like a model told what to do: "use the tool NAME" picks the tool of that name (else the
    first tool), and the lines after that phrase, if any, are the input it dictates: a
    custom (freeform) tool gets them verbatim, a function tool with one string parameter
    gets them as that parameter. Otherwise the arguments are placeholders of the right
    types, and a custom tool's input is "hello".
    """
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    said = _last_user_text(body)
    at = said.find("use the tool")
    if not opts.tool_call and at < 0:
        return None
    words = said[at + len("use the tool"):].split(None, 1) if at >= 0 else []
    dictated = said[at:].partition("\n")[2] if at >= 0 else ""
    tool = tools[0]
    for t in tools:
        if words and isinstance(t, dict) and _tool_name(t) == words[0].rstrip(".,:;"):
            tool = t
            break
    if tool.get("type") == "custom":
        return _tool_name(tool) or "tool", dictated or "hello", True
    fn: dict[str, Any] = tool["function"] if isinstance(tool.get("function"), dict) else tool
    name = fn.get("name") or "tool"
    schema = fn.get("parameters") or fn.get("input_schema") or {}
    args: dict[str, Any] = {}
    props = schema.get("properties") if isinstance(schema, dict) else None
    if isinstance(props, dict):
        if dictated and len(props) == 1 and (next(iter(props.values())) or {}).get("type") == "string":
            return str(name), orjson.dumps({next(iter(props)): dictated}).decode(), False
        for key, prop in props.items():
            kind = prop.get("type") if isinstance(prop, dict) else None
            args[key] = {"integer": 1, "number": 1, "boolean": True, "array": [],
                         "object": {}}.get(kind, "hello") if isinstance(kind, str) else "hello"
    return str(name), orjson.dumps(args).decode(), False


def _tool_name(tool: dict[str, Any]) -> Any:
    """A tool's name in any of the shapes: chat function/custom, Responses, Anthropic."""
    for nested in ("function", "custom"):
        if isinstance(tool.get(nested), dict):
            return tool[nested].get("name")
    return tool.get("name")


def _last_user_text(body: dict[str, Any]) -> str:
    items = body.get("messages")
    if items is None:
        items = body.get("input")
    if isinstance(items, str):
        return items
    if isinstance(items, list):
        # The newest turn decides, skipping system/developer notes: when it is a tool
        # result (role "tool", a function_call_output item, or a user turn carrying
        # tool_result blocks), the client is answering our tool call, so answer in text
        # instead of asking for the tool again (a client would loop forever).
        for item in reversed(items):
            if not isinstance(item, dict) or item.get("role") in ("system", "developer"):
                continue
            if item.get("role") != "user":
                return ""
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                if any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
                    return ""
                return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
            return ""
    return ""


# --- SSE -------------------------------------------------------------------------------------

def sse_data(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def sse_event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
dumps = orjson.dumps


# --- OpenAI chat completions ---------------------------------------------------------------


def chat(body: dict[str, Any], plan: Plan) -> list[bytes]:
    """Non-stream: [body]. Stream: SSE events (each a list element), [DONE] last."""
    cid = "chatcmpl-" + new_id()
    created = int(time.time())
    finish = "length" if plan.truncated else ("tool_calls" if plan.tool else "stop")
    call_id = "call_" + new_id()
    if not plan.stream:
        if plan.tool:
            call: dict[str, Any] = (
                {"id": call_id, "type": "custom", "custom": {"name": plan.tool[0], "input": plan.text}}
                if plan.custom_tool else
                {"id": call_id, "type": "function", "function": {"name": plan.tool[0], "arguments": plan.text}})
            message: dict[str, Any] = {
                "role": "assistant", "content": None, "tool_calls": [call],
                "refusal": None, "annotations": [],
            }
        else:
            message = {"role": "assistant", "content": plan.text, "refusal": None,
                       "annotations": []}
        out: dict[str, Any] = {
            "id": cid, "object": "chat.completion", "created": created, "model": plan.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish}],
        }
        if not plan.no_usage:
            out["usage"] = plan.openai_usage()
        out["service_tier"] = "default"
        out["system_fingerprint"] = _SYSTEM_FINGERPRINT
        return [dumps(out)]

    opts = body.get("stream_options")
    with_usage = isinstance(opts, dict) and opts.get("include_usage") is True and not plan.no_usage
    base: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": plan.model, "service_tier": "default",
                            "system_fingerprint": _SYSTEM_FINGERPRINT, "choices": None}
    if with_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        base["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish_reason}]
        return sse_data(dumps(base))

    if plan.tool and plan.custom_tool:
        # The shape OpenAI streams custom tool calls in (not yet in its published chunk schema).
        events = [chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": call_id, "type": "custom",
             "custom": {"name": plan.tool[0], "input": ""}}], "refusal": None})]
        events += [chunk({"tool_calls": [{"index": 0, "custom": {"input": d}}]})
                   for d in plan.deltas]
    elif plan.tool:
        events = [chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": call_id, "type": "function",
             "function": {"name": plan.tool[0], "arguments": ""}}], "refusal": None})]
        events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": d}}]})
                   for d in plan.deltas]
    else:
        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if plan.deltas:
            same = chunk({"content": plan.deltas[0]})
            events += [same if d == plan.deltas[0] else chunk({"content": d})
                       for d in plan.deltas]
    events.append(chunk({}, finish))
    if with_usage:
        base["choices"] = []
        base["usage"] = plan.openai_usage()
        events.append(sse_data(dumps(base)))
    events.append(SSE_DONE)
    return events


# --- OpenAI legacy completions --------------------------------------------------------------


def completions(body: dict[str, Any], plan: Plan) -> list[bytes]:
    cid = "cmpl-" + new_id()
    created = int(time.time())
    finish = "length" if plan.truncated else "stop"
    if not plan.stream:
        out: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": created, "model": plan.model,
            "choices": [{"text": plan.text, "index": 0, "logprobs": None,
                         "finish_reason": finish}],
        }
        if not plan.no_usage:
            out["usage"] = plan.openai_usage()
        out["system_fingerprint"] = _SYSTEM_FINGERPRINT
        return [dumps(out)]
    opts = body.get("stream_options")
    with_usage = isinstance(opts, dict) and opts.get("include_usage") is True and not plan.no_usage
    base: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created,
                            "model": plan.model, "choices": None,
                            "system_fingerprint": _SYSTEM_FINGERPRINT}
    if with_usage:
        base["usage"] = None

    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        base["choices"] = [{"text": text, "index": 0, "logprobs": None,
                            "finish_reason": finish_reason}]
        return sse_data(dumps(base))

    events = []
    if plan.deltas:
        same = chunk(plan.deltas[0])
        events = [same if d == plan.deltas[0] else chunk(d) for d in plan.deltas]
    events.append(chunk("", finish))
    if with_usage:
        base["choices"] = []
        base["usage"] = plan.openai_usage()
        events.append(sse_data(dumps(base)))
    events.append(SSE_DONE)
    return events


# --- OpenAI Responses -----------------------------------------------------------------------


def responses(body: dict[str, Any], plan: Plan) -> list[bytes]:
    rid = "resp_" + new_id() + new_id()
    created = int(time.time())
    resp: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": plan.model, "output": [],
        "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.get("store", True), "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": body.get("tools", []), "top_p": 1.0, "truncation": "disabled",
        "usage": None, "user": None, "metadata": body.get("metadata") or {},
    }
    final_status = "incomplete" if plan.truncated else "completed"
    if plan.tool and plan.custom_tool:
        item_id = "ctc_" + new_id()
        done_item: dict[str, Any] = {"id": item_id, "type": "custom_tool_call",
                                     "status": "completed", "input": plan.text,
                                     "call_id": "call_" + new_id(), "name": plan.tool[0]}
    elif plan.tool:
        item_id = "fc_" + new_id()
        done_item = {"id": item_id, "type": "function_call",
                     "status": "completed", "arguments": plan.text,
                     "call_id": "call_" + new_id(), "name": plan.tool[0]}
    else:
        item_id = "msg_" + new_id()
        done_item = {"id": item_id, "type": "message", "status": "completed",
                     "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                                  "text": plan.text}],
                     "role": "assistant"}
    if plan.truncated:
        done_item["status"] = "incomplete"

    def finished() -> dict[str, Any]:
        resp["status"] = final_status
        if plan.truncated:
            resp["incomplete_details"] = {"reason": "max_output_tokens"}
        resp["output"] = [done_item]
        if plan.no_usage:
            resp.pop("usage", None)
        else:
            resp["usage"] = plan.responses_usage()
        return resp

    if not plan.stream:
        return [dumps(finished())]

    if plan.no_usage:
        resp.pop("usage")
    events: list[bytes] = []
    seq = 0

    def ev(name: str, payload: dict[str, Any]) -> None:
        nonlocal seq
        events.append(sse_event(name.encode(), dumps({"type": name, "sequence_number": seq,
                                                      **payload})))
        seq += 1

    ev("response.created", {"response": resp})
    ev("response.in_progress", {"response": resp})
    if plan.tool and plan.custom_tool:
        ev("response.output_item.added", {"output_index": 0, "item": {
            **done_item, "status": "in_progress", "input": ""}})
        for d in plan.deltas:
            ev("response.custom_tool_call_input.delta",
               {"item_id": item_id, "output_index": 0, "delta": d})
        ev("response.custom_tool_call_input.done",
           {"item_id": item_id, "output_index": 0, "input": plan.text})
    elif plan.tool:
        ev("response.output_item.added", {"output_index": 0, "item": {
            **done_item, "status": "in_progress", "arguments": ""}})
        for d in plan.deltas:
            ev("response.function_call_arguments.delta",
               {"item_id": item_id, "output_index": 0, "delta": d})
        ev("response.function_call_arguments.done",
           {"item_id": item_id, "output_index": 0, "name": plan.tool[0],
            "arguments": plan.text})
    else:
        ev("response.output_item.added", {"output_index": 0, "item": {
            "id": item_id, "type": "message", "status": "in_progress", "content": [],
            "role": "assistant"}})
        ev("response.content_part.added", {"item_id": item_id, "output_index": 0,
                                           "content_index": 0, "part": {
                                               "type": "output_text", "annotations": [],
                                               "logprobs": [], "text": ""}})
        # Deltas differ only in sequence_number: render the rest once and splice the number in.
        head = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'
        for d in plan.deltas:
            tail = (b',"item_id":"' + item_id.encode()
                    + b'","output_index":0,"content_index":0,"delta":' + dumps(d)
                    + b',"logprobs":[]}\n\n')
            events.append(head + b"%d" % seq + tail)
            seq += 1
        ev("response.output_text.done", {"item_id": item_id, "output_index": 0,
                                         "content_index": 0, "text": plan.text,
                                         "logprobs": []})
        ev("response.content_part.done", {"item_id": item_id, "output_index": 0,
                                          "content_index": 0,
                                          "part": done_item["content"][0]})
    ev("response.output_item.done", {"output_index": 0, "item": done_item})
    ev("response.incomplete" if plan.truncated else "response.completed",
       {"response": finished()})
    return events


# --- OpenAI embeddings and models -----------------------------------------------------------

_vectors: dict[tuple[int, bool], bytes] = {}


def _vector(dims: int, b64: bool) -> bytes:
    """One deterministic embedding (values exact in float32), rendered once per shape."""
    key = (dims, b64)
    got = _vectors.get(key)
    if got is None:
        values = [((i * 37) % 1024 - 512) / 1024 for i in range(dims)]
        if b64:
            got = dumps(base64.b64encode(struct.pack(f"<{dims}f", *values)).decode())
        else:
            got = dumps(values)
        _vectors[key] = got
    return got


def embeddings(body: dict[str, Any], opts: Options) -> bytes:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter")
    inp = body.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
        n = 1
    elif isinstance(inp, list) and inp:
        n = len(inp)
    else:
        raise BadRequest("'input' must be a non-empty string or array")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'")
    dims = body.get("dimensions", 1536)
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 8192:
        raise BadRequest("dimensions must be an integer in 1..8192")
    vec = _vector(dims, fmt == "base64")
    data = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, vec)
                     for i in range(n))
    out = b'{"object":"list","data":[' + data + b'],"model":' + dumps(model)
    if not opts.no_usage:
        tokens = opts.input_tokens if opts.input_tokens is not None else count_input_tokens(body)
        out += b',"usage":' + dumps({"prompt_tokens": tokens, "total_tokens": tokens})
    return out + b"}"


def _openai_model(mid: str) -> dict[str, Any]:
    owner = "anthropic" if mid.startswith("claude") else "system"
    return {"id": mid, "object": "model", "created": _MODEL_CREATED, "owned_by": owner}


def _anthropic_model(mid: str) -> dict[str, Any]:
    name = " ".join(p.capitalize() for p in mid.split("-"))
    return {"type": "model", "id": mid, "display_name": name,
            "created_at": "2025-09-29T00:00:00Z"}


OPENAI_MODELS = dumps({"object": "list", "data": [_openai_model(m) for m in MODELS]})
ANTHROPIC_MODELS = dumps({"data": [_anthropic_model(m) for m in MODELS if m.startswith("claude")],
                          "has_more": False, "first_id": "claude-sonnet-4-6",
                          "last_id": "claude-opus-4-1"})


def model(mid: str, anthropic: bool) -> bytes:
    return dumps(_anthropic_model(mid) if anthropic else _openai_model(mid))


# --- Anthropic messages ---------------------------------------------------------------------


def messages(body: dict[str, Any], plan: Plan) -> list[bytes]:
    if not isinstance(body.get("messages"), list):
        raise BadRequest("messages: Field required")
    if "max_tokens" not in body:
        raise BadRequest("max_tokens: Field required")
    mid = "msg_01" + new_id()
    stop = "max_tokens" if plan.truncated else ("tool_use" if plan.tool else "end_turn")
    tool_id = "toolu_01" + new_id()
    if not plan.stream:
        if plan.tool:
            try:
                tool_input = orjson.loads(plan.text)
            except orjson.JSONDecodeError:
                tool_input = {}
            content: list[dict[str, Any]] = [{"type": "tool_use", "id": tool_id,
                                              "name": plan.tool[0], "input": tool_input}]
        else:
            content = [{"type": "text", "text": plan.text}]
        out: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant",
                               "model": plan.model, "content": content, "stop_reason": stop,
                               "stop_sequence": None}
        if not plan.no_usage:
            out["usage"] = {**plan.anthropic_usage(plan.output_tokens), "service_tier": "standard"}
        return [dumps(out)]

    message: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant",
                               "model": plan.model, "content": [], "stop_reason": None,
                               "stop_sequence": None}
    if not plan.no_usage:
        message["usage"] = {**plan.anthropic_usage(1), "service_tier": "standard"}
    events = [
        sse_event(b"message_start", dumps({"type": "message_start", "message": message})),
        sse_event(b"ping", b'{"type": "ping"}'),
    ]
    if plan.tool:
        block: dict[str, Any] = {"type": "tool_use", "id": tool_id, "name": plan.tool[0],
                                 "input": {}}
        events.append(sse_event(b"content_block_start", dumps(
            {"type": "content_block_start", "index": 0, "content_block": block})))
        events += [sse_event(b"content_block_delta", dumps(
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "input_json_delta", "partial_json": d}})) for d in plan.deltas]
    else:
        events.append(sse_event(b"content_block_start", dumps(
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}})))
        if plan.deltas:
            first = plan.deltas[0]

            def delta(d: str) -> bytes:
                return sse_event(b"content_block_delta", dumps(
                    {"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": d}}))

            same = delta(first)
            events += [same if d == first else delta(d) for d in plan.deltas]
    events.append(sse_event(b"content_block_stop", b'{"type":"content_block_stop","index":0}'))
    md: dict[str, Any] = {"type": "message_delta",
                          "delta": {"stop_reason": stop, "stop_sequence": None}}
    if not plan.no_usage:
        md["usage"] = {"output_tokens": plan.output_tokens}
    events.append(sse_event(b"message_delta", dumps(md)))
    events.append(sse_event(b"message_stop", b'{"type":"message_stop"}'))
    return events


def count_tokens(body: dict[str, Any], opts: Options) -> bytes:
    if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
        raise BadRequest("model and messages are required")
    n = opts.input_tokens if opts.input_tokens is not None else count_input_tokens(body)
    return dumps({"input_tokens": n})


# --- errors ---------------------------------------------------------------------------------

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error",
}


def error(anthropic: bool, status: int, message: str) -> bytes:
    if anthropic:
        kind = _ANTHROPIC_ERRORS.get(status, "invalid_request_error" if status < 500
                                     else "api_error")
        return dumps({"type": "error", "error": {"type": kind, "message": message},
                      "request_id": "req_011" + new_id()})
    etype, code = _OPENAI_ERRORS.get(status, ("invalid_request_error" if status < 500
                                              else "server_error", None))
    return dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})
