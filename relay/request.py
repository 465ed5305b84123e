"""One parse of a model request, and the output bound an upstream may honour for a body.

The problem: a reservation is only as good as the numbers it is computed from. A body
that names its bound twice (`"max_tokens": 1, "max_tokens": 100000`), in the other
protocol's field, as a string, or not at all, lets the upstream produce far more than
was reserved. The naive fix (re-serialise every body, or parse it with a duplicate-
detecting Python parser) costs more CPU than the rest of the request path.

The chosen one: one parser that refuses a duplicate key at any depth while it parses
(jiter, the Rust parser pydantic uses, with `catch_duplicate_keys`), at about the cost
of a plain parse. (Counting each name's quoted bytes in the raw body, the previous way,
cost ten times the parse on a 130 KB agent body and missed keys spelled with escapes.)
The fields the gateway reads are type-checked here, once, and a wrong type is a 400
naming the field; the output bound and the choices the route's protocol reads, and
the media parts the input bound must add, come out of the same pass.

`upstream_bound()` reads a body the way the upstream that receives it will: per the
protocol it speaks, the largest of the fields it may honour, times the choices it may
produce. `set_bound()` writes an explicit bound into a body that has none, so no
upstream is ever asked for more than was reserved. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson
from jiter import from_json

from accounting import tokens
from relay import errors as E

# Largest bound accepted: beyond any model's limit, and it keeps money arithmetic small.
MAX_BOUND = 1 << 24
MAX_CHOICES = 128

# Routes whose upstream produces output, and so whose bodies carry a bound.
BOUNDED_ROUTES = frozenset(("chat", "completions", "responses", "messages"))
# Fields holding an output bound, per upstream route (as that protocol reads them).
BOUND_FIELDS = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
}
# Fields multiplying the bound (choices), per upstream route.
CHOICE_FIELDS = {
    "chat": ("n",),
    "completions": ("n", "best_of"),
}
_INT_FIELDS = frozenset(("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of"))
# Every member whose type the gateway checks (relay.request._check).
_CHECKED = _INT_FIELDS | {"stream", "stream_options", "thinking", "reasoning_effort", "reasoning"}


class ModelRequest:
    """What the gateway read from a body, checked once: the model, stream mode, and the
    output bound per choice and the choices the client's own protocol reads (0 and 1
    when the body names none)."""

    __slots__ = ("body", "bound", "choices", "include_usage", "media", "model", "stream")

    def __init__(self, body: dict[str, Any], model: str, stream: bool, include_usage: bool,
                 bound: int, choices: int, media: int) -> None:
        self.body = body
        self.model = model
        self.stream = stream
        self.include_usage = include_usage
        self.bound = bound
        self.choices = choices
        self.media = media  # media parts in the members that may hold them


def _shape(route: str, names: tuple[str, ...]) -> _Shape:
    bounds, choices = BOUND_FIELDS.get(route, ()), CHOICE_FIELDS.get(route, ())
    ints = tuple((n, MAX_CHOICES if n in ("n", "best_of") else MAX_BOUND,
                  _BOUND if n in bounds else _CHOICES if n in choices else 0)
                 for n in names if n in _INT_FIELDS)
    shape = (ints, tuple(n for n in names if n in _CHECKED and n not in _INT_FIELDS
                         and n != "stream"),
             tuple(n for n in names if n in _MEDIA_MEMBERS) if route in BOUNDED_ROUTES else ())
    if len(_SHAPES) < 4096 and sum(map(len, names)) < 1024:  # names come from clients
        _SHAPES[(route, names)] = shape
    return shape


# What a body's top-level names ask of the checks, per route and tuple of names (clients
# send the same few shapes), worked out once: the integer members with their upper limit
# and role (1: the bound the route's protocol reads, 2: its choices, 0: neither); the
# other members whose type is checked; the members that may hold media parts.
_BOUND, _CHOICES = 1, 2
_Shape = tuple[tuple[tuple[str, int, int], ...], tuple[str, ...], tuple[str, ...]]
_SHAPES: dict[tuple[str, tuple[str, ...]], _Shape] = {}


def parse(raw: bytes, route: str, streamable: bool) -> ModelRequest:
    try:
        body = from_json(raw, allow_inf_nan=False, cache_mode="keys", catch_duplicate_keys=True)
    except ValueError as exc:
        raise _parse_error(str(exc))
    if type(body) is not dict:
        raise E.InvalidRequest("The request body must be a JSON object")
    names = tuple(body)
    shape = _SHAPES.get((route, names))
    if shape is None:
        shape = _shape(route, names)
    # The members the gateway reads, checked here once: the bound and choices the
    # route's protocol reads need no second look.
    bound, choices = 0, 1
    for name, hi, role in shape[0]:
        v = body[name]
        if v is None:
            continue
        if type(v) is not int or v < 1 or v > hi:
            _int_field(body, name)  # raises, naming the field
        if role == _BOUND:
            if v > bound:
                bound = v
        elif role == _CHOICES and v > choices:
            choices = v
    for name in shape[1]:
        _check(body, name)
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise E.InvalidRequest("stream must be true or false")
    m = body.get("model")
    if type(m) is not str or not m:
        raise E.InvalidRequest("Missing required field: model (a string)")
    if len(m) > 256 or not m.isprintable():
        raise E.InvalidRequest("Invalid model name: at most 256 printable characters")
    include = False
    if stream:
        so = body.get("stream_options")
        include = type(so) is dict and so.get("include_usage") is True
    if bound and route == "messages":
        bound = _with_thinking(body, bound)
    # Media parts (images, audio, files) cost tokens their bytes do not show. Counted
    # in the parsed members (escapes already decoded), not by a scan of the bytes.
    media = 0
    for name in shape[2]:
        v = body[name]
        if type(v) is list or type(v) is dict:
            media += media_parts(v)
    return ModelRequest(body, m, stream is True and streamable, include, bound, choices, media)


def _parse_error(message: str) -> E.GatewayError:
    if message.startswith("Detected duplicate key "):
        return E.InvalidRequest("Duplicate key in the request body: "
                                + message[len("Detected duplicate key "):])
    if message.startswith("recursion limit exceeded"):
        return E.InvalidRequest("The request body is nested too deeply")
    return E.InvalidRequest(f"Malformed JSON body: {message}")


def _check(body: dict[str, Any], name: str) -> None:
    """A member the gateway reads: its type, or a 400 naming it."""
    v = body[name]
    if v is None:
        return
    if name in _INT_FIELDS:
        _int_field(body, name)
    elif name == "stream":
        if type(v) is not bool:
            raise E.InvalidRequest("stream must be true or false")
    elif name == "stream_options":
        if type(v) is not dict:
            raise E.InvalidRequest("stream_options must be an object")
        iu = v.get("include_usage")
        if iu is not None and type(iu) is not bool:
            raise E.InvalidRequest("stream_options.include_usage must be true or false")
    elif name == "thinking":
        if type(v) is not dict:
            raise E.InvalidRequest("thinking must be an object")
        if "budget_tokens" in v:
            _int_field(v, "budget_tokens", "thinking.budget_tokens")
    elif name == "reasoning_effort":
        if type(v) is not str:
            raise E.InvalidRequest("reasoning_effort must be a string")
    elif name == "reasoning":
        if type(v) is not dict:
            raise E.InvalidRequest("reasoning must be an object")
        eff = v.get("effort")
        if eff is not None and type(eff) is not str:
            raise E.InvalidRequest("reasoning.effort must be a string")


def _int_field(obj: dict[str, Any], name: str, path: str = "") -> int:
    v = obj[name]
    if v is None:
        return 0
    label = path or name
    if type(v) is not int:
        raise E.InvalidRequest(f"{label} must be an integer, got {type(v).__name__}")
    if v < 1 or v > (MAX_CHOICES if name in ("n", "best_of") else MAX_BOUND):
        hi = MAX_CHOICES if name in ("n", "best_of") else MAX_BOUND
        raise E.InvalidRequest(f"{label} must be between 1 and {hi}, got {v}")
    return v


def _int(obj: dict[str, Any], name: str) -> int:
    v = obj.get(name)
    if v is None:
        return 0
    if type(v) is not int or v < 1:
        # A translated body is ours; a native one was checked by parse(). Anything else
        # here is a body we cannot bound: refuse rather than guess.
        raise E.InvalidRequest(f"{name} must be a positive integer")
    return v


def bound_of(route: str, body: dict[str, Any]) -> int:
    """The output bound `body` names for an upstream speaking `route`, per choice; 0: none."""
    fields = BOUND_FIELDS.get(route)
    if fields is None:
        return 0
    bound = 0
    for name in fields:
        v = body.get(name)
        if v is not None:
            if type(v) is not int or v < 1:
                # A translated body is ours; a native one was checked by parse(). Anything
                # else here is a body we cannot bound: refuse rather than guess.
                raise E.InvalidRequest(f"{name} must be a positive integer")
            if v > bound:
                bound = v
    if route == "messages" and bound:
        bound = _with_thinking(body, bound)
    return bound


def _with_thinking(body: dict[str, Any], bound: int) -> int:
    """An Anthropic bound raised to the thinking budget, when that is larger (without
    max_tokens the budget bounds nothing: callers pass a bound already found)."""
    th = body.get("thinking")
    if type(th) is dict:
        budget = _int(th, "budget_tokens")
        if budget > bound:
            return budget
    return bound


def choices_of(route: str, body: dict[str, Any]) -> int:
    n = 1
    for name in CHOICE_FIELDS.get(route, ()):
        v = body.get(name)
        if v is not None:
            if type(v) is not int or v < 1:
                raise E.InvalidRequest(f"{name} must be a positive integer")
            if v > n:
                n = v
    return n


def upstream_bound(route: str, body: dict[str, Any]) -> int:
    """Output tokens an upstream speaking `route` may produce for `body` (0: unbounded)."""
    return bound_of(route, body) * choices_of(route, body)


def bound_field(route: str, reasoning: bool) -> str:
    """The field the gateway writes when a body names no bound. OpenAI's reasoning models
    refuse `max_tokens`; every other chat upstream reads it."""
    if route == "chat":
        return "max_completion_tokens" if reasoning else "max_tokens"
    return BOUND_FIELDS[route][0]


def inject_raw(raw: bytes, name: str, value: int) -> bytes:
    """Add one top-level integer member without re-serialising the body."""
    i = raw.find(b"{")
    member = b'"%s":%d' % (name.encode(), value)
    rest = raw[i + 1:]
    sep = b"" if rest.lstrip()[:1] == b"}" else b","
    return raw[: i + 1] + member + sep + rest


# --- input bounds ----------------------------------------------------------------------

# Members whose parts may be media an upstream reads (not tools' schemas or metadata).
_MEDIA_MEMBERS = frozenset(("messages", "input", "system"))
_MEDIA_TYPES = tokens.MEDIA_TYPES
# Members estimate_input_tokens reads; every other member is counted a token per byte.
_COUNTED = frozenset(("messages", "prompt", "input", "instructions", "tools", "functions",
                      "system"))
_OPENAI_TOKENIZED = ("gpt-", "o1", "o3", "o4", "chatgpt-", "text-", "davinci", "babbage")


def media_parts(value: dict[str, Any] | list[Any]) -> int:
    """Media parts (a dict whose "type" is an image, audio or file type) anywhere in
    `value`: a part may sit at any depth (an Anthropic tool_result's content, a
    Responses function_call_output). The parser bounds the depth (jiter: 200 levels)."""
    n = 0
    for v in (value,) if type(value) is dict else value:
        if type(v) is dict:
            # The common message, a role and a text, has nothing to walk.
            if len(v) == 2 and type(v.get("content")) is str and type(v.get("role")) is str:
                continue
            kind = v.get("type")
            if type(kind) is str and kind in _MEDIA_TYPES:
                n += 1
            for x in v.values():
                if type(x) is dict or type(x) is list:
                    n += media_parts(x)
        elif type(v) is list:
            n += media_parts(v)
    return n


def tight_input_tokens(protocol: str, body: dict[str, Any], raw: bytes, model: str) -> int:
    """Input tokens counted the way the upstream will, never below what it reports.

    Text is counted with tiktoken plus the protocol's per-message overhead; members the
    count does not read are taken at a token per byte. A model whose tokenizer is not
    OpenAI's may count up to a half more tokens for the same text, so its count is
    raised by that much. Runs only when the fast bound would refuse a request.
    """
    n = tokens.estimate_input_tokens(protocol, body)
    rest = {k: v for k, v in body.items() if k not in _COUNTED}
    n += len(orjson.dumps(rest))
    if not model.startswith(_OPENAI_TOKENIZED):
        n = n * 3 // 2 + 16
    return n
