"""Users: search (name, email or id), a new user with a one-time set-up link, and a
user's page: balance adjustment (a top-up with its note, or a debit), role (owners
only), status, console device limit, 2FA reset, live sessions (sign out any), keys,
usage, subscriptions and recent top-ups. Every change is a relay.ops.users action.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from accounting import reports
from relay.console import back
from relay.console.admin import Failed, body, int_field, run, show
from relay.console.home import chart_json
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import users as ops

ROLES = ("user", "viewer", "admin", "owner")


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/users", lambda p: listing(c, p), VIEWER)
    r.add("POST", "/admin/users", lambda p: create(c, p), ADMIN)
    r.add("GET", "/admin/users/{user}", lambda p: user_page(c, p), VIEWER)
    r.add("POST", "/admin/users/{user}/adjust", lambda p: adjust(c, p), ADMIN)
    r.add("POST", "/admin/users/{user}/account", lambda p: account(c, p), ADMIN)
    r.add("POST", "/admin/users/{user}/limits", lambda p: limits(c, p), ADMIN)
    r.add("POST", "/admin/users/{user}/sessions/revoke", lambda p: revoke(c, p), ADMIN)


async def listing(c: Any, p: Page, error: str = "", status: int = 200,
                  made: dict[str, Any] | None = None) -> Response:
    q = {k: p.query[k] for k in ("q", "role", "status", "cursor") if p.query.get(k)}
    try:
        found = await run(c, p, ops.users_search, query=q)
    except Failed as exc:
        found, error = {"data": [], "next": None}, exc.message
    return show(c, p, "users.html", status, error=error, users=found["data"], next=found["next"],
                filters={k: p.query.get(k, "") for k in ("q", "role", "status")}, roles=ROLES,
                made=made, form=p.form)


async def create(c: Any, p: Page) -> Response:
    fields = {k: p.form.get(k, "").strip() for k in ("name", "email", "role")}
    try:
        made = body(await run(c, p, ops.users_invite, fields=fields))
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    made["setup_url"] = f"{c.base_url(p)}/console/set-password?token={made.pop('setup_token')}"
    return await listing(c, p, made=made)


async def user_page(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    try:
        u = await run(c, p, ops.users_account, params={"user": p.params["user"]})
    except Failed as exc:
        return show(c, p, "missing.html", exc.status, error=exc.message)
    now = c.now()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(days=29)
    async with c.db.acquire() as conn:
        series = await reports.spend_series(conn, start, now + timedelta(hours=1), "day",
                                            user_id=u["id"])
    return show(c, p, "user.html", status, error=error, u=u, roles=ROLES,
                chart=chart_json(series, c._(p, "Spend (USD)"), start, today, "day"),
                month_nano=sum(int(r["cost_nano"] or 0) for r in series),
                month_requests=sum(int(r["requests"] or 0) for r in series))


async def _act(c: Any, p: Page, action: Any, fields: dict[str, Any], ok: str = "saved") -> Response:
    try:
        await run(c, p, action, params={"user": p.params["user"]}, fields=fields)
    except Failed as exc:
        return await user_page(c, p, exc.message, exc.status)
    return back(f"/admin/users/{p.params['user']}", ok=ok)


async def adjust(c: Any, p: Page) -> Response:
    return await _act(c, p, ops.users_adjust, {"amount": p.form.get("amount", ""),
                                               "note": p.form.get("note", "")})


async def account(c: Any, p: Page) -> Response:
    fields: dict[str, Any] = {}
    if p.form.get("role"):
        fields["role"] = p.form["role"]
    if p.form.get("status"):
        fields["status"] = p.form["status"]
    if "max_devices" in p.form:
        try:
            fields["max_devices"] = int_field(p, "max_devices")
        except Failed as exc:
            return await user_page(c, p, exc.message, 400)
    if p.form.get("reset_2fa") == "1":
        fields["reset_2fa"] = True
    return await _act(c, p, ops.users_account_edit, fields)


async def limits(c: Any, p: Page) -> Response:
    fields: dict[str, Any] = {}
    try:
        for name in ("concurrency", "rpm", "tpm", "max_ips"):
            v = int_field(p, name)
            fields[name] = 0 if v is None else v
    except Failed as exc:
        return await user_page(c, p, exc.message, 400)
    return await _act(c, p, ops.users_edit, fields)


async def revoke(c: Any, p: Page) -> Response:
    return await _act(c, p, ops.users_sessions_revoke, {"session": int_or_none(p.form.get("session"))},
                      ok="revoked")


def int_or_none(v: str | None) -> int | None:
    return int(v) if v and v.isdigit() else None
