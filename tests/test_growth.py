"""Growth on a real worker and Postgres: sign-up credit, invite codes, the inviter's share of
an invitee's first top-up paid exactly once even when the payment webhook is retried ten
times concurrently, and the top-up minimum."""

from __future__ import annotations

import asyncio
import secrets
from fractions import Fraction
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from accounting import growth, store
from relay.config import ConfigError, parse
from tests.gateway import Harness

USD = 1_000_000_000
TOKEN = "growth-admin-token-0123456789abcdef"


def uname() -> str:
    return f"g_{secrets.token_hex(4)}"


@pytest.fixture
async def gw(pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    h = await Harness().start(pg_dsn, admin={"token": TOKEN, "min_topup": "1"},
                              growth={"signup_credit": "0.5", "invite_credit": "1.25",
                                      "invite_share": "0.1"})
    yield h
    await h.stop()


async def call(http: aiohttp.ClientSession, h: Harness, method: str, path: str, body: Any = None,
               ok: int | None = None) -> tuple[int, Any]:
    async with http.request(method, h.url + "/admin/v1" + path,
                            data=None if body is None else orjson.dumps(body),
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        out = orjson.loads(await r.read())
        if ok is not None:
            assert r.status == ok, (r.status, out)
        return r.status, out


async def test_signup_invite_and_first_topup_reward_once(gw: Harness, pg: asyncpg.Connection) -> None:
    async with aiohttp.ClientSession() as http:
        _, plain = await call(http, gw, "POST", "/signup", {"name": uname()}, ok=201)
        assert plain["balance_nano"] == USD // 2 and plain["inviter_id"] is None

        _, inviter = await call(http, gw, "POST", "/users", {"name": uname()}, ok=201)
        _, code = await call(http, gw, "POST", f"/users/{inviter['id']}/invite-codes", {"max_uses": 1}, ok=201)
        _, invitee = await call(http, gw, "POST", "/signup",
                                {"name": uname(), "invite_code": code["code"].lower()}, ok=201)
        assert invitee["inviter_id"] == inviter["id"]
        assert invitee["balance_nano"] == USD // 2 + 1_250_000_000
        # The code had one use: a second sign-up with it is refused and creates no user.
        name = uname()
        status, _ = await call(http, gw, "POST", "/signup", {"name": name, "invite_code": code["code"]})
        assert status == 400
        assert await store.get_user(pg, name) is None
        status, _ = await call(http, gw, "POST", "/signup", {"name": uname(), "invite_code": "INV-NOPE"})
        assert status == 404

        # Below the minimum: refused, and it is not the "first top-up".
        await call(http, gw, "POST", "/topups", {"user": invitee["id"], "amount": "0.5",
                                                 "external_id": f"pay-{uname()}"}, ok=400)
        # The payment webhook, retried ten times at once: one credit, one reward.
        pay = {"user": invitee["id"], "amount": "20", "external_id": f"pay-{uname()}"}
        results = await asyncio.gather(*(call(http, gw, "POST", "/topups", pay) for _ in range(10)))
        assert sorted(s for s, _ in results) == [200] * 9 + [201]
        first = next(b for s, b in results if s == 201)
        assert first["invite_reward"] == {"inviter_id": inviter["id"], "amount_usd": "2",
                                          "amount_nano": 2 * USD}
        # A second top-up pays nothing more.
        _, again = await call(http, gw, "POST", "/topups", {"user": invitee["id"], "amount": "30",
                                                            "external_id": f"pay-{uname()}"}, ok=201)
        assert "invite_reward" not in again
        _, shown = await call(http, gw, "GET", f"/users/{inviter['id']}", ok=200)
        assert shown["balance_nano"] == 2 * USD
        _, shown = await call(http, gw, "GET", f"/users/{invitee['id']}", ok=200)
        assert shown["balance_nano"] == USD // 2 + 1_250_000_000 + 50 * USD
        _, listed = await call(http, gw, "GET", f"/users/{inviter['id']}/invite-codes", ok=200)
        assert listed["data"][0]["uses"] == 1
        assert [(i["invitee_id"], i["reward_nano"]) for i in listed["invites"]] == [(invitee["id"], 2 * USD)]
        n = await pg.fetchval("SELECT count(*) FROM topups WHERE user_id = $1 AND external_id LIKE 'invite-reward:%'",
                              inviter["id"])
        assert n == 1


async def test_reward_is_exact_and_claimed_once_across_concurrent_first_topups(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=8)
    try:
        inviter = await store.create_user(pool, uname())
        code = await growth.create_invite_code(pool, inviter)
        terms = growth.Terms(0, 0, Fraction(1, 3))
        got = await growth.signup(pool, uname(), terms, code)
        invitee = got["user_id"]

        async def topup(i: int) -> Any:
            async with pool.acquire() as conn, conn.transaction():
                from accounting import topups

                c = await topups.credit(conn, invitee, 10 * USD + i, f"ext-{invitee}-{i}")
                return await growth.reward_inviter(conn, invitee, c.topup_id, c.amount_nano, terms.share)

        rewards = [r for r in await asyncio.gather(*(topup(i) for i in range(8))) if r is not None]
        assert len(rewards) == 1
        (who, amount), = rewards
        assert who == inviter and amount * 3 <= 10 * USD + 7 and (amount + 1) * 3 > 10 * USD
        bal = await pool.fetchval("SELECT balance_nano FROM users WHERE id = $1", inviter)
        assert bal == amount
    finally:
        await pool.close()


def test_growth_config_is_checked_at_start() -> None:
    assert parse({"growth": {"invite_share": "1/4"}}).growth.invite_share == "1/4"
    for bad in ({"invite_share": "1.5"}, {"signup_credit": "-1"}, {"signup_credit": "abc"}, {"bonus": "1"}):
        with pytest.raises(ConfigError):
            parse({"growth": bad})
