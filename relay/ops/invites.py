"""Sign-up through the API and invite codes (with the invites and rewards they brought).
"""

from __future__ import annotations

from typing import Any

from accounting import growth, store
from relay.ops.base import Op
from relay.ops.parse import (
    int_,
    only,
    q_int,
    text,
)
from relay.ops.views import (
    money,
    user_json,
    with_usd,
)
from relay.webapi import Reply


async def signup(op: Op) -> Reply:
    body = op.body()
    only(body, {"name", "invite_code"})
    name = text(body, "name", required=True)
    assert name is not None
    terms = op._growth()
    async with op.tx() as conn:
        got = await growth.signup(conn, name, terms, text(body, "invite_code"))
        user = await op._user(conn, got["user_id"])
        await store.audit(conn, op.actor, "user.signup", str(user.id),
                          {"name": user.name, "inviter_id": got["inviter_id"]})
    return Reply(201, {**user_json(user), **money("signup_credit", got["signup_nano"]),
                       **money("invite_credit", got["invite_nano"]), "inviter_id": got["inviter_id"]})


async def invite_codes_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"max_uses"})
    async with op.tx() as conn:
        user = await op._user(conn, op.params["user"])
        code = await growth.create_invite_code(conn, user.id, int_(body, "max_uses") or 0)
        await store.audit(conn, op.actor, "invite_code.create", str(user.id), {"code": code})
    return Reply(201, {"code": code, "inviter_id": user.id, "max_uses": int_(body, "max_uses") or 0})


async def invite_codes_list(op: Op) -> Any:
    async with op.read() as conn:
        user = await op._user(conn, op.params["user"])
        codes_ = await growth.list_invite_codes(conn, user.id)
        invited = await growth.invites_of(conn, user.id)
    return {"data": codes_, "invites": [with_usd(r, "reward_nano") for r in invited], "next": None}


async def invites_report(op: Op) -> dict[str, Any]:
    """The invitations of the whole site, newest first (keyset on the invitee's id): who
    invited whom and the share of the first top-up paid out, with the totals."""
    q = op.query
    limit = q_int(q, "limit", 100, lo=1, hi=1000) or 100
    before = q_int(q, "cursor")
    async with op.read() as conn:
        rows = await conn.fetch(
            "SELECT i.invitee_id, i.inviter_id, i.code, i.created_at, i.reward_topup_id,"
            " i.reward_nano, coalesce(a.email, a.name) AS invitee, coalesce(b.email, b.name) AS inviter"
            " FROM invites i JOIN users a ON a.id = i.invitee_id JOIN users b ON b.id = i.inviter_id"
            " WHERE $1::bigint IS NULL OR i.invitee_id < $1 ORDER BY i.invitee_id DESC LIMIT $2",
            before, limit + 1)
        totals = await conn.fetchrow(
            "SELECT count(*) AS invites, count(reward_topup_id) AS rewarded,"
            " coalesce(sum(reward_nano), 0)::bigint AS paid_nano FROM invites")
    data = [with_usd(dict(r), "reward_nano") for r in rows[:limit]]
    return {"data": data, "next": str(data[-1]["invitee_id"]) if len(rows) > limit else None,
            "totals": {**dict(totals), **money("paid", int(totals["paid_nano"]))}}
