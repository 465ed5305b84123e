"""Every error code the gateway can raise renders with its own status and code on both
protocols: nothing falls through to 500 / internal_error / api_error.

The walk is over the source: every `Denial(status, "code", ...)` in limits/ and every
GatewayError subclass in relay.errors, so a code added later is checked without
anyone remembering to list it here.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from relay import errors as E

ROOT = Path(__file__).resolve().parent.parent

# Anthropic's documented error types (docs.anthropic.com, "Errors").
ANTHROPIC_TYPES = {
    "invalid_request_error", "authentication_error", "billing_error", "permission_error",
    "not_found_error", "request_too_large", "rate_limit_error", "api_error",
    "overloaded_error", "timeout_error",
}


def _limits_codes() -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    for path in (ROOT / "limits").glob("*.py"):
        text = path.read_text()
        found.update((int(s), c) for s, c in re.findall(r'Denial\(\s*(\d{3}),\s*"([a-z_]+)"', text))
    return found


def _relay_codes() -> set[tuple[int, str]]:
    out = set()
    stack = list(E.GatewayError.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__ == "relay.errors":
            out.add((cls.status, cls.openai_code))
    return out


LIMITS_CODES = sorted(_limits_codes())
ALL_CODES = sorted(set(LIMITS_CODES) | _relay_codes())


def test_the_walk_finds_the_codes_limits_raises() -> None:
    codes = {c for _, c in LIMITS_CODES}
    assert {"invalid_api_key", "model_not_allowed", "ip_not_allowed", "ip_limit_exceeded",
            "insufficient_quota", "rate_limit_exceeded"} <= codes


@pytest.mark.parametrize(("status", "code"), ALL_CODES, ids=[c for _, c in ALL_CODES])
def test_every_code_renders_on_both_protocols(status: int, code: str) -> None:
    exc = E.from_code(code, "why it was refused", status)
    assert exc.status == status
    assert type(exc) is not E.GatewayError, f"{code} is missing from relay.errors.BY_CODE"

    openai = orjson.loads(E.render(exc, E.OPENAI))["error"]
    assert openai["code"] == code
    assert openai["message"] == "why it was refused"
    assert openai["type"] != "server_error" or status >= 500
    assert "param" in openai

    anthropic = orjson.loads(E.render(exc, E.ANTHROPIC))
    assert anthropic["type"] == "error"
    assert anthropic["error"]["type"] in ANTHROPIC_TYPES
    assert anthropic["error"]["message"] == "why it was refused"
    if 400 <= status < 500:
        assert anthropic["error"]["type"] != "api_error", code
    if status == 403:
        assert anthropic["error"]["type"] == "permission_error"


@pytest.mark.parametrize(("status", "code"), LIMITS_CODES, ids=[c for _, c in LIMITS_CODES])
def test_every_denial_keeps_its_status_through_the_family(status: int, code: str) -> None:
    # The status the limiter chose is the status the client sees, with or without the
    # status argument (a code that maps to a class of another status would be a lie).
    assert E.from_code(code, "m").status == status


async def test_an_address_outside_the_allowlist_is_403_ip_not_allowed_on_both_routes(
    pg_dsn: str,
) -> None:
    import aiohttp

    from tests.gateway import Harness

    h = await Harness().start(pg_dsn)
    try:
        _, _, secret = await h.user_and_key(allowed_cidrs=["10.9.8.0/24"])
        async with aiohttp.ClientSession() as s:
            async with s.post(h.url + "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                              json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 403
                assert (await r.json())["error"]["code"] == "ip_not_allowed"
            async with s.post(h.url + "/v1/messages", headers={"x-api-key": secret},
                              json={"model": "claude-sonnet-4-6", "max_tokens": 5,
                                    "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 403
                assert (await r.json())["error"]["type"] == "permission_error"
    finally:
        await h.stop()
