"""Failed-auth throttling cannot be turned against users.

A valid key (or admin token) is never throttled by others' failures from the same
address; the address comes from X-Forwarded-For only when the peer is a trusted proxy;
failures count the same on every route that takes a credential; an admin token read
from the environment with a trailing newline works.
"""

from __future__ import annotations

import aiohttp
import pytest

from relay.clientaddr import TrustedProxies
from relay.config import ConfigError, parse
from tests.gateway import Harness

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _post(s: aiohttp.ClientSession, url: str, secret: str, xff: str = "") -> int:
    headers = {"authorization": f"Bearer {secret}"}
    if xff:
        headers["x-forwarded-for"] = xff
    async with s.post(url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
        await r.read()
        return r.status


async def _get(s: aiohttp.ClientSession, url: str, path: str, secret: str) -> int:
    async with s.get(url + path, headers={"authorization": f"Bearer {secret}"}) as r:
        await r.read()
        return r.status


@pytest.fixture
async def gw(pg_dsn: str):
    h = await Harness().start(pg_dsn)  # the default budget: 30 failures a minute
    yield h
    await h.stop()


async def test_forty_bad_keys_do_not_lock_out_a_valid_key_from_the_same_address(gw: Harness) -> None:
    _, _, good = await gw.user_and_key()
    async with aiohttp.ClientSession() as s:
        bad = [await _post(s, gw.url, f"sk-{'x' * 30}{i:04d}") for i in range(40)]
        assert bad[:30] == [401] * 30 and set(bad[30:]) == {429}
        assert await _post(s, gw.url, good) == 200
        assert await _get(s, gw.url, "/v1/me", good) == 200
        assert await _get(s, gw.url, "/v1/models", good) == 200
        # The failing ones stay throttled: the budget is for failures only.
        assert await _post(s, gw.url, "sk-" + "y" * 32) == 429


async def test_failures_count_on_every_route(gw: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            assert await _get(s, gw.url, "/v1/me", f"sk-{'m' * 30}{i:04d}") == 401
        for i in range(10):
            assert await _get(s, gw.url, "/v1/usage", f"sk-{'u' * 30}{i:04d}") == 401
        for i in range(10):
            assert await _get(s, gw.url, "/v1/models", f"sk-{'l' * 30}{i:04d}") == 401
        # 30 failures spent on the key holder's views: the 31st, anywhere, is 429.
        assert await _post(s, gw.url, "sk-" + "z" * 32) == 429
        assert await _get(s, gw.url, "/v1/me", "sk-" + "w" * 32) == 429


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, server={"trusted_proxies": ["127.0.0.0/8"]},
                              limits={"auth_failures_per_minute": 5})
    try:
        async with aiohttp.ClientSession() as s:
            # Behind the proxy, each client has its own budget.
            assert [await _post(s, h.url, f"sk-{'a' * 30}{i:04d}", "10.0.0.1") for i in range(7)] \
                == [401] * 5 + [429] * 2
            assert await _post(s, h.url, "sk-" + "b" * 32, "10.0.0.2") == 401
            # A client cannot pick its address: the proxy appends the real peer, and the
            # walk from the right stops at the first hop that is not a trusted proxy.
            assert await _post(s, h.url, "sk-" + "c" * 32, "10.0.0.3, 10.0.0.1") == 429
            assert await _post(s, h.url, "sk-" + "c" * 32, "10.0.0.1, 10.0.0.4") == 401
    finally:
        await h.stop()


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, limits={"auth_failures_per_minute": 5})
    try:
        async with aiohttp.ClientSession() as s:
            statuses = [await _post(s, h.url, f"sk-{'d' * 30}{i:04d}", f"10.1.0.{i}") for i in range(7)]
            assert statuses == [401] * 5 + [429] * 2  # all from 127.0.0.1, whatever they claim
    finally:
        await h.stop()


async def test_the_allowlist_sees_the_forwarded_client(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, server={"trusted_proxies": ["127.0.0.1"]})
    try:
        _, _, secret = await h.user_and_key(allowed_cidrs=["192.0.2.0/24"])
        async with aiohttp.ClientSession() as s:
            assert await _post(s, h.url, secret, "192.0.2.7") == 200
            assert await _post(s, h.url, secret, "198.51.100.1") == 403
            assert await _post(s, h.url, secret) == 403  # the proxy itself is not the client
    finally:
        await h.stop()


async def test_admin_token_from_the_environment_is_stripped_and_failures_count(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = "admin-token-0123456789abcdef"
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", token + "\n")
    h = await Harness().start(pg_dsn, limits={"auth_failures_per_minute": 3})
    try:
        async with aiohttp.ClientSession() as s:
            statuses = [await _get(s, h.url, "/admin/v1/users", f"wrong-{i}") for i in range(5)]
            assert statuses == [401] * 3 + [429] * 2
            assert await _get(s, h.url, "/admin/v1/users", token) == 200
    finally:
        await h.stop()


def test_trusted_proxies_walk() -> None:
    tp = TrustedProxies(["10.0.0.0/8", "::1"])
    h = [(b"x-forwarded-for", b"203.0.113.9, 10.1.1.1"), (b"x-forwarded-for", b"10.2.2.2")]
    assert tp.client("10.0.0.5", h) == "203.0.113.9"
    assert tp.client("10.0.0.5", [(b"x-forwarded-for", b"garbage, 10.1.1.1")]) == "10.1.1.1"
    assert tp.client("10.0.0.5", []) == "10.0.0.5"
    assert tp.trusts("::ffff:10.1.2.3") and tp.trusts("::1") and not tp.trusts("192.0.2.1")


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies"):
        parse({"server": {"trusted_proxies": ["10.0.0.0/8", "nginx"]}})


