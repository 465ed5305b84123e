"""What an upstream's error status becomes for the client, in the client's protocol.

Held errors (429, 5xx, redirects: the gateway may still retry elsewhere) become one
GatewayError when no attempt is left. A 429 keeps its status and the provider's own
message; its body is the provider's when the channel speaks the client's protocol, else
the same error rewritten into the client's shape (OpenAI `error.type/code/param`,
Anthropic `type: "error"` with `error.type`): an OpenAI SDK must never read an Anthropic
body or the other way round. `Retry-After` and the rate-limit headers come along,
renamed for the client's protocol (relay.translate.ratelimit). Nothing else of the
upstream's head is copied (its request id is not ours to send). No I/O.
"""

from __future__ import annotations

import time

import orjson

from relay import errors as E
from relay.errors import ANTHROPIC, GatewayError
from relay.translate import errors as te
from relay.translate import ratelimit

Headers = list[tuple[bytes, bytes]]


def client_headers(headers: Headers, upstream: int, client: int) -> tuple[tuple[bytes, bytes], ...]:
    """The upstream's Retry-After and rate-limit headers, in the client's names."""
    picked = [(k, v) for k, v in headers if ratelimit.is_rate_limit_header(k)]
    if picked and upstream != client:
        picked = ratelimit.for_client(picked, client == ANTHROPIC, time.time())
    return tuple(picked)


def client_headers_all(headers: Headers, upstream: int, client: int) -> Headers:
    """A translated response's headers: the rate-limit ones renamed for the client's
    protocol (those without an equivalent dropped), every other one as it came."""
    if upstream == client:
        return headers
    return ratelimit.for_client(headers, client == ANTHROPIC, time.time())


def _retry_after(headers: Headers) -> float:
    for k, v in headers:
        if k == b"retry-after-ms":
            try:
                return max(0.0, float(v) / 1000)
            except ValueError:
                pass
    for k, v in headers:
        if k == b"retry-after":
            try:
                return max(0.0, float(v))
            except ValueError:
                return 0.0  # an HTTP date: the header itself still goes to the client
    return 0.0


def _detail(body: bytes) -> str:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", ""))[:300]
    if isinstance(err, str):
        return err[:300]
    return ""


def _is_error_body(body: bytes) -> bool:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict)


def status_error(status: int, body: bytes, headers: Headers, upstream: int,
                 client: int) -> GatewayError:
    """The error a held upstream answer (`status`, `body`, `headers`) becomes."""
    if 300 <= status < 400:
        return E.UpstreamError(f"Upstream answered with a redirect ({status}); redirects are not followed")
    detail = _detail(body)
    extra = client_headers(headers, upstream, client)
    retry = _retry_after(headers)
    if status == 429:
        exc: GatewayError = E.RateLimited(f"Upstream rate limited the request: {detail}".rstrip(": "),
                                          retry_after=retry, headers=extra)
        if upstream == client:
            if _is_error_body(body):  # the provider's own, e.g. OpenAI's type "tokens"
                exc.upstream_body = body  # type: ignore[attr-defined]
        elif client == ANTHROPIC:
            exc.upstream_body = te.openai_error_to_anthropic(status, body)  # type: ignore[attr-defined]
        else:
            exc.upstream_body = te.anthropic_error_to_openai(status, body)  # type: ignore[attr-defined]
        return exc
    return E.UpstreamError(f"Upstream error {status}: {detail}".rstrip(": "), retry_after=retry,
                           headers=extra)
