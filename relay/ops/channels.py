"""Upstream channels: create, edit, enable, disable, and this worker's live health.
Header values may be credentials: the audit log keeps their names only.
"""

from __future__ import annotations

from typing import Any

from accounting import channels as chan_store
from accounting import store
from relay import errors as E
from relay.ops.base import Op
from relay.ops.parse import (
    only,
    ref,
    text,
)
from relay.ops.views import (
    channel_json,
)
from relay.webapi import Reply

_CHANNEL_FIELDS = frozenset(chan_store.EDITABLE)


def _channel_audit(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if "headers" in out and isinstance(out["headers"], dict):
        out["headers"] = sorted(out["headers"])  # names only: a value may be a credential
    return out


async def channels_list(op: Op) -> Any:
    async with op.read() as conn:
        chans = await store.list_channels(conn)
    return {"data": [channel_json(c) for c in chans], "next": None}


async def channels_show(op: Op) -> Any:
    async with op.read() as conn:
        ch = await chan_store.get_channel(conn, ref(op.params["channel"]))
    if ch is None:
        raise E.NotFound(f"channel {op.params['channel']!r} not found")
    return channel_json(ch)


async def channels_health(op: Op) -> Any:
    """This worker's view of the channel: breaker state, error rate, load. Every worker
    keeps its own breaker; /metrics merges them (the worst state wins)."""
    name = op.params["channel"]
    status = op.gw.router.status()
    if name not in status:
        raise E.NotFound(f"channel {name!r} is not in service (unknown or disabled)")
    return {"channel": name, **status[name]}


async def channels_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"name", *_CHANNEL_FIELDS})
    name = text(body, "name", required=True) or ""
    fields = {k: v for k, v in body.items() if k != "name" and v is not None}
    for req in ("protocol", "base_url"):
        if req not in fields:
            raise E.InvalidRequest(f"{req}: required")
    async with op.tx() as conn:
        ch = await chan_store.create_channel(conn, name, fields.pop("protocol"),
                                             fields.pop("base_url"), **fields)
        await store.audit(conn, op.actor, "channel.create", ch.name,
                          _channel_audit({"protocol": ch.protocol, "base_url": ch.base_url,
                                               **fields}))
    return Reply(201, channel_json(ch))


async def channels_edit(op: Op) -> Any:
    body = op.body()
    only(body, set(_CHANNEL_FIELDS))
    fields = {k: v for k, v in body.items() if v is not None}
    return await _channel_change(op, "channel.edit", fields)


async def _channel_change(op: Op, action: str, fields: dict[str, Any]) -> Any:
    async with op.tx() as conn:
        old = await chan_store.get_channel(conn, ref(op.params["channel"]))
        ch = await chan_store.edit_channel(conn, ref(op.params["channel"]), **fields)
        before = None if old is None else {k: v for k, v in channel_json(old).items() if k in fields}
        await store.audit(conn, op.actor, action, ch.name, _channel_audit(fields),
                          before=None if before is None else _channel_audit(before))
    return channel_json(ch)


async def channels_disable(op: Op) -> Any:
    return await _channel_change(op, "channel.disable", {"enabled": False})


async def channels_enable(op: Op) -> Any:
    return await _channel_change(op, "channel.enable", {"enabled": True})


async def channels_test(op: Op) -> dict[str, Any]:
    """Send one smallest request through the channel as this worker knows it and report
    the status and latency. The model is the form's, else the channel's first exact one."""
    from relay.healthcheck import test_request

    name = op.params["channel"]
    router = getattr(op.gw, "router", None)
    channel = next((c for c in router.channels if c.name == name), None) if router else None
    if channel is None:
        raise E.NotFound(f"channel {name!r} is not in service on this worker (unknown or disabled)")
    model = (text(op.body(), "model") or "").strip()
    if not model:
        model = next((m for m in channel.patterns if "*" not in m and "?" not in m), "")
    if not model:
        raise E.InvalidRequest("model: required (this channel lists only patterns)")
    result = await test_request(channel, model)
    async with op.tx() as conn:
        await store.audit(conn, op.actor, "channel.test", name,
                          {"model": model, "status": result["status"],
                           "latency_ms": result["latency_ms"]})
    return {"channel": name, **result}
