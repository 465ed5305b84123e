"""Plans, their plan codes and subscriptions (with the team keys of a subscription).
"""

from __future__ import annotations

from typing import Any

from accounting import plans, store
from relay import errors as E
from relay.ops.base import Op, audit_fields
from relay.ops.parse import (
    id_,
    int_,
    names,
    nano,
    only,
    q_bool,
    q_int,
    ref,
    text,
    time_,
)
from relay.ops.views import (
    key_json,
    plan_json,
    subscription_json,
)
from relay.webapi import Reply

_PLAN_BODY = {"name", "price", "price_nano", "credit", "credit_nano", "validity", "validity_s",
              "periodic_credit", "periodic_credit_nano", "reset", "reset_s", "models", "groups",
              "renewal_window_s", "status"}


def _plan_fields(op: Op, body: dict[str, Any]) -> dict[str, Any]:
    only(body, _PLAN_BODY)
    out: dict[str, Any] = {}
    for name, col in (("price", "price_nano"), ("credit", "credit_nano"),
                      ("periodic_credit", "periodic_nano")):
        v = nano(body, name)
        if v is not None:
            out[col] = v
    for name in ("name", "validity", "reset", "status"):
        if body.get(name) is not None:
            out[name] = text(body, name)
    for name in ("validity_s", "reset_s", "renewal_window_s"):
        v = int_(body, name, hi=2**62)
        if v is not None:
            out[name] = v
    if "models" in body:
        out["models"] = names(body, "models")
    if body.get("groups") is not None:
        out["groups"] = names(body, "groups")
    return out


async def _plan(op: Op, conn: Any, plan_ref: str) -> plans.Plan:
    return await plans.get_plan(conn, ref(plan_ref))


async def plans_create(op: Op) -> Reply:
    f = _plan_fields(op, op.body())
    for need in ("name", "credit_nano"):
        if need not in f:
            raise E.InvalidRequest(f"{need.removesuffix('_nano')}: required")
    f.pop("status", None)
    async with op.tx() as conn:
        p = await plans.create_plan(conn, f.pop("name"), f.pop("credit_nano"),
                                    f.pop("validity", "month"), **f)
        await store.audit(conn, op.actor, "plan.create", str(p.id), {"name": p.name})
    return Reply(201, plan_json(p))


async def plans_list(op: Op) -> Any:
    async with op.read() as conn:
        rows = await plans.list_plans(conn, include_archived=q_bool(op.query, "all"))
    return {"data": [plan_json(p) for p in rows], "next": None}


async def plans_show(op: Op) -> Any:
    async with op.read() as conn:
        return plan_json(await _plan(op, conn, op.params["plan"]))


async def plans_edit(op: Op) -> Any:
    f = _plan_fields(op, op.body())
    async with op.tx() as conn:
        old = await _plan(op, conn, op.params["plan"])
        p = await plans.edit_plan(conn, old.id, **f)
        shown = plan_json(old)
        before = {k: shown.get(k, getattr(old, k, None)) for k in f}
        await store.audit(conn, op.actor, "plan.edit", str(p.id), audit_fields(f),
                          before=audit_fields(before))
    return plan_json(p)


async def plans_delete(op: Op) -> Any:
    # Archived, not removed: subscriptions refer to it; it can no longer be bought or renewed.
    async with op.tx() as conn:
        p = await _plan(op, conn, op.params["plan"])
        p = await plans.edit_plan(conn, p.id, status="archived")
        await store.audit(conn, op.actor, "plan.archive", str(p.id), {"name": p.name})
    return plan_json(p)


async def plan_codes_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"count", "expires_at"})
    count = int_(body, "count", lo=1, hi=10_000)
    if count is None:
        raise E.InvalidRequest("count: required (1..10000)")
    expires = time_(body, "expires_at")
    async with op.tx() as conn:
        p = await _plan(op, conn, op.params["plan"])
        batch, made = await plans.create_plan_codes(conn, p.id, count, expires)
        await store.audit(conn, op.actor, "plan_codes.create", str(batch),
                          {"plan_id": p.id, "count": count})
    return Reply(201, {"batch_id": batch, "plan_id": p.id, "count": count,
                       "expires_at": expires, "codes": made})


async def plan_codes_list(op: Op) -> Any:
    async with op.read() as conn:
        p = await _plan(op, conn, op.params["plan"])
        rows = await plans.list_plan_codes(conn, p.id)
    return {"data": rows, "next": None}


async def plan_codes_redeem(op: Op) -> Reply:
    body = op.body()
    only(body, {"code", "user"})
    code = text(body, "code", required=True)
    assert code is not None
    async with op.tx() as conn:
        user = await op._user(conn, str(body.get("user") or ""))
        sub, key_id, secret = await plans.redeem_plan_code(conn, code, user.id, op.now())
        await store.audit(conn, op.actor, "plan_code.redeem", str(sub.id),
                          {"user_id": user.id, "plan_id": sub.plan_id, "key_id": key_id})
    return Reply(201, {**subscription_json(sub, op.now()), "key_id": key_id, "secret": secret})

# --- subscriptions ----------------------------------------------------------------


async def subscriptions_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"user", "plan", "pay_from_balance", "balance_fallback", "starts_at"})
    plan = body.get("plan")
    if isinstance(plan, bool) or not isinstance(plan, int | str) or plan == "":
        raise E.InvalidRequest("plan: required (the plan's id or name)")
    flags = {}
    for f in ("pay_from_balance", "balance_fallback"):
        if body.get(f) is not None:
            if not isinstance(body[f], bool):
                raise E.InvalidRequest(f"{f}: expected true or false")
            flags[f] = body[f]
    # starts_at: the term and the reset cycle are anchored there (default: now).
    start = time_(body, "starts_at") or op.now()
    async with op.tx() as conn:
        user = await op._user(conn, str(body.get("user") or ""))
        p = await plans.get_plan(conn, plan if isinstance(plan, int) else ref(plan))
        sub, key_id, secret = await plans.subscribe(conn, user.id, p.id, start, **flags)
        await store.audit(conn, op.actor, "subscription.create", str(sub.id),
                          {"user_id": user.id, "plan_id": p.id, "key_id": key_id, **flags})
    return Reply(201, {**subscription_json(sub, op.now()), "key_id": key_id, "secret": secret})


async def subscriptions_list(op: Op) -> Any:
    q = op.query
    async with op.read() as conn:
        uid = await op._user_id(conn, q)
        subs = await plans.list_subscriptions(conn, uid, q_int(q, "plan"))
    now = op.now()
    rows = [subscription_json(s, now) for s in subs]
    if q.get("state"):
        rows = [r for r in rows if r["state"] == q["state"]]
    return {"data": rows, "next": None}


async def _sub(op: Op, conn: Any) -> plans.Subscription:
    return await plans.get_subscription(conn, id_(op.params["subscription"], "subscription"))


async def subscriptions_show(op: Op) -> Any:
    async with op.read() as conn:
        sub = await _sub(op, conn)
        keys = await plans.subscription_keys(conn, sub.id)
    return {**subscription_json(sub, op.now()), "keys": [key_json(k) for k in keys]}


async def subscriptions_edit(op: Op) -> Any:
    body = op.body()
    only(body, {"periodic_enabled", "balance_fallback"})
    for f, v in body.items():
        if v is not None and not isinstance(v, bool):
            raise E.InvalidRequest(f"{f}: expected true or false")
    async with op.tx() as conn:
        sub = await _sub(op, conn)
        sub = await plans.set_options(conn, sub.id, periodic_enabled=body.get("periodic_enabled"),
                                      balance_fallback=body.get("balance_fallback"))
        await store.audit(conn, op.actor, "subscription.edit", str(sub.id), body)
    return subscription_json(sub, op.now())


async def subscriptions_renew(op: Op) -> Any:
    body = op.body()
    only(body, {"pay_from_balance"})
    pay = body.get("pay_from_balance") is True
    async with op.tx() as conn:
        sub = await _sub(op, conn)
        sub = await plans.renew(conn, sub.id, op.now(), pay_from_balance=pay)
        await store.audit(conn, op.actor, "subscription.renew", str(sub.id),
                          {"expires_at": sub.expires_at.isoformat(), "pay_from_balance": pay})
    return subscription_json(sub, op.now())


async def subscriptions_cancel(op: Op) -> Any:
    async with op.tx() as conn:
        sub = await _sub(op, conn)
        sub = await plans.cancel(conn, sub.id, op.now())
        await store.audit(conn, op.actor, "subscription.cancel", str(sub.id), {})
    return subscription_json(sub, op.now())


async def subscription_keys_list(op: Op) -> Any:
    async with op.read() as conn:
        sub = await _sub(op, conn)
        keys = await plans.subscription_keys(conn, sub.id)
    return {"data": [key_json(k) for k in keys], "next": None}


async def subscription_keys_create(op: Op) -> Reply:
    body = op.body()
    only(body, {"name", "quantity", "group", "expires_at", "cap", "cap_nano"})
    name = text(body, "name", required=True)
    assert name is not None
    quantity = int_(body, "quantity", lo=1, hi=plans.MAX_TEAM_KEYS) or 1
    async with op.tx() as conn:
        sub = await _sub(op, conn)
        made = await plans.create_team_keys(
            conn, sub.id, name, quantity=quantity, group=text(body, "group"),
            expires_at=time_(body, "expires_at"), cap_nano=nano(body, "cap") or 0)
        keys = [await store.get_key(conn, k) for k, _, _ in made]
        await store.audit(conn, op.actor, "subscription.keys", str(sub.id),
                          {"key_ids": [k for k, _, _ in made], "quantity": quantity})
    return Reply(201, {"data": [{**key_json(k), "secret": s}
                                for k, (_, s, _) in zip(keys, made, strict=True) if k is not None]})
