"""Errors cross protocols: a failing channel of the other protocol reaches the client in
the client's own shape, status kept, Retry-After and rate-limit headers renamed; the
client gets one request id, the gateway's.

The upstreams here are scripted: each answers every request with one fixed status,
body and head, as a provider would.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from relay.translate import ratelimit
from tests.gateway import Harness, read_request

KEY_ENV = "TOLLWAY_TEST_UPSTREAM_KEY"
CHAT = {"model": "cross-model", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "cross-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


class Scripted:
    def __init__(self, status: int, body: dict[str, Any], headers: list[tuple[str, str]]) -> None:
        self.status, self.body, self.headers = status, orjson.dumps(body), headers
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                head = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
                writer.write(f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\n{head}"
                             f"content-length: {len(self.body)}\r\n\r\n".encode() + self.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _instant(seconds_from_now: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds_from_now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def anthropic_429() -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
    """Built when the test runs: its reset instant is 30 s from then, not from import
    (the whole suite runs between the two)."""
    return (429, {"type": "error", "error": {"type": "rate_limit_error",
                                             "message": "Number of request tokens has exceeded your per-minute rate limit"}},
            [("retry-after", "7"), ("anthropic-ratelimit-requests-limit", "50"),
             ("anthropic-ratelimit-requests-remaining", "0"),
             ("anthropic-ratelimit-requests-reset", _instant(30)),
             ("anthropic-ratelimit-input-tokens-limit", "40000"),
             ("request-id", "req_upstream_anthropic_1")])


OPENAI_429 = (429, {"error": {"message": "Rate limit reached for requests", "type": "requests",
                              "param": None, "code": "rate_limit_exceeded"}},
              [("retry-after", "5"), ("x-ratelimit-limit-requests", "500"),
               ("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "1m30s"),
               ("x-request-id", "req_upstream_openai_1")])


async def _gateway(pg_dsn: str, up: Scripted, protocol: str) -> Harness:
    base = f"http://127.0.0.1:{up.port}" + ("/v1" if protocol == "openai" else "")
    return await Harness().start(pg_dsn, upstream={"max_attempts": 1}, channels=[
        {"name": f"only-{protocol}", "protocol": protocol, "base_url": base, "api_key_env": KEY_ENV,
         "models": ["cross-model"]}])


def _one(headers: Any, name: str) -> str:
    values = headers.getall(name, [])
    assert len(values) == 1, (name, values)
    return str(values[0])


async def test_anthropic_429_reaches_an_openai_client_in_openai_shape(pg_dsn: str) -> None:
    async with Scripted(*anthropic_429()) as up:
        h = await _gateway(pg_dsn, up, "anthropic")
        try:
            _, _, secret = await h.user_and_key()
            async with aiohttp.ClientSession() as s, s.post(
                    h.url + "/v1/chat/completions", json=CHAT,
                    headers={"authorization": f"Bearer {secret}"}) as r:
                body = await r.json()
                assert r.status == 429
                err = body["error"]
                assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
                assert "param" in err and "per-minute rate limit" in err["message"]
                assert _one(r.headers, "retry-after") == "7"
                assert _one(r.headers, "x-ratelimit-limit-requests") == "50"
                assert _one(r.headers, "x-ratelimit-remaining-requests") == "0"
                reset = ratelimit.parse_duration(_one(r.headers, "x-ratelimit-reset-requests").encode())
                assert reset is not None and 20 <= reset <= 31
                assert not [k for k in r.headers if k.lower().startswith("anthropic-")]
                assert "request-id" not in r.headers
                assert _one(r.headers, "x-request-id").startswith("req_")
                assert _one(r.headers, "x-request-id") != "req_upstream_anthropic_1"
            client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key=secret, max_retries=0)
            with pytest.raises(openai.RateLimitError) as ei:
                await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            assert ei.value.code == "rate_limit_exceeded"
            await client.close()
        finally:
            await h.stop()


async def test_openai_429_reaches_an_anthropic_client_in_anthropic_shape(pg_dsn: str) -> None:
    async with Scripted(*OPENAI_429) as up:
        h = await _gateway(pg_dsn, up, "openai")
        try:
            _, _, secret = await h.user_and_key()
            async with aiohttp.ClientSession() as s, s.post(
                    h.url + "/v1/messages", json=MSG, headers={"x-api-key": secret}) as r:
                body = await r.json()
                assert r.status == 429
                assert body["type"] == "error"
                assert body["error"]["type"] == "rate_limit_error"
                assert "Rate limit reached" in body["error"]["message"]
                assert _one(r.headers, "retry-after") == "5"
                assert _one(r.headers, "anthropic-ratelimit-requests-limit") == "500"
                reset = datetime.fromisoformat(_one(r.headers, "anthropic-ratelimit-requests-reset")
                                               .replace("Z", "+00:00")).timestamp()
                assert 80 <= reset - time.time() <= 91
                assert not [k for k in r.headers if k.lower().startswith("x-ratelimit-")]
                assert _one(r.headers, "request-id") == _one(r.headers, "x-request-id")
            client = anthropic.AsyncAnthropic(base_url=h.url, api_key=secret, max_retries=0)
            with pytest.raises(anthropic.RateLimitError) as ei:
                await client.messages.create(**MSG)  # type: ignore[call-overload]
            assert ei.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
            assert ei.value.response.headers["request-id"].startswith("req_")
            await client.close()
        finally:
            await h.stop()


async def test_openai_insufficient_quota_is_a_billing_error_for_an_anthropic_client(pg_dsn: str) -> None:
    body = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                      "param": None, "code": "insufficient_quota"}}
    async with Scripted(429, body, []) as up:
        h = await _gateway(pg_dsn, up, "openai")
        try:
            _, _, secret = await h.user_and_key()
            async with aiohttp.ClientSession() as s, s.post(
                    h.url + "/v1/messages", json=MSG, headers={"x-api-key": secret}) as r:
                assert r.status == 429
                assert (await r.json())["error"]["type"] == "billing_error"
        finally:
            await h.stop()


async def test_native_429_keeps_the_providers_body_and_headers(pg_dsn: str) -> None:
    async with Scripted(*OPENAI_429) as up:
        h = await _gateway(pg_dsn, up, "openai")
        try:
            _, _, secret = await h.user_and_key()
            async with aiohttp.ClientSession() as s, s.post(
                    h.url + "/v1/chat/completions", json=CHAT,
                    headers={"authorization": f"Bearer {secret}"}) as r:
                assert r.status == 429
                assert (await r.json()) == OPENAI_429[1]
                assert _one(r.headers, "retry-after") == "5"
                assert _one(r.headers, "x-ratelimit-reset-requests") == "1m30s"
                assert _one(r.headers, "x-request-id") != "req_upstream_openai_1"
        finally:
            await h.stop()


async def test_a_translated_4xx_carries_renamed_headers_and_one_request_id(pg_dsn: str) -> None:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}}
    heads = [("anthropic-ratelimit-requests-remaining", "49"), ("request-id", "req_upstream_x")]
    async with Scripted(400, body, heads) as up:
        h = await _gateway(pg_dsn, up, "anthropic")
        try:
            _, _, secret = await h.user_and_key()
            async with aiohttp.ClientSession() as s, s.post(
                    h.url + "/v1/chat/completions", json=CHAT,
                    headers={"authorization": f"Bearer {secret}"}) as r:
                assert r.status == 400
                assert (await r.json())["error"]["type"] == "invalid_request_error"
                assert _one(r.headers, "x-ratelimit-remaining-requests") == "49"
                assert "request-id" not in r.headers
                assert _one(r.headers, "x-request-id") != "req_upstream_x"
        finally:
            await h.stop()


async def test_native_anthropic_answers_with_one_request_id(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn)  # the mock sends its own request-id
    try:
        _, _, secret = await h.user_and_key()
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                async with s.post(h.url + "/v1/messages", json={
                        "model": "claude-sonnet-4-6", "max_tokens": 16, "stream": stream,
                        "messages": [{"role": "user", "content": "hi"}]},
                        headers={"x-api-key": secret}) as r:
                    await r.read()
                    assert r.status == 200
                    assert _one(r.headers, "request-id") == _one(r.headers, "x-request-id")
    finally:
        await h.stop()


def test_duration_round_trip() -> None:
    for text, secs in ((b"20ms", 0.02), (b"1s", 1.0), (b"6m0s", 360.0), (b"1h2m3s", 3723.0),
                       (b"1.5s", 1.5)):
        assert ratelimit.parse_duration(text) == secs
    assert ratelimit.parse_duration(b"soon") is None
    assert ratelimit.format_duration(90) == b"1m30s" and ratelimit.format_duration(0.25) == b"250ms"
