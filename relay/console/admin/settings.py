"""Site settings: sign-up mode, email verification, sign-up and invite credits and the
inviter's share, the console device limit, the minimum top-up, and SMTP (the password
stays in the environment). Saved through relay.ops.settings: audited, and in effect
on every worker within a second. Changing settings needs an admin; viewers see them.
"""

from __future__ import annotations

from typing import Any

from relay.console import back
from relay.console.admin import Failed, run, show
from relay.console.web import ADMIN, VIEWER, Page, Response
from relay.ops import settings as ops


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/admin/settings", lambda p: page(c, p), VIEWER)
    r.add("POST", "/admin/settings", lambda p: save(c, p), ADMIN)


async def page(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    got = await run(c, p, ops.settings_show)
    values = dict(got["data"])
    if p.form:
        values.update({k: p.form.get(k, "") for k in ops.FIELDS if k in p.form})
    return show(c, p, "settings.html", status, error=error, s=values, overridden=got["overridden"],
                smtp_password_env=c.cfg.smtp_password_env)


async def save(c: Any, p: Page) -> Response:
    fields: dict[str, Any] = {}
    for name in ops.FIELDS:
        if name == "verify_email":
            fields[name] = p.form.get(name) == "on"
        elif name in p.form:
            fields[name] = p.form[name]
    try:
        await run(c, p, ops.settings_set, fields=fields)
    except Failed as exc:
        return await page(c, p, exc.message, exc.status)
    return back("/admin/settings", ok="saved")
