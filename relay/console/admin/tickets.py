"""Support tickets, the operators' side: the queue by state (open first), a thread with
the user and the request it is about (linked to the request log), a reply (the key
holder gets an email when SMTP is configured), and the state.
"""

from __future__ import annotations

from typing import Any

from relay.console import back
from relay.console.admin import Failed, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import tickets as ops


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/tickets", lambda p: listing(c, p), VIEWER)
    r.add("GET", "/admin/tickets/{ticket}", lambda p: thread(c, p), VIEWER)
    r.add("POST", "/admin/tickets/{ticket}/reply", lambda p: reply(c, p), ADMIN)
    r.add("POST", "/admin/tickets/{ticket}/state", lambda p: state(c, p), ADMIN)


async def listing(c: Any, p: Page) -> Response:
    st = p.query.get("state", "open")
    q = {k: p.query[k] for k in ("user", "cursor") if p.query.get(k)}
    if st != "all":
        q["state"] = st
    error = ""
    try:
        found = await run(c, p, ops.tickets_list, query=q)
    except Failed as exc:
        found, error = {"data": [], "next": None}, exc.message
    return show(c, p, "tickets.html", 400 if error else 200, error=error, rows=found["data"],
                next=found["next"], state=st)


async def thread(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    try:
        got = await run(c, p, ops.tickets_show, params={"ticket": p.params["ticket"]})
    except Failed as exc:
        return show(c, p, "missing.html", exc.status, error=exc.message)
    return show(c, p, "ticket.html", status, error=error, **got)


async def reply(c: Any, p: Page) -> Response:
    assert p.account is not None
    fields = {"body": p.form.get("body", ""), "state": p.form.get("state") or None}
    try:
        got = await run(c, p, lambda op: ops.tickets_reply(op, p.user_id),
                        params={"ticket": p.params["ticket"]}, fields=fields)
    except Failed as exc:
        return await thread(c, p, exc.message, exc.status)
    t = got["ticket"]
    if got["notify"] and c.cfg.smtp_host:  # without SMTP, no copy of the thread in the log
        await c.mailer.send(got["notify"], f"{c.cfg.site_name}: {t.subject}",
                            f"Support answered your ticket #{t.id}:\n\n{p.form.get('body', '').strip()}\n\n"
                            f"{c.base_url(p)}/console/tickets/{t.id}")
    return back(f"/admin/tickets/{t.id}", ok="ticket_sent")


async def state(c: Any, p: Page) -> Response:
    try:
        await run(c, p, ops.tickets_state, params={"ticket": p.params["ticket"]},
                  fields={"state": p.form.get("state", "")})
    except Failed as exc:
        return await thread(c, p, exc.message, exc.status)
    return back(f"/admin/tickets/{p.params['ticket']}", ok="saved")
