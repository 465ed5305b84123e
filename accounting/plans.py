"""Subscription plans: plans, subscriptions and their keys, plan codes, plan credit.

A plan is what an operator sells (price, credit per term, validity, an optional
periodic credit with a reset cycle anchored at purchase, the models and groups it
covers, a renewal window). Subscribing copies the money terms onto a subscription and
creates its first key, `Subscription Access - <plan id>`; the owner adds team keys
(`keys.plan_id` = the subscription's id, `keys.cap_nano` = that key's cap). Renewal
extends the same subscription, so its keys keep working.

Plan credit is charged by the ledger flusher through `charge`, inside the flush
transaction and only for rows that transaction newly inserted, so it is exactly-once
like the rest of the flush. Each row (in time order per subscription) takes from the
plan what the plan has left, periodic credit first bounded by the total; with balance
fallback on, the rest of the row goes to the user's balance, else the plan absorbs it
(admission keeps that overdraft to the in-flight reservations). Workers read the plan's
remaining credit with `budgets` (admission's snapshot). Every function that depends on
the time takes `now`, so tests run plans on a fake clock. This module never imports relay.
"""

from __future__ import annotations

import calendar
import itertools
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from accounting import codes, store
from accounting.store import Conflict, NotFound, StoreError

Conn = Any

DAY = 86_400
VALIDITIES = ("day", "week", "month", "custom")
RESETS = ("none", "daily", "weekly", "monthly", "custom")
KEY_NAME = "Subscription Access - {plan_id}"
MAX_TEAM_KEYS = 1000


# --- calendar -----------------------------------------------------------------------------


def add_months(t: datetime, n: int) -> datetime:
    """`t` moved by `n` calendar months, the day clamped to the month's length (Jan 31 + 1
    month = Feb 28/29): a monthly cycle anchored on the 31st still resets every month."""
    m = t.month - 1 + n
    year, month = t.year + m // 12, m % 12 + 1
    return t.replace(year=year, month=month, day=min(t.day, calendar.monthrange(year, month)[1]))


def term_end(start: datetime, validity: str, validity_s: int) -> datetime:
    if validity == "day":
        return start + timedelta(days=1)
    if validity == "week":
        return start + timedelta(days=7)
    if validity == "month":
        return add_months(start, 1)
    return start + timedelta(seconds=validity_s)


def period_index(anchor: datetime, t: datetime, reset: str, reset_s: int) -> int:
    """Which reset cycle `t` falls in, counting from the cycle that starts at `anchor`."""
    if reset == "none" or t <= anchor:
        return 0
    if reset == "monthly":
        n = (t.year - anchor.year) * 12 + t.month - anchor.month
        while n > 0 and add_months(anchor, n) > t:
            n -= 1
        return n
    length = {"daily": DAY, "weekly": 7 * DAY}.get(reset, reset_s)
    return int((t - anchor).total_seconds() // length) if length > 0 else 0


def period_start(anchor: datetime, index: int, reset: str, reset_s: int) -> datetime:
    if reset == "monthly":
        return add_months(anchor, index)
    length = {"daily": DAY, "weekly": 7 * DAY}.get(reset, reset_s)
    return anchor + timedelta(seconds=length * index)


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    id: int
    name: str
    price_nano: int
    credit_nano: int
    validity: str
    validity_s: int
    periodic_nano: int
    reset: str
    reset_s: int
    models: tuple[str, ...] | None
    groups: tuple[str, ...]
    renewal_window_s: int
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Subscription:
    id: int
    user_id: int
    plan_id: int
    status: str
    started_at: datetime
    expires_at: datetime
    cancelled_at: datetime | None
    credit_nano: int
    used_nano: int
    periodic_nano: int
    reset: str
    reset_s: int
    period_index: int
    period_used_nano: int
    periodic_enabled: bool
    balance_fallback: bool
    renewals: int
    created_at: datetime

    def ends_at(self) -> datetime:
        """When its keys stop: the end of the term, or the cancellation if earlier."""
        if self.cancelled_at is not None and self.cancelled_at < self.expires_at:
            return self.cancelled_at
        return self.expires_at

    def active(self, now: datetime) -> bool:
        return self.status == "active" and now < self.expires_at

    def periodic(self) -> bool:
        return bool(self.periodic_nano) and self.reset != "none" and self.periodic_enabled

    def period_used(self, now: datetime) -> int:
        """Plan credit used in the cycle `now` falls in (0 once a new cycle began)."""
        idx = period_index(self.started_at, now, self.reset, self.reset_s)
        return self.period_used_nano if idx <= self.period_index else 0

    def remaining(self, now: datetime) -> int:
        """Plan credit a request may still draw at `now`: the total left, bounded by the
        periodic credit left in the current cycle when the periodic limit is on."""
        left = self.credit_nano - self.used_nano
        if self.periodic():
            left = min(left, self.periodic_nano - self.period_used(now))
        return left


_PLAN_COLS = (
    "id, name, price_nano, credit_nano, validity, validity_s, periodic_nano, reset, reset_s,"
    " models, groups, renewal_window_s, status, created_at"
)
_SUB_COLS = (
    "id, user_id, plan_id, status, started_at, expires_at, cancelled_at, credit_nano, used_nano,"
    " periodic_nano, reset, reset_s, period_index, period_used_nano, periodic_enabled,"
    " balance_fallback, renewals, created_at"
)


def _plan(r: asyncpg.Record) -> Plan:
    d = dict(r)
    d["models"] = None if d["models"] is None else tuple(d["models"])
    d["groups"] = tuple(d["groups"])
    return Plan(**d)


def _sub(r: asyncpg.Record) -> Subscription:
    return Subscription(**dict(r))


# --- plans --------------------------------------------------------------------------------


def _nonneg(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2**63:
        raise StoreError(f"{name}: expected an integer >= 0, got {v!r}")
    return v


def _check_terms(f: dict[str, Any]) -> None:
    if f["validity"] not in VALIDITIES:
        raise StoreError(f"validity: expected one of {', '.join(VALIDITIES)}, got {f['validity']!r}")
    if f["validity"] == "custom" and f["validity_s"] <= 0:
        raise StoreError("validity_s: a custom validity needs a duration in seconds > 0")
    if f["reset"] not in RESETS:
        raise StoreError(f"reset: expected one of {', '.join(RESETS)}, got {f['reset']!r}")
    if f["reset"] == "custom" and f["reset_s"] <= 0:
        raise StoreError("reset_s: a custom reset cycle needs a duration in seconds > 0")
    if f["periodic_nano"] and f["reset"] == "none":
        raise StoreError("periodic_credit: needs a reset cycle (daily, weekly, monthly or custom)")
    if not f["groups"]:
        raise StoreError("groups: a plan covers at least one group")


_PLAN_FIELDS = ("name", "price_nano", "credit_nano", "validity", "validity_s", "periodic_nano",
                "reset", "reset_s", "models", "groups", "renewal_window_s", "status")


async def create_plan(
    conn: Conn, name: str, credit_nano: int, validity: str = "month", *, price_nano: int = 0,
    validity_s: int = 0, periodic_nano: int = 0, reset: str = "none", reset_s: int = 0,
    models: Iterable[str] | None = None, groups: Iterable[str] = ("default",),
    renewal_window_s: int = 3 * DAY,
) -> Plan:
    f: dict[str, Any] = {"name": name.strip(), "price_nano": _nonneg("price", price_nano),
         "credit_nano": _nonneg("credit", credit_nano), "validity": validity,
         "validity_s": _nonneg("validity_s", validity_s),
         "periodic_nano": _nonneg("periodic_credit", periodic_nano), "reset": reset,
         "reset_s": _nonneg("reset_s", reset_s),
         "models": None if models is None else list(models), "groups": list(groups),
         "renewal_window_s": _nonneg("renewal_window_s", renewal_window_s), "status": "active"}
    if not f["name"]:
        raise StoreError("name: must not be empty")
    _check_terms(f)
    await _check_groups(conn, f["groups"])
    cols = ", ".join(_PLAN_FIELDS)
    marks = ", ".join(f"${i + 1}" for i in range(len(_PLAN_FIELDS)))
    try:
        row = await conn.fetchrow(f"INSERT INTO plans ({cols}) VALUES ({marks}) RETURNING {_PLAN_COLS}",
                                  *(f[c] for c in _PLAN_FIELDS))
    except asyncpg.UniqueViolationError:
        raise Conflict(f"plan {name!r} already exists")
    return _plan(row)


async def _check_groups(conn: Conn, groups: list[str]) -> None:
    known = {r[0] for r in await conn.fetch("SELECT name FROM groups WHERE name = ANY($1::text[])", groups)}
    missing = [g for g in groups if g not in known]
    if missing:
        raise NotFound(f"group {missing[0]!r} not found")


async def get_plan(conn: Conn, plan: int | str) -> Plan:
    col = "id" if isinstance(plan, int) else "name"
    row = await conn.fetchrow(f"SELECT {_PLAN_COLS} FROM plans WHERE {col} = $1", plan)
    if row is None:
        raise NotFound(f"plan {plan!r} not found")
    return _plan(row)


async def list_plans(conn: Conn, *, include_archived: bool = False) -> list[Plan]:
    where = "" if include_archived else " WHERE status = 'active'"
    return [_plan(r) for r in await conn.fetch(f"SELECT {_PLAN_COLS} FROM plans{where} ORDER BY id")]


async def edit_plan(conn: Conn, plan: int | str, **fields: Any) -> Plan:
    """Change a plan's terms for future purchases and renewals (subscriptions already
    bought keep the credit terms they were sold with)."""
    unknown = set(fields) - set(_PLAN_FIELDS)
    if unknown:
        raise StoreError(f"cannot edit plan field {sorted(unknown)[0]!r}")
    old = await get_plan(conn, plan)
    f = {c: getattr(old, c) for c in _PLAN_FIELDS}
    f["models"] = None if old.models is None else list(old.models)
    f["groups"] = list(old.groups)
    for k, v in fields.items():
        f[k] = list(v) if k in ("groups", "models") and v is not None else v
    for k in ("price_nano", "credit_nano", "validity_s", "periodic_nano", "reset_s", "renewal_window_s"):
        _nonneg(k, f[k])
    if f["status"] not in ("active", "archived"):
        raise StoreError(f"status: expected active or archived, got {f['status']!r}")
    _check_terms(f)
    await _check_groups(conn, f["groups"])
    sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(_PLAN_FIELDS))
    try:
        row = await conn.fetchrow(f"UPDATE plans SET {sets} WHERE id = $1 RETURNING {_PLAN_COLS}",
                                  old.id, *(f[c] for c in _PLAN_FIELDS))
    except asyncpg.UniqueViolationError:
        raise Conflict(f"plan {f['name']!r} already exists")
    return _plan(row)


# --- subscriptions ------------------------------------------------------------------------


async def _pay(conn: Conn, user_id: int, price: int, what: str) -> None:
    """Debit the plan's price from the balance, journaled; refused below zero."""
    if price:
        await store.topup(conn, user_id, -price, note=what)


async def subscribe(
    conn: Conn, user: int | str, plan: int | str, now: datetime, *, pay_from_balance: bool = False,
    balance_fallback: bool = True,
) -> tuple[Subscription, int, str]:
    """Subscribe a user to an active plan: (subscription, key id, key secret shown once).

    The subscription's first key is created with it, named `Subscription Access - <plan id>`.
    With `pay_from_balance` the plan's price is debited from the user's balance (refused
    if it does not cover it); otherwise payment happened elsewhere (admin, plan code).
    """
    async with store._transaction(conn) as tx:
        uid = await store._user_id(tx, user)
        p = await get_plan(tx, plan)
        if p.status != "active":
            raise StoreError(f"plan {p.name!r} is archived")
        if pay_from_balance:
            await _pay(tx, uid, p.price_nano, f"plan {p.name} ({p.id})")
        row = await tx.fetchrow(
            "INSERT INTO subscriptions (user_id, plan_id, started_at, expires_at, credit_nano,"
            " periodic_nano, reset, reset_s, balance_fallback)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_SUB_COLS}",
            uid, p.id, now, term_end(now, p.validity, p.validity_s), p.credit_nano,
            p.periodic_nano, p.reset, p.reset_s, balance_fallback,
        )
        sub = _sub(row)
        key_id, secret = await store.create_key(tx, uid, KEY_NAME.format(plan_id=p.id),
                                                models=p.models, group=p.groups[0])
        await tx.execute("UPDATE keys SET plan_id = $2 WHERE id = $1", key_id, sub.id)
    return sub, key_id, secret


async def get_subscription(conn: Conn, sub_id: int) -> Subscription:
    row = await conn.fetchrow(f"SELECT {_SUB_COLS} FROM subscriptions WHERE id = $1", sub_id)
    if row is None:
        raise NotFound(f"subscription {sub_id} not found")
    return _sub(row)


async def list_subscriptions(
    conn: Conn, user: int | str | None = None, plan: int | None = None
) -> list[Subscription]:
    where, args = [], []
    if user is not None:
        args.append(await store._user_id(conn, user))
        where.append(f"user_id = ${len(args)}")
    if plan is not None:
        args.append(plan)
        where.append(f"plan_id = ${len(args)}")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await conn.fetch(f"SELECT {_SUB_COLS} FROM subscriptions{clause} ORDER BY id", *args)
    return [_sub(r) for r in rows]


async def renew(conn: Conn, sub_id: int, now: datetime, *, pay_from_balance: bool = False) -> Subscription:
    """Extend a subscription by one term of its plan and add that term's credit.

    Allowed inside the renewal window (the last `renewal_window_s` of the term) and after
    the term ended; earlier it is refused (Conflict), so a double click or a replayed
    payment cannot stack terms. An ended term restarts at `now`. Unused credit carries
    over; the reset cycle keeps its anchor. Keys stay bound and work again at once.
    """
    async with store._transaction(conn) as tx:
        row = await tx.fetchrow(f"SELECT {_SUB_COLS} FROM subscriptions WHERE id = $1 FOR UPDATE", sub_id)
        if row is None:
            raise NotFound(f"subscription {sub_id} not found")
        sub = _sub(row)
        if sub.status != "active":
            raise Conflict(f"subscription {sub_id} is cancelled")
        p = await get_plan(tx, sub.plan_id)
        if p.status != "active":
            raise Conflict(f"plan {p.name!r} is archived and cannot be renewed")
        opens = sub.expires_at - timedelta(seconds=p.renewal_window_s)
        if now < opens:
            raise Conflict(f"subscription {sub_id} can be renewed from {opens.isoformat()}"
                           f" (the last {p.renewal_window_s // 3600} h of its term)")
        if pay_from_balance:
            await _pay(tx, sub.user_id, p.price_nano, f"renewal of plan {p.name} ({p.id})")
        base = max(sub.expires_at, now)
        row = await tx.fetchrow(
            "UPDATE subscriptions SET expires_at = $2, credit_nano = credit_nano + $3,"
            f" renewals = renewals + 1 WHERE id = $1 RETURNING {_SUB_COLS}",
            sub_id, term_end(base, p.validity, p.validity_s), p.credit_nano,
        )
    return _sub(row)


async def cancel(conn: Conn, sub_id: int, now: datetime) -> Subscription:
    """End a subscription now: every key bound to it is refused from the next sync."""
    row = await conn.fetchrow(
        "UPDATE subscriptions SET status = 'cancelled', cancelled_at = $2"
        f" WHERE id = $1 AND status = 'active' RETURNING {_SUB_COLS}", sub_id, now)
    if row is None:
        await get_subscription(conn, sub_id)
        raise Conflict(f"subscription {sub_id} is already cancelled")
    return _sub(row)


async def set_options(
    conn: Conn, sub_id: int, *, periodic_enabled: bool | None = None,
    balance_fallback: bool | None = None,
) -> Subscription:
    """The owner's switches: the periodic limit (off: draw on the total credit) and
    plan-then-balance (off: the plan only)."""
    sets, args = [], []
    for name, v in (("periodic_enabled", periodic_enabled), ("balance_fallback", balance_fallback)):
        if v is not None:
            args.append(bool(v))
            sets.append(f"{name} = ${len(args) + 1}")
    if not sets:
        return await get_subscription(conn, sub_id)
    row = await conn.fetchrow(
        f"UPDATE subscriptions SET {', '.join(sets)} WHERE id = $1 RETURNING {_SUB_COLS}", sub_id, *args)
    if row is None:
        raise NotFound(f"subscription {sub_id} not found")
    return _sub(row)


async def subscription_keys(conn: Conn, sub_id: int) -> list[store.Key]:
    rows = await conn.fetch(f"{store._KEY_SELECT} WHERE k.plan_id = $1 AND k.status <> 'deleted'"
                            " ORDER BY k.id", sub_id)
    return [store._key(r) for r in rows]


async def create_team_keys(
    conn: Conn, sub_id: int, name: str, *, quantity: int = 1, group: str | None = None,
    expires_at: datetime | None = None, cap_nano: int = 0,
) -> list[tuple[int, str, str]]:
    """Keys bound to the subscription: [(key id, secret, name)], secrets shown once.

    Each key draws on the same plan credit; `cap_nano` (0: none) caps what that key may
    consume (it is the key's spending cap). With `quantity` > 1 each name gets a random
    suffix. The group must be one of the plan's groups (default: its first).
    """
    if isinstance(quantity, bool) or not isinstance(quantity, int) or not 1 <= quantity <= MAX_TEAM_KEYS:
        raise StoreError(f"quantity: expected 1..{MAX_TEAM_KEYS}, got {quantity!r}")
    name = name.strip()
    if not name:
        raise StoreError("name: required")
    async with store._transaction(conn) as tx:
        sub = await get_subscription(tx, sub_id)
        if sub.status != "active":
            raise Conflict(f"subscription {sub_id} is cancelled")
        p = await get_plan(tx, sub.plan_id)
        group = group or p.groups[0]
        if group not in p.groups:
            raise StoreError(f"group: {group!r} is not covered by plan {p.name!r}"
                             f" (covers {', '.join(p.groups)})")
        out = []
        for _ in range(quantity):
            n = name if quantity == 1 else f"{name}-{secrets.token_hex(3)}"
            key_id, secret = await store.create_key(tx, sub.user_id, n, models=p.models, group=group,
                                                    expires_at=expires_at, cap_nano=cap_nano)
            await tx.execute("UPDATE keys SET plan_id = $2 WHERE id = $1", key_id, sub_id)
            out.append((key_id, secret, n))
    return out


# --- plan codes ---------------------------------------------------------------------------


async def create_plan_codes(
    conn: Conn, plan: int | str, count: int, expires_at: datetime | None = None
) -> tuple[int, list[str]]:
    """`count` codes that each grant one subscription to the plan: (batch id, codes shown once)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
        raise StoreError(f"count: expected 1..10000, got {count!r}")
    store._check_expiry(expires_at)
    made = [codes.new_code() for _ in range(count)]
    async with store._transaction(conn) as tx:
        p = await get_plan(tx, plan)
        batch = await tx.fetchval("SELECT nextval('redemption_batch_seq')")
        await tx.executemany(
            "INSERT INTO plan_codes (code_hash, prefix, plan_id, batch_id, expires_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(codes.code_hash(c), c[:codes.DISPLAY_LEN], p.id, batch, expires_at) for c in made])
    return int(batch), made


async def redeem_plan_code(
    conn: Conn, code: str, user: int | str, now: datetime
) -> tuple[Subscription, int, str]:
    """Subscribe the user to the code's plan, exactly once per code."""
    h = codes.code_hash(code)
    async with store._transaction(conn) as tx:
        uid = await store._user_id(tx, user)
        plan_id = await tx.fetchval(
            "UPDATE plan_codes SET redeemed_by = $2, redeemed_at = $3"
            " WHERE code_hash = $1 AND redeemed_by IS NULL AND (expires_at IS NULL OR expires_at > $3)"
            " RETURNING plan_id", h, uid, now)
        if plan_id is None:
            why = await tx.fetchrow("SELECT redeemed_by FROM plan_codes WHERE code_hash = $1", h)
            if why is None:
                raise codes.CodeNotFound("unknown plan code")
            if why["redeemed_by"] is not None:
                raise codes.CodeAlreadyRedeemed("this plan code has already been used")
            raise codes.CodeExpired("this plan code has expired")
        sub, key_id, secret = await subscribe(tx, uid, int(plan_id), now)
        await tx.execute("UPDATE plan_codes SET subscription_id = $2 WHERE code_hash = $1", h, sub.id)
    return sub, key_id, secret


async def list_plan_codes(conn: Conn, plan: int | None = None) -> list[dict[str, Any]]:
    where = "" if plan is None else " WHERE plan_id = $1"
    rows = await conn.fetch(
        "SELECT prefix, plan_id, batch_id, expires_at, redeemed_by, redeemed_at, subscription_id,"
        f" created_at FROM plan_codes{where} ORDER BY batch_id, prefix", *(() if plan is None else (plan,)))
    return [dict(r) for r in rows]


# --- credit: admission's snapshots and the ledger's charge ----------------------------------


async def budgets(conn: Conn, sub_ids: Iterable[int], now: datetime) -> dict[int, int]:
    """Remaining plan credit of each subscription at `now` (admission's snapshot; absent
    ids are unknown subscriptions, whose keys draw nothing)."""
    rows = await conn.fetch(f"SELECT {_SUB_COLS} FROM subscriptions WHERE id = ANY($1::bigint[])",
                            list(sub_ids))
    return {r["id"]: _sub(r).remaining(now) for r in rows}


def loader(db: Conn, clock: Callable[[], float]) -> Callable[[int], Awaitable[int]]:
    """For the limiter's `plan_loader`: one subscription's remaining credit (0 if unknown)."""

    async def load(sub_id: int) -> int:
        got = await budgets(db, [sub_id], datetime.fromtimestamp(clock(), UTC))
        return got.get(sub_id, 0)

    return load


async def charge(conn: Conn, stage: str) -> dict[int, int]:
    """Charge the staged (newly inserted) plan rows to their subscriptions; return what
    falls to users' balances {user_id: nano}, which the caller debits.

    Per subscription, rows go in (ts, request_id) order. A row takes from the plan
    min(cost, what the plan has left at the row's time): the total left, bounded by the
    periodic credit left in the row's cycle when the periodic limit is on (a row from a
    cycle that already ended counts towards the total only). With balance fallback off
    the plan takes the whole cost. A row whose subscription does not exist, or belongs
    to another user, is charged to neither (admission refuses such keys; it stays in the
    key's spend and the usage log). Runs inside the flush transaction; its updates do not bump the change feed.
    """
    rows = await conn.fetch(
        f"SELECT plan_id, user_id, ts, cost_nano FROM {stage}"
        " WHERE plan_id <> 0 AND cost_nano <> 0 ORDER BY plan_id, ts, request_id")
    if not rows:
        return {}
    ids = sorted({r["plan_id"] for r in rows})
    await conn.execute("SET LOCAL tollway.ledger_charge = 'on'")
    subs = {r["id"]: _sub(r) for r in await conn.fetch(
        f"SELECT {_SUB_COLS} FROM subscriptions WHERE id = ANY($1::bigint[]) ORDER BY id"
        " FOR NO KEY UPDATE", ids)}
    to_balance: dict[int, int] = {}
    upd: list[tuple[int, int, int, int]] = []
    for sid, group in itertools.groupby(rows, key=lambda r: r["plan_id"]):
        s = subs.get(sid)
        if s is None:
            continue  # admission refuses such keys; an old journal's row stays in key spend only
        anchor = s.started_at.timestamp()
        used, idx, pused = s.used_nano, s.period_index, s.period_used_nano
        tracked = bool(s.periodic_nano) and s.reset != "none"
        for r in group:
            if r["user_id"] != s.user_id:
                continue  # not this subscription's owner: never bill someone else's plan
            cost = r["cost_nano"]
            ridx = idx
            if tracked:
                ridx = _row_period(s, anchor, r["ts"])
                if ridx > idx:
                    idx, pused = ridx, 0
            left = s.credit_nano - used
            if tracked and s.periodic_enabled and ridx == idx:
                left = min(left, s.periodic_nano - pused)
            part = min(cost, max(left, 0)) if s.balance_fallback else cost
            used += part
            if ridx == idx:
                pused += part
            if part < cost:
                to_balance[r["user_id"]] = to_balance.get(r["user_id"], 0) + cost - part
        upd.append((sid, used, idx, pused))
    await conn.executemany(
        "UPDATE subscriptions SET used_nano = $2, period_index = $3, period_used_nano = $4 WHERE id = $1",
        upd)
    return to_balance


def _row_period(s: Subscription, anchor: float, ts: float) -> int:
    if s.reset == "monthly":
        return period_index(s.started_at, datetime.fromtimestamp(ts, UTC), s.reset, s.reset_s)
    length = {"daily": DAY, "weekly": 7 * DAY}.get(s.reset, s.reset_s)
    return max(0, math.floor((ts - anchor) / length)) if length > 0 else 0
