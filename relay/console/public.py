"""Public pages: /pricing (models and prices per group) and /status (health per group
over the last hour and day). Neither shows anything about any user."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from accounting import health
from relay.console import catalog
from relay.console.web import PUBLIC, Page, Response


def routes(c: Any) -> None:
    c.router.add("GET", "/pricing", lambda p: pricing(c, p), PUBLIC)
    c.router.add("GET", "/status", lambda p: status(c, p), PUBLIC)


async def pricing(c: Any, p: Page) -> Response:
    groups = sorted(c.gw.groups.multiplier)
    tables = [{"group": g, "multiplier": catalog.multiplier_text(c.gw, g),
               "models": catalog.priced(c.gw, g)} for g in groups]
    return c.render(p, "pricing.html", tables=tables)


async def status(c: Any, p: Page) -> Response:
    end = c.now()
    async with c.db.acquire() as conn:
        hour = await health.health(conn, end - timedelta(hours=1), end, "group")
        day = await health.health(conn, end - timedelta(hours=24), end, "group")
    by_day = {r["group"]: r for r in day}
    by_hour = {r["group"]: r for r in hour}
    rows = []
    for g in sorted(set(c.gw.groups.multiplier) | set(by_day)):
        h, d = by_hour.get(g), by_day.get(g)
        rate = h["success_rate"] if h else None
        state = "idle" if rate is None else "ok" if rate >= 0.98 else "degraded" if rate >= 0.8 else "down"
        rows.append({"group": g, "state": state, "hour": h, "day": d})
    return c.render(p, "status.html", rows=rows, now=end)
