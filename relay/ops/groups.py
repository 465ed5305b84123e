"""Groups: a price multiplier (an exact fraction) and the models a group's keys may use.
"""

from __future__ import annotations

from typing import Any

from accounting import store
from accounting.money import format_fraction, parse_multiplier
from relay import errors as E
from relay.ops.base import Op
from relay.ops.parse import (
    names,
    only,
    text,
)
from relay.ops.views import (
    group_json,
)
from relay.webapi import ApiError, Reply


def _group_fields(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if body.get("multiplier") is not None:
        m = body["multiplier"]
        if not isinstance(m, str):
            raise E.InvalidRequest(f"multiplier: expected an exact string such as \"0.8\" or"
                                   f" \"2/3\", got {m!r}")
        out["multiplier"] = format_fraction(parse_multiplier(m))
    if body.get("models") is not None:
        models = [m.strip() for m in names(body, "models") or [] if m.strip()]
        if not models:
            raise E.InvalidRequest("models: expected at least one model or pattern (\"*\": all)")
        out["models"] = models
    return out


async def _groups(op: Op, conn: Any) -> dict[str, store.Group]:
    return {g.name: g for g in (await store.fetch_groups(conn, 0))[0]}


async def groups_list(op: Op) -> Any:
    async with op.read() as conn:
        groups = await _groups(op, conn)
    return {"data": [group_json(g) for g in groups.values()], "next": None}


async def groups_show(op: Op) -> Any:
    async with op.read() as conn:
        g = (await _groups(op, conn)).get(op.params["group"])
    if g is None:
        raise E.NotFound(f"group {op.params['group']!r} not found")
    return group_json(g)


async def groups_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"name", "multiplier", "models"})
    name = (text(body, "name", required=True) or "").strip()
    if not name or "/" in name:
        raise E.InvalidRequest("name: expected a non-empty name without '/'")
    fields = {"multiplier": "1", "models": ["*"], **_group_fields(body)}
    async with op.tx() as conn:
        await conn.execute("LOCK TABLE groups IN SHARE ROW EXCLUSIVE MODE")
        if name in await _groups(op, conn):
            raise ApiError(409, "conflict", f"group {name!r} already exists")
        g = await store.upsert_group(conn, name, fields["multiplier"], fields["models"])
        await store.audit(conn, op.actor, "group.create", name, fields)
    return Reply(201, group_json(g))


async def groups_edit(op: Op) -> Any:
    body = op.body()
    only(body, {"multiplier", "models"})
    fields = _group_fields(body)
    name = op.params["group"]
    async with op.tx() as conn:
        cur = await conn.fetchrow(
            "SELECT multiplier, models FROM groups WHERE name = $1 FOR UPDATE", name)
        if cur is None:
            raise E.NotFound(f"group {name!r} not found")
        g = await store.upsert_group(conn, name, fields.get("multiplier", cur["multiplier"]),
                                     fields.get("models", list(cur["models"])))
        await store.audit(conn, op.actor, "group.edit", name, fields,
                          before={"multiplier": cur["multiplier"], "models": list(cur["models"])})
    return group_json(g)
