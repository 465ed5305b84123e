"""A small JSON API router for the non-model routes (admin, key-holder views).

These routes are not on the hot path, so convenience wins here: path parameters,
parsed JSON bodies and query strings, and handlers that return plain objects. They
share the model routes' listener and error family, so one port serves everything
and every error has the same shape (OpenAI's).

    api = Api()

    @api.route("GET", "/admin/v1/users/{name}")
    async def show_user(call: Call) -> Any:
        return {...}            # 200 with JSON; or `Reply(status, obj)`

A handler raises a GatewayError (or `ApiError(status, code, message)`) to fail.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from relay import errors as E
from relay.httpserver import HttpConnection, Request


class ApiError(E.GatewayError):
    """An error with an explicit status and code (admin API validation, conflicts)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, status=status)
        self.openai_code = code
        self.openai_type = "invalid_request_error" if status < 500 else "server_error"


@dataclass(slots=True)
class Call:
    req: Request
    params: dict[str, str]
    query: dict[str, str]
    ctx: Any = None  # what the route's guard returned (e.g. the admin identity or a KeyState)

    def json(self) -> Any:
        if not self.req.body:
            return {}
        try:
            return orjson.loads(self.req.body)
        except orjson.JSONDecodeError as exc:
            raise E.InvalidRequest(f"Malformed JSON body: {exc}")

    def body(self) -> dict[str, Any]:
        obj = self.json()
        if type(obj) is not dict:
            raise E.InvalidRequest("The request body must be a JSON object")
        return obj


@dataclass(slots=True)
class Reply:
    status: int
    body: Any
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw: bytes | None = None  # send these bytes instead of JSON (e.g. the OpenAPI file)
    content_type: bytes = b"application/json"


Handler = Callable[[Call], Awaitable[Any]]
Guard = Callable[[Request], Awaitable[Any]]

_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


@dataclass(slots=True)
class _Route:
    method: str
    pattern: str
    regex: re.Pattern[str]
    handler: Handler
    guard: Guard | None


class Api:
    def __init__(self) -> None:
        self.routes: list[_Route] = []
        self.prefixes: set[bytes] = set()

    def route(self, method: str, pattern: str, *, guard: Guard | None = None) -> Callable[[Handler], Handler]:
        regex = re.compile("^" + _PARAM.sub(r"(?P<\1>[^/]+)", pattern) + "$")

        def deco(fn: Handler) -> Handler:
            self.routes.append(_Route(method.upper(), pattern, regex, fn, guard))
            return fn

        return deco

    def matches(self, path: bytes) -> bool:
        return any(path.startswith(p) for p in self.prefixes)

    async def dispatch(self, req: Request, conn: HttpConnection, rid: bytes) -> None:
        path = unquote(req.path.decode("utf-8", "replace"))
        method = req.method.decode()
        headers = [(b"content-type", b"application/json"), (b"x-request-id", rid)]
        allowed = []
        for r in self.routes:
            m = r.regex.match(path)
            if m is None:
                continue
            if r.method != method:
                allowed.append(r.method)
                continue
            query = {k: v[-1] for k, v in parse_qs(req.query.decode("utf-8", "replace")).items()}
            try:
                ctx = await r.guard(req) if r.guard is not None else None
                out = await r.handler(Call(req, m.groupdict(), query, ctx))
            except E.GatewayError as exc:
                if exc.retry_after:
                    headers.append((b"retry-after", b"%d" % max(1, int(exc.retry_after + 0.999))))
                conn.send(exc.status, headers, E.render(exc, E.OPENAI))
                return
            if isinstance(out, Reply):
                headers[0] = (b"content-type", out.content_type)
                headers.extend(out.headers)
                body = out.raw if out.raw is not None else orjson.dumps(out.body, default=_default)
                conn.send(out.status, headers, body)
            else:
                conn.send(200, headers, orjson.dumps(out, default=_default))
            return
        miss: E.GatewayError
        if allowed:
            miss = E.MethodNotAllowed(f"Use {' or '.join(sorted(set(allowed)))} for {path}")
        else:
            miss = E.NotFound(f"No route for {method} {path}")
        conn.send(miss.status, headers, E.render(miss, E.OPENAI))


def _default(obj: Any) -> Any:
    from datetime import datetime
    from fractions import Fraction

    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Fraction):
        return f"{obj.numerator}/{obj.denominator}" if obj.denominator != 1 else str(obj.numerator)
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
