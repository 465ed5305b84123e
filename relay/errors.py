"""The one error family of the relay, and the one place that renders it.

    GatewayError                      status  OpenAI code           Anthropic type
    ├── InvalidRequest                400     invalid_request       invalid_request_error
    ├── InvalidKey                    401     invalid_api_key       authentication_error
    ├── InsufficientQuota             402     insufficient_quota    billing_error
    ├── ModelNotAllowed               403     model_not_allowed     permission_error
    ├── IpNotAllowed                  403     ip_not_allowed        permission_error
    ├── IpLimitExceeded               403     ip_limit_exceeded     permission_error
    ├── ModelNotFound                 404     model_not_found       not_found_error
    ├── NotFound                      404     not_found             not_found_error
    ├── MethodNotAllowed              405     method_not_allowed    invalid_request_error
    ├── RequestTooLarge               413     request_too_large     request_too_large
    ├── RateLimited                   429     rate_limit_exceeded   rate_limit_error
    ├── UpstreamError                 502     upstream_error        api_error
    ├── NoChannel                     503     upstream_error        overloaded_error
    └── UpstreamTimeout               504     upstream_timeout      api_error

Classes carry their status and protocol codes as attributes (as asyncpg attaches
`sqlstate`); `render()` turns one into bytes in the route's protocol. Nothing here
does I/O. Upstream exceptions are translated into this family only in relay.upstream.
"""

from __future__ import annotations

import orjson

OPENAI = 0
ANTHROPIC = 1


class GatewayError(Exception):
    status = 500
    openai_code = "internal_error"
    openai_type = "server_error"
    anthropic_type = "api_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 0.0,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        status: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = headers
        if status:
            self.status = status


class InvalidRequest(GatewayError):
    status = 400
    openai_code = "invalid_request"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class InvalidKey(GatewayError):
    status = 401
    openai_code = "invalid_api_key"
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"


class InsufficientQuota(GatewayError):
    status = 402
    openai_code = "insufficient_quota"
    openai_type = "insufficient_quota"
    anthropic_type = "billing_error"


class ModelNotAllowed(GatewayError):
    status = 403
    openai_code = "model_not_allowed"
    openai_type = "invalid_request_error"
    anthropic_type = "permission_error"


class IpNotAllowed(GatewayError):
    """The client address is outside the key's allowlist."""

    status = 403
    openai_code = "ip_not_allowed"
    openai_type = "invalid_request_error"
    anthropic_type = "permission_error"


class IpLimitExceeded(GatewayError):
    """The account already used its distinct client addresses for the window."""

    status = 403
    openai_code = "ip_limit_exceeded"
    openai_type = "invalid_request_error"
    anthropic_type = "permission_error"


class ModelNotFound(GatewayError):
    status = 404
    openai_code = "model_not_found"
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"


class NotFound(GatewayError):
    status = 404
    openai_code = "not_found"
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"


class MethodNotAllowed(GatewayError):
    status = 405
    openai_code = "method_not_allowed"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class RequestTooLarge(GatewayError):
    status = 413
    openai_code = "request_too_large"
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    openai_code = "rate_limit_exceeded"
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"


class UpstreamError(GatewayError):
    status = 502
    openai_code = "upstream_error"
    openai_type = "server_error"
    anthropic_type = "api_error"


class NoChannel(GatewayError):
    status = 503
    openai_code = "upstream_error"
    openai_type = "server_error"
    anthropic_type = "overloaded_error"


class UpstreamTimeout(GatewayError):
    status = 504
    openai_code = "upstream_timeout"
    openai_type = "server_error"
    anthropic_type = "api_error"


# Denials from limits arrive as (status, code); map them onto the family. Every code
# limits/ can return must be here (tests/test_error_codes.py walks the source), else it
# renders as a 500-shaped internal_error. NoChannel shares UpstreamError's code.
BY_CODE: dict[str, type[GatewayError]] = {
    cls.openai_code: cls
    for cls in (
        InvalidRequest, InvalidKey, InsufficientQuota, ModelNotAllowed, IpNotAllowed,
        IpLimitExceeded, ModelNotFound, NotFound, MethodNotAllowed, RequestTooLarge,
        RateLimited, UpstreamError, UpstreamTimeout,
    )
}


def from_code(code: str, message: str, status: int = 0, **kw: object) -> GatewayError:
    cls = BY_CODE.get(code, GatewayError)
    return cls(message, status=status, **kw)  # type: ignore[arg-type]


def render(exc: GatewayError, protocol: int) -> bytes:
    """The JSON error body in the route's protocol shape."""
    if protocol == ANTHROPIC:
        return orjson.dumps(
            {"type": "error", "error": {"type": exc.anthropic_type, "message": exc.message}}
        )
    return orjson.dumps(
        {
            "error": {
                "message": exc.message,
                "type": exc.openai_type,
                "param": None,
                "code": exc.openai_code,
            }
        }
    )


def render_stream_event(exc: GatewayError, protocol: int) -> bytes:
    """One SSE error event for a failure after a stream has started."""
    body = render(exc, protocol)
    if protocol == ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"
