"""Users and their balances: create, list, show, edit, disable, and top-ups (a
credit recorded with its note and external id; an invited user's first top-up pays
the inviter's share).
"""

from __future__ import annotations

from typing import Any

from accounting import growth, store, topups
from accounting.money import format_usd
from relay import errors as E
from relay.ops.base import Op
from relay.ops.parse import (
    int_,
    nano,
    offset_page,
    only,
    q_int,
    ref,
    text,
)
from relay.ops.views import (
    credit_json,
    money,
    user_json,
    with_usd,
)
from relay.webapi import Reply

_USER_LIMITS = ("concurrency", "rpm", "tpm", "max_ips")

async def users_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"name", "balance", "balance_nano", "status", *_USER_LIMITS})
    name = text(body, "name", required=True)
    assert name is not None
    balance = nano(body, "balance") or 0
    limits: dict[str, Any] = {f: v for f in _USER_LIMITS if (v := int_(body, f)) is not None}
    if body.get("status") is not None:
        limits["status"] = text(body, "status")
    async with op.tx() as conn:
        uid = await store.create_user(conn, name, balance, note=f"initial balance by {op.actor}")
        user = await store.edit_user(conn, uid, **limits)
        await store.audit(conn, op.actor, "user.create", str(uid),
                          {"name": user.name, "balance_nano": balance, **limits})
    return Reply(201, user_json(user))


async def users_list(op: Op) -> Any:
    q = op.query
    limit = q_int(q, "limit", 100, lo=1, hi=1000) or 100
    offset = q_int(q, "cursor", 0) or 0
    async with op.read() as conn:
        users = await store.list_users(conn)
    if q.get("status"):
        users = [u for u in users if u.status == q["status"]]
    if q.get("name"):
        users = [u for u in users if q["name"].lower() in u.name.lower()]
    return offset_page([user_json(u) for u in users], limit, offset)


async def users_show(op: Op) -> Any:
    async with op.read() as conn:
        user = await op._user(conn, op.params["user"])
        keys = await store.list_keys(conn, user.id)
    return {**user_json(user), "keys": len(keys),
            **money("keys_spent", sum(k.spent_nano for k in keys))}


async def users_edit(op: Op) -> Any:
    body = op.body()
    only(body, {"status", *_USER_LIMITS})
    fields: dict[str, Any] = {f: v for f in _USER_LIMITS if (v := int_(body, f)) is not None}
    if body.get("status") is not None:
        fields["status"] = text(body, "status")
    async with op.tx() as conn:
        user = await op._user(conn, op.params["user"])
        user = await store.edit_user(conn, user.id, **fields)
        await store.audit(conn, op.actor, "user.edit", str(user.id), {"name": user.name, **fields})
    return user_json(user)


async def users_delete(op: Op) -> Any:
    # Users are never removed: usage, topups and keys refer to them. Disabled, every
    # key of theirs is refused on every worker within a second.
    async with op.tx() as conn:
        user = await op._user(conn, op.params["user"])
        user = await store.edit_user(conn, user.id, status="disabled")
        await store.audit(conn, op.actor, "user.delete", str(user.id), {"name": user.name})
    return user_json(user)

# --- balances ---------------------------------------------------------------------


async def _credit(op: Op, user_ref: int | str, body: dict[str, Any]) -> Reply:
    amount = nano(body, "amount", required=True)
    assert amount is not None
    minimum = op._min_topup()
    if amount < minimum:
        raise E.InvalidRequest(f"amount: the minimum top-up is {format_usd(minimum)} USD")
    external_id = text(body, "external_id")
    if external_id is not None and not 1 <= len(external_id) <= 200:
        raise E.InvalidRequest("external_id: expected 1 to 200 characters")
    note = text(body, "note") or ""
    async with op.tx() as conn:
        user = await op._user(conn, user_ref)
        c = await topups.credit(conn, user.id, amount, external_id, note or f"top-up by {op.actor}")
        reward = None
        if not c.duplicate:
            await store.audit(conn, op.actor, "user.topup", str(user.id),
                              {"name": user.name, "amount_nano": amount,
                               "external_id": external_id, "topup_id": c.topup_id})
            # An invited user's first top-up pays the inviter their share, once.
            reward = await growth.reward_inviter(conn, user.id, c.topup_id, amount,
                                                 op._growth().share)
    out = credit_json(c)
    if reward is not None:
        out["invite_reward"] = {"inviter_id": reward[0], **money("amount", reward[1])}
    return Reply(200 if c.duplicate else 201, out)


async def topups_create_for_user(op: Op) -> Reply:
    body = op.body()
    only(body, {"amount", "amount_nano", "external_id", "note"})
    return await _credit(op, ref(op.params["user"]), body)


async def topups_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"user", "amount", "amount_nano", "external_id", "note"})
    user = body.get("user")
    if isinstance(user, bool) or not isinstance(user, int | str) or user == "":
        raise E.InvalidRequest("user: required (the user's id or name)")
    if text(body, "external_id") is None:
        raise E.InvalidRequest("external_id: required (the payment's id, so a retried"
                               " notification credits once)")
    return await _credit(op, user, body)


async def topups_list(op: Op) -> Any:
    q = op.query
    async with op.read() as conn:
        user = await op._user(conn, op.params["user"])
        rows, nxt = await topups.list_topups(
            conn, user.id, limit=q_int(q, "limit", 50, lo=1, hi=1000) or 50,
            before_id=q_int(q, "cursor"))
    return {"data": [with_usd(r, "amount_nano") for r in rows],
            "next": None if nxt is None else str(nxt), **money("balance", user.balance_nano)}
