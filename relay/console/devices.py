"""The Devices page: the console sessions (revoke any) against the device limit, and the
addresses the user's keys were used from, against the API's distinct-address limit.

The window's addresses are those of the usage log in the limit's window (each of the
user's keys walked on its (key_id, ts) index, a few minutes of rows) plus this worker's
own view from the limiter, which holds requests not yet flushed. The log holds
addresses only where the operator turned `server.log_client_ip` on; otherwise the page
shows the limiter's view alone and says so. "Recent addresses" are
those of the user's last RECENT requests, not of a day: a day of a busy key is tens of
thousands of rows, and the page must answer in milliseconds at any volume.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from accounting import sessions
from relay.console.web import USER, Page, Response

RECENT = 1000


def routes(c: Any) -> None:
    c.router.add("GET", "/console/account/devices", lambda p: devices(c, p), USER)


async def addresses(c: Any, p: Page, conn: Any, recent: bool) -> dict[str, Any]:
    """{max_ips, window_min, window: [(ip, last, n)], recent: [(ip, last, n)]}."""
    window_s = c.gw.cfg.limits.user_ip_window_s
    keys = [r[0] for r in await conn.fetch("SELECT id FROM keys WHERE user_id = $1", p.user_id)]
    user = await conn.fetchrow("SELECT max_ips FROM users WHERE id = $1", p.user_id)
    max_ips = (user["max_ips"] if user else 0) or c.gw.cfg.limits.user_max_ips
    since = c.now() - timedelta(seconds=window_s)
    window: dict[str, dict[str, Any]] = {}
    latest: list[Any] = []
    logged = c.gw.cfg.server.log_client_ip  # off by default: rows carry no address
    if keys and logged:
        for r in await conn.fetch(
                "SELECT client_ip, max(ts) AS last, count(*) AS n FROM usage_log"
                " WHERE key_id = ANY($1::bigint[]) AND ts > $2 AND client_ip <> ''"
                " GROUP BY 1", keys, since):
            window[r["client_ip"]] = dict(r)
        if recent:
            # Each key's newest rows (its (key_id, ts) index, newest first), then the
            # newest RECENT of them all.
            latest = await conn.fetch(
                "SELECT client_ip, max(ts) AS last, count(*) AS n FROM ("
                " SELECT l.client_ip, l.ts FROM unnest($1::bigint[]) AS k(id) CROSS JOIN LATERAL"
                "  (SELECT client_ip, ts FROM usage_log WHERE key_id = k.id"
                "   ORDER BY ts DESC LIMIT $2) l ORDER BY l.ts DESC LIMIT $2) r"
                " WHERE client_ip <> '' GROUP BY 1 ORDER BY 2 DESC LIMIT 50", keys, RECENT)
    limiter = getattr(c.gw, "limiter", None)
    scope = limiter.users.get(p.user_id) if limiter is not None else None
    horizon = c.now().timestamp() - window_s
    if scope is not None:  # requests this worker admitted that the log may not hold yet
        from datetime import UTC, datetime

        for ip, at in getattr(scope, "ips", {}).items():
            if at >= horizon and ip not in window:
                window[ip] = {"client_ip": ip, "last": datetime.fromtimestamp(at, UTC), "n": None}
    return {"max_ips": max_ips, "window_min": max(1, window_s // 60),
            "window": sorted(window.values(), key=lambda r: r["last"], reverse=True),
            "recent": [dict(r) for r in latest], "recent_n": RECENT, "logged": logged}


async def devices(c: Any, p: Page) -> Response:
    assert p.account is not None and p.session is not None
    async with c.db.acquire() as conn:
        live = await sessions.live(conn, p.user_id)
        addrs = await addresses(c, p, conn, recent=True)
    return c.render(p, "devices.html", sessions=live, current=p.session.id,
                    devices=c.devices(p.account), **addrs)
