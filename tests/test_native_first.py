"""Native channels first: among usable channels of one priority, the one speaking the
client's protocol answers; translation serves only when no native channel can, or when
the operator mixes them (`upstream.prefer_native = false`)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import asyncpg

from relay.config import ChannelConfig
from relay.errors import ANTHROPIC, OPENAI
from relay.routing import Router
from tests.gateway import Harness

KEY_ENV = "TOLLWAY_TEST_UPSTREAM_KEY"


def _channels(**extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "oa", "protocol": "openai", "base_url": "http://127.0.0.1:{port}/v1",
         "api_key_env": KEY_ENV, "models": ["gpt-4o-mini", "claude-sonnet-4-6"], **extra},
        {"name": "an", "protocol": "anthropic", "base_url": "http://127.0.0.1:{port}",
         "api_key_env": KEY_ENV, "models": ["gpt-4o-mini", "claude-sonnet-4-6"], **extra},
    ]


def _router(prefer_native: bool = True, chat_only: bool = False) -> Router:
    return Router([
        ChannelConfig("oa", "openai", "http://127.0.0.1:1/v1", models=("m",), weight=5,
                      responses_api=not chat_only),
        ChannelConfig("an", "anthropic", "http://127.0.0.1:1", models=("m",), weight=5),
        ChannelConfig("low", "openai", "http://127.0.0.1:1/v1", models=("m",), priority=-1),
    ], prefer_native=prefer_native)


def test_router_puts_the_native_channel_first_in_its_tier() -> None:
    r = _router()
    for _ in range(200):
        assert [c.name for c in r.candidates("m", False, OPENAI)] == ["oa", "an", "low"]
        assert [c.name for c in r.candidates("m", False, ANTHROPIC)][:2] == ["an", "oa"]


def test_a_chat_only_channel_is_not_native_for_responses() -> None:
    r = _router(chat_only=True)
    for _ in range(50):
        names = [c.name for c in r.candidates("m", False, OPENAI, responses=True)]
        assert set(names[:2]) == {"oa", "an"}  # both translate: mixed by weight
    firsts = Counter(r.candidates("m", False, OPENAI, responses=True)[0].name for _ in range(400))
    assert firsts["oa"] > 0 and firsts["an"] > 0
    assert r.candidates("m", False, OPENAI)[0].name == "oa"  # chat is native on it


def test_translation_serves_when_the_native_channel_is_unusable() -> None:
    r = _router()
    oa = r.channel("oa")
    assert oa is not None
    for _ in range(10):
        oa.breaker.record(False, r.clock())
    assert [c.name for c in r.candidates("m", False, OPENAI)] == ["an", "low"]


def test_mixing_by_weight_when_configured() -> None:
    r = _router(prefer_native=False)
    firsts = Counter(r.candidates("m", False, OPENAI)[0].name for _ in range(400))
    assert firsts["oa"] > 50 and firsts["an"] > 50


async def _by_channel(h: Harness, key_id: int) -> Counter[str]:
    await h.flush()
    conn = await asyncpg.connect(h.dsn)
    try:
        rows = await conn.fetch("SELECT channel, status FROM usage_log WHERE key_id = $1", key_id)
    finally:
        await conn.close()
    assert {r["status"] for r in rows} == {200}
    return Counter(r["channel"] for r in rows)


async def _send(h: Harness, secret: str, n: int, path: str, body: dict[str, Any]) -> None:
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as s:
        async def one() -> None:
            async with sem, s.post(h.url + path, json=body,
                                   headers={"authorization": f"Bearer {secret}"}) as r:
                assert r.status == 200, await r.text()
                await r.read()
        await asyncio.gather(*(one() for _ in range(n)))


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


async def test_200_requests_at_equal_priority_are_all_native(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, channels=_channels())
    try:
        _, key_id, secret = await h.user_and_key()
        await _send(h, secret, 200, "/v1/chat/completions", CHAT)
        assert await _by_channel(h, key_id) == Counter({"oa": 200})
        _, key_id, secret = await h.user_and_key()
        await _send(h, secret, 200, "/v1/messages", MSG)
        assert await _by_channel(h, key_id) == Counter({"an": 200})
    finally:
        await h.stop()


async def test_prefer_native_false_mixes_them(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, channels=_channels(), upstream={"prefer_native": False})
    try:
        _, key_id, secret = await h.user_and_key()
        await _send(h, secret, 100, "/v1/chat/completions", CHAT)
        seen = await _by_channel(h, key_id)
        assert seen["oa"] > 0 and seen["an"] > 0
    finally:
        await h.stop()
