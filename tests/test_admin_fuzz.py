"""Schema-driven fuzzing of the admin API: schemathesis generates requests from
relay/openapi.yaml and sends them to a live gateway with the admin token set.

Checks, per operation: no 5xx for anything (valid or not), and for requests that follow
the schema, answers whose status, content type and body the document declares. The
generator runs in a thread with its own blocking HTTP session, because the gateway under
test shares this test's event loop. Bounded: a few examples per operation, no shrinking
(a failure is reported with its reproducing curl command instead).

schemathesis is a dev dependency; without it this file is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from relay.admin import OPENAPI_PATH
from tests.gateway import Harness

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

TOKEN = "admin-fuzz-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}
POSITIVE_EXAMPLES = 6
NEGATIVE_EXAMPLES = 4


@pytest.fixture
async def gw(pg_dsn: str) -> AsyncIterator[Harness]:
    h = await Harness().start(pg_dsn, admin={"token": TOKEN})
    # Something for the generated ids and names to hit besides 404s.
    await h.user_and_key(balance="5")
    yield h
    await h.stop()


def _operations() -> list[Any]:
    schema = schemathesis.openapi.from_path(str(OPENAPI_PATH))
    # The document itself is YAML, declared as a string; schemathesis parses YAML bodies
    # into objects, so its schema check cannot apply to it.
    return [op for r in schema.get_all_operations() if (op := r.ok()).path != "/admin/v1/openapi.yaml"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _runner(op: Any, session: Any, base_url: str, mode: Any, examples: int,
            checks: list[Callable[..., Any]], failures: list[str]) -> Callable[[], None]:
    """A hypothesis test for one operation that records (not raises) its failures."""
    seen: set[str] = set()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        resp = case.call(base_url=base_url, session=session, headers=AUTH, timeout=10)
        try:
            case.validate_response(resp, checks=checks, headers=AUTH)
        except BaseExceptionGroup as exc:  # schemathesis: a FailureGroup of check failures
            what = "; ".join(f"{type(e).__name__}: {_first_line(e)}" for e in exc.exceptions)
            msg = f"{op.method.upper()} {op.path} -> {resp.status_code}: {what}"
            key = msg
            detail = resp.text[:200]
            if key not in seen and len(failures) < 40:
                seen.add(key)
                failures.append(f"{msg} {detail}\n    repro: {case.as_curl_command(headers=AUTH)}")

    return run


def _fuzz(base_url: str, mode: Any, examples: int, checks: list[Callable[..., Any]]) -> list[str]:
    """Run every operation; return one line per distinct failure (with a repro)."""
    failures: list[str] = []
    session = requests.Session()
    try:
        for op in _operations():
            try:
                _runner(op, session, base_url, mode, examples, checks, failures)()
            except Unsatisfiable:
                continue  # nothing to make invalid (no parameters or body): nothing to test
    finally:
        session.close()
    return failures


@pytest.mark.timeout(50)
async def test_schema_conforming_requests_get_documented_answers(gw: Harness) -> None:
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    failures = await asyncio.to_thread(_fuzz, gw.url, GenerationMode.POSITIVE, POSITIVE_EXAMPLES, checks)
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(50)
async def test_malformed_requests_never_get_a_5xx(gw: Harness) -> None:
    failures = await asyncio.to_thread(_fuzz, gw.url, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES,
                                       [not_a_server_error])
    assert not failures, "\n".join(failures)
