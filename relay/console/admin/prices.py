"""Prices: the version in effect for each model, a change (now or at a future instant,
with an optional long-context tier), the changes waiting for their instant, a model's
versions, and a diff between any two versions. A request keeps the version it was admitted with; a scheduled version takes
effect on each worker at its instant (accounting.pricing.PriceBook).
"""

from __future__ import annotations

from datetime import datetime
from fractions import Fraction
from typing import Any

from accounting.pricing import LONG_CONTEXT_CLASSES
from relay.console import back
from relay.console.admin import Failed, int_field, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import prices as ops

CLASSES = ("input", "output", "cache_read", "cache_write")


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/prices", lambda p: listing(c, p), VIEWER)
    r.add("POST", "/admin/prices", lambda p: set_price(c, p), ADMIN)
    r.add("GET", "/admin/prices/{model}", lambda p: versions(c, p), VIEWER)


async def listing(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    current = (await run(c, p, ops.prices_list))["data"]
    scheduled = (await run(c, p, ops.prices_scheduled))["data"]
    return show(c, p, "prices.html", status, error=error, prices=current, scheduled=scheduled,
                form=p.form)


def _when(c: Any, p: Page, text: str) -> str | None:
    """A datetime-local value in the operator's time zone, as ISO 8601 with its offset."""
    text = text.strip()
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise Failed(c._(p, "Times look like 2026-12-31T18:00."), status=400)
    if t.tzinfo is None:
        t = t.replace(tzinfo=c.zone(p))
    return t.isoformat()


async def set_price(c: Any, p: Page) -> Response:
    f = p.form
    try:
        fields: dict[str, Any] = {"model": f.get("model", "").strip()}
        for k in (*CLASSES, *LONG_CONTEXT_CLASSES):
            if f.get(k, "").strip():
                fields[k] = f[k].strip()
        threshold = int_field(p, "long_context_threshold")
        if threshold is not None:
            fields["long_context_threshold"] = threshold
        when = _when(c, p, f.get("effective_at", ""))
        if when is not None:
            fields["effective_at"] = when
        await run(c, p, ops.prices_set, fields=fields)
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back("/admin/prices", ok="saved")


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for k in CLASSES:
        old, new = int(a[f"{k}_nano"]), int(b[f"{k}_nano"])
        change = None if old == 0 else float(Fraction(new - old, old))
        out.append({"class": k, "old": old, "new": new, "change": change})
    return out


async def versions(c: Any, p: Page) -> Response:
    model = p.params["model"]
    rows = (await run(c, p, ops.prices_history, query={"model": model}))["data"]
    if not rows:
        return show(c, p, "missing.html", 404, error=c._(p, "No price for this model."))
    by = {str(r["version"]): r for r in rows}
    now = c.now()
    # By default: the version in effect against the one it replaced.
    live = [r for r in rows if r["effective_at"] is None or r["effective_at"] <= now] or rows
    b = by.get(p.query.get("b", "")) or live[0]
    a = by.get(p.query.get("a", "")) or (live[1] if len(live) > 1 else live[0])
    return show(c, p, "price_versions.html", model=model, versions=rows, a=a, b=b, diff=diff(a, b))
