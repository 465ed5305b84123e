"""API keys: create (one or a batch), list, show, edit (scope, expiry, group, cap,
concurrency, RPM, TPM, CIDRs), disable, enable, reset and delete. A key's secret is
returned once, by the call that makes it, and never audited.
"""

from __future__ import annotations

import secrets
from typing import Any

from accounting import store
from relay import errors as E
from relay.ops.base import Op, audit_fields
from relay.ops.parse import (
    id_,
    int_,
    names,
    nano,
    offset_page,
    only,
    q_int,
    text,
    time_,
)
from relay.ops.views import (
    key_json,
)
from relay.webapi import Reply

_KEY_FIELDS = {"name", "models", "expires_at", "group", "cap", "cap_nano", "concurrency", "rpm",
               "tpm", "allowed_cidrs"}
MAX_BATCH_KEYS = 1000

def _key_fields(op: Op, body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "name" in body:
        out["name"] = text(body, "name") or ""
    if "models" in body:
        out["models"] = names(body, "models")
    if "expires_at" in body:
        out["expires_at"] = time_(body, "expires_at")
    if body.get("group") is not None:
        out["group"] = text(body, "group")
    if "cap" in body or "cap_nano" in body:
        out["cap_nano"] = nano(body, "cap") or 0
    for f in ("concurrency", "rpm", "tpm"):
        if body.get(f) is not None:
            out[f] = int_(body, f)
    if "allowed_cidrs" in body:
        out["allowed_cidrs"] = names(body, "allowed_cidrs") or []
    return out


async def keys_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"user", *_KEY_FIELDS})
    fields = _key_fields(op, body)
    async with op.tx() as conn:
        user = await op._user(conn, str(body.get("user") or ""))
        key_id, secret = await store.create_key(conn, user.id, **fields)
        key = await store.get_key(conn, key_id)
        assert key is not None
        await store.audit(conn, op.actor, "key.create", str(key_id),
                          {"user_id": user.id, "key_prefix": key.key_prefix,
                           **audit_fields(fields)})
    return Reply(201, {**key_json(key), "secret": secret})


async def keys_batch(op: Op) -> Reply:
    body = op.body()
    only(body, {"user", "count", *_KEY_FIELDS})
    count = int_(body, "count", lo=1, hi=MAX_BATCH_KEYS)
    if count is None:
        raise E.InvalidRequest(f"count: required (1..{MAX_BATCH_KEYS})")
    fields = _key_fields(op, body)
    base = fields.pop("name", "") or "key"
    out = []
    async with op.tx() as conn:
        user = await op._user(conn, str(body.get("user") or ""))
        ids = []
        for _ in range(count):
            key_id, secret = await store.create_key(
                conn, user.id, name=f"{base}-{secrets.token_hex(4)}", **fields)
            key = await store.get_key(conn, key_id)
            assert key is not None
            ids.append(key_id)
            out.append({**key_json(key), "secret": secret})
        await store.audit(conn, op.actor, "key.batch_create", str(user.id),
                          {"count": count, "key_ids": ids,
                           "key_prefixes": [k["key_prefix"] for k in out],
                           "name": base, **audit_fields(fields)})
    return Reply(201, {"data": out})


async def keys_list(op: Op) -> Any:
    q = op.query
    status = q.get("status") or None
    if status not in (None, "active", "disabled", "deleted", "all"):
        raise E.InvalidRequest(f"status: expected active, disabled, deleted or all, got {status!r}")
    limit = q_int(q, "limit", 100, lo=1, hi=1000) or 100
    offset = q_int(q, "cursor", 0) or 0
    async with op.read() as conn:
        uid = await op._user_id(conn, q)
        keys = await store.list_keys(conn, uid, include_deleted=status in ("deleted", "all"))
    if status not in (None, "all"):
        keys = [k for k in keys if k.status == status]
    if q.get("group"):
        keys = [k for k in keys if k.group == q["group"]]
    if q.get("name"):
        keys = [k for k in keys if q["name"].lower() in k.name.lower()]
    if q.get("prefix"):
        keys = [k for k in keys if k.key_prefix.startswith(q["prefix"])]
    return offset_page([key_json(k) for k in keys], limit, offset)


async def keys_show(op: Op) -> Any:
    async with op.read() as conn:
        key = await store.get_key(conn, id_(op.params["key"], "key"))
    if key is None:
        raise E.NotFound(f"key {op.params['key']} not found")
    return key_json(key)


async def keys_edit(op: Op) -> Any:
    body = op.body()
    only(body, _KEY_FIELDS | {"plan_id"})
    fields = _key_fields(op, body)
    if body.get("plan_id") is not None:
        fields["plan_id"] = int_(body, "plan_id", hi=2**63 - 1)
    key_id = id_(op.params["key"], "key")
    async with op.tx() as conn:
        old = await store.get_key(conn, key_id)
        key = await store.edit_key(conn, key_id, **fields)
        await store.audit(conn, op.actor, "key.edit", str(key_id),
                          {"key_prefix": key.key_prefix, **audit_fields(fields)},
                          before=None if old is None else _before(key_json(old), fields))
    return key_json(key)


def _before(shown: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The record's values of the fields a change sets (its JSON names: cap_nano...)."""
    return audit_fields({k: shown.get(k) for k in fields})


async def _key_action(op: Op, action: str) -> Any:
    key_id = id_(op.params["key"], "key")
    secret = None
    async with op.tx() as conn:
        if action == "disable":
            await store.set_key_status(conn, key_id, "disabled")
        elif action == "enable":
            await store.set_key_status(conn, key_id, "active")
        elif action == "delete":
            await store.delete_key(conn, key_id)
        else:
            secret = await store.reset_key(conn, key_id)
        key = await store.get_key(conn, key_id)
        assert key is not None
        await store.audit(conn, op.actor, f"key.{action}", str(key_id),
                          {"key_prefix": key.key_prefix})
    out = key_json(key)
    if secret is not None:
        out["secret"] = secret
    return out


async def keys_disable(op: Op) -> Any:
    return await _key_action(op, "disable")


async def keys_enable(op: Op) -> Any:
    return await _key_action(op, "enable")


async def keys_reset(op: Op) -> Any:
    return await _key_action(op, "reset")


async def keys_delete(op: Op) -> Any:
    return await _key_action(op, "delete")


async def keys_search(op: Op) -> Any:
    """Every key, newest first, filtered by prefix, owner (id or name), group, state and
    name, one keyset page (`cursor`: the last id seen): the operator's key list."""
    q = op.query
    status = q.get("status") or None
    if status not in (None, "active", "disabled", "deleted", "all"):
        raise E.InvalidRequest(f"status: expected active, disabled, deleted or all, got {status!r}")
    async with op.read() as conn:
        uid = await op._user_id(conn, q)
        keys, nxt = await store.search_keys(
            conn, user_id=uid, prefix=q.get("prefix") or None, group=q.get("group") or None,
            status=status, name=q.get("name") or None, before_id=q_int(q, "cursor"),
            limit=q_int(q, "limit", 100, lo=1, hi=1000) or 100)
    return {"data": [key_json(k) for k in keys], "next": None if nxt is None else str(nxt)}
