"""Support tickets, the key holder's side: open one (optionally about one of their own
logged requests, whose id is attached), read the thread, reply, close. Every ticket is
checked against the signed-in user: another user's ticket answers 404 like a missing
one. The operators are told of a reply by email when one of them answered before and
SMTP is configured.
"""

from __future__ import annotations

from typing import Any

from accounting import reports, tickets
from accounting.store import NotFound, StoreError
from relay.console import back
from relay.console.web import USER, Page, Refused, Response


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/console/tickets", lambda p: listing(c, p), USER)
    r.add("POST", "/console/tickets", lambda p: open_one(c, p), USER)
    r.add("GET", "/console/tickets/{ticket}", lambda p: thread(c, p), USER)
    r.add("POST", "/console/tickets/{ticket}/reply", lambda p: reply(c, p), USER)
    r.add("POST", "/console/tickets/{ticket}/close", lambda p: close(c, p), USER)


async def listing(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    async with c.db.acquire() as conn:
        rows, _ = await tickets.listing(conn, user_id=p.user_id, limit=100)
    rid = p.form.get("request_id") or p.query.get("request_id", "")
    return c.render(p, "tickets.html", status, error=error, rows=rows, request_id=rid,
                    form=p.form)


async def _own(c: Any, p: Page, conn: Any) -> tickets.Ticket:
    ref = p.params["ticket"]
    try:
        t = await tickets.get(conn, int(ref)) if ref.isdigit() else None
    except NotFound:
        t = None
    if t is None or t.user_id != p.user_id:
        raise Refused(404, c._(p, "No such ticket."))
    return t


async def open_one(c: Any, p: Page) -> Response:
    await c.throttled(p, "ticket", str(p.user_id))
    rid = p.form.get("request_id", "").strip()
    try:
        async with c.db.acquire() as conn:
            if rid:
                row = await reports.usage_row(conn, rid)
                if row is None or row["user_id"] != p.user_id:
                    raise StoreError(c._(p, "No such request."))
                rid = row["request_id"]
            t = await tickets.open_ticket(conn, p.user_id, p.form.get("subject", ""),
                                          p.form.get("body", ""), rid)
    except StoreError as exc:
        return await listing(c, p, c._(p, str(exc)), 400)
    return back(f"/console/tickets/{t.id}", ok="ticket_sent")


async def thread(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    async with c.db.acquire() as conn:
        t = await _own(c, p, conn)
        msgs = await tickets.messages(conn, t.id)
    return c.render(p, "ticket.html", status, error=error, ticket=t, messages=msgs,
                    operator_view=False)


async def reply(c: Any, p: Page) -> Response:
    await c.throttled(p, "ticket", str(p.user_id))
    try:
        async with c.db.acquire() as conn:
            t = await _own(c, p, conn)
            t = await tickets.reply(conn, t.id, p.user_id, p.form.get("body", ""), staff=False)
            staff = await tickets.last_staff_author(conn, t.id)
    except StoreError as exc:
        return await thread(c, p, c._(p, str(exc)), 400)
    if staff and c.cfg.smtp_host:  # without SMTP, no copy of the thread in the log
        await c.mailer.send(staff, f"{c.cfg.site_name}: #{t.id} {t.subject}",
                            f"The user answered ticket #{t.id}:\n\n{p.form.get('body', '').strip()}\n\n"
                            f"{c.base_url(p)}/admin/tickets/{t.id}")
    return back(f"/console/tickets/{t.id}", ok="ticket_sent")


async def close(c: Any, p: Page) -> Response:
    async with c.db.acquire() as conn:
        t = await _own(c, p, conn)
        await tickets.set_state(conn, t.id, "closed")
    return back(f"/console/tickets/{t.id}", ok="saved")
