"""The key holder's API end to end: own usage only, bills, redemption, billing endpoints."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from accounting import codes
from accounting.money import parse_usd
from tests.gateway import Harness

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw(pg_dsn: str):
    h = await Harness().start(pg_dsn)
    yield h
    await h.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


async def call(http: aiohttp.ClientSession, gw: Harness, secret: str, method: str, path: str,
               body: Any = None) -> tuple[int, Any]:
    async with http.request(method, gw.url + path, data=None if body is None else orjson.dumps(body),
                            headers={"Authorization": f"Bearer {secret}"}) as r:
        raw = await r.read()
        return r.status, orjson.loads(raw) if raw else None


async def chat(http: aiohttp.ClientSession, gw: Harness, secret: str, client_rid: str = "") -> str:
    headers = {"Authorization": f"Bearer {secret}", "content-type": "application/json"}
    if client_rid:
        headers["x-request-id"] = client_rid
    async with http.post(gw.url + "/v1/chat/completions", data=orjson.dumps(CHAT), headers=headers) as r:
        await r.read()
        assert r.status == 200
        return r.headers["x-request-id"]


async def test_key_holder_sees_only_its_own_usage(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, kid_a, a = await gw.user_and_key()
    uid_b, kid_b, b = await gw.user_and_key()
    # A second key of the same user is still "another key".
    from accounting import store

    conn = await asyncpg.connect(gw.dsn)
    try:
        kid_b2, b2 = await store.create_key(conn, uid_b, name="other")
    finally:
        await conn.close()
    rids_a = [await chat(http, gw, a) for _ in range(2)]
    rid_b = await chat(http, gw, b)
    await chat(http, gw, b2, client_rid="shared-client-id")
    await chat(http, gw, a, client_rid="shared-client-id")
    rid_b2 = await chat(http, gw, b2)
    await gw.flush()

    status, mine = await call(http, gw, a, "GET", "/v1/usage")
    assert status == 200 and mine["key_id"] == kid_a
    seen = [r["request_id"] for r in mine["requests"]["data"]]
    assert len(seen) == 3 and set(rids_a) < set(seen)
    assert [r["client_request_id"] for r in mine["requests"]["data"]].count("shared-client-id") == 1
    assert {r["key_id"] for r in mine["requests"]["data"]} == {kid_a}
    assert all("channel" not in r and "client_ip" not in r and "user_id" not in r
               for r in mine["requests"]["data"])
    assert sum(s["requests"] for s in mine["series"]) == 3
    assert [m["model"] for m in mine["models"]] == ["gpt-4o-mini"]
    assert mine["total_cost_nano"] == sum(r["cost_nano"] for r in mine["requests"]["data"]) > 0

    # Paging keeps to the key.
    status, page = await call(http, gw, a, "GET", "/v1/usage?limit=2")
    assert len(page["requests"]["data"]) == 2 and page["requests"]["next"]
    status, rest = await call(http, gw, a, "GET", f"/v1/usage?limit=2&cursor={page['requests']['next']}")
    assert status == 200 and [r["key_id"] for r in rest["requests"]["data"]] == [kid_a]

    status, one = await call(http, gw, a, "GET", f"/v1/usage/{rids_a[0]}")
    assert status == 200 and one["usage"]["request_id"] == rids_a[0]
    assert one["bill"]["matches_charged"] is True and one["bill"]["cost_nano"] == one["usage"]["cost_nano"]
    for foreign in (rid_b, rid_b2):
        status, body = await call(http, gw, a, "GET", f"/v1/usage/{foreign}")
        assert status == 404 and body["error"]["code"] == "not_found"
    # A client request id shared with another key resolves to the caller's own row.
    for secret, want in ((a, kid_a), (b2, kid_b2)):
        status, own = await call(http, gw, secret, "GET", "/v1/usage/shared-client-id")
        assert status == 200 and own["usage"]["key_id"] == want
        assert own["usage"]["client_request_id"] == "shared-client-id"
    status, _ = await call(http, gw, b, "GET", "/v1/usage/shared-client-id")
    assert status == 404
    assert kid_b != kid_b2


async def test_auth_is_required_and_refuses_disabled_keys(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, kid, secret = await gw.user_and_key()
    for path in ("/v1/usage", "/v1/me", "/v1/dashboard/billing/subscription"):
        status, body = await call(http, gw, "sk-" + "x" * 48, "GET", path)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        async with http.get(gw.url + path) as r:
            assert r.status == 401
    conn = await asyncpg.connect(gw.dsn)
    try:
        await conn.execute("UPDATE keys SET status = 'disabled' WHERE id = $1", kid)
    finally:
        await conn.close()
    for _ in range(20):
        status, _ = await call(http, gw, secret, "GET", "/v1/me")
        if status == 401:
            break
        await asyncio.sleep(0.1)
    assert status == 401
    # Model routes are untouched by the key API's prefixes.
    async with http.get(gw.url + "/v1/messages/nope", headers={"x-api-key": secret}) as r:
        assert r.status == 404
        assert (await r.json())["type"] == "error"  # Anthropic-shaped, from the gateway


async def test_redeem_exactly_once(gw: Harness, http: aiohttp.ClientSession) -> None:
    uid, _, secret = await gw.user_and_key(balance="1")
    uid_other, _, other = await gw.user_and_key(balance="0")
    conn = await asyncpg.connect(gw.dsn)
    try:
        [code] = await codes.create_codes(conn, parse_usd("2.5"), 1)
        results = await asyncio.gather(
            *(call(http, gw, s, "POST", "/v1/redeem", {"code": code.lower()}) for s in (secret, other) * 4))
        ok = [r for s, r in results if s == 200]
        assert len(ok) == 1, results
        assert sorted(s for s, _ in results) == [200] + [409] * 7
        winner_balance = ok[0]["balance_nano"]
        assert ok[0]["amount_nano"] == 2_500_000_000 and ok[0]["amount_usd"] == "2.5"
        total = await conn.fetchval("SELECT sum(balance_nano) FROM users WHERE id = ANY($1::bigint[])",
                                    [uid, uid_other])
        assert total == 3_500_000_000  # 1 + 0 + one credit of 2.5
        assert winner_balance in (3_500_000_000, 2_500_000_000)
        assert await conn.fetchval("SELECT count(*) FROM topups WHERE external_id LIKE 'code:%'"
                                   " AND amount_nano = 2500000000 AND user_id = ANY($1::bigint[])",
                                   [uid, uid_other]) == 1
        audit = await conn.fetchval("SELECT string_agg(detail::text || target, ' ') FROM audit_log"
                                    " WHERE action = 'code.redeem'")
        assert code not in audit and codes.normalize(code) not in audit
    finally:
        await conn.close()
    status, _ = await call(http, gw, secret, "POST", "/v1/redeem", {"code": "TW-AAAA-BBBB-CCCC-DDDD"})
    assert status == 404
    status, _ = await call(http, gw, secret, "POST", "/v1/redeem", {})
    assert status == 400
    # Guessing is bounded per key.
    statuses = [(await call(http, gw, secret, "POST", "/v1/redeem", {"code": f"TW-{i:04d}"}))[0]
                for i in range(12)]
    assert statuses[-1] == 429 and statuses.count(404) <= 10


async def test_me_and_openai_billing_endpoints(gw: Harness, http: aiohttp.ClientSession) -> None:
    _, kid, capped = await gw.user_and_key(balance="10", cap_nano=parse_usd("3"))
    await chat(http, gw, capped)
    await chat(http, gw, capped)
    await gw.flush()
    status, me = await call(http, gw, capped, "GET", "/v1/me")
    assert status == 200 and me["key"]["id"] == kid
    assert me["key"]["cap_usd"] == "3" and me["key"]["cap_nano"] == 3_000_000_000
    spent = me["key"]["spent_nano"]
    assert spent > 0 and me["user"]["balance_nano"] == 10_000_000_000 - spent
    assert me["remaining_nano"] == 3_000_000_000 - spent

    async with http.get(gw.url + "/v1/dashboard/billing/subscription",
                        headers={"Authorization": f"Bearer {capped}"}) as r:
        raw = await r.read()
    sub = orjson.loads(raw)
    assert sub["object"] == "billing_subscription" and sub["hard_limit_usd"] == 3
    assert b'"hard_limit_usd":3,' in raw  # exact decimal literal, no float formatting

    today = datetime.now(UTC).date()
    q = f"start_date={today - timedelta(days=3)}&end_date={today + timedelta(days=1)}"
    for prefix in ("/v1", ""):
        async with http.get(f"{gw.url}{prefix}/dashboard/billing/usage?{q}",
                            headers={"Authorization": f"Bearer {capped}"}) as r:
            assert r.status == 200
            raw = await r.read()
        usage = orjson.loads(raw)
        assert usage["object"] == "list"
        # total_usage is in cents: spent nano-USD / 10^7, printed exactly.
        from accounting.money import format_usd
        assert f'"total_usage":{format_usd(spent * 100)}'.encode() in raw
        [day] = usage["daily_costs"]
        assert [li["name"] for li in day["line_items"]] == ["gpt-4o-mini"]
    status, _ = await call(http, gw, capped, "GET", "/v1/dashboard/billing/usage?start_date=2020-01-01"
                                                     "&end_date=2021-01-01")
    assert status == 400  # over 100 days
    status, _ = await call(http, gw, capped, "GET", "/v1/dashboard/billing/usage?start_date=junk")
    assert status == 400

    # Without a cap the limit is what the account can still spend plus what the key spent.
    _, _, free = await gw.user_and_key(balance="4")
    status, sub = await call(http, gw, free, "GET", "/dashboard/billing/subscription")
    assert status == 200 and sub["hard_limit_usd"] == 4
