"""Home (balance, plan credit, spend, the 30-day curve, announcements) and the account
page (email, password, 2FA, devices, language, time zone, low-balance alert)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson
import segno

from accounting import accounts, plans, reports, sessions
from accounting.accounts import AccountError
from accounting.money import parse_usd
from relay.console import back
from relay.console.web import USER, Page, Response, redirect
from relay.ops import announcements


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/console", lambda p: home(c, p), USER)
    r.add("GET", "/console/account", lambda p: account(c, p), USER)
    r.add("POST", "/console/account/password", lambda p: change_password(c, p), USER)
    r.add("POST", "/console/account/prefs", lambda p: prefs(c, p), USER)
    r.add("POST", "/console/account/2fa/enable", lambda p: totp_enable(c, p), USER)
    r.add("POST", "/console/account/2fa/disable", lambda p: totp_disable(c, p), USER)
    r.add("POST", "/console/account/sessions/{sid}/revoke", lambda p: revoke(c, p), USER)


def day_start(c: Any, p: Page, days_back: int = 0) -> datetime:
    local = c.now().astimezone(c.zone(p))
    d = local.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days_back)
    return d.replace(tzinfo=c.zone(p)) if d.tzinfo is None else d


def chart_json(rows: list[dict[str, Any]], label: str, start: datetime | None = None,
               end: datetime | None = None, bucket: str = "day") -> str:
    """The series for console.js: epoch seconds and USD as exact decimal strings (the
    chart draws floats; the tables and CSV keep the exact figures)."""
    from accounting.money import format_usd

    if start is not None and end is not None:
        # Every bucket of the window, zero where nothing was spent, so the axis spans it.
        step = timedelta(hours=1) if bucket == "hour" else timedelta(days=1)
        have = {int(r["bucket"].timestamp()): r for r in rows}
        dense: list[dict[str, Any]] = []
        t = start
        while t <= end and len(dense) < 5000:
            dense.append(have.pop(int(t.timestamp()), {"bucket": t, "cost_nano": 0, "requests": 0}))
            t += step
        rows = sorted(dense + list(have.values()), key=lambda r: r["bucket"])
    return orjson.dumps({"label": label, "x": [int(r["bucket"].timestamp()) for r in rows],
                         "y": [format_usd(int(r["cost_nano"] or 0)) for r in rows],
                         "n": [int(r["requests"] or 0) for r in rows],
                         "from": int(start.timestamp()) if start else None,
                         "to": int(end.timestamp()) if end else None}).decode()


async def home(c: Any, p: Page) -> Response:
    assert p.account is not None
    now = c.now()
    today = day_start(c, p)
    month = today.replace(day=1)
    curve_from = day_start(c, p, 29)
    async with c.db.acquire() as conn:
        acct = await accounts.get(conn, p.user_id)
        series = await reports.spend_series(conn, min(curve_from, month), now + timedelta(hours=1),
                                            "day", user_id=p.user_id, tz=p.tz)
        subs = await plans.list_subscriptions(conn, user=p.user_id)
        names = {pl.id: pl.name for pl in await plans.list_plans(conn, include_archived=True)}
        notes = await announcements.for_user(conn, p.user_id)
    assert acct is not None
    today_nano = sum(int(r["cost_nano"] or 0) for r in series if r["bucket"] >= today)
    month_nano = sum(int(r["cost_nano"] or 0) for r in series if r["bucket"] >= month)
    curve = [r for r in series if r["bucket"] >= curve_from]
    active = []
    for s in subs:
        if not s.active(now):
            continue
        nxt = None
        if s.periodic():
            idx = plans.period_index(s.started_at, now, s.reset, s.reset_s)
            nxt = plans.period_start(s.started_at, idx + 1, s.reset, s.reset_s)
        active.append({"sub": s, "name": names.get(s.plan_id, str(s.plan_id)),
                       "left": s.remaining(now), "next_reset": nxt})
    return c.render(p, "home.html", acct=acct, today_nano=today_nano, month_nano=month_nano,
                    chart=chart_json(curve, c._(p, "Spend (USD)"), curve_from, today), subs=active,
                    notes=notes, welcome="welcome" in p.query)


async def account(c: Any, p: Page, error: str = "", status: int = 200,
                  totp: dict[str, Any] | None = None, recovery: list[str] | None = None) -> Response:
    assert p.account is not None and p.session is not None
    async with c.db.acquire() as conn:
        live = await sessions.live(conn, p.user_id)
        left = await accounts.recovery_left(conn, p.user_id)
        user = await conn.fetchrow("SELECT max_ips FROM users WHERE id = $1", p.user_id)
    max_ips = (user["max_ips"] if user else 0) or c.gw.cfg.limits.user_max_ips
    window_min = max(1, c.gw.cfg.limits.user_ip_window_s // 60)
    if totp is None and not p.account.totp_enabled:
        secret = accounts.new_totp_secret()
        totp = _totp_view(c, p, secret)
    return c.render(p, "account.html", status, error=error, sessions=live, current=p.session.id,
                    devices=c.devices(p.account), recovery_left=left, totp=totp,
                    recovery=recovery, max_ips=max_ips, window_min=window_min, zones=_zones(),
                    low_balance=p.account.low_balance_nano)


def _totp_view(c: Any, p: Page, secret: str) -> dict[str, Any]:
    assert p.account is not None
    uri = accounts.totp_uri(secret, p.account.email or p.account.name, c.cfg.site_name)
    data = segno.make(uri, error="m").svg_data_uri(scale=4, dark="#111", light="#fff")
    return {"secret": secret, "qr": data}


_ZONES: list[str] = []


def _zones() -> list[str]:
    if not _ZONES:
        from zoneinfo import available_timezones

        _ZONES.extend(sorted(z for z in available_timezones()
                             if "/" in z and not z.startswith(("Etc/", "SystemV/", "US/"))))
        _ZONES.insert(0, "UTC")
    return _ZONES


async def change_password(c: Any, p: Page) -> Response:
    assert p.account is not None and p.session is not None
    await c.throttled(p, "password", str(p.user_id))
    async with c.db.acquire() as conn:
        stored = await accounts.password_hash(conn, p.user_id)
    ok, _ = await c.passwords.verify(stored, p.form.get("current", ""))
    if not ok:
        return await account(c, p, c._(p, "The current password is not right."), 400)
    try:
        accounts.check_password(p.form.get("password", ""))
    except AccountError as exc:
        return await account(c, p, c._(p, str(exc)), 400)
    hashed = await c.passwords.hash(p.form["password"])
    async with c.db.acquire() as conn:
        await accounts.set_password(conn, p.user_id, hashed)
        await sessions.end_others(conn, p.user_id, p.session.id, "password")
    return redirect("/console/account?ok=password")


async def prefs(c: Any, p: Page) -> Response:
    try:
        low = p.form.get("low_balance", "").strip()
        async with c.db.acquire() as conn:
            await accounts.set_prefs(
                conn, p.user_id, lang=p.form.get("lang") or None, tz=p.form.get("tz") or None,
                low_balance_nano=parse_usd(low, what="alert") if low else None)
    except (AccountError, ValueError) as exc:
        return await account(c, p, c._(p, str(exc)), 400)
    return back("/console/account", ok="saved")


async def totp_enable(c: Any, p: Page) -> Response:
    assert p.session is not None
    secret = p.form.get("secret", "")
    try:
        async with c.db.acquire() as conn:
            codes = await accounts.enable_totp(conn, p.user_id, secret, p.form.get("code", ""))
            await sessions.end_others(conn, p.user_id, p.session.id, "2fa")
    except AccountError as exc:
        return await account(c, p, c._(p, str(exc)), 400, totp=_totp_view(c, p, secret))
    return await account(c, p, recovery=codes)


async def totp_disable(c: Any, p: Page) -> Response:
    assert p.session is not None
    async with c.db.acquire() as conn:
        stored = await accounts.password_hash(conn, p.user_id)
    ok, _ = await c.passwords.verify(stored, p.form.get("current", ""))
    if not ok:
        return await account(c, p, c._(p, "The current password is not right."), 400)
    async with c.db.acquire() as conn:
        await accounts.disable_totp(conn, p.user_id)
        await sessions.end_others(conn, p.user_id, p.session.id, "2fa")
    return redirect("/console/account?ok=2fa_off")


async def revoke(c: Any, p: Page) -> Response:
    try:
        sid = int(p.params["sid"])
    except ValueError:
        sid = 0
    async with c.db.acquire() as conn:
        await sessions.revoke(conn, p.user_id, sid)
    if p.session is not None and sid == p.session.id:
        resp = redirect("/console/login?why=logout")
        resp.cookie(p.cookie_name, "", max_age=0, secure=p.secure)
        return resp
    to = "/console/account/devices" if p.form.get("back") == "/console/account/devices" else "/console/account"
    return redirect(f"{to}?ok=revoked")
