"""Error bodies from one protocol rendered in the other's shape.

When a translated request fails upstream, the client must see the error in its own protocol:
OpenAI `{"error": {"message", "type", "param", "code"}}` or Anthropic
`{"type": "error", "error": {"type", "message"}}`. The HTTP status is kept by the caller; these
functions only rewrite the body (and accept non-JSON bodies such as a proxy's HTML page).
They never raise on bad input and do no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.translate.common import JSON

# Anthropic error.type by HTTP status (docs.anthropic.com "Errors"); the DESIGN.md table
# maps upstream timeouts to api_error, so 504 does too.
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}

# OpenAI (error.type, error.code) by Anthropic error.type; codes follow DESIGN.md's table.
_OPENAI_BY_ANTHROPIC_TYPE = {
    "invalid_request_error": ("invalid_request_error", "invalid_request"),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "permission_error": ("permission_error", "permission_denied"),
    "not_found_error": ("not_found_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", "upstream_error"),
    "overloaded_error": ("server_error", "upstream_overloaded"),
    "timeout_error": ("server_error", "upstream_timeout"),
}


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _fallback_message(status: int, body: bytes) -> str:
    text = body[:512].decode("utf-8", "replace").strip()
    return text or f"upstream returned HTTP {status}"


def anthropic_error_type_for(status: int, openai_error: JSON | None = None) -> str:
    """The Anthropic error.type for an OpenAI-side error of this status (and body, if any)."""
    if openai_error is not None:
        code = openai_error.get("code") or openai_error.get("type")
        # OpenAI reports an exhausted account as 429 insufficient_quota; an Anthropic client
        # must not retry it as a rate limit.
        if code == "insufficient_quota":
            return "billing_error"
    if status in _ANTHROPIC_TYPE_BY_STATUS:
        return _ANTHROPIC_TYPE_BY_STATUS[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def openai_error_to_anthropic(status: int, body: bytes) -> bytes:
    """An OpenAI error body (or any body) as an Anthropic error body."""
    parsed = _parse(body)
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or _fallback_message(status, body))
        err_type = anthropic_error_type_for(status, err)
    else:
        message = err if isinstance(err, str) and err else _fallback_message(status, body)
        err_type = anthropic_error_type_for(status)
    return orjson.dumps({"type": "error", "error": {"type": err_type, "message": message}})


def openai_error_fields_for(status: int, anthropic_type: str | None) -> tuple[str, str]:
    """OpenAI (error.type, error.code) for an Anthropic-side error."""
    if anthropic_type in _OPENAI_BY_ANTHROPIC_TYPE:
        return _OPENAI_BY_ANTHROPIC_TYPE[anthropic_type]
    return _OPENAI_BY_ANTHROPIC_TYPE[anthropic_error_type_for(status)]


def anthropic_error_object_to_openai(status: int, err: JSON) -> JSON:
    """The OpenAI `{"error": {...}}` object for an Anthropic `error` object."""
    err_type, code = openai_error_fields_for(status, err.get("type"))
    message = str(err.get("message") or f"upstream returned HTTP {status}")
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def anthropic_error_to_openai(status: int, body: bytes) -> bytes:
    """An Anthropic error body (or any body) as an OpenAI error body."""
    parsed = _parse(body)
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(err, dict):
        err = {"message": _fallback_message(status, body)}
    return orjson.dumps(anthropic_error_object_to_openai(status, err))


def openai_error_object_to_anthropic(status: int, err: JSON) -> JSON:
    """The Anthropic `{"type": "error", "error": {...}}` event for an OpenAI `error` object."""
    message = str(err.get("message") or f"upstream returned HTTP {status}")
    return {
        "type": "error",
        "error": {"type": anthropic_error_type_for(status, err), "message": message},
    }
