"""Announcements: write one in Markdown (previewed as users will see it, sanitised),
schedule its start and end, edit it, take it down. relay.ops.announcements actions;
key holders see them on their home page with a mark on the ones they have not seen.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from relay.console import back
from relay.console.admin import Failed, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import announcements as ops


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/announcements", lambda p: listing(c, p), VIEWER)
    r.add("POST", "/admin/announcements", lambda p: create(c, p), ADMIN)
    r.add("POST", "/admin/announcements/{announcement}", lambda p: edit(c, p), ADMIN)
    r.add("POST", "/admin/announcements/{announcement}/end", lambda p: end(c, p), ADMIN)


def _when(c: Any, p: Page, name: str) -> str | None:
    text = p.form.get(name, "").strip()
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise Failed(c._(p, "Times look like 2026-12-31T18:00."), status=400)
    return (t.replace(tzinfo=c.zone(p)) if t.tzinfo is None else t).isoformat()


def _fields(c: Any, p: Page) -> dict[str, Any]:
    return {"title": p.form.get("title", ""), "body": p.form.get("body", ""),
            "starts_at": _when(c, p, "starts_at"), "ends_at": _when(c, p, "ends_at")}


async def listing(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    rows = (await run(c, p, ops.announcements_list))["data"]
    now = c.now()
    for r in rows:
        r["state"] = ("ended" if r["ends_at"] is not None and r["ends_at"] <= now else
                      "scheduled" if r["starts_at"] > now else "live")
    preview = ops.render(p.form["body"]) if p.form.get("body") else ""
    return show(c, p, "announcements.html", status, error=error, rows=rows, form=p.form,
                preview=preview)


async def create(c: Any, p: Page) -> Response:
    try:
        await run(c, p, ops.announcements_create, fields=_fields(c, p))
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back("/admin/announcements", ok="saved")


async def edit(c: Any, p: Page) -> Response:
    try:
        fields = _fields(c, p)
        if fields["starts_at"] is None:
            fields.pop("starts_at")
        await run(c, p, ops.announcements_edit, params={"announcement": p.params["announcement"]},
                  fields=fields)
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back("/admin/announcements", ok="saved")


async def end(c: Any, p: Page) -> Response:
    try:
        await run(c, p, ops.announcements_end, params={"announcement": p.params["announcement"]})
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back("/admin/announcements", ok="done")
