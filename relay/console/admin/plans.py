"""Plans: their terms (price, credit, validity, periodic credit and its reset, models,
groups, renewal window, on sale or archived), a new plan, edits (for future purchases
and renewals), and each plan's subscribers. relay.ops.plans actions.
"""

from __future__ import annotations

from typing import Any

from accounting import plans as plan_store
from relay.console import back
from relay.console.admin import Failed, body, csv_list, int_field, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import plans as ops


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/plans", lambda p: listing(c, p), VIEWER)
    r.add("POST", "/admin/plans", lambda p: create(c, p), ADMIN)
    r.add("GET", "/admin/plans/{plan}", lambda p: plan_page(c, p), VIEWER)
    r.add("POST", "/admin/plans/{plan}", lambda p: edit(c, p), ADMIN)


def _fields(p: Page) -> dict[str, Any]:
    f = p.form
    out: dict[str, Any] = {}
    for name in ("name", "price", "credit", "periodic_credit", "validity", "reset", "status"):
        if f.get(name, "").strip():
            out[name] = f[name].strip()
    for name in ("validity_days", "reset_days"):
        days = int_field(p, name)
        if days is not None:
            out[name.replace("_days", "_s")] = days * 86_400
    hours = int_field(p, "renewal_window_hours")
    if hours is not None:
        out["renewal_window_s"] = hours * 3600
    if "models" in f:
        out["models"] = csv_list(f["models"]) or None
    if f.get("groups", "").strip():
        out["groups"] = csv_list(f["groups"])
    return out


async def listing(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    rows = (await run(c, p, ops.plans_list, query={"all": "true"}))["data"]
    subs = (await run(c, p, ops.subscriptions_list))["data"]
    counts: dict[int, int] = {}
    for s in subs:
        if s["state"] == "active":
            counts[s["plan_id"]] = counts.get(s["plan_id"], 0) + 1
    return show(c, p, "plans.html", status, error=error, plans=rows, counts=counts,
                validities=plan_store.VALIDITIES, resets=plan_store.RESETS, form=p.form)


async def create(c: Any, p: Page) -> Response:
    try:
        made = body(await run(c, p, ops.plans_create, fields=_fields(p)))
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back(f"/admin/plans/{made['id']}", ok="saved")


async def plan_page(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    try:
        plan = await run(c, p, ops.plans_show, params={"plan": p.params["plan"]})
    except Failed as exc:
        return show(c, p, "missing.html", exc.status, error=exc.message)
    subs = (await run(c, p, ops.subscriptions_list, query={"plan": str(plan["id"])}))["data"]
    return show(c, p, "plan.html", status, error=error, plan=plan, subs=subs,
                validities=plan_store.VALIDITIES, resets=plan_store.RESETS)


async def edit(c: Any, p: Page) -> Response:
    try:
        await run(c, p, ops.plans_edit, params={"plan": p.params["plan"]}, fields=_fields(p))
    except Failed as exc:
        return await plan_page(c, p, exc.message, exc.status)
    return back(f"/admin/plans/{p.params['plan']}", ok="saved")
