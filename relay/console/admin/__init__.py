"""The operator's pages under /admin: the same house as the key holder's console (its
router, sessions, CSRF and Origin checks, layout and catalogues), one module per
resource, each calling the relay.ops action the admin API and the CLI call.

Who may see what is decided by the router (relay.console.web) before a handler runs:
every route here says the least role it needs (VIEWER to read; a POST always needs
ADMIN), and an owner or admin without 2FA is sent to turn it on first. An action that
only an owner may take (naming operators) is refused again inside relay.ops.

    overview.py       site-wide requests, spend, errors; top users, keys, models; channels; ledger
    users.py          search, a user's page: balance, role, status, devices, sessions, keys...
    keys.py           every key: search, edit, limits, disable/enable
    groups.py         groups (multiplier, models) and invites (terms, payouts)
    channels.py       channels: create, edit, enable/disable, test, live health
    prices.py         prices: current, versions, diff, scheduled changes
    codes.py          redemption codes: batches, CSV, void
    plans.py          plans and their subscribers
    notes.py          announcements (Markdown, sanitised, scheduled)
    tickets.py        support tickets, the operators' side
    logs.py           the request log across users, each request's bill
    audit.py          the audit log
    settings.py       site settings (sign-up, verification, credits, devices, SMTP, top-up)
"""

from __future__ import annotations

from typing import Any

from relay import errors as E
from relay.console.web import Page
from relay.ops.base import Env, Op
from relay.ops.parse import mapped

Failed = E.GatewayError


def routes(c: Any) -> None:
    from relay.console.admin import (
        audit,
        channels,
        codes,
        groups,
        keys,
        logs,
        notes,
        overview,
        plans,
        prices,
        settings,
        tickets,
        users,
    )

    for m in (overview, users, keys, groups, channels, prices, codes, plans, notes, tickets, logs,
              audit, settings):
        m.routes(c)


def actor(p: Page) -> str:
    assert p.account is not None
    return p.account.email or p.account.name


def env(c: Any) -> Env:
    return Env(c.gw.cfg, c.db, c.gw, c.settings)


async def run(c: Any, p: Page, action: Any, *, params: dict[str, str] | None = None,
              query: dict[str, str] | None = None, fields: dict[str, Any] | None = None) -> Any:
    """Run one relay.ops action as the signed-in operator; refusals raise `Failed`
    (relay.errors.GatewayError) with a message fit to show."""
    assert p.account is not None
    op = Op(env(c), actor(p), params or {}, query or {}, fields, role=p.account.role)
    return await mapped(action)(op)


def show(c: Any, p: Page, template: str, status: int = 200, *, error: str = "",
         **ctx: Any) -> Any:
    """Render an operator page: `can_edit` (admin or owner) and `is_owner` decide which
    forms are shown; the router refuses the forms' POSTs to anyone else anyway."""
    assert p.account is not None
    role = p.account.role
    return c.render(p, f"admin/{template}", status, error=error,
                    can_edit=role in ("admin", "owner"), is_owner=role == "owner", **ctx)


def body(result: Any) -> Any:
    """An action's result without its HTTP status (relay.webapi.Reply)."""
    return getattr(result, "body", result)


def present(p: Page, *names: str) -> dict[str, str]:
    """The named form fields that were filled in, stripped."""
    return {n: p.form[n].strip() for n in names if p.form.get(n, "").strip()}


def int_field(p: Page, name: str) -> int | None:
    v = p.form.get(name, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise E.InvalidRequest(f"{name}: expected a whole number, got {v!r}")


def csv_list(text: str) -> list[str]:
    return [s.strip() for s in text.replace("\n", ",").split(",") if s.strip()]
