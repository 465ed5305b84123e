"""Channels: every upstream with this worker's live health (breaker state, error rate,
in-flight), create, edit, enable, disable, and a "test" button that sends one smallest
request and shows the status and latency. Channels from config.toml are shown and
tested but edited in the file. Header values are never shown (they may be credentials).
"""

from __future__ import annotations

from typing import Any

from relay.console import back
from relay.console.admin import Failed, csv_list, int_field, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import channels as ops


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/channels", lambda p: listing(c, p), VIEWER)
    r.add("POST", "/admin/channels", lambda p: create(c, p), ADMIN)
    r.add("GET", "/admin/channels/{channel}", lambda p: channel_page(c, p), VIEWER)
    r.add("POST", "/admin/channels/{channel}", lambda p: edit(c, p), ADMIN)
    r.add("POST", "/admin/channels/{channel}/enable", lambda p: toggle(c, p, ops.channels_enable), ADMIN)
    r.add("POST", "/admin/channels/{channel}/disable", lambda p: toggle(c, p, ops.channels_disable), ADMIN)
    r.add("POST", "/admin/channels/{channel}/test", lambda p: test(c, p), ADMIN)


def _live(c: Any) -> dict[str, dict[str, Any]]:
    router = getattr(c.gw, "router", None)
    return router.status() if router is not None else {}


async def listing(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    chans = (await run(c, p, ops.channels_list))["data"]
    return show(c, p, "channels.html", status, error=error, channels=chans, live=_live(c),
                form=p.form)


def _fields(p: Page, *, create: bool) -> dict[str, Any]:
    f = p.form
    out: dict[str, Any] = {}
    for name in ("protocol", "base_url", "api_key_env"):
        if f.get(name, "").strip():
            out[name] = f[name].strip()
    if f.get("models", "").strip() or not create:
        out["models"] = csv_list(f.get("models", "")) or ["*"]
    mapping: dict[str, str] = {}
    for line in f.get("model_map", "").splitlines():
        if "=" in line:
            alias, _, target = line.partition("=")
            if alias.strip() and target.strip():
                mapping[alias.strip()] = target.strip()
    if mapping or not create:
        out["model_map"] = mapping
    for name in ("priority", "weight", "max_concurrency"):
        n = int_field(p, name)
        if n is not None:
            out[name] = n
    return out


async def create(c: Any, p: Page) -> Response:
    try:
        fields = {"name": p.form.get("name", "").strip(), **_fields(p, create=True)}
        made = await run(c, p, ops.channels_create, fields=fields)
    except Failed as exc:
        return await listing(c, p, exc.message, exc.status)
    return back(f"/admin/channels/{made.body['name']}", ok="saved")


async def channel_page(c: Any, p: Page, error: str = "", status: int = 200,
                       tested: dict[str, Any] | None = None) -> Response:
    try:
        ch = await run(c, p, ops.channels_show, params={"channel": p.params["channel"]})
    except Failed as exc:
        return show(c, p, "missing.html", exc.status, error=exc.message)
    return show(c, p, "channel.html", status, error=error, ch=ch, live=_live(c).get(ch["name"]),
                tested=tested, header_names=sorted(ch["headers"] or {}))


async def edit(c: Any, p: Page) -> Response:
    try:
        await run(c, p, ops.channels_edit, params={"channel": p.params["channel"]},
                  fields=_fields(p, create=False))
    except Failed as exc:
        return await channel_page(c, p, exc.message, exc.status)
    return back(f"/admin/channels/{p.params['channel']}", ok="saved")


async def toggle(c: Any, p: Page, action: Any) -> Response:
    try:
        await run(c, p, action, params={"channel": p.params["channel"]})
    except Failed as exc:
        return await channel_page(c, p, exc.message, exc.status)
    return back(f"/admin/channels/{p.params['channel']}", ok="saved")


async def test(c: Any, p: Page) -> Response:
    try:
        result = await run(c, p, ops.channels_test, params={"channel": p.params["channel"]},
                           fields={"model": p.form.get("model", "")})
    except Failed as exc:
        return await channel_page(c, p, exc.message, exc.status)
    return await channel_page(c, p, tested=result)
