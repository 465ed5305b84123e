"""Site settings an operator changes from the console: sign-up mode, verification,
sign-up and invite credits, the inviter's share, the device limit, SMTP, the minimum
top-up. Each overrides its config.toml value ([accounts], [growth], [admin]).

Stored in `site_settings` (migration 040); every change bumps a sequence, and each
worker's `Live` re-reads the table when that sequence moved, checked at most once a
second before a console page or an admin API call, so a change is in effect on every
worker within a second. Changes are audited with the value before. No secret is ever
a setting: the SMTP password stays in the environment variable config names.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import orjson

from accounting import growth, store
from accounting.money import format_usd, parse_multiplier, parse_usd
from relay import errors as E
from relay.ops.base import Op


def _choice(*allowed: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v not in allowed:
            raise E.InvalidRequest(f"expected one of {', '.join(allowed)}, got {v!r}")
        return v
    return check


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("true", "on", "1", "yes"):
        return True
    if v in ("false", "off", "0", "no", ""):
        return False
    raise E.InvalidRequest(f"expected true or false, got {v!r}")


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise E.InvalidRequest(f"expected a whole number, got {v!r}")
        if not lo <= n <= hi:
            raise E.InvalidRequest(f"expected {lo}..{hi}, got {n}")
        return n
    return check


def _usd(v: Any) -> str:
    try:
        return format_usd(parse_usd(str(v).strip(), what="amount"))
    except (ValueError, OverflowError) as exc:
        raise E.InvalidRequest(str(exc))


def _share(v: Any) -> str:
    if str(v).strip() in ("", "0", "0.0"):
        return "0"
    try:
        f = parse_multiplier(str(v).strip() or "0", what="invite_share")
    except ValueError as exc:
        raise E.InvalidRequest(str(exc))
    if not 0 <= f <= 1:
        raise E.InvalidRequest("expected a fraction between 0 and 1")
    return str(v).strip()


def _text(limit: int) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = str(v).strip()
        if len(s) > limit or any(ch in s for ch in "\r\n"):
            raise E.InvalidRequest(f"expected one line of at most {limit} characters")
        return s
    return check


# name: (config section, check)
FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "signup": ("accounts", _choice("open", "invite", "closed")),
    "verify_email": ("accounts", _bool),
    "max_devices": ("accounts", _int(1, 100)),
    "signup_credit": ("growth", _usd),
    "invite_credit": ("growth", _usd),
    "invite_share": ("growth", _share),
    "min_topup": ("admin", _usd),
    "smtp_host": ("accounts", _text(255)),
    "smtp_port": ("accounts", _int(1, 65535)),
    "smtp_user": ("accounts", _text(255)),
    "smtp_from": ("accounts", _text(255)),
    "smtp_tls": ("accounts", _choice("starttls", "tls", "none")),
}
REFRESH_S = 1.0


class Live:
    """This worker's view of the settings over its config; `refresh` is cheap when
    nothing changed (one sequence read, at most once a second)."""

    def __init__(self, cfg: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = cfg
        self.accounts = cfg.accounts
        self.growth_cfg = cfg.growth
        self.admin = cfg.admin
        self.values: dict[str, Any] = {}
        self.version = -1
        self.checked = float("-inf")
        self.clock = clock
        self.listeners: list[Callable[[Live], None]] = []

    def get(self, name: str) -> Any:
        section, _ = FIELDS[name]
        return getattr({"accounts": self.accounts, "growth": self.growth_cfg,
                        "admin": self.admin}[section], name)

    def growth(self, _default: growth.Terms | None = None) -> growth.Terms:
        return growth.Terms.of(self.growth_cfg)

    async def refresh(self, db: Any, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.checked < REFRESH_S:
            return
        self.checked = now
        async with db.acquire() as conn:
            version = await conn.fetchval(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM site_settings_version")
            if version == self.version and not force:
                return
            rows = await conn.fetch("SELECT name, value::text AS value FROM site_settings")
        self.apply({r["name"]: orjson.loads(r["value"]) for r in rows})
        self.version = version

    def apply(self, values: dict[str, Any]) -> None:
        by: dict[str, dict[str, Any]] = {"accounts": {}, "growth": {}, "admin": {}}
        for name, value in values.items():
            if name in FIELDS:
                by[FIELDS[name][0]][name] = value
        self.values = dict(values)
        self.accounts = dataclasses.replace(self.base.accounts, **by["accounts"])
        self.growth_cfg = dataclasses.replace(self.base.growth, **by["growth"])
        self.admin = dataclasses.replace(self.base.admin, **by["admin"])
        for fn in self.listeners:
            fn(self)


async def settings_show(op: Op) -> dict[str, Any]:
    live = op.env.settings
    assert live is not None
    await live.refresh(op.env.db, force=True)
    return {"data": {name: live.get(name) for name in FIELDS},
            "overridden": sorted(live.values)}


async def settings_set(op: Op) -> dict[str, Any]:
    """Set the given settings (others unchanged); `null` returns one to its config value."""
    body = op.body()
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise E.InvalidRequest(f"{unknown[0]}: unknown setting (known: {', '.join(FIELDS)})")
    clean: dict[str, Any] = {}
    for name, value in body.items():
        try:
            clean[name] = None if value is None else FIELDS[name][1](value)
        except E.InvalidRequest as exc:
            raise E.InvalidRequest(f"{name}: {exc.message}")
    if "invite_share" in clean and clean["invite_share"] is not None:
        growth.Terms.of(dataclasses.replace(op.cfg.growth, invite_share=clean["invite_share"]))
    async with op.tx() as conn:
        await conn.execute("LOCK TABLE site_settings IN SHARE ROW EXCLUSIVE MODE")
        old = {r["name"]: orjson.loads(r["value"]) for r in await conn.fetch(
            "SELECT name, value::text AS value FROM site_settings WHERE name = ANY($1::text[])",
            list(clean))}
        live = op.env.settings
        if live is not None:
            await live.refresh(op.env.db, force=True)

        def current(name: str) -> Any:
            if name in old:
                return old[name]
            if live is None:
                return None
            try:
                return FIELDS[name][1](live.get(name))
            except E.InvalidRequest:
                return live.get(name)

        # Only what differs from the value in effect becomes (or stops being) an override.
        changed = {k: v for k, v in clean.items()
                   if (v is None and k in old) or (v is not None and current(k) != v)}
        if not changed:
            return {"changed": []}
        for name, value in changed.items():
            if value is None:
                await conn.execute("DELETE FROM site_settings WHERE name = $1", name)
            else:
                await conn.execute(
                    "INSERT INTO site_settings (name, value, updated_by) VALUES ($1, $2::jsonb, $3)"
                    " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now(),"
                    " updated_by = EXCLUDED.updated_by", name, orjson.dumps(value).decode(), op.actor)
        await conn.execute("SELECT nextval('site_settings_version')")
        await store.audit(conn, op.actor, "settings.set", "site", changed,
                          before={k: current(k) for k in changed})
    if op.env.settings is not None:
        await op.env.settings.refresh(op.env.db, force=True)
    return {"changed": sorted(changed)}
