"""The console's pages over real HTTP: a key holder never reaches another user's data
through any console URL (written first), then every page and action: keys, usage and
its CSV (equal to the ledger to the nano-dollar), logs and bills, wallet (redeem,
transfer exactly once), plans, invite, pricing, status, in both languages."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import secrets
import time
from datetime import datetime

import aiohttp
import asyncpg
import pytest

from accounting import codes, plans
from tests import console_client as cc
from tests.console_client import Browser


@pytest.fixture
async def h(pg_dsn: str):
    h = await cc.start(pg_dsn, verify_email=False, attempts_per_ip=10_000,
                       attempts_per_account=10_000)
    yield h
    await h.stop()


@pytest.fixture
async def browsers(h):
    made: list[Browser] = []

    def make() -> Browser:
        b = Browser(h)
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


async def _key(b: Browser, name: str = "k", cap: str = "", **extra: str) -> tuple[int, str]:
    await b.get("/console/keys")
    r = await b.post("/console/keys", {"name": name, "cap": cap, **extra})
    assert r.status == 200, b.last[:2000]
    secret = re.search(r'data-testid="key-secret">([^<]+)<', b.last).group(1)
    key_id = int(re.search(r'data-testid="key-row" data-key-id="(\d+)"', b.last).group(1))
    return key_id, secret


async def _chat(h, secret: str, model: str = "gpt-4o-mini") -> str:
    async with aiohttp.ClientSession() as s:
        r = await s.post(h.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status == 200, await r.text()
        return r.headers["x-request-id"]


async def _fund(pg_dsn: str, email: str, usd: int = 10, *, h) -> None:
    """Credit the balance in Postgres, then wait (bounded) until the gateway's limiter has
    read it: its cache follows Postgres on the worker's next sync (0.5 s), and a request
    sent before that is refused (402) and logged, which the tests would count."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        uid, balance = await conn.fetchrow(
            "UPDATE users SET balance_nano = balance_nano + $2 WHERE email = $1"
            " RETURNING id, balance_nano", email, usd * 1_000_000_000)
    finally:
        await conn.close()
    limiter = h.worker.gw.limiter
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        scope = limiter.users.get(uid)
        if scope is not None and scope.db >= balance:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the gateway never saw the new balance")


async def test_a_key_holder_never_reaches_another_users_data(h, browsers, pg_dsn) -> None:
    alice, mallory = browsers(), browsers()
    a_email = cc.new_email()
    await alice.register(a_email)
    await _fund(pg_dsn, a_email, h=h)
    key_id, secret = await _key(alice, "alice-key")
    rid = await _chat(h, secret)
    await h.flush()
    conn = await asyncpg.connect(pg_dsn)
    try:
        plan = await plans.create_plan(conn, f"p-{secrets.token_hex(3)}", 1_000_000_000)
        uid = await conn.fetchval("SELECT id FROM users WHERE email = $1", a_email)
        sub, _, _ = await plans.subscribe(conn, uid, plan.id, __import__("datetime").datetime.now(__import__("datetime").UTC))
        sid = await conn.fetchval("SELECT id FROM console_sessions WHERE user_id = $1 AND ended_at IS NULL", uid)
    finally:
        await conn.close()
    await mallory.register(cc.new_email())
    await mallory.get("/console")
    for path in (f"/console/keys/{key_id}", f"/console/logs/{rid}", f"/console/usage?key={key_id}",
                 f"/console/usage.csv?key={key_id}", f"/console/logs?key={key_id}",
                 f"/console/logs.csv?key={key_id}"):
        r = await mallory.get(path)
        assert r.status == 404, path
        assert "alice-key" not in mallory.last and rid not in mallory.last
    for path in (f"/console/keys/{key_id}", f"/console/keys/{key_id}/disable",
                 f"/console/keys/{key_id}/reset", f"/console/keys/{key_id}/delete",
                 f"/console/subscriptions/{sub.id}/renew", f"/console/subscriptions/{sub.id}/keys"):
        r = await mallory.post(path, {"name": "stolen", "quantity": "1"})
        assert r.status == 404, path
    await mallory.post(f"/console/account/sessions/{sid}/revoke")
    # Alice's key, data and session are untouched.
    r = await alice.get(f"/console/keys/{key_id}")
    assert r.status == 200 and "alice-key" in alice.last and "stolen" not in alice.last
    assert ">active<" in alice.last
    # Mallory's own pages show none of Alice's rows.
    for path in ("/console/logs", "/console/usage", "/console/health", "/console/wallet",
                 "/console/plans", "/console/keys", "/console/usage.csv", "/console/logs.csv",
                 "/console/account/devices"):
        r = await mallory.get(path)
        assert r.status == 200, path
        assert rid not in mallory.last and "alice-key" not in mallory.last, path
    r = await mallory.get(f"/console/logs?request_id={rid}")
    assert r.status == 404


async def test_keys_create_edit_disable_enable_reset_delete(h, browsers, pg_dsn) -> None:
    b = browsers()
    email = cc.new_email()
    await b.register(email)
    await _fund(pg_dsn, email, h=h)
    key_id, secret = await _key(b, "laptop", cap="2.5")
    assert secret.startswith("sk-")
    for name in ("claude", "codex", "curl", "openai"):
        assert f'data-testid="snippet-{name}"' in b.last
    assert f"ANTHROPIC_BASE_URL={h.url}\n" in b.last  # Claude Code: without /v1
    assert f'base_url = "{h.url}/v1"' in __import__("html").unescape(b.last)  # Codex: with /v1
    assert "$2.50" in b.last
    await _chat(h, secret)
    r = await b.get(f"/console/keys/{key_id}")
    assert "Access configuration" in b.last and "gpt-4o-mini" in b.last
    assert "$0.15" in b.last  # input price per 1M at multiplier 1
    r = await b.post(f"/console/keys/{key_id}", {"name": "desk", "cap": "", "models": "gpt-*",
                                                 "group": "default", "expires": "2099-01-31"})
    assert r.status == 200 and "desk" in b.last and "gpt-*" in b.last
    r = await b.post(f"/console/keys/{key_id}", {"name": "desk", "group": "vip"})
    assert r.status == 400  # a holder never picks a group they were not given
    await b.post(f"/console/keys/{key_id}/disable")
    async with aiohttp.ClientSession() as s:
        import asyncio
        for _ in range(50):
            r = await s.post(h.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            if r.status == 401:
                break
            await asyncio.sleep(0.1)
        assert r.status == 401
    await b.post(f"/console/keys/{key_id}/enable")
    assert ">active<" in b.last
    r = await b.post(f"/console/keys/{key_id}/reset")
    new_secret = re.search(r'data-testid="key-secret">([^<]+)<', b.last).group(1)
    assert new_secret != secret
    await b.post(f"/console/keys/{key_id}/delete")
    assert f"data-key-id=\"{key_id}\"" not in b.last and ">desk<" not in b.last
    r = await b.get(f"/console/keys/{key_id}")
    assert r.status == 404
    # Filters.
    await _key(b, "alpha")
    await _key(b, "beta")
    await b.get("/console/keys?q=alp")
    assert "alpha" in b.last and ">beta<" not in b.last


async def test_usage_csv_equals_the_ledger_to_the_nano_dollar(h, browsers, pg_dsn) -> None:
    b = browsers()
    email = cc.new_email()
    await b.register(email)
    await _fund(pg_dsn, email, h=h)
    _, s1 = await _key(b, "one")
    _, s2 = await _key(b, "two")
    for s, m in ((s1, "gpt-4o-mini"), (s1, "claude-sonnet-4-6"), (s2, "gpt-4o-mini"), (s2, "gpt-4o-mini")):
        await _chat(h, s, m)
    await h.flush()
    r = await b.get("/console/usage")
    assert r.status == 200 and "<canvas" not in b.last  # the canvas is drawn by uPlot
    assert 'data-chart="usage-curve"' in b.last
    url = re.search(r'href="([^"]+)" data-testid="csv"', b.last).group(1).replace("&amp;", "&")
    r = await b.http.get(h.url + url)
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    total = next(x for x in rows if x["model"] == "TOTAL")
    conn = await asyncpg.connect(pg_dsn)
    try:
        uid = await conn.fetchval("SELECT id FROM users WHERE email = $1", email)
        ledger = await conn.fetchval("SELECT sum(cost_nano) FROM usage_log WHERE user_id = $1", uid)
        spent = 10_000_000_000 - await conn.fetchval("SELECT balance_nano FROM users WHERE id = $1", uid)
    finally:
        await conn.close()
    assert int(total["cost_nano"]) == ledger == spent > 0
    assert sum(int(x["cost_nano"]) for x in rows if x["model"] != "TOTAL") == ledger
    assert int(total["requests"]) == 4
    r = await b.get("/console/usage?bucket=hour&model=gpt-4o-mini")
    assert r.status == 200 and "claude-sonnet-4-6</code>" not in b.last


async def test_logs_cursor_pages_and_the_bill(h, browsers, pg_dsn, monkeypatch) -> None:
    from relay.console import usage
    monkeypatch.setattr(usage, "LOG_PAGE", 2)
    b = browsers()
    email = cc.new_email()
    await b.register(email)
    await _fund(pg_dsn, email, h=h)
    _, secret = await _key(b, "logger")
    rids = [await _chat(h, secret) for _ in range(3)]
    await h.flush()
    await b.get("/console/logs")
    first = re.findall(r'data-testid="log-row" data-request-id="([^"]+)"', b.last)
    assert len(first) == 2
    more = re.search(r'data-testid="more"', b.last)
    assert more
    nxt = re.search(r'<a href="([^"]+)" hx-get', b.last).group(1).replace("&amp;", "&")
    assert "offset" not in nxt and "cursor=" in nxt
    await b.get(nxt)
    second = re.findall(r'data-testid="log-row" data-request-id="([^"]+)"', b.last)
    assert sorted(first + second) == sorted(rids)
    await b.get("/console/logs?errors=1")  # every request answered: no error rows
    assert 'name="errors" type="checkbox" value="1" checked' in b.last
    assert 'data-testid="log-row"' not in b.last
    r = await b.get(f"/console/logs/{rids[0]}")
    assert r.status == 200 and 'data-testid="bill"' in b.last and "matches the charge" in b.last
    r = await b.get(f"/console/logs?request_id={rids[1]}")
    assert r.url.path == f"/console/logs/{rids[1]}"
    r = await b.http.get(h.url + "/console/logs.csv")
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert sorted(x["request_id"] for x in rows) == sorted(rids)
    # Streamed (chunked): every row once, newest first, the dollars exact.
    r = await b.http.get(h.url + "/console/logs.csv")
    assert r.headers.get("transfer-encoding") == "chunked"
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert [x["request_id"] for x in rows] == [x["request_id"] for x in sorted(
        rows, key=lambda x: (x["ts"], x["request_id"]), reverse=True)]
    assert sorted(x["request_id"] for x in rows) == sorted(rids)
    from accounting.money import format_usd

    conn = await asyncpg.connect(pg_dsn)
    try:
        logged = {r["request_id"]: r for r in await conn.fetch(
            "SELECT request_id, ts, cost_nano FROM usage_log WHERE request_id = ANY($1)", rids)}
    finally:
        await conn.close()
    for x in rows:
        row = logged[x["request_id"]]
        assert int(x["cost_nano"]) == row["cost_nano"] > 0
        assert x["cost_usd"] == format_usd(row["cost_nano"])
        assert datetime.fromisoformat(x["ts"]) == row["ts"]
    monkeypatch.setattr(usage, "CSV_MAX_ROWS", 2)
    r = await b.http.get(h.url + "/console/logs.csv")
    assert len(list(csv.DictReader(io.StringIO(await r.text())))) == 2


async def test_wallet_redeem_and_transfer_exactly_once(h, browsers, pg_dsn) -> None:
    a, friend = browsers(), browsers()
    a_email, f_email = cc.new_email(), cc.new_email()
    await a.register(a_email)
    await friend.register(f_email)
    conn = await asyncpg.connect(pg_dsn)
    try:
        code = (await codes.create_codes(conn, 3_000_000_000, 1))[0]
    finally:
        await conn.close()
    await a.get("/console/wallet")
    r = await a.post("/console/wallet/redeem", {"code": code})
    assert r.status == 200 and "$3.00" in a.last
    r = await a.post("/console/wallet/redeem", {"code": code})
    assert r.status == 400 and "already redeemed" in a.last
    await a.get("/console/wallet")
    idem = re.search(r'name="idem" value="([^"]+)"', a.last).group(1)
    for _ in range(2):  # a double submit of the same form moves the money once
        r = await a.post("/console/wallet/transfer", {"email": f_email, "amount": "1.25", "idem": idem})
    assert "$1.75" in a.last
    await friend.get("/console/wallet")
    assert "$1.25" in friend.last and a_email in friend.last
    r = await a.post("/console/wallet/transfer", {"email": f_email, "amount": "100",
                                                  "idem": "another-form"})
    assert r.status == 400
    r = await a.post("/console/wallet/transfer", {"email": a_email, "amount": "1", "idem": "self"})
    assert r.status == 400
    conn = await asyncpg.connect(pg_dsn)
    try:
        n = await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = 'wallet.transfer'"
                                " AND actor = (SELECT 'user:' || id FROM users WHERE email = $1)", a_email)
    finally:
        await conn.close()
    assert n == 1


async def test_plans_buy_renew_and_team_keys(h, browsers, pg_dsn) -> None:
    b = browsers()
    email = cc.new_email()
    await b.register(email)
    await _fund(pg_dsn, email, h=h)
    conn = await asyncpg.connect(pg_dsn)
    try:
        plan = await plans.create_plan(conn, f"Pro-{secrets.token_hex(2)}", 5_000_000_000,
                                       price_nano=2_000_000_000, renewal_window_s=40 * 86400)
    finally:
        await conn.close()
    await b.get("/console/plans")
    assert plan.name in b.last
    r = await b.post(f"/console/plans/{plan.id}/buy")
    assert r.status == 200 and 'data-testid="key-secret"' in b.last
    assert f"Subscription Access - {plan.id}" in b.last
    sub_id = int(re.search(r"/console/subscriptions/(\d+)/renew", b.last).group(1))
    r = await b.post(f"/console/subscriptions/{sub_id}/renew")
    assert r.status == 200 and "renewed" in b.last
    r = await b.post(f"/console/subscriptions/{sub_id}/keys", {"name": "team", "quantity": "3", "cap": "1"})
    assert r.status == 200 and b.last.count('data-testid="key-secret"') == 3
    await b.get("/console/keys")
    assert b.last.count("team key") == 3 and "plan key" in b.last
    await b.get("/console")
    assert plan.name in b.last
    await b.get("/console/health")
    assert r.status == 200


async def test_invite_page_and_public_pages(h, browsers) -> None:
    b = browsers()
    await b.register(cc.new_email())
    await b.get("/console/invite")
    link = re.search(r'data-testid="invite-link">([^<]+)<', b.last).group(1)
    code = link.split("aff=")[1]
    friend = browsers()
    email = cc.new_email()
    await friend.register(email, invite=code)
    await b.get("/console/invite")
    assert cc.new_email  # masked: never the full address
    assert email not in b.last and email[0] + "***@example.com" in b.last
    anon = browsers()
    r = await anon.get("/pricing")
    assert r.status == 200 and "gpt-4o-mini" in anon.last
    r = await anon.get("/status")
    assert r.status == 200 and 'data-testid="status-row"' in anon.last
    assert "@" not in anon.last.split("<main")[1]


async def test_every_page_renders_in_both_languages(h, browsers, pg_dsn) -> None:
    b = browsers()
    email = cc.new_email()
    await b.register(email)
    await _fund(pg_dsn, email, h=h)
    key_id, secret = await _key(b, "k")
    rid = await _chat(h, secret)
    await h.flush()
    pages = ["/console", "/console/keys", f"/console/keys/{key_id}", "/console/usage",
             "/console/logs", f"/console/logs/{rid}", "/console/wallet", "/console/plans",
             "/console/health", "/console/invite", "/console/account", "/pricing", "/status"]
    for lang, word in (("en", "Balance"), ("zh_Hans", "余额")):
        await b.get("/console/account")
        await b.post("/console/account/prefs", {"lang": lang, "tz": "Asia/Shanghai"})
        for path in pages:
            r = await b.get(path)
            assert r.status == 200, (lang, path)
        await b.get("/console")
        assert word in b.last, lang
    anon = browsers()
    await anon.get("/console/login?lang=zh_Hans")
    assert "登录" in anon.last
    await anon.get("/console/register")
    assert "注册" in anon.last or "创建" in anon.last
