"""Every key: search by prefix, owner, group and state; a key's page with the edits a
key holder has (name, models, expiry, group, cap) plus the limits only operators set
(concurrency, RPM, TPM, client networks), and disable/enable. relay.ops.keys actions.
"""

from __future__ import annotations

from typing import Any

from accounting import store
from relay.console import back
from relay.console.admin import Failed, csv_list, int_field, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import keys as ops


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/keys", lambda p: listing(c, p), VIEWER)
    r.add("GET", "/admin/keys/{key}", lambda p: key_page(c, p), VIEWER)
    r.add("POST", "/admin/keys/{key}", lambda p: edit(c, p), ADMIN)
    r.add("POST", "/admin/keys/{key}/disable", lambda p: act(c, p, ops.keys_disable), ADMIN)
    r.add("POST", "/admin/keys/{key}/enable", lambda p: act(c, p, ops.keys_enable), ADMIN)


async def listing(c: Any, p: Page) -> Response:
    q = {k: p.query[k] for k in ("prefix", "user", "group", "status", "cursor", "name")
         if p.query.get(k)}
    error = ""
    try:
        found = await run(c, p, ops.keys_search, query={**q, "limit": "100"})
    except Failed as exc:
        found, error = {"data": [], "next": None}, exc.message
    async with c.db.acquire() as conn:
        groups = sorted(g.name for g in (await store.fetch_groups(conn, 0))[0])
    return show(c, p, "keys.html", error=error, keys=found["data"], next=found["next"],
                filters={k: p.query.get(k, "") for k in ("prefix", "user", "group", "status")},
                groups=groups)


async def key_page(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    try:
        k = await run(c, p, ops.keys_show, params={"key": p.params["key"]})
    except Failed as exc:
        return show(c, p, "missing.html", exc.status, error=exc.message)
    async with c.db.acquire() as conn:
        groups = sorted(g.name for g in (await store.fetch_groups(conn, 0))[0])
    return show(c, p, "key.html", status, error=error, k=k, groups=groups)


async def edit(c: Any, p: Page) -> Response:
    f = p.form
    try:
        fields: dict[str, Any] = {"name": f.get("name", "").strip(),
                                  "models": csv_list(f.get("models", "")) or None,
                                  "expires_at": f.get("expires_at", "").strip() or None,
                                  "allowed_cidrs": csv_list(f.get("allowed_cidrs", ""))}
        if f.get("group"):
            fields["group"] = f["group"]
        fields["cap"] = f.get("cap", "").strip() or "0"
        for name in ("concurrency", "rpm", "tpm"):
            fields[name] = int_field(p, name) or 0
        await run(c, p, ops.keys_edit, params={"key": p.params["key"]}, fields=fields)
    except Failed as exc:
        return await key_page(c, p, exc.message, exc.status)
    return back(f"/admin/keys/{p.params['key']}", ok="key_saved")


async def act(c: Any, p: Page, action: Any) -> Response:
    try:
        await run(c, p, action, params={"key": p.params["key"]})
    except Failed as exc:
        return await key_page(c, p, exc.message, exc.status)
    return back(f"/admin/keys/{p.params['key']}", ok="saved")
