"""The low-balance email: sent once per crossing of the threshold the user set on the
Account page, again after a top-up and a new fall, in the user's language, once across
workers, retried when the SMTP server refused it, and sent by the worker's own task.
Error pages speak the page's language."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from relay.console.alerts import LowBalanceAlerts
from tests import console_client as cc
from tests.console_client import Browser


@pytest.fixture
async def h(pg_dsn: str):
    # The worker's own task is off (0): these tests run the rounds themselves.
    h = await cc.start(pg_dsn, verify_email=False, attempts_per_ip=10_000,
                       attempts_per_account=10_000, low_balance_check_s=0)
    yield h
    await h.stop()


async def _user(h, threshold: str, lang: str = "en") -> tuple[Browser, str, int]:
    b = Browser(h)
    email = cc.new_email()
    await b.register(email)
    await b.get("/console/account")
    r = await b.post("/console/account/prefs", {"lang": lang, "tz": "UTC", "low_balance": threshold})
    assert r.status == 200 and "ok=saved" in str(r.url), b.last[:1000]
    conn = await asyncpg.connect(h.dsn)
    try:
        uid = await conn.fetchval("SELECT id FROM users WHERE lower(email) = lower($1)", email)
    finally:
        await conn.close()
    return b, email, uid


async def _balance(h, uid: int, usd: str) -> None:
    conn = await asyncpg.connect(h.dsn)
    try:
        await conn.execute("UPDATE users SET balance_nano = ($2::numeric * 1000000000)::bigint"
                           " WHERE id = $1", uid, usd)
    finally:
        await conn.close()


def _mails(h, email: str) -> list[tuple[str, str, str]]:
    return [m for m in cc.console_of(h).mailer.outbox if m[0].lower() == email.lower()]


async def test_one_alert_per_crossing_and_again_after_a_top_up(h) -> None:
    c = cc.console_of(h)
    b, email, uid = await _user(h, "2")
    try:
        await _balance(h, uid, "5")
        await c.alerts.run_once()
        assert _mails(h, email) == []
        await _balance(h, uid, "1.25")
        await c.alerts.run_once()
        mails = _mails(h, email)
        assert len(mails) == 1
        assert "low" in mails[0][1] and "$1.25" in mails[0][2] and "$2.00" in mails[0][2]
        for _ in range(3):  # still below: told once
            await c.alerts.run_once()
        # Saving the form again (another language, the same threshold) tells it no twice.
        r = await b.post("/console/account/prefs", {"lang": "en", "tz": "Asia/Shanghai",
                                                    "low_balance": "2"})
        assert r.status == 200
        await c.alerts.run_once()
        await _balance(h, uid, "0.5")
        await c.alerts.run_once()
        assert len(_mails(h, email)) == 1
        await _balance(h, uid, "10")  # a top-up re-arms it
        await c.alerts.run_once()
        assert len(_mails(h, email)) == 1
        await _balance(h, uid, "1")
        await c.alerts.run_once()
        assert len(_mails(h, email)) == 2
        # A new threshold re-arms it too; 0 turns it off.
        r = await b.post("/console/account/prefs", {"lang": "en", "tz": "UTC", "low_balance": "0"})
        assert r.status == 200
        await c.alerts.run_once()
        assert len(_mails(h, email)) == 2
    finally:
        await b.close()


async def test_the_alert_speaks_the_users_language(h) -> None:
    c = cc.console_of(h)
    b, email, uid = await _user(h, "3", lang="zh_Hans")
    try:
        await _balance(h, uid, "1")
        assert await c.alerts.run_once() == 1
        (_, subject, body), = _mails(h, email)
        assert "余额" in subject and "$1.00" in body and "$3.00" in body
    finally:
        await b.close()


async def test_two_workers_looking_at_once_send_it_once(h) -> None:
    c = cc.console_of(h)
    b, email, uid = await _user(h, "2")
    try:
        await _balance(h, uid, "1")
        other = LowBalanceAlerts(c, 0)
        sent = await asyncio.gather(c.alerts.run_once(), other.run_once(), c.alerts.run_once())
        assert sum(sent) == 1
        assert len(_mails(h, email)) == 1
    finally:
        await b.close()


async def test_a_refused_message_is_sent_at_the_next_round(h, monkeypatch) -> None:
    c = cc.console_of(h)
    b, email, uid = await _user(h, "2")
    try:
        await _balance(h, uid, "1")
        real = c.mailer.send

        async def refused(to: str, subject: str, body: str) -> bool:
            return False

        monkeypatch.setattr(c.mailer, "send", refused)
        assert await c.alerts.run_once() == 0
        monkeypatch.setattr(c.mailer, "send", real)
        assert await c.alerts.run_once() == 1
        assert len(_mails(h, email)) == 1
    finally:
        await b.close()


async def test_an_unverified_or_disabled_account_is_not_mailed(h) -> None:
    c = cc.console_of(h)
    b, email, uid = await _user(h, "2")
    try:
        conn = await asyncpg.connect(h.dsn)
        try:
            await conn.execute("UPDATE users SET status = 'disabled' WHERE id = $1", uid)
        finally:
            await conn.close()
        await _balance(h, uid, "1")
        await c.alerts.run_once()
        assert _mails(h, email) == []
    finally:
        await b.close()


async def test_the_workers_task_sends_it(pg_dsn: str) -> None:
    h = await cc.start(pg_dsn, verify_email=False, low_balance_check_s=0.2)
    try:
        assert cc.console_of(h).alerts.task is not None
        b, email, uid = await _user(h, "2")
        try:
            await _balance(h, uid, "1")
            deadline = time.monotonic() + 15
            while not _mails(h, email) and time.monotonic() < deadline:  # noqa: ASYNC110 - the worker's own task
                await asyncio.sleep(0.05)
            assert len(_mails(h, email)) == 1
        finally:
            await b.close()
    finally:
        await h.stop()
    assert cc.console_of(h).alerts.task is None  # stopped with the worker


async def test_error_pages_speak_the_pages_language(h) -> None:
    b = Browser(h)
    try:
        r = await b.get("/console/no-such-page?lang=zh_Hans")
        assert r.status == 404
        assert "此页面不存在" in b.last and 'lang="zh-Hans"' in b.last
        r = await b.get("/console/no-such-page", headers={"Accept-Language": "en-US"})
        assert r.status == 404 and "This page does not exist." in b.last
        # A signed-in user's language wins; a refused form says why in it.
        await b.register(cc.new_email())
        await b.get("/console/account")
        await b.post("/console/account/prefs", {"lang": "zh_Hans", "tz": "UTC", "low_balance": ""})
        r = await b.post("/console/keys", {"name": "x", "csrf": "forged"})
        assert r.status == 403 and "此表单已过期" in b.last
        r = await b.get("/console/logs/no-such-request")
        assert r.status == 404 and 'lang="zh-Hans"' in b.last and "No such request." not in b.last
    finally:
        await b.close()
