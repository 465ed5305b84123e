"""Users and their balances: create, list, show, edit, disable, and top-ups (a
credit recorded with its note and external id; an invited user's first top-up pays
the inviter's share).
"""

from __future__ import annotations

from typing import Any

from accounting import accounts, growth, plans, sessions, store, topups
from accounting.money import format_usd, parse_usd
from relay import errors as E
from relay.ops.base import Op, need_owner
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
    key_json,
    money,
    subscription_json,
    user_json,
    with_usd,
)
from relay.webapi import ApiError, Reply

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
                              {"name": user.name, "amount_nano": amount, "note": note,
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


# --- operator-side account management (the pages and the CLI) -------------------------------

_ACCOUNT_COLS = ("id, name, email, status, role, balance_nano, email_verified, totp_enabled,"
                 " max_devices, created_at")


async def users_search(op: Op) -> Any:
    """Users whose name or email starts with `q` (or whose id is `q`), newest first,
    one keyset page (`cursor`: the last id seen)."""
    q = op.query
    term = (q.get("q") or "").strip().lower()
    limit = q_int(q, "limit", 50, lo=1, hi=500) or 50
    args: list[Any] = []
    where = []
    if term:
        args.append(term)
        cond = f"lower(name) LIKE ${len(args)} || '%' OR lower(email) LIKE ${len(args)} || '%'"
        if term.isdigit():
            args.append(int(term))
            cond += f" OR id = ${len(args)}"
        where.append(f"({cond})")
    if q.get("role"):
        args.append(q["role"])
        where.append(f"role = ${len(args)}")
    if q.get("status"):
        args.append(q["status"])
        where.append(f"status = ${len(args)}")
    before = q_int(q, "cursor")
    if before is not None:
        args.append(before)
        where.append(f"id < ${len(args)}")
    args.append(limit + 1)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    async with op.read() as conn:
        rows = await conn.fetch(f"SELECT {_ACCOUNT_COLS} FROM users{clause} ORDER BY id DESC"
                                f" LIMIT ${len(args)}", *args)
    data = [with_usd(dict(r), "balance_nano") for r in rows[:limit]]
    return {"data": data, "next": str(data[-1]["id"]) if len(rows) > limit else None}


async def users_account(op: Op) -> dict[str, Any]:
    """One user's page: the account, live sessions, keys, subscriptions, recent top-ups."""
    async with op.read() as conn:
        user = await op._user(conn, op.params["user"])
        acct = await conn.fetchrow(f"SELECT {_ACCOUNT_COLS} FROM users WHERE id = $1", user.id)
        live = await sessions.live(conn, user.id)
        keys = await store.list_keys(conn, user.id)
        subs = await plans.list_subscriptions(conn, user.id)
        names = {p.id: p.name for p in await plans.list_plans(conn, include_archived=True)}
        tops, _ = await topups.list_topups(conn, user.id, limit=10)
    now = op.now()
    return {**user_json(user), **dict(acct), "sessions": live,
            "keys": [key_json(k) for k in keys],
            "subscriptions": [{**subscription_json(s, now), "plan": names.get(s.plan_id, "")}
                              for s in subs],
            "topups": [with_usd(r, "amount_nano") for r in tops]}


async def users_invite(op: Op) -> Reply:
    """A user with a console login (email, role) and a one-time link to set the password."""
    body = op.body()
    only(body, {"name", "email", "role"})
    email = accounts.normalize_email(text(body, "email", required=True) or "")
    name = (text(body, "name") or "").strip() or email
    role = accounts.check_role(text(body, "role") or "user")
    if role != "user":
        need_owner(op, "create an operator")
    async with op.tx() as conn:
        uid = await store.create_user(conn, name, 0, note=f"created by {op.actor}")
        await accounts.set_login(conn, uid, email)
        await accounts.set_role(conn, uid, role)
        token = await accounts.new_code(conn, uid, "setup")
        await store.audit(conn, op.actor, "user.create", str(uid),
                          {"name": name, "email": email, "role": role})
        user = await op._user(conn, uid)
    return Reply(201, {**user_json(user), "email": email, "role": role, "setup_token": token})


async def users_account_edit(op: Op) -> Any:
    """Role (owners only), status, console device limit and 2FA reset of one user."""
    body = op.body()
    only(body, {"role", "status", "max_devices", "reset_2fa"})
    async with op.tx() as conn:
        user = await op._user(conn, op.params["user"])
        cur = await conn.fetchrow("SELECT role, status, max_devices, totp_enabled FROM users"
                                  " WHERE id = $1 FOR UPDATE", user.id)
        before: dict[str, Any] = {k: cur[k] for k in ("role", "status", "max_devices") if k in body}
        if cur["role"] != "user" or body.get("role") not in (None, "user", cur["role"]):
            need_owner(op, "change an operator's account")
        if body.get("role") is not None:
            role = accounts.check_role(text(body, "role") or "")
            if cur["role"] == "owner" and role != "owner" and await conn.fetchval(
                    "SELECT count(*) FROM users WHERE role = 'owner' AND status = 'active'") <= 1:
                raise ApiError(409, "conflict", "The site must keep an owner: name another first")
            await accounts.set_role(conn, user.id, role)
        if body.get("status") is not None:
            await store.edit_user(conn, user.id, status=text(body, "status"))
            if body["status"] == "disabled":
                await sessions.end_others(conn, user.id, None, "revoked")
        if "max_devices" in body:
            await accounts.set_max_devices(conn, user.id, int_(body, "max_devices", lo=1, hi=100))
        if body.get("reset_2fa") is True:
            before["totp_enabled"] = cur["totp_enabled"]
            await accounts.disable_totp(conn, user.id)
            await sessions.end_others(conn, user.id, None, "2fa")
        await store.audit(conn, op.actor, "user.account", str(user.id),
                          {"name": user.name, **body}, before=before)
        user = await op._user(conn, user.id)
    return user_json(user)


async def users_adjust(op: Op) -> Reply:
    """A balance adjustment by an operator: a credit (a top-up with its note, as any
    other) or a debit (never below zero); the note is required and audited."""
    body = op.body()
    only(body, {"amount", "note"})
    raw = text(body, "amount", required=True) or ""
    note = (text(body, "note") or "").strip()
    if not note:
        raise E.InvalidRequest("note: required (why the balance changes)")
    try:
        amount = parse_usd(raw.strip(), allow_negative=True, what="amount")
    except (ValueError, OverflowError) as exc:
        raise E.InvalidRequest(str(exc))
    if amount == 0:
        raise E.InvalidRequest("amount: must not be zero")
    if amount > 0:
        return await _credit(op, ref(op.params["user"]), {"amount": raw.strip(), "note": note})
    async with op.tx() as conn:
        user = await op._user(conn, op.params["user"])
        balance = await store.topup(conn, user.id, amount, note=note)
        await store.audit(conn, op.actor, "user.topup", str(user.id),
                          {"name": user.name, "amount_nano": amount, "note": note},
                          before={"balance_nano": user.balance_nano})
    return Reply(201, {"user_id": user.id, **money("amount", amount), **money("balance", balance)})


async def users_sessions_revoke(op: Op) -> Any:
    async with op.tx() as conn:
        user = await op._user(conn, op.params["user"])
        sid = int_({"s": op.body().get("session")}, "s", hi=2**62)
        if sid is None or not await sessions.revoke(conn, user.id, sid):
            raise E.NotFound("That session is not live")
        await store.audit(conn, op.actor, "user.session_revoke", str(user.id), {"session": sid})
    return {"revoked": sid}
