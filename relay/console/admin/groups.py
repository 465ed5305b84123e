"""Groups and invites. Groups: each group's price multiplier (an exact fraction) and the
models its keys may use; new groups and edits (relay.ops.groups). Invites: the terms
(sign-up credit, invite credit, the inviter's share of the first top-up, set on the
settings page) and every invitation with the payout it brought (relay.ops.invites).
"""

from __future__ import annotations

from typing import Any

from relay.console import back
from relay.console.admin import Failed, csv_list, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import groups as ops
from relay.ops import invites


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/groups", lambda p: listing(c, p), VIEWER)
    r.add("POST", "/admin/groups", lambda p: create(c, p), ADMIN)
    r.add("POST", "/admin/groups/{group}", lambda p: edit(c, p), ADMIN)
    r.add("GET", "/admin/invites", lambda p: invites_page(c, p), VIEWER)


async def listing(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    rows = (await run(c, p, ops.groups_list))["data"]
    return show(c, p, "groups.html", status, error=error, groups=rows, form=p.form)


def _fields(p: Page) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.form.get("multiplier", "").strip():
        out["multiplier"] = p.form["multiplier"].strip()
    if "models" in p.form:
        out["models"] = csv_list(p.form["models"]) or ["*"]
    return out


async def create(c: Any, p: Page) -> Response:
    try:
        await run(c, p, ops.groups_create, fields={"name": p.form.get("name", ""), **_fields(p)})
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back("/admin/groups", ok="saved")


async def edit(c: Any, p: Page) -> Response:
    try:
        await run(c, p, ops.groups_edit, params={"group": p.params["group"]}, fields=_fields(p))
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back("/admin/groups", ok="saved")


async def invites_page(c: Any, p: Page) -> Response:
    q = {"cursor": p.query["cursor"]} if p.query.get("cursor", "").isdigit() else {}
    got = await run(c, p, invites.invites_report, query=q)
    terms = c.settings
    return show(c, p, "invites.html", rows=got["data"], next=got["next"], totals=got["totals"],
                signup_credit=terms.get("signup_credit"), invite_credit=terms.get("invite_credit"),
                invite_share=terms.get("invite_share"))
