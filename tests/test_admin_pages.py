"""The operator pages over real HTTP: each action as an owner or admin, through the
relay.ops function the admin API calls, with its audit row; what the key holder sees
of it (announcements, tickets); settings in effect within a second."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest

from tests import console_client as cc
from tests.admin_client import operator
from tests.console_client import Browser


@pytest.fixture
async def h(pg_dsn: str):
    h = await cc.start(pg_dsn, verify_email=False, attempts_per_ip=10_000,
                       attempts_per_account=10_000)
    yield h
    await h.stop()


@pytest.fixture
async def owner(h):
    b, _ = await operator(h, "owner")
    yield b
    await b.close()


async def _q(h, sql: str, *args):
    conn = await asyncpg.connect(h.dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _key_holder(h) -> tuple[Browser, str, int]:
    b = Browser(h)
    email = cc.new_email()
    await b.register(email)
    uid = (await _q(h, "SELECT id FROM users WHERE email = $1", email))[0]["id"]
    return b, email, uid


async def _chat(h, secret: str) -> str:
    """One request; a new balance reaches the worker's cache at its next poll (about a
    second), so a 402 before that is retried for a bounded time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    async with aiohttp.ClientSession() as s:
        while True:
            r = await s.post(h.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            if r.status != 402 or loop.time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert r.status == 200, await r.text()
        return r.headers["x-request-id"]


async def test_users_search_adjust_and_sessions(h, owner) -> None:
    kh, email, uid = await _key_holder(h)
    try:
        await owner.get(f"/admin/users?q={email[:6]}")
        assert f'data-user-id="{uid}"' in owner.last
        await owner.get(f"/admin/users/{uid}")
        r = await owner.post(f"/admin/users/{uid}/adjust", {"amount": "12.5", "note": "wire 42"})
        assert r.status == 200 and "$12.50" in owner.last
        r = await owner.post(f"/admin/users/{uid}/adjust", {"amount": "-2.5", "note": "refund fix"})
        assert r.status == 200 and "$10.00" in owner.last
        r = await owner.post(f"/admin/users/{uid}/adjust", {"amount": "5", "note": ""})
        assert r.status == 400
        tops = await _q(h, "SELECT amount_nano, note FROM topups WHERE user_id = $1 ORDER BY id", uid)
        assert [(t["amount_nano"], t["note"]) for t in tops][-2:] == [
            (12_500_000_000, "wire 42"), (-2_500_000_000, "refund fix")]
        sid = re.search(r'name="session" value="(\d+)"', owner.last).group(1)
        r = await owner.post(f"/admin/users/{uid}/sessions/revoke", {"session": sid})
        assert r.status == 200
        r = await kh.get("/console", allow_redirects=False)
        assert r.status == 303 and "why=revoked" in r.headers["location"]
        r = await owner.post(f"/admin/users/{uid}/account", {"status": "disabled", "max_devices": "3"})
        row = (await _q(h, "SELECT status, max_devices FROM users WHERE id = $1", uid))[0]
        assert (row["status"], row["max_devices"]) == ("disabled", 3)
        audit = await _q(h, "SELECT action FROM audit_log WHERE target = $1 ORDER BY id", str(uid))
        assert [a["action"] for a in audit] == ["user.topup", "user.topup", "user.session_revoke",
                                                "user.account"]
    finally:
        await kh.close()


async def test_keys_edit_limits_and_disable(h, owner) -> None:
    uid, key_id, _secret = await h.user_and_key()
    await owner.get(f"/admin/keys?user={uid}")
    assert 'data-testid="admin-key-row"' in owner.last
    await owner.get(f"/admin/keys/{key_id}")
    r = await owner.post(f"/admin/keys/{key_id}", {"name": "renamed", "models": "gpt-*", "cap": "3",
                                                  "concurrency": "2", "rpm": "60", "tpm": "",
                                                  "allowed_cidrs": "10.0.0.0/8", "expires_at": "",
                                                  "group": "default"})
    assert r.status == 200, owner.last[:500]
    k = (await _q(h, "SELECT name, rpm, concurrency, cap_nano, allowed_cidrs FROM keys WHERE id = $1",
                  key_id))[0]
    assert (k["name"], k["rpm"], k["concurrency"], k["cap_nano"]) == ("renamed", 60, 2, 3_000_000_000)
    logged = (await _q(h, "SELECT before->>'rpm' AS rpm, detail->>'rpm' AS now FROM audit_log"
                          " WHERE action = 'key.edit' AND target = $1", str(key_id)))[0]
    assert (logged["rpm"], logged["now"]) == ("0", "60")
    r = await owner.post(f"/admin/keys/{key_id}/disable")
    assert (await _q(h, "SELECT status FROM keys WHERE id = $1", key_id))[0]["status"] == "disabled"


async def test_channels_create_edit_toggle_and_test(h, owner) -> None:
    await owner.get("/admin/channels")
    assert 'data-testid="channel-row"' in owner.last and "mock-openai" in owner.last
    base = f"http://127.0.0.1:{h.mock.port}/v1"
    r = await owner.post("/admin/channels", {"name": "extra", "protocol": "openai", "base_url": base,
                                             "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY",
                                             "models": "gpt-extra", "priority": "0", "weight": "1"})
    assert r.status == 200 and r.url.path == "/admin/channels/extra", owner.last[:800]
    r = await owner.post("/admin/channels/extra", {"protocol": "openai", "base_url": base,
                                                   "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY",
                                                   "models": "gpt-extra, gpt-extra2",
                                                   "model_map": "gpt-extra = gpt-4o-mini",
                                                   "priority": "1", "weight": "3", "max_concurrency": "5"})
    assert r.status == 200
    row = (await _q(h, "SELECT models, weight, model_map::text AS mm FROM channels WHERE name = 'extra'"))[0]
    assert list(row["models"]) == ["gpt-extra", "gpt-extra2"] and row["weight"] == 3
    r = await owner.post("/admin/channels/extra/disable")
    assert (await _q(h, "SELECT enabled FROM channels WHERE name = 'extra'"))[0]["enabled"] is False
    r = await owner.post("/admin/channels/extra/enable")
    assert (await _q(h, "SELECT enabled FROM channels WHERE name = 'extra'"))[0]["enabled"] is True
    await owner.get("/admin/channels/mock-openai")
    r = await owner.post("/admin/channels/mock-openai/test", {"model": "gpt-4o-mini"})
    assert r.status == 200
    assert re.search(r'data-testid="test-status">200<', owner.last), owner.last[:2000]
    assert re.search(r'data-testid="test-latency">\d+ ms<', owner.last)
    before = (await _q(h, "SELECT before::text AS b FROM audit_log WHERE action = 'channel.edit'"
                          " AND target = 'extra'"))[0]["b"]
    assert '"weight": 1' in before or '"weight":1' in before


async def test_prices_set_scheduled_diff(h, owner) -> None:
    await owner.get("/admin/prices")
    r = await owner.post("/admin/prices", {"model": "diff-model", "input": "1", "output": "2"})
    assert r.status == 200
    r = await owner.post("/admin/prices", {"model": "diff-model", "input": "1.5", "output": "2"})
    when = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    r = await owner.post("/admin/prices", {"model": "diff-model", "input": "3", "output": "4",
                                           "effective_at": when})
    assert r.status == 200 and 'data-testid="scheduled-row"' in owner.last
    await owner.get("/admin/prices/diff-model")
    assert owner.last.count('data-testid="version-row"') == 3
    assert "50.0%" in owner.last  # input 1 -> 1.5 between the two versions in effect


async def test_prices_form_sets_a_long_context_tier(h, owner) -> None:
    await owner.get("/admin/prices")
    r = await owner.post("/admin/prices", {"model": "lc-model", "input": "3", "output": "15",
                                           "long_context_threshold": "200000",
                                           "long_context_input": "6", "long_context_output": "22.5"})
    assert r.status == 200 and "above 200,000 tokens: 6 / 22.5" in owner.last
    (row,) = await _q(h, "SELECT long_context_threshold, long_context_cache_read FROM prices"
                         " WHERE model = 'lc-model'")
    assert (row[0], row[1]) == (200000, 6_000_000_000)
    # A tier cheaper than the base, or a threshold that is no number, is refused on the page.
    for bad in ({"long_context_threshold": "200000", "long_context_input": "1",
                 "long_context_output": "22.5"},
                {"long_context_threshold": "2e5", "long_context_input": "6",
                 "long_context_output": "22.5"}):
        r = await owner.post("/admin/prices", {"model": "lc-bad", "input": "3", "output": "15", **bad})
        assert r.status == 400 and "long_context_" in owner.last
    await owner.get("/admin/prices/lc-model")
    assert "above 200,000 tokens" in owner.last


async def test_codes_batch_csv_and_void(h, owner) -> None:
    await owner.get("/admin/codes")
    r = await owner.post("/admin/codes", {"amount": "2", "count": "3", "expires_at": ""})
    made = re.findall(r"TW-[A-Z0-9-]{10,}", owner.last)
    assert r.status == 200 and len(set(made)) == 3
    r = await owner.post("/admin/codes", {"amount": "1", "count": "2", "format": "csv"})
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(await r.text())))
    assert rows[0] == ["code", "amount_usd", "batch_id", "expires_at"] and len(rows) == 3
    batch = rows[1][2]
    r = await owner.get(f"/admin/codes.csv?batch={batch}")
    listed = list(csv.reader(io.StringIO(owner.last)))
    assert len(listed) == 3 and all(r_[3] == "unused" for r_ in listed[1:])
    await owner.get("/admin/codes")
    r = await owner.post("/admin/codes/void", {"batch": batch})
    assert r.status == 200
    kh, _, uid = await _key_holder(h)
    try:
        await kh.get("/console/wallet")
        await kh.post("/console/wallet/redeem", {"code": rows[1][0]})
        assert (await _q(h, "SELECT balance_nano FROM users WHERE id = $1", uid))[0][0] == 0
    finally:
        await kh.close()
    state = await _q(h, "SELECT count(*) AS n FROM redemption_codes WHERE batch_id = $1 AND"
                        " voided_at IS NOT NULL", int(batch))
    assert state[0]["n"] == 2


async def test_plans_create_edit_and_subscribers(h, owner) -> None:
    await owner.get("/admin/plans")
    r = await owner.post("/admin/plans", {"name": "Pro-x", "price": "10", "credit": "20",
                                          "validity": "month", "periodic_credit": "", "reset": "none",
                                          "models": "", "groups": "default",
                                          "renewal_window_hours": "72"})
    assert r.status == 200 and r.url.path.startswith("/admin/plans/"), owner.last[:800]
    pid = int(r.url.path.rsplit("/", 1)[1])
    r = await owner.post(f"/admin/plans/{pid}", {"name": "Pro-x", "price": "12", "credit": "20",
                                                 "validity": "month", "reset": "none", "models": "",
                                                 "groups": "default", "status": "archived",
                                                 "renewal_window_hours": "48"})
    row = (await _q(h, "SELECT price_nano, status, renewal_window_s FROM plans WHERE id = $1", pid))[0]
    assert (row["price_nano"], row["status"], row["renewal_window_s"]) == (12_000_000_000, "archived",
                                                                          48 * 3600)
    assert "No subscribers yet." in owner.last


async def test_announcements_sanitised_scheduled_and_marked_unread(h, owner) -> None:
    kh, _, _ = await _key_holder(h)
    try:
        await owner.get("/admin/announcements")
        r = await owner.post("/admin/announcements", {
            "title": "Maintenance", "body": "**Tonight** <script>alert(1)</script> [doc](javascript:x)",
            "starts_at": "", "ends_at": ""})
        assert r.status == 200
        later = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
        await owner.post("/admin/announcements", {"title": "Future", "body": "x", "starts_at": later,
                                                  "ends_at": ""})
        await kh.get("/console")
        assert "Maintenance" in kh.last and "<strong>Tonight</strong>" in kh.last
        assert "<script>alert" not in kh.last, re.findall(r".{80}<script>alert.{40}", kh.last)
        assert 'href="javascript' not in kh.last  # left as text, never a link
        assert "Future" not in kh.last
        assert 'data-testid="unread"' in kh.last
        await kh.get("/console")
        assert "Maintenance" in kh.last and 'data-testid="unread"' not in kh.last
    finally:
        await kh.close()


async def test_a_ticket_about_a_request_is_answered(h, owner) -> None:
    kh, email, uid = await _key_holder(h)
    try:
        await owner.get(f"/admin/users/{uid}")
        await owner.post(f"/admin/users/{uid}/adjust", {"amount": "10", "note": "for support"})
        from accounting import store

        conn = await asyncpg.connect(h.dsn)
        try:
            _, secret = await store.create_key(conn, uid, name="support")
        finally:
            await conn.close()
        rid = await _chat(h, secret)
        await h.flush()
        await kh.get(f"/console/logs/{rid}")
        assert 'data-testid="ask-support"' in kh.last
        await kh.get(f"/console/tickets?request_id={rid}")
        r = await kh.post("/console/tickets", {"subject": "Charged twice?", "body": "Please check",
                                               "request_id": rid})
        assert r.status == 200 and r.url.path.startswith("/console/tickets/")
        tid = r.url.path.rsplit("/", 1)[1]
        await owner.get("/admin/tickets")
        assert "Charged twice?" in owner.last
        await owner.get(f"/admin/tickets/{tid}")
        assert rid in owner.last
        # With SMTP configured (a port nothing listens on: the send fails and is logged,
        # the message is in the outbox), the key holder is told of the answer.
        console = cc.console_of(h)
        console.settings.apply({"smtp_host": "127.0.0.1", "smtp_port": 9})
        try:
            r = await owner.post(f"/admin/tickets/{tid}/reply", {"body": "Billed once, see the bill.",
                                                                 "state": "waiting"})
        finally:
            console.settings.apply({})
        assert r.status == 200
        mail = console.mailer.outbox[-1]
        assert mail[0] == email and "Billed once" in mail[2]
        await kh.get(f"/console/tickets/{tid}")
        assert "Billed once, see the bill." in kh.last and "support answered" in kh.last
        other, _, _ = await _key_holder(h)
        try:
            r = await other.get(f"/console/tickets/{tid}")
            assert r.status == 404
            await other.get("/console/tickets")
            r = await other.post("/console/tickets", {"subject": "x", "body": "y", "request_id": rid})
            assert r.status == 400  # someone else's request
        finally:
            await other.close()
    finally:
        await kh.close()


async def test_request_log_across_users_with_user_and_channel(h, owner) -> None:
    uid, _, secret = await h.user_and_key()
    rid = await _chat(h, secret)
    await h.flush()
    await owner.get(f"/admin/logs?user={uid}&channel=mock-openai")
    assert f'data-request-id="{rid}"' in owner.last
    await owner.get(f"/admin/logs?user={uid}&channel=mock-anthropic")
    assert f'data-request-id="{rid}"' not in owner.last
    await owner.get(f"/admin/logs/{rid}")
    assert 'data-testid="bill"' in owner.last and "matches the charge" in owner.last


async def test_audit_filters_and_never_a_secret(h, owner) -> None:
    uid, _key_id, secret = await h.user_and_key()
    await owner.get(f"/admin/users/{uid}")
    await owner.post(f"/admin/users/{uid}/adjust", {"amount": "1", "note": "audit me"})
    await owner.get(f"/admin/audit?action=user.topup&target={uid}")
    assert owner.last.count('data-testid="audit-row"') == 1 and "audit me" in owner.last
    await owner.get("/admin/audit")
    assert secret not in owner.last


async def test_settings_take_effect_within_a_second(h, owner) -> None:
    try:
        await owner.get("/admin/settings")
        r = await owner.post("/admin/settings", {"signup": "closed", "max_devices": "2",
                                                 "signup_credit": "0", "invite_credit": "0",
                                                 "invite_share": "0", "min_topup": "0.01",
                                                 "smtp_host": "", "smtp_port": "587", "smtp_user": "",
                                                 "smtp_from": "", "smtp_tls": "starttls"})
        assert r.status == 200, re.findall(r'role="alert">([^<]*)', owner.last)
        b = Browser(h)
        try:
            await b.get("/console/register")
            r = await b.post("/console/register", {"email": cc.new_email(), "password": cc.PASSWORD})
            assert r.status == 403
        finally:
            await b.close()
        rows = await _q(h, "SELECT detail::text AS d, before::text AS b FROM audit_log"
                           " WHERE action = 'settings.set' ORDER BY id DESC LIMIT 1")
        assert '"closed"' in rows[0]["d"] and '"open"' in rows[0]["b"]
        assert "max_devices" not in rows[0]["d"]  # unchanged values are not overrides
        # A second worker's view: a fresh Live sees the change on its next refresh.
        from relay.ops.settings import Live

        live = Live(h.cfg)
        await live.refresh(cc.console_of(h).db)
        assert live.get("signup") == "closed"
        await owner.post("/admin/settings", {"signup": "open"})
        await asyncio.sleep(0)  # nothing to wait for: this worker refreshed on save
        assert cc.console_of(h).cfg.signup == "open"
    finally:
        # The settings live in the database this run's other tests share: back to config.
        await _q(h, "DELETE FROM site_settings")
        await _q(h, "SELECT nextval('site_settings_version')")


async def test_groups_and_invites(h, owner) -> None:
    await owner.get("/admin/groups")
    r = await owner.post("/admin/groups", {"name": "vip-x", "multiplier": "2/3", "models": "gpt-*"})
    assert r.status == 200 and "vip-x" in owner.last
    r = await owner.post("/admin/groups/vip-x", {"multiplier": "0.8", "models": "gpt-*, claude-*"})
    row = (await _q(h, "SELECT multiplier, models FROM groups WHERE name = 'vip-x'"))[0]
    assert row["multiplier"] in ("0.8", "4/5") and list(row["models"]) == ["gpt-*", "claude-*"]
    r = await owner.post("/admin/groups", {"name": "bad", "multiplier": "-1"})
    assert r.status == 400
    # An invitation whose first top-up paid the inviter shows with its payout.
    from accounting import growth, store

    conn = await asyncpg.connect(h.dsn)
    try:
        inviter = await store.create_user(conn, f"inv-{cc.new_email()}")
        code = await growth.create_invite_code(conn, inviter)
        terms = growth.Terms(signup_nano=0, invite_nano=0, share=growth.Fraction(1, 10))
        got = await growth.signup(conn, f"new-{cc.new_email()}", terms, code)
    finally:
        await conn.close()
    await owner.get(f"/admin/users/{got['user_id']}")
    await owner.post(f"/admin/users/{got['user_id']}/adjust", {"amount": "10", "note": "first"})
    await owner.get("/admin/invites")
    assert 'data-testid="invite-row"' in owner.last
