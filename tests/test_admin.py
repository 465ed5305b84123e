"""The admin API end to end: real worker, real mock upstream, real Postgres, HTTP clients."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.gateway import Harness

TOKEN = "admin-test-token-0123456789abcdef"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw(pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    h = await Harness().start(pg_dsn, admin={"token": TOKEN})
    yield h
    await h.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


class Admin:
    def __init__(self, http: aiohttp.ClientSession, gw: Harness, actor: str = "") -> None:
        self.http, self.gw = http, gw
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        if actor:
            self.headers["x-admin-actor"] = actor

    async def call(self, method: str, path: str, body: Any = None, *, ok: int | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
        async with self.http.request(method, self.gw.url + path, data=data,
                                     headers=headers if headers is not None else self.headers) as r:
            raw = await r.read()
            out = orjson.loads(raw) if r.content_type == "application/json" else raw
            if ok is not None:
                assert r.status == ok, (r.status, out)
            return r.status, out

    async def get(self, path: str) -> Any:
        return (await self.call("GET", path, ok=200))[1]


async def chat(http: aiohttp.ClientSession, gw: Harness, secret: str,
               model: str = "gpt-4o-mini") -> tuple[int, str]:
    async with http.post(gw.url + "/v1/chat/completions", data=orjson.dumps({**CHAT, "model": model}),
                         headers={"Authorization": f"Bearer {secret}",
                                  "content-type": "application/json"}) as r:
        await r.read()
        return r.status, r.headers["x-request-id"]


# --- auth ----------------------------------------------------------------------------


async def test_no_token_configured_answers_403_with_how_to(pg_dsn: str, http: aiohttp.ClientSession,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    h = await Harness().start(pg_dsn)
    try:
        for path in ("/admin/v1/users", "/admin/v1/keys/1"):
            async with http.get(h.url + path, headers={"Authorization": "Bearer anything"}) as r:
                body = await r.json()
                assert r.status == 403
                assert "TOLLWAY_ADMIN_TOKEN" in body["error"]["message"]
        # The environment variable switches it on without a config change.
        monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
        async with http.get(h.url + "/admin/v1/users", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
    finally:
        await h.stop()


async def test_wrong_or_missing_token_is_401(gw: Harness, http: aiohttp.ClientSession) -> None:
    a = Admin(http, gw)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"x-api-key": TOKEN[:-1]}):
        status, body = await a.call("GET", "/admin/v1/users", headers=headers)
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
    # A key holder's key is not an admin token either.
    _, _, secret = await gw.user_and_key()
    status, _ = await a.call("GET", "/admin/v1/users", headers={"Authorization": f"Bearer {secret}"})
    assert status == 401
    # The OpenAPI document needs no token.
    async with http.get(gw.url + "/admin/v1/openapi.yaml") as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("application/yaml")
        assert b"openapi: 3.1" in await r.read()


# --- the whole loop: user -> key -> request -> usage views -----------------------------


async def test_user_key_request_usage_views(gw: Harness, http: aiohttp.ClientSession,
                                            pg: asyncpg.Connection) -> None:
    a = Admin(http, gw, actor="ops-alice")
    _, user = await a.call("POST", "/admin/v1/users", {"name": "acme", "balance": "2.50", "rpm": 100},
                           ok=201)
    assert user["balance_usd"] == "2.5" and user["balance_nano"] == 2_500_000_000 and user["rpm"] == 100
    await a.call("POST", "/admin/v1/users", {"name": "acme"}, ok=409)
    await a.call("POST", "/admin/v1/users", {"name": "x", "balance": 2.5}, ok=400)  # floats refused
    await a.call("POST", "/admin/v1/users", {"name": "x", "rmp": 5}, ok=400)  # typo refused

    _, key = await a.call("POST", "/admin/v1/keys", {
        "user": "acme", "name": "ci", "models": ["gpt-4o-mini"], "expires_at": "2099-01-01T00:00:00Z",
        "group": "default", "cap": "1.25", "concurrency": 4, "rpm": 60, "tpm": 100000,
        "allowed_cidrs": ["127.0.0.0/8"]}, ok=201)
    secret = key["secret"]
    assert secret.startswith("sk-") and key["cap_usd"] == "1.25" and key["models"] == ["gpt-4o-mini"]
    assert key["allowed_cidrs"] == ["127.0.0.0/8"] and key["expires_at"].startswith("2099-01-01")
    assert key["user"] == "acme" and key["concurrency"] == 4 and key["tpm"] == 100000

    status, rid = await chat(http, gw, secret)
    assert status == 200
    status, denied = await chat(http, gw, secret, model="gpt-4.1")  # outside the key's models
    assert status == 403
    await gw.flush()

    uid, kid = user["id"], key["id"]
    log = await a.get(f"/admin/v1/requests?key={kid}")
    assert [(r["request_id"], r["status"]) for r in log["data"]] == [(denied, 403), (rid, 200)]
    assert [r["request_id"] for r in (await a.get(f"/admin/v1/requests?key={kid}&errors_only=1"))["data"]] == [denied]
    first = await a.get(f"/admin/v1/requests?key={kid}&limit=1")
    assert [r["request_id"] for r in first["data"]] == [denied] and first["next"]
    second = await a.get(f"/admin/v1/requests?key={kid}&limit=1&cursor={first['next']}")
    assert [r["request_id"] for r in second["data"]] == [rid] and second["next"] is None
    row = log["data"][1]
    assert (await a.get(f"/admin/v1/requests?key={kid}&status=200"))["data"] == [row]
    assert row["model"] == "gpt-4o-mini" and row["status"] == 200 and row["cost_nano"] > 0
    assert (await a.get(f"/admin/v1/requests?request_id={rid}"))["data"][0]["request_id"] == rid
    assert (await a.get("/admin/v1/requests?key=999999"))["data"] == []
    assert (await a.get(f"/admin/v1/requests?key={kid}&status=500"))["data"] == []

    shown = await a.get(f"/admin/v1/requests/{rid}")
    assert shown["usage"]["cost_nano"] == row["cost_nano"]
    assert shown["bill"]["matches_charged"] is True
    assert shown["bill"]["cost_nano"] == row["cost_nano"]
    await a.call("GET", "/admin/v1/requests/req_nope", ok=404)

    series = await a.get(f"/admin/v1/usage/series?user={uid}&bucket=hour")
    assert sum(b["requests"] for b in series["data"]) == 2
    assert sum(b["cost_nano"] for b in series["data"]) == row["cost_nano"]
    days = await a.get("/admin/v1/usage/series?user=acme&bucket=day&model=gpt-4o-mini")
    assert sum(b["cost_nano"] for b in days["data"]) == row["cost_nano"]
    models = await a.get(f"/admin/v1/usage/models?key={kid}")
    assert [(m["model"], m["requests"], m["cost_nano"]) for m in models["data"] if m["cost_nano"]] == [
        ("gpt-4o-mini", 1, row["cost_nano"])]
    assert models["data"][0]["cost_usd"] == row["cost_usd"]

    by_model = await a.get(f"/admin/v1/health?by=model&user={uid}")
    assert {h["model"]: (h["requests"], h["errors"], h["success_rate"]) for h in by_model["data"]} == {
        "gpt-4o-mini": (1, 0, 1.0), "gpt-4.1": (1, 1, 0.0)}
    for by, name in (("group", "group"), ("user", "user_id"), ("key", "key_id")):
        hv = await a.get(f"/admin/v1/health?by={by}&user={uid}&window=2h")
        assert len(hv["data"]) == 1, hv
        h = hv["data"][0]
        assert h[name] == {"group": "default", "user": uid, "key": kid}[by]
        assert (h["requests"], h["errors"], h["success_rate"]) == (2, 1, 0.5), h
        assert h["cost_nano"] == row["cost_nano"] and h["cache_hit_rate"] == 0.0
        assert h["avg_latency_ms"] is not None and h["last_at"]
    assert (await a.get("/admin/v1/health?by=user&user=acme"))["data"][0]["user_name"] == "acme"
    week = await a.get(f"/admin/v1/health?by=key&user={uid}&window=7d")
    # A window longer than two days covers whole UTC days, and says so.
    assert week["start"].endswith("T00:00:00+00:00") and week["end"].endswith("T00:00:00+00:00")
    assert week["data"][0]["requests"] == 2
    await a.call("GET", "/admin/v1/health?by=planet", ok=400)
    await a.call("GET", "/admin/v1/usage/series?start=yesterday", ok=400)

    shown_user = await a.get("/admin/v1/users/acme")
    assert shown_user["id"] == uid and shown_user["keys"] == 1
    assert shown_user["balance_nano"] == 2_500_000_000 - row["cost_nano"]

    audit = await a.get("/admin/v1/audit?actor=ops-alice")
    actions = [e["action"] for e in audit["data"]]
    assert actions == ["key.create", "user.create"]
    assert audit["data"][0]["detail"]["key_prefix"] == key["key_prefix"]
    text = await pg.fetchval("SELECT string_agg(actor || action || target || detail::text, ' ')"
                             " FROM audit_log")
    assert secret not in text and secret[8:] not in text and TOKEN not in text


# --- top-ups -----------------------------------------------------------------------------


async def test_topup_retried_ten_times_credits_once(gw: Harness, http: aiohttp.ClientSession,
                                                    pg: asyncpg.Connection) -> None:
    a = Admin(http, gw)
    _, user = await a.call("POST", "/admin/v1/users", {"name": "payer"}, ok=201)
    body = {"user": "payer", "amount": "7.30", "external_id": "stripe_evt_42"}
    results = await asyncio.gather(*(a.call("POST", "/admin/v1/topups", body) for _ in range(10)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * 9 + [201]
    assert {r["topup_id"] for _, r in results} == {results[0][1]["topup_id"]}
    assert sum(1 for _, r in results if r["duplicate"]) == 9
    assert await pg.fetchval("SELECT balance_nano FROM users WHERE id = $1", user["id"]) == 7_300_000_000
    assert await pg.fetchval("SELECT count(*) FROM topups WHERE external_id = 'stripe_evt_42'") == 1
    assert await pg.fetchval("SELECT count(*) FROM audit_log WHERE action = 'user.topup'"
                             " AND target = $1", str(user["id"])) == 1
    # The same id with another amount is a conflict, not a second credit.
    await a.call("POST", "/admin/v1/topups", {**body, "amount": "8"}, ok=409)
    await a.call("POST", "/admin/v1/topups", {"user": "payer", "amount": "1"}, ok=400)  # no id
    # Per-user route, by id, without an external id: every call credits.
    for _ in range(2):
        _, c = await a.call("POST", f"/admin/v1/users/{user['id']}/topups", {"amount_nano": 50_000_000}, ok=201)
    assert c["balance_nano"] == 7_400_000_000 and c["duplicate"] is False
    await a.call("POST", "/admin/v1/users/payer/topups", {"amount": "0.009"}, ok=400)  # below min
    await a.call("POST", "/admin/v1/users/payer/topups", {"amount": "-1"}, ok=400)
    await a.call("POST", "/admin/v1/users/payer/topups", {"amount": "1e400"}, ok=400)
    await a.call("POST", "/admin/v1/users/nobody/topups", {"amount": "1"}, ok=404)
    listed = await a.get("/admin/v1/users/payer/topups?limit=2")
    assert [t["amount_nano"] for t in listed["data"]] == [50_000_000] * 2 and listed["next"] is not None
    rest = await a.get(f"/admin/v1/users/payer/topups?cursor={listed['next']}")
    assert [t["amount_usd"] for t in rest["data"]] == ["7.3"]


# --- keys --------------------------------------------------------------------------------


async def test_key_lifecycle_takes_effect_within_a_second(gw: Harness, http: aiohttp.ClientSession,
                                                          pg: asyncpg.Connection) -> None:
    a = Admin(http, gw)
    await a.call("POST", "/admin/v1/users", {"name": "kl", "balance": "5"}, ok=201)
    _, key = await a.call("POST", "/admin/v1/keys", {"user": "kl", "name": "app"}, ok=201)
    secret, kid = key["secret"], key["id"]
    assert (await chat(http, gw, secret))[0] == 200

    async def refused_within(secret: str, want: int) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            if (await chat(http, gw, secret))[0] == want:
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        raise AssertionError(f"status {want} not seen within 1 s")

    await a.call("POST", f"/admin/v1/keys/{kid}/disable", ok=200)
    await refused_within(secret, 401)
    await a.call("POST", f"/admin/v1/keys/{kid}/enable", ok=200)
    await refused_within(secret, 200)

    _, reset = await a.call("POST", f"/admin/v1/keys/{kid}/reset", ok=200)
    new = reset["secret"]
    assert new != secret and reset["id"] == kid
    await refused_within(secret, 401)
    assert (await chat(http, gw, new))[0] == 200

    _, edited = await a.call("PATCH", f"/admin/v1/keys/{kid}", {"models": ["claude-*"], "cap": "0.5",
                                                                 "expires_at": None}, ok=200)
    assert edited["models"] == ["claude-*"] and edited["cap_nano"] == 500_000_000
    await refused_within(new, 403)
    await a.call("PATCH", f"/admin/v1/keys/{kid}", {"group": "no-such-group"}, ok=404)
    await a.call("PATCH", f"/admin/v1/keys/{kid}", {"allowed_cidrs": ["not-a-net"]}, ok=400)

    # Disabling the user refuses its keys too.
    await a.call("PATCH", f"/admin/v1/keys/{kid}", {"models": None}, ok=200)
    await a.call("DELETE", "/admin/v1/users/kl", ok=200)
    await refused_within(new, 401)
    await a.call("PATCH", "/admin/v1/users/kl", {"status": "active"}, ok=200)
    await refused_within(new, 200)

    await a.call("DELETE", f"/admin/v1/keys/{kid}", ok=200)
    await refused_within(new, 401)
    await a.call("POST", f"/admin/v1/keys/{kid}/enable", ok=404)  # deleted stays deleted
    assert (await a.get(f"/admin/v1/keys/{kid}"))["status"] == "deleted"
    await a.call("GET", "/admin/v1/keys/x1", ok=404)

    text = await pg.fetchval("SELECT string_agg(detail::text || target, ' ') FROM audit_log")
    for s in (secret, new):
        assert s not in text and s[8:20] not in text
    actions = {r["action"] for r in await pg.fetch(
        "SELECT action FROM audit_log WHERE target = $1", str(kid))}
    assert {"key.create", "key.disable", "key.enable", "key.reset", "key.edit", "key.delete"} <= actions


async def test_batch_keys_and_listing_filters(gw: Harness, http: aiohttp.ClientSession) -> None:
    a = Admin(http, gw)
    await a.call("POST", "/admin/v1/users", {"name": "batcher"}, ok=201)
    await a.call("POST", "/admin/v1/groups", {"name": "vip", "multiplier": "0.8"}, ok=201)
    _, made = await a.call("POST", "/admin/v1/keys/batch", {"user": "batcher", "count": 5, "name": "promo",
                                                            "group": "vip", "rpm": 10}, ok=201)
    keys = made["data"]
    assert len(keys) == 5 and len({k["secret"] for k in keys}) == 5
    assert len({k["name"] for k in keys}) == 5 and all(k["name"].startswith("promo-") for k in keys)
    assert all(k["group"] == "vip" and k["rpm"] == 10 for k in keys)
    assert (await chat(http, gw, keys[0]["secret"]))[0] in (200, 402)  # authenticates (no balance)
    await a.call("POST", "/admin/v1/keys/batch", {"user": "batcher", "count": 0}, ok=400)
    await a.call("POST", "/admin/v1/keys/batch", {"user": "batcher", "count": 2, "group": "nope"}, ok=404)

    page = await a.get("/admin/v1/keys?user=batcher&group=vip&limit=3")
    assert len(page["data"]) == 3 and page["next"] == "3"
    page2 = await a.get(f"/admin/v1/keys?user=batcher&group=vip&limit=3&cursor={page['next']}")
    assert len(page2["data"]) == 2 and page2["next"] is None
    assert "secret" not in page["data"][0]
    await a.call("POST", f"/admin/v1/keys/{keys[0]['id']}/disable", ok=200)
    assert [k["id"] for k in (await a.get("/admin/v1/keys?user=batcher&status=disabled"))["data"]] == [
        keys[0]["id"]]
    one = await a.get(f"/admin/v1/keys?prefix={keys[1]['key_prefix']}&user=batcher")
    assert [k["id"] for k in one["data"]] == [keys[1]["id"]]
    await a.call("GET", "/admin/v1/keys?status=weird", ok=400)


# --- users, groups, channels, prices, codes -----------------------------------------------


async def test_users_list_edit(gw: Harness, http: aiohttp.ClientSession) -> None:
    a = Admin(http, gw)
    await a.call("POST", "/admin/v1/users", {"name": "zq-edit-user1"}, ok=201)
    _, u = await a.call("PATCH", "/admin/v1/users/zq-edit-user1", {"tpm": 5000, "max_ips": 3}, ok=200)
    assert u["tpm"] == 5000 and u["max_ips"] == 3
    await a.call("PATCH", "/admin/v1/users/zq-edit-user1", {"status": "gone"}, ok=400)
    await a.call("PATCH", "/admin/v1/users/zq-edit-user1", {"tpm": -1}, ok=400)
    await a.call("PATCH", "/admin/v1/users/nobody", {"tpm": 1}, ok=404)
    listed = await a.get("/admin/v1/users?name=zq-edit")
    assert [x["name"] for x in listed["data"]] == ["zq-edit-user1"]
    await a.call("DELETE", "/admin/v1/users/zq-edit-user1", ok=200)
    assert [x["name"] for x in (await a.get("/admin/v1/users?status=disabled&name=zq-edit-user1"))["data"]] == ["zq-edit-user1"]


async def test_groups(gw: Harness, http: aiohttp.ClientSession) -> None:
    a = Admin(http, gw)
    _, g = await a.call("POST", "/admin/v1/groups", {"name": "resell", "multiplier": "2/3",
                                                      "models": ["gpt-*"]}, ok=201)
    assert g == {"name": "resell", "multiplier": "2/3", "models": ["gpt-*"]}
    await a.call("POST", "/admin/v1/groups", {"name": "resell"}, ok=409)
    await a.call("POST", "/admin/v1/groups", {"name": "bad", "multiplier": 0.5}, ok=400)
    await a.call("POST", "/admin/v1/groups", {"name": "bad", "multiplier": "0"}, ok=400)
    _, g = await a.call("PATCH", "/admin/v1/groups/resell", {"multiplier": "1.250"}, ok=200)
    assert g["multiplier"] == "1.25" and g["models"] == ["gpt-*"]
    await a.call("PATCH", "/admin/v1/groups/nope", {"multiplier": "1"}, ok=404)
    names = [x["name"] for x in (await a.get("/admin/v1/groups"))["data"]]
    assert {"default", "resell"} <= set(names)
    assert (await a.get("/admin/v1/groups/resell"))["multiplier"] == "1.25"
    # The worker sees the new multiplier within a second.
    for _ in range(20):
        if str(gw.worker.gw.groups.multiplier.get("resell")) == "5/4":
            break
        await asyncio.sleep(0.1)
    assert str(gw.worker.gw.groups.multiplier["resell"]) == "5/4"


async def test_channels(gw: Harness, http: aiohttp.ClientSession, pg: asyncpg.Connection) -> None:
    a = Admin(http, gw)
    body = {"name": "extra-openai", "protocol": "openai", "base_url": "http://127.0.0.1:9/v1/",
            "api_key_env": "EXTRA_KEY", "models": ["gpt-x"], "model_map": {"gpt-x": "gpt-4o"},
            "headers": {"x-org": "org-secret-value"}, "priority": 2, "weight": 3}
    _, ch = await a.call("POST", "/admin/v1/channels", body, ok=201)
    assert ch["source"] == "admin" and ch["enabled"] and ch["base_url"] == "http://127.0.0.1:9/v1"
    assert ch["model_map"] == {"gpt-x": "gpt-4o"} and ch["weight"] == 3
    await a.call("POST", "/admin/v1/channels", body, ok=409)
    await a.call("POST", "/admin/v1/channels", {**body, "name": "b", "protocol": "grpc"}, ok=400)
    await a.call("POST", "/admin/v1/channels", {"name": "c", "protocol": "openai"}, ok=400)
    _, ch2 = await a.call("PATCH", "/admin/v1/channels/extra-openai", {"weight": 0, "models": ["*"]}, ok=200)
    assert ch2["weight"] == 0 and ch2["models"] == ["*"]
    _, off = await a.call("POST", f"/admin/v1/channels/{ch['id']}/disable", ok=200)
    assert off["enabled"] is False
    row = await pg.fetchrow("SELECT enabled, source FROM channels WHERE name = 'extra-openai'")
    assert (row["enabled"], row["source"]) == (False, "admin")
    # Channels from config.toml: toggled, not edited.
    await a.call("PATCH", "/admin/v1/channels/mock-openai", {"weight": 5}, ok=409)
    _, cfg_off = await a.call("POST", "/admin/v1/channels/mock-openai/disable", ok=200)
    assert cfg_off["enabled"] is False and cfg_off["source"] == "config"
    await a.call("POST", "/admin/v1/channels/mock-openai/enable", ok=200)
    names = [c["name"] for c in (await a.get("/admin/v1/channels"))["data"]]
    assert {"mock-openai", "mock-anthropic", "extra-openai"} <= set(names)
    text = await pg.fetchval("SELECT string_agg(detail::text, ' ') FROM audit_log"
                             " WHERE action LIKE 'channel.%'")
    assert "org-secret-value" not in text and "x-org" in text


async def test_prices(gw: Harness, http: aiohttp.ClientSession) -> None:
    a = Admin(http, gw, actor="pricer")
    _, p = await a.call("POST", "/admin/v1/prices", {"model": "gpt-new", "input": "1.10",
                                                      "output": "4.4", "cache_read": "0.275"}, ok=201)
    assert p["created"] and p["input_usd"] == "1.1" and p["cache_write_nano"] == 1_100_000_000
    _, same = await a.call("POST", "/admin/v1/prices", {"model": "gpt-new", "input": "1.1",
                                                         "output": "4.40", "cache_read": "0.275"}, ok=200)
    assert same["created"] is False and same["version"] == p["version"]
    _, p2 = await a.call("POST", "/admin/v1/prices", {"model": "gpt-new", "input": "1", "output": "4"},
                         ok=201)
    assert p2["version"] > p["version"]
    await a.call("POST", "/admin/v1/prices", {"model": "m", "input": 1.5, "output": "1"}, ok=400)
    await a.call("POST", "/admin/v1/prices", {"model": "m", "input": "0.0000000001", "output": "1"},
                 ok=400)
    await a.call("POST", "/admin/v1/prices", {"model": "m", "input": "1"}, ok=400)
    cur = await a.get("/admin/v1/prices?model=gpt-new")
    assert [(x["version"], x["input_usd"]) for x in cur["data"]] == [(p2["version"], "1")]
    assert "gpt-4o-mini" in {x["model"] for x in (await a.get("/admin/v1/prices"))["data"]}
    hist = await a.get("/admin/v1/prices/history?model=gpt-new")
    assert [h["version"] for h in hist["data"]] == [p2["version"], p["version"]]
    assert hist["data"][0]["created_by"] == "pricer"
    await a.call("GET", "/admin/v1/prices/history", ok=400)
    for _ in range(20):  # the worker's price book picks the version up
        if gw.worker.gw.pricebook.by_version(p2["version"]) is not None:
            break
        await asyncio.sleep(0.1)
    assert gw.worker.gw.pricebook.lookup("gpt-new").version == p2["version"]


async def test_codes(gw: Harness, http: aiohttp.ClientSession, pg: asyncpg.Connection) -> None:
    a = Admin(http, gw)
    _, made = await a.call("POST", "/admin/v1/codes", {"amount": "2.5", "count": 3,
                                                        "expires_at": "2099-12-31"}, ok=201)
    assert made["count"] == 3 and len(set(made["codes"])) == 3 and made["amount_nano"] == 2_500_000_000
    batch = made["batch_id"]
    listed = await a.get(f"/admin/v1/codes?batch={batch}")
    assert len(listed["data"]) == 3
    assert {c["state"] for c in listed["data"]} == {"unused"}
    prefix = made["codes"][0][:7]
    shown = await a.get(f"/admin/v1/codes/{prefix.lower()}")
    assert [c["prefix"] for c in shown["data"]] == [prefix]
    await a.call("GET", "/admin/v1/codes/TW-ZZZZZZZ", ok=404)
    await a.call("POST", "/admin/v1/codes", {"amount": "1", "count": 0}, ok=400)
    await a.call("GET", "/admin/v1/codes?state=lost", ok=400)
    text = await pg.fetchval("SELECT string_agg(detail::text || target, ' ') FROM audit_log")
    for code in made["codes"]:
        assert code not in text and code[8:] not in text


async def test_unknown_route_and_method(gw: Harness, http: aiohttp.ClientSession) -> None:
    a = Admin(http, gw)
    status, body = await a.call("GET", "/admin/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _ = await a.call("PUT", "/admin/v1/users")
    assert status == 405
    status, body = await a.call("POST", "/admin/v1/users", b"not json")
    assert status == 400


async def test_channel_health_reports_the_breaker(gw: Harness, http: aiohttp.ClientSession) -> None:
    a = Admin(http, gw)
    _, _, secret = await gw.user_and_key()
    assert (await chat(http, gw, secret))[0] == 200
    health = await a.get("/admin/v1/channels/mock-openai/health")
    assert health["channel"] == "mock-openai" and health["state"] == "closed"
    assert health["window_requests"] >= 1 and health["error_rate"] == 0
    await a.call("GET", "/admin/v1/channels/no-such-channel/health", ok=404)
    await a.call("GET", "/admin/v1/channels/mock-openai/health", ok=401, headers={})
