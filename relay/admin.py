"""The admin API under /admin/v1: users, balances, keys, groups, channels, prices, codes,
plans, subscriptions and their team keys, plan codes, sign-up and invite codes, audit,
usage and health, as JSON over the gateway's own listener.

Every route but the OpenAPI document needs the admin token (`Authorization: Bearer`,
compared in constant time); with no token configured every route answers 403 and says
how to set one. Each mutating call writes its change and its audit row in one
transaction, so the log never claims a change that rolled back. Money goes in as exact
USD strings ("5.00", or `*_nano` integers) and comes out as both. This module only
writes Postgres: workers see the change through their version polling within a
second. It never logs or audits a secret (key secrets and codes are returned once, in
the response that creates them). The route table is `ROUTES`; relay/openapi.yaml
documents exactly those routes (tests/test_openapi.py keeps them in step).
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg

from accounting import channels as chan_store
from accounting import codes, growth, health, plans, pricing, reports, store, topups
from accounting.money import format_fraction, format_usd, parse_multiplier, parse_usd
from relay import errors as E
from relay.cli import channel_json, key_json, money, user_json
from relay.cli_plans import plan_json, subscription_json
from relay.config import Price
from relay.httpserver import Request
from relay.webapi import Api, ApiError, Call, Reply

PREFIX = "/admin/v1"
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
DEFAULT_MIN_TOPUP = "0.01"
MAX_BATCH_KEYS = 1000
_ACTOR = re.compile(r"[A-Za-z0-9._@:+\-]{1,64}")
_WINDOW = re.compile(r"(\d{1,5})([mhd])")
_WINDOW_UNIT = {"m": "minutes", "h": "hours", "d": "days"}


# --- request parsing -------------------------------------------------------------------


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    """A misspelt field must fail, not silently leave a limit unset."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise E.InvalidRequest(f"{unknown[0]}: unknown field (known: {', '.join(sorted(allowed))})")


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise E.InvalidRequest(f"{name}: required")
        return None
    if not isinstance(v, str):
        raise E.InvalidRequest(f"{name}: expected a string, got {v!r}")
    return v


def _int(body: dict[str, Any], name: str, *, lo: int = 0, hi: int = 2**31 - 1) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise E.InvalidRequest(f"{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _nano(body: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    """`name` as an exact USD string, or `name_nano` as an integer of nano-USD."""
    usd, nano = body.get(name), body.get(f"{name}_nano")
    if usd is not None and nano is not None:
        raise E.InvalidRequest(f"{name}: give {name} (USD string) or {name}_nano, not both")
    if usd is not None:
        if not isinstance(usd, str):
            raise E.InvalidRequest(f"{name}: expected a decimal string such as \"5.00\", got {usd!r}"
                                   " (numbers are refused: they may not be exact)")
        try:
            return parse_usd(usd, what=name)
        except (ValueError, OverflowError) as exc:
            raise E.InvalidRequest(str(exc))
    if nano is not None:
        if isinstance(nano, bool) or not isinstance(nano, int) or not 0 <= nano < 2**63:
            raise E.InvalidRequest(f"{name}_nano: expected an integer >= 0, got {nano!r}")
        return nano
    if required:
        raise E.InvalidRequest(f"{name}: required (a USD string such as \"5.00\")")
    return None


def _names(body: dict[str, Any], name: str) -> list[str] | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise E.InvalidRequest(f"{name}: expected a list of strings, got {v!r}")
    return v


def parse_time(value: str, what: str) -> datetime:
    """ISO 8601 date or datetime; without an offset it is UTC."""
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise E.InvalidRequest(f"{what}: expected an ISO 8601 time such as 2026-01-31T12:00:00Z,"
                               f" got {value!r}")
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _time(body: dict[str, Any], name: str) -> datetime | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise E.InvalidRequest(f"{name}: expected an ISO 8601 string or null, got {v!r}")
    return parse_time(v, name)


def window(query: dict[str, str], default: timedelta) -> tuple[datetime, datetime]:
    """[start, end) from `start`/`end` (ISO 8601) or `window` ("90m", "24h", "7d")."""
    end = parse_time(query["end"], "end") if query.get("end") else datetime.now(UTC)
    if query.get("start"):
        start = parse_time(query["start"], "start")
    elif query.get("window"):
        m = _WINDOW.fullmatch(query["window"].strip())
        if m is None:
            raise E.InvalidRequest(f"window: expected a number and m, h or d (\"24h\"), got {query['window']!r}")
        start = end - timedelta(**{_WINDOW_UNIT[m.group(2)]: int(m.group(1))})
    else:
        start = end - default
    if start >= end:
        raise E.InvalidRequest("start: must be before end")
    return start, end


def q_int(query: dict[str, str], name: str, default: int | None = None, *, lo: int = 0,
          hi: int = 2**63 - 1) -> int | None:
    v = query.get(name)
    if v is None or v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        n = lo - 1
    if not lo <= n <= hi:
        raise E.InvalidRequest(f"{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return n


def q_bool(query: dict[str, str], name: str) -> bool:
    v = query.get(name, "").lower()
    if v in ("", "0", "false", "no"):
        return False
    if v in ("1", "true", "yes"):
        return True
    raise E.InvalidRequest(f"{name}: expected true or false, got {v!r}")


def encode_cursor(cursor: str | None) -> str | None:
    """The request log's keyset cursor as URL-safe text (it holds '+' and '|')."""
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")


def decode_cursor(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise E.InvalidRequest(f"cursor: not a cursor this API returned: {text!r}")


def _ref(text: str) -> int | str:
    """A path or query reference to a user or channel: digits are an id, anything else a name."""
    return int(text) if text.isdigit() else text


def _id(text: str, what: str) -> int:
    if not text.isdigit():
        raise E.NotFound(f"{what} {text!r} not found")
    return int(text)


def _page(rows: list[Any], limit: int, offset: int) -> dict[str, Any]:
    """Offset pages with the same shape as the keyset pages: pass `next` back as `cursor`."""
    more = len(rows) > offset + limit
    return {"data": rows[offset:offset + limit], "next": str(offset + limit) if more else None}


def _with_usd(row: dict[str, Any], *names: str) -> dict[str, Any]:
    for n in names:
        if n in row and row[n] is not None:
            row[n.removesuffix("_nano") + "_usd"] = format_usd(row[n])
    return row


def price_json(row: pricing.PriceRow) -> dict[str, Any]:
    return {"model": row.model, "version": row.version, **money("input", row.input),
            **money("output", row.output), **money("cache_read", row.cache_read),
            **money("cache_write", row.cache_write), "unit": "USD per 1M tokens"}


def group_json(g: store.Group) -> dict[str, Any]:
    return {"name": g.name, "multiplier": g.multiplier, "models": list(g.models)}


def code_json(r: dict[str, Any]) -> dict[str, Any]:
    state = ("redeemed" if r["redeemed_by"] is not None else
             "expired" if r["expires_at"] is not None and r["expires_at"] <= datetime.now(UTC)
             else "unused")
    return {"prefix": r["prefix"], "batch_id": r["batch_id"], **money("amount", r["amount_nano"]),
            "state": state, "expires_at": r["expires_at"], "redeemed_by": r["redeemed_by"],
            "redeemed_at": r["redeemed_at"], "created_at": r["created_at"]}


def credit_json(c: topups.Credit) -> dict[str, Any]:
    return {"topup_id": c.topup_id, "user_id": c.user_id, **money("amount", c.amount_nano),
            "external_id": c.external_id, "duplicate": c.duplicate,
            **money("balance", c.balance_nano), "created_at": c.created_at}


def mapped(fn: Callable[[Call], Awaitable[Any]]) -> Callable[[Call], Awaitable[Any]]:
    """Storage's refusals become API errors (404, 409, 400) with their safe messages."""

    async def run(call: Call) -> Any:
        try:
            return await fn(call)
        except store.NotFound as exc:
            raise E.NotFound(str(exc))
        except store.Conflict as exc:
            raise ApiError(409, "conflict", str(exc))
        except codes.CodeNotFound as exc:
            raise E.NotFound(str(exc))
        except (codes.CodeAlreadyRedeemed, codes.CodeExpired) as exc:
            raise ApiError(409, "code_unavailable", str(exc))
        except (store.StoreError, codes.CodeError, ValueError, OverflowError,
                asyncpg.DataError) as exc:
            raise E.InvalidRequest(str(exc))

    run.__name__ = getattr(fn, "__name__", "handler")
    return run


# --- the handlers ------------------------------------------------------------------------

_KEY_FIELDS = {"name", "models", "expires_at", "group", "cap", "cap_nano", "concurrency", "rpm",
               "tpm", "allowed_cidrs"}
_USER_LIMITS = ("concurrency", "rpm", "tpm", "max_ips")


class Admin:
    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self._openapi: bytes | None = None

    # --- plumbing -------------------------------------------------------------------

    async def guard(self, req: Request) -> str:
        """The acting admin's name for the audit log, or 401/403."""
        cfg = self.gw.cfg
        token = cfg.admin_token()
        if not token:
            raise ApiError(403, "admin_disabled",
                           f"The admin API is disabled: set the {cfg.admin.token_env} environment"
                           " variable (or token in the [admin] section of config.toml) to a long"
                           " random string and restart")
        self.gw.authguard.admin(token, req)
        raw = req.header(b"x-admin-actor")
        if raw is not None:
            name = raw.decode("latin-1").strip()
            if _ACTOR.fullmatch(name):
                return name
        return "admin"

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Any]:
        async with self.gw.db.acquire() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        async with self.gw.db.acquire() as conn:
            yield conn

    async def _user(self, conn: Any, ref: str | int) -> store.User:
        if ref == "":
            raise E.InvalidRequest("user: required (the user's id or name)")
        u = await store.get_user(conn, _ref(ref) if isinstance(ref, str) else ref)
        if u is None:
            raise E.NotFound(f"user {ref!r} not found")
        return u

    async def _user_id(self, conn: Any, query: dict[str, str]) -> int | None:
        return None if not query.get("user") else (await self._user(conn, query["user"])).id

    def _min_topup(self) -> int:
        raw = getattr(self.gw.cfg.admin, "min_topup", "") or DEFAULT_MIN_TOPUP
        return parse_usd(raw, what="admin.min_topup")

    def _growth(self) -> growth.Terms:
        return growth.Terms.of(self.gw.cfg.growth)

    def now(self) -> datetime:
        return datetime.now(UTC)

    # --- openapi ----------------------------------------------------------------------

    async def openapi(self, call: Call) -> Reply:
        if self._openapi is None:
            self._openapi = OPENAPI_PATH.read_bytes()
        return Reply(200, None, raw=self._openapi, content_type=b"application/yaml")

    # --- users ------------------------------------------------------------------------

    async def users_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"name", "balance", "balance_nano", "status", *_USER_LIMITS})
        name = _text(body, "name", required=True)
        assert name is not None
        balance = _nano(body, "balance") or 0
        limits: dict[str, Any] = {f: v for f in _USER_LIMITS if (v := _int(body, f)) is not None}
        if body.get("status") is not None:
            limits["status"] = _text(body, "status")
        async with self.tx() as conn:
            uid = await store.create_user(conn, name, balance, note=f"initial balance by {call.ctx}")
            user = await store.edit_user(conn, uid, **limits)
            await store.audit(conn, call.ctx, "user.create", str(uid),
                              {"name": user.name, "balance_nano": balance, **limits})
        return Reply(201, user_json(user))

    async def users_list(self, call: Call) -> Any:
        q = call.query
        limit = q_int(q, "limit", 100, lo=1, hi=1000) or 100
        offset = q_int(q, "cursor", 0) or 0
        async with self.read() as conn:
            users = await store.list_users(conn)
        if q.get("status"):
            users = [u for u in users if u.status == q["status"]]
        if q.get("name"):
            users = [u for u in users if q["name"].lower() in u.name.lower()]
        return _page([user_json(u) for u in users], limit, offset)

    async def users_show(self, call: Call) -> Any:
        async with self.read() as conn:
            user = await self._user(conn, call.params["user"])
            keys = await store.list_keys(conn, user.id)
        return {**user_json(user), "keys": len(keys),
                **money("keys_spent", sum(k.spent_nano for k in keys))}

    async def users_edit(self, call: Call) -> Any:
        body = call.body()
        _only(body, {"status", *_USER_LIMITS})
        fields: dict[str, Any] = {f: v for f in _USER_LIMITS if (v := _int(body, f)) is not None}
        if body.get("status") is not None:
            fields["status"] = _text(body, "status")
        async with self.tx() as conn:
            user = await self._user(conn, call.params["user"])
            user = await store.edit_user(conn, user.id, **fields)
            await store.audit(conn, call.ctx, "user.edit", str(user.id), {"name": user.name, **fields})
        return user_json(user)

    async def users_delete(self, call: Call) -> Any:
        # Users are never removed: usage, topups and keys refer to them. Disabled, every
        # key of theirs is refused on every worker within a second.
        async with self.tx() as conn:
            user = await self._user(conn, call.params["user"])
            user = await store.edit_user(conn, user.id, status="disabled")
            await store.audit(conn, call.ctx, "user.delete", str(user.id), {"name": user.name})
        return user_json(user)

    # --- balances ---------------------------------------------------------------------

    async def _credit(self, call: Call, user_ref: int | str, body: dict[str, Any]) -> Reply:
        amount = _nano(body, "amount", required=True)
        assert amount is not None
        minimum = self._min_topup()
        if amount < minimum:
            raise E.InvalidRequest(f"amount: the minimum top-up is {format_usd(minimum)} USD")
        external_id = _text(body, "external_id")
        if external_id is not None and not 1 <= len(external_id) <= 200:
            raise E.InvalidRequest("external_id: expected 1 to 200 characters")
        note = _text(body, "note") or ""
        async with self.tx() as conn:
            user = await self._user(conn, user_ref)
            c = await topups.credit(conn, user.id, amount, external_id, note or f"top-up by {call.ctx}")
            reward = None
            if not c.duplicate:
                await store.audit(conn, call.ctx, "user.topup", str(user.id),
                                  {"name": user.name, "amount_nano": amount,
                                   "external_id": external_id, "topup_id": c.topup_id})
                # An invited user's first top-up pays the inviter their share, once.
                reward = await growth.reward_inviter(conn, user.id, c.topup_id, amount,
                                                     self._growth().share)
        out = credit_json(c)
        if reward is not None:
            out["invite_reward"] = {"inviter_id": reward[0], **money("amount", reward[1])}
        return Reply(200 if c.duplicate else 201, out)

    async def topups_create_for_user(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"amount", "amount_nano", "external_id", "note"})
        return await self._credit(call, _ref(call.params["user"]), body)

    async def topups_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"user", "amount", "amount_nano", "external_id", "note"})
        user = body.get("user")
        if isinstance(user, bool) or not isinstance(user, int | str) or user == "":
            raise E.InvalidRequest("user: required (the user's id or name)")
        if _text(body, "external_id") is None:
            raise E.InvalidRequest("external_id: required (the payment's id, so a retried"
                                   " notification credits once)")
        return await self._credit(call, user, body)

    async def topups_list(self, call: Call) -> Any:
        q = call.query
        async with self.read() as conn:
            user = await self._user(conn, call.params["user"])
            rows, nxt = await topups.list_topups(
                conn, user.id, limit=q_int(q, "limit", 50, lo=1, hi=1000) or 50,
                before_id=q_int(q, "cursor"))
        return {"data": [_with_usd(r, "amount_nano") for r in rows],
                "next": None if nxt is None else str(nxt), **money("balance", user.balance_nano)}

    # --- keys -------------------------------------------------------------------------

    def _key_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "name" in body:
            out["name"] = _text(body, "name") or ""
        if "models" in body:
            out["models"] = _names(body, "models")
        if "expires_at" in body:
            out["expires_at"] = _time(body, "expires_at")
        if body.get("group") is not None:
            out["group"] = _text(body, "group")
        if "cap" in body or "cap_nano" in body:
            out["cap_nano"] = _nano(body, "cap") or 0
        for f in ("concurrency", "rpm", "tpm"):
            if body.get(f) is not None:
                out[f] = _int(body, f)
        if "allowed_cidrs" in body:
            out["allowed_cidrs"] = _names(body, "allowed_cidrs") or []
        return out

    @staticmethod
    def _audit_fields(fields: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in fields.items()}

    async def keys_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"user", *_KEY_FIELDS})
        fields = self._key_fields(body)
        async with self.tx() as conn:
            user = await self._user(conn, str(body.get("user") or ""))
            key_id, secret = await store.create_key(conn, user.id, **fields)
            key = await store.get_key(conn, key_id)
            assert key is not None
            await store.audit(conn, call.ctx, "key.create", str(key_id),
                              {"user_id": user.id, "key_prefix": key.key_prefix,
                               **self._audit_fields(fields)})
        return Reply(201, {**key_json(key), "secret": secret})

    async def keys_batch(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"user", "count", *_KEY_FIELDS})
        count = _int(body, "count", lo=1, hi=MAX_BATCH_KEYS)
        if count is None:
            raise E.InvalidRequest(f"count: required (1..{MAX_BATCH_KEYS})")
        fields = self._key_fields(body)
        base = fields.pop("name", "") or "key"
        out = []
        async with self.tx() as conn:
            user = await self._user(conn, str(body.get("user") or ""))
            ids = []
            for _ in range(count):
                key_id, secret = await store.create_key(
                    conn, user.id, name=f"{base}-{secrets.token_hex(4)}", **fields)
                key = await store.get_key(conn, key_id)
                assert key is not None
                ids.append(key_id)
                out.append({**key_json(key), "secret": secret})
            await store.audit(conn, call.ctx, "key.batch_create", str(user.id),
                              {"count": count, "key_ids": ids,
                               "key_prefixes": [k["key_prefix"] for k in out],
                               "name": base, **self._audit_fields(fields)})
        return Reply(201, {"data": out})

    async def keys_list(self, call: Call) -> Any:
        q = call.query
        status = q.get("status") or None
        if status not in (None, "active", "disabled", "deleted", "all"):
            raise E.InvalidRequest(f"status: expected active, disabled, deleted or all, got {status!r}")
        limit = q_int(q, "limit", 100, lo=1, hi=1000) or 100
        offset = q_int(q, "cursor", 0) or 0
        async with self.read() as conn:
            uid = await self._user_id(conn, q)
            keys = await store.list_keys(conn, uid, include_deleted=status in ("deleted", "all"))
        if status not in (None, "all"):
            keys = [k for k in keys if k.status == status]
        if q.get("group"):
            keys = [k for k in keys if k.group == q["group"]]
        if q.get("name"):
            keys = [k for k in keys if q["name"].lower() in k.name.lower()]
        if q.get("prefix"):
            keys = [k for k in keys if k.key_prefix.startswith(q["prefix"])]
        return _page([key_json(k) for k in keys], limit, offset)

    async def keys_show(self, call: Call) -> Any:
        async with self.read() as conn:
            key = await store.get_key(conn, _id(call.params["key"], "key"))
        if key is None:
            raise E.NotFound(f"key {call.params['key']} not found")
        return key_json(key)

    async def keys_edit(self, call: Call) -> Any:
        body = call.body()
        _only(body, _KEY_FIELDS | {"plan_id"})
        fields = self._key_fields(body)
        if body.get("plan_id") is not None:
            fields["plan_id"] = _int(body, "plan_id", hi=2**63 - 1)
        key_id = _id(call.params["key"], "key")
        async with self.tx() as conn:
            key = await store.edit_key(conn, key_id, **fields)
            await store.audit(conn, call.ctx, "key.edit", str(key_id),
                              {"key_prefix": key.key_prefix, **self._audit_fields(fields)})
        return key_json(key)

    async def _key_action(self, call: Call, action: str) -> Any:
        key_id = _id(call.params["key"], "key")
        secret = None
        async with self.tx() as conn:
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
            await store.audit(conn, call.ctx, f"key.{action}", str(key_id),
                              {"key_prefix": key.key_prefix})
        out = key_json(key)
        if secret is not None:
            out["secret"] = secret
        return out

    async def keys_disable(self, call: Call) -> Any:
        return await self._key_action(call, "disable")

    async def keys_enable(self, call: Call) -> Any:
        return await self._key_action(call, "enable")

    async def keys_reset(self, call: Call) -> Any:
        return await self._key_action(call, "reset")

    async def keys_delete(self, call: Call) -> Any:
        return await self._key_action(call, "delete")

    # --- groups -----------------------------------------------------------------------

    @staticmethod
    def _group_fields(body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if body.get("multiplier") is not None:
            m = body["multiplier"]
            if not isinstance(m, str):
                raise E.InvalidRequest(f"multiplier: expected an exact string such as \"0.8\" or"
                                       f" \"2/3\", got {m!r}")
            out["multiplier"] = format_fraction(parse_multiplier(m))
        if body.get("models") is not None:
            models = [m.strip() for m in _names(body, "models") or [] if m.strip()]
            if not models:
                raise E.InvalidRequest("models: expected at least one model or pattern (\"*\": all)")
            out["models"] = models
        return out

    async def _groups(self, conn: Any) -> dict[str, store.Group]:
        return {g.name: g for g in (await store.fetch_groups(conn, 0))[0]}

    async def groups_list(self, call: Call) -> Any:
        async with self.read() as conn:
            groups = await self._groups(conn)
        return {"data": [group_json(g) for g in groups.values()], "next": None}

    async def groups_show(self, call: Call) -> Any:
        async with self.read() as conn:
            g = (await self._groups(conn)).get(call.params["group"])
        if g is None:
            raise E.NotFound(f"group {call.params['group']!r} not found")
        return group_json(g)

    async def groups_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"name", "multiplier", "models"})
        name = (_text(body, "name", required=True) or "").strip()
        if not name or "/" in name:
            raise E.InvalidRequest("name: expected a non-empty name without '/'")
        fields = {"multiplier": "1", "models": ["*"], **self._group_fields(body)}
        async with self.tx() as conn:
            await conn.execute("LOCK TABLE groups IN SHARE ROW EXCLUSIVE MODE")
            if name in await self._groups(conn):
                raise ApiError(409, "conflict", f"group {name!r} already exists")
            g = await store.upsert_group(conn, name, fields["multiplier"], fields["models"])
            await store.audit(conn, call.ctx, "group.create", name, fields)
        return Reply(201, group_json(g))

    async def groups_edit(self, call: Call) -> Any:
        body = call.body()
        _only(body, {"multiplier", "models"})
        fields = self._group_fields(body)
        name = call.params["group"]
        async with self.tx() as conn:
            cur = await conn.fetchrow(
                "SELECT multiplier, models FROM groups WHERE name = $1 FOR UPDATE", name)
            if cur is None:
                raise E.NotFound(f"group {name!r} not found")
            g = await store.upsert_group(conn, name, fields.get("multiplier", cur["multiplier"]),
                                         fields.get("models", list(cur["models"])))
            await store.audit(conn, call.ctx, "group.edit", name, fields)
        return group_json(g)

    # --- channels ---------------------------------------------------------------------

    _CHANNEL_FIELDS = frozenset(chan_store.EDITABLE)

    @staticmethod
    def _channel_audit(fields: dict[str, Any]) -> dict[str, Any]:
        out = dict(fields)
        if "headers" in out and isinstance(out["headers"], dict):
            out["headers"] = sorted(out["headers"])  # names only: a value may be a credential
        return out

    async def channels_list(self, call: Call) -> Any:
        async with self.read() as conn:
            chans = await store.list_channels(conn)
        return {"data": [channel_json(c) for c in chans], "next": None}

    async def channels_show(self, call: Call) -> Any:
        async with self.read() as conn:
            ch = await chan_store.get_channel(conn, _ref(call.params["channel"]))
        if ch is None:
            raise E.NotFound(f"channel {call.params['channel']!r} not found")
        return channel_json(ch)

    async def channels_health(self, call: Call) -> Any:
        """This worker's view of the channel: breaker state, error rate, load. Every worker
        keeps its own breaker; /metrics merges them (the worst state wins)."""
        name = call.params["channel"]
        status = self.gw.router.status()
        if name not in status:
            raise E.NotFound(f"channel {name!r} is not in service (unknown or disabled)")
        return {"channel": name, **status[name]}

    async def channels_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"name", *self._CHANNEL_FIELDS})
        name = _text(body, "name", required=True) or ""
        fields = {k: v for k, v in body.items() if k != "name" and v is not None}
        for req in ("protocol", "base_url"):
            if req not in fields:
                raise E.InvalidRequest(f"{req}: required")
        async with self.tx() as conn:
            ch = await chan_store.create_channel(conn, name, fields.pop("protocol"),
                                                 fields.pop("base_url"), **fields)
            await store.audit(conn, call.ctx, "channel.create", ch.name,
                              self._channel_audit({"protocol": ch.protocol, "base_url": ch.base_url,
                                                   **fields}))
        return Reply(201, channel_json(ch))

    async def channels_edit(self, call: Call) -> Any:
        body = call.body()
        _only(body, set(self._CHANNEL_FIELDS))
        fields = {k: v for k, v in body.items() if v is not None}
        return await self._channel_change(call, "channel.edit", fields)

    async def _channel_change(self, call: Call, action: str, fields: dict[str, Any]) -> Any:
        async with self.tx() as conn:
            ch = await chan_store.edit_channel(conn, _ref(call.params["channel"]), **fields)
            await store.audit(conn, call.ctx, action, ch.name, self._channel_audit(fields))
        return channel_json(ch)

    async def channels_disable(self, call: Call) -> Any:
        return await self._channel_change(call, "channel.disable", {"enabled": False})

    async def channels_enable(self, call: Call) -> Any:
        return await self._channel_change(call, "channel.enable", {"enabled": True})

    # --- prices -----------------------------------------------------------------------

    async def prices_list(self, call: Call) -> Any:
        async with self.read() as conn:
            book = pricing.PriceBook(await pricing.load_since(conn, 0))
        models = book.models()
        if call.query.get("model"):
            models = [m for m in models if m == call.query["model"]]
        return {"data": [price_json(book.lookup(m)) for m in models], "next": None}

    async def prices_set(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"model", "input", "output", "cache_read", "cache_write"})
        model = (_text(body, "model", required=True) or "").strip()
        if not model:
            raise E.InvalidRequest("model: must not be empty (\"default\" prices unknown models)")
        parts = {}
        for f in ("input", "output", "cache_read", "cache_write"):
            v = body.get(f)
            if v is None and f in ("input", "output"):
                raise E.InvalidRequest(f"{f}: required (USD per 1M tokens, e.g. \"0.15\")")
            if v is not None and not isinstance(v, str):
                raise E.InvalidRequest(f"{f}: expected a decimal string such as \"0.15\", got {v!r}")
            parts[f] = v or ""
        price = Price(**parts)
        async with self.tx() as conn:
            before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM prices")
            row = await pricing.set_price(conn, model, price, call.ctx)
            created = row.version > before
            if created:
                await store.audit(conn, call.ctx, "price.set", model,
                                  {"version": row.version, **parts})
        return Reply(201 if created else 200, {**price_json(row), "created": created})

    async def prices_history(self, call: Call) -> Any:
        model = call.query.get("model")
        if not model:
            raise E.InvalidRequest("model: required")
        async with self.read() as conn:
            versions = await pricing.history(conn, model)
        return {"data": [{**price_json(v.row), "created_at": v.created_at, "created_by": v.created_by}
                         for v in versions], "next": None}

    # --- redemption codes -------------------------------------------------------------

    async def codes_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"amount", "amount_nano", "count", "expires_at"})
        amount = _nano(body, "amount", required=True)
        count = _int(body, "count", lo=1, hi=10_000)
        if count is None:
            raise E.InvalidRequest("count: required (1..10000)")
        expires = _time(body, "expires_at")
        assert amount is not None
        async with self.tx() as conn:
            made = await codes.create_codes(conn, amount, count, expires)
            batch = await conn.fetchval(
                "SELECT batch_id FROM redemption_codes WHERE code_hash = $1", codes.code_hash(made[0]))
            await store.audit(conn, call.ctx, "codes.create", str(batch),
                              {"count": count, "amount_nano": amount,
                               "expires_at": expires.isoformat() if expires else None})
        return Reply(201, {"batch_id": batch, **money("amount", amount), "count": count,
                           "expires_at": expires, "codes": made})

    async def codes_list(self, call: Call) -> Any:
        q = call.query
        limit = q_int(q, "limit", 100, lo=1, hi=1000) or 100
        offset = q_int(q, "cursor", 0) or 0
        async with self.read() as conn:
            rows = await reports.list_codes(conn, batch_id=q_int(q, "batch"),
                                            prefix=(q.get("prefix") or "").upper() or None,
                                            state=q.get("state") or None,
                                            limit=limit + 1, offset=offset)
        more = len(rows) > limit
        return {"data": [code_json(r) for r in rows[:limit]],
                "next": str(offset + limit) if more else None}

    async def codes_show(self, call: Call) -> Any:
        prefix = call.params["prefix"].upper()
        async with self.read() as conn:
            rows = await reports.list_codes(conn, prefix=prefix, limit=1000)
        if not rows:
            raise E.NotFound(f"no redemption code starts with {prefix!r}")
        return {"data": [code_json(r) for r in rows], "next": None}

    # --- plans ------------------------------------------------------------------------

    _PLAN_BODY = {"name", "price", "price_nano", "credit", "credit_nano", "validity", "validity_s",
                  "periodic_credit", "periodic_credit_nano", "reset", "reset_s", "models", "groups",
                  "renewal_window_s", "status"}

    def _plan_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, self._PLAN_BODY)
        out: dict[str, Any] = {}
        for name, col in (("price", "price_nano"), ("credit", "credit_nano"),
                          ("periodic_credit", "periodic_nano")):
            v = _nano(body, name)
            if v is not None:
                out[col] = v
        for name in ("name", "validity", "reset", "status"):
            if body.get(name) is not None:
                out[name] = _text(body, name)
        for name in ("validity_s", "reset_s", "renewal_window_s"):
            v = _int(body, name, hi=2**62)
            if v is not None:
                out[name] = v
        if "models" in body:
            out["models"] = _names(body, "models")
        if body.get("groups") is not None:
            out["groups"] = _names(body, "groups")
        return out

    async def _plan(self, conn: Any, ref: str) -> plans.Plan:
        return await plans.get_plan(conn, _ref(ref))

    async def plans_create(self, call: Call) -> Reply:
        f = self._plan_fields(call.body())
        for need in ("name", "credit_nano"):
            if need not in f:
                raise E.InvalidRequest(f"{need.removesuffix('_nano')}: required")
        f.pop("status", None)
        async with self.tx() as conn:
            p = await plans.create_plan(conn, f.pop("name"), f.pop("credit_nano"),
                                        f.pop("validity", "month"), **f)
            await store.audit(conn, call.ctx, "plan.create", str(p.id), {"name": p.name})
        return Reply(201, plan_json(p))

    async def plans_list(self, call: Call) -> Any:
        async with self.read() as conn:
            rows = await plans.list_plans(conn, include_archived=q_bool(call.query, "all"))
        return {"data": [plan_json(p) for p in rows], "next": None}

    async def plans_show(self, call: Call) -> Any:
        async with self.read() as conn:
            return plan_json(await self._plan(conn, call.params["plan"]))

    async def plans_edit(self, call: Call) -> Any:
        f = self._plan_fields(call.body())
        async with self.tx() as conn:
            p = await self._plan(conn, call.params["plan"])
            p = await plans.edit_plan(conn, p.id, **f)
            await store.audit(conn, call.ctx, "plan.edit", str(p.id), self._audit_fields(f))
        return plan_json(p)

    async def plans_delete(self, call: Call) -> Any:
        # Archived, not removed: subscriptions refer to it; it can no longer be bought or renewed.
        async with self.tx() as conn:
            p = await self._plan(conn, call.params["plan"])
            p = await plans.edit_plan(conn, p.id, status="archived")
            await store.audit(conn, call.ctx, "plan.archive", str(p.id), {"name": p.name})
        return plan_json(p)

    async def plan_codes_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"count", "expires_at"})
        count = _int(body, "count", lo=1, hi=10_000)
        if count is None:
            raise E.InvalidRequest("count: required (1..10000)")
        expires = _time(body, "expires_at")
        async with self.tx() as conn:
            p = await self._plan(conn, call.params["plan"])
            batch, made = await plans.create_plan_codes(conn, p.id, count, expires)
            await store.audit(conn, call.ctx, "plan_codes.create", str(batch),
                              {"plan_id": p.id, "count": count})
        return Reply(201, {"batch_id": batch, "plan_id": p.id, "count": count,
                           "expires_at": expires, "codes": made})

    async def plan_codes_list(self, call: Call) -> Any:
        async with self.read() as conn:
            p = await self._plan(conn, call.params["plan"])
            rows = await plans.list_plan_codes(conn, p.id)
        return {"data": rows, "next": None}

    async def plan_codes_redeem(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"code", "user"})
        code = _text(body, "code", required=True)
        assert code is not None
        async with self.tx() as conn:
            user = await self._user(conn, str(body.get("user") or ""))
            sub, key_id, secret = await plans.redeem_plan_code(conn, code, user.id, self.now())
            await store.audit(conn, call.ctx, "plan_code.redeem", str(sub.id),
                              {"user_id": user.id, "plan_id": sub.plan_id, "key_id": key_id})
        return Reply(201, {**subscription_json(sub, self.now()), "key_id": key_id, "secret": secret})

    # --- subscriptions ----------------------------------------------------------------

    async def subscriptions_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"user", "plan", "pay_from_balance", "balance_fallback", "starts_at"})
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
        start = _time(body, "starts_at") or self.now()
        async with self.tx() as conn:
            user = await self._user(conn, str(body.get("user") or ""))
            p = await plans.get_plan(conn, plan if isinstance(plan, int) else _ref(plan))
            sub, key_id, secret = await plans.subscribe(conn, user.id, p.id, start, **flags)
            await store.audit(conn, call.ctx, "subscription.create", str(sub.id),
                              {"user_id": user.id, "plan_id": p.id, "key_id": key_id, **flags})
        return Reply(201, {**subscription_json(sub, self.now()), "key_id": key_id, "secret": secret})

    async def subscriptions_list(self, call: Call) -> Any:
        q = call.query
        async with self.read() as conn:
            uid = await self._user_id(conn, q)
            subs = await plans.list_subscriptions(conn, uid, q_int(q, "plan"))
        now = self.now()
        rows = [subscription_json(s, now) for s in subs]
        if q.get("state"):
            rows = [r for r in rows if r["state"] == q["state"]]
        return {"data": rows, "next": None}

    async def _sub(self, conn: Any, call: Call) -> plans.Subscription:
        return await plans.get_subscription(conn, _id(call.params["subscription"], "subscription"))

    async def subscriptions_show(self, call: Call) -> Any:
        async with self.read() as conn:
            sub = await self._sub(conn, call)
            keys = await plans.subscription_keys(conn, sub.id)
        return {**subscription_json(sub, self.now()), "keys": [key_json(k) for k in keys]}

    async def subscriptions_edit(self, call: Call) -> Any:
        body = call.body()
        _only(body, {"periodic_enabled", "balance_fallback"})
        for f, v in body.items():
            if v is not None and not isinstance(v, bool):
                raise E.InvalidRequest(f"{f}: expected true or false")
        async with self.tx() as conn:
            sub = await self._sub(conn, call)
            sub = await plans.set_options(conn, sub.id, periodic_enabled=body.get("periodic_enabled"),
                                          balance_fallback=body.get("balance_fallback"))
            await store.audit(conn, call.ctx, "subscription.edit", str(sub.id), body)
        return subscription_json(sub, self.now())

    async def subscriptions_renew(self, call: Call) -> Any:
        body = call.body()
        _only(body, {"pay_from_balance"})
        pay = body.get("pay_from_balance") is True
        async with self.tx() as conn:
            sub = await self._sub(conn, call)
            sub = await plans.renew(conn, sub.id, self.now(), pay_from_balance=pay)
            await store.audit(conn, call.ctx, "subscription.renew", str(sub.id),
                              {"expires_at": sub.expires_at.isoformat(), "pay_from_balance": pay})
        return subscription_json(sub, self.now())

    async def subscriptions_cancel(self, call: Call) -> Any:
        async with self.tx() as conn:
            sub = await self._sub(conn, call)
            sub = await plans.cancel(conn, sub.id, self.now())
            await store.audit(conn, call.ctx, "subscription.cancel", str(sub.id), {})
        return subscription_json(sub, self.now())

    async def subscription_keys_list(self, call: Call) -> Any:
        async with self.read() as conn:
            sub = await self._sub(conn, call)
            keys = await plans.subscription_keys(conn, sub.id)
        return {"data": [key_json(k) for k in keys], "next": None}

    async def subscription_keys_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"name", "quantity", "group", "expires_at", "cap", "cap_nano"})
        name = _text(body, "name", required=True)
        assert name is not None
        quantity = _int(body, "quantity", lo=1, hi=plans.MAX_TEAM_KEYS) or 1
        async with self.tx() as conn:
            sub = await self._sub(conn, call)
            made = await plans.create_team_keys(
                conn, sub.id, name, quantity=quantity, group=_text(body, "group"),
                expires_at=_time(body, "expires_at"), cap_nano=_nano(body, "cap") or 0)
            keys = [await store.get_key(conn, k) for k, _, _ in made]
            await store.audit(conn, call.ctx, "subscription.keys", str(sub.id),
                              {"key_ids": [k for k, _, _ in made], "quantity": quantity})
        return Reply(201, {"data": [{**key_json(k), "secret": s}
                                    for k, (_, s, _) in zip(keys, made, strict=True) if k is not None]})

    # --- sign-up and invites ------------------------------------------------------------

    async def signup(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"name", "invite_code"})
        name = _text(body, "name", required=True)
        assert name is not None
        terms = self._growth()
        async with self.tx() as conn:
            got = await growth.signup(conn, name, terms, _text(body, "invite_code"))
            user = await self._user(conn, got["user_id"])
            await store.audit(conn, call.ctx, "user.signup", str(user.id),
                              {"name": user.name, "inviter_id": got["inviter_id"]})
        return Reply(201, {**user_json(user), **money("signup_credit", got["signup_nano"]),
                           **money("invite_credit", got["invite_nano"]), "inviter_id": got["inviter_id"]})

    async def invite_codes_create(self, call: Call) -> Reply:
        body = call.body()
        _only(body, {"max_uses"})
        async with self.tx() as conn:
            user = await self._user(conn, call.params["user"])
            code = await growth.create_invite_code(conn, user.id, _int(body, "max_uses") or 0)
            await store.audit(conn, call.ctx, "invite_code.create", str(user.id), {"code": code})
        return Reply(201, {"code": code, "inviter_id": user.id, "max_uses": _int(body, "max_uses") or 0})

    async def invite_codes_list(self, call: Call) -> Any:
        async with self.read() as conn:
            user = await self._user(conn, call.params["user"])
            codes_ = await growth.list_invite_codes(conn, user.id)
            invited = await growth.invites_of(conn, user.id)
        return {"data": codes_, "invites": [_with_usd(r, "reward_nano") for r in invited], "next": None}

    # --- audit ------------------------------------------------------------------------

    async def audit_list(self, call: Call) -> Any:
        q = call.query
        start = parse_time(q["start"], "start") if q.get("start") else None
        end = parse_time(q["end"], "end") if q.get("end") else None
        async with self.read() as conn:
            rows, nxt = await reports.audit_entries(
                conn, start=start, end=end, actor=q.get("actor") or None,
                action=q.get("action") or None, target=q.get("target") or None,
                limit=q_int(q, "limit", 100, lo=1, hi=1000) or 100, before_id=q_int(q, "cursor"))
        return {"data": rows, "next": None if nxt is None else str(nxt)}

    # --- usage ------------------------------------------------------------------------

    async def _usage_filters(self, conn: Any, q: dict[str, str]) -> dict[str, Any]:
        return {"user_id": await self._user_id(conn, q), "key_id": q_int(q, "key"),
                "group": q.get("group") or None}

    async def usage_series(self, call: Call) -> Any:
        q = call.query
        bucket = q.get("bucket") or "hour"
        if bucket not in reports.BUCKETS:
            raise E.InvalidRequest(f"bucket: expected hour or day, got {bucket!r}")
        start, end = window(q, timedelta(days=30) if bucket == "day" else timedelta(hours=24))
        async with self.read() as conn:
            f = await self._usage_filters(conn, q)
            rows = await reports.spend_series(conn, health.hour_floor(start), end, bucket,
                                              model=q.get("model") or None, **f)
        return {"start": start, "end": end, "bucket": bucket,
                "data": [_with_usd(r, "cost_nano") for r in rows]}

    async def usage_models(self, call: Call) -> Any:
        q = call.query
        start, end = window(q, timedelta(hours=24))
        async with self.read() as conn:
            f = await self._usage_filters(conn, q)
            rows = await reports.per_model(conn, health.hour_floor(start), end, **f)
        if q.get("model"):
            rows = [r for r in rows if r["model"] == q["model"]]
        return {"start": start, "end": end, "data": [_with_usd(r, "cost_nano") for r in rows]}

    async def requests_list(self, call: Call) -> Any:
        q = call.query
        if q.get("request_id"):
            async with self.read() as conn:
                row = await reports.usage_row(conn, q["request_id"])
            return {"data": [] if row is None else [_with_usd(row, "cost_nano")], "next": None}
        start = parse_time(q["start"], "start") if q.get("start") else None
        end = parse_time(q["end"], "end") if q.get("end") else None
        async with self.read() as conn:
            f = await self._usage_filters(conn, q)
            rows, nxt = await reports.request_log(
                conn, start=start, end=end, model=q.get("model") or None,
                status=q_int(q, "status", lo=0, hi=999), errors_only=q_bool(q, "errors_only"),
                limit=q_int(q, "limit", 50, lo=1, hi=1000) or 50,
                before_cursor=decode_cursor(q.get("cursor")), **f)
        return {"data": [_with_usd(r, "cost_nano") for r in rows], "next": encode_cursor(nxt)}

    async def requests_show(self, call: Call) -> Any:
        async with self.read() as conn:
            row = await reports.usage_row(conn, call.params["request_id"])
            if row is None:
                raise E.NotFound(f"no usage row for request {call.params['request_id']!r}")
            bill = await explain_row(self.gw, conn, row)
        return {"usage": _with_usd(row, "cost_nano"), "bill": bill}

    async def health_view(self, call: Call) -> Any:
        q = call.query
        by = q.get("by") or "group"
        if by not in health.BY:
            raise E.InvalidRequest(f"by: expected one of {', '.join(health.BY)}, got {by!r}")
        start, end = window(q, timedelta(hours=1))
        async with self.read() as conn:
            f = await self._usage_filters(conn, q)
            rows = await health.health(conn, start, end, by, model=q.get("model") or None, **f)
        start, end = health.widened(start, end)  # the window the figures cover
        return {"start": start, "end": end, "by": by,
                "data": [_with_usd(r, "cost_nano") for r in rows]}


async def explain_row(gw: Any, conn: Any, row: dict[str, Any]) -> dict[str, Any] | None:
    """The bill of a logged request with its own price version and the multiplier stored
    on the row; None when the request was never priced.

    Rows written before the multiplier was stored read '1'; when that does not
    reproduce the charge, the group's current multiplier is tried (see 004_ledger.sql).
    """
    version = row["price_version"]
    if not version:
        return None
    price = gw.pricebook.by_version(version) if gw.pricebook is not None else None
    if price is None:
        price = await pricing.load_version(conn, version)
    if price is None:
        return None
    stored = await conn.fetchval(
        "SELECT multiplier FROM usage_log WHERE request_id = $1 AND ts = $2",
        row["request_id"], row["ts"])
    try:
        mult = parse_multiplier(stored) if stored else Fraction(1)
    except ValueError:
        mult = Fraction(1)
    bill = reports.explain(row, price, mult)
    current = gw.groups.multiplier.get(row["group"], Fraction(1))
    if not bill["matches_charged"] and current != mult:
        other = reports.explain(row, price, current)
        if other["matches_charged"]:
            return other
    return bill


# (method, path, Admin method). The OpenAPI document lists exactly these.
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/admin/v1/users", "users_list"),
    ("POST", "/admin/v1/users", "users_create"),
    ("GET", "/admin/v1/users/{user}", "users_show"),
    ("PATCH", "/admin/v1/users/{user}", "users_edit"),
    ("DELETE", "/admin/v1/users/{user}", "users_delete"),
    ("GET", "/admin/v1/users/{user}/topups", "topups_list"),
    ("POST", "/admin/v1/users/{user}/topups", "topups_create_for_user"),
    ("POST", "/admin/v1/topups", "topups_create"),
    ("GET", "/admin/v1/keys", "keys_list"),
    ("POST", "/admin/v1/keys", "keys_create"),
    ("POST", "/admin/v1/keys/batch", "keys_batch"),
    ("GET", "/admin/v1/keys/{key}", "keys_show"),
    ("PATCH", "/admin/v1/keys/{key}", "keys_edit"),
    ("DELETE", "/admin/v1/keys/{key}", "keys_delete"),
    ("POST", "/admin/v1/keys/{key}/disable", "keys_disable"),
    ("POST", "/admin/v1/keys/{key}/enable", "keys_enable"),
    ("POST", "/admin/v1/keys/{key}/reset", "keys_reset"),
    ("GET", "/admin/v1/groups", "groups_list"),
    ("POST", "/admin/v1/groups", "groups_create"),
    ("GET", "/admin/v1/groups/{group}", "groups_show"),
    ("PATCH", "/admin/v1/groups/{group}", "groups_edit"),
    ("GET", "/admin/v1/channels", "channels_list"),
    ("POST", "/admin/v1/channels", "channels_create"),
    ("GET", "/admin/v1/channels/{channel}", "channels_show"),
    ("PATCH", "/admin/v1/channels/{channel}", "channels_edit"),
    ("GET", "/admin/v1/channels/{channel}/health", "channels_health"),
    ("POST", "/admin/v1/channels/{channel}/disable", "channels_disable"),
    ("POST", "/admin/v1/channels/{channel}/enable", "channels_enable"),
    ("GET", "/admin/v1/prices", "prices_list"),
    ("POST", "/admin/v1/prices", "prices_set"),
    ("GET", "/admin/v1/prices/history", "prices_history"),
    ("GET", "/admin/v1/codes", "codes_list"),
    ("POST", "/admin/v1/codes", "codes_create"),
    ("GET", "/admin/v1/codes/{prefix}", "codes_show"),
    ("GET", "/admin/v1/plans", "plans_list"),
    ("POST", "/admin/v1/plans", "plans_create"),
    ("GET", "/admin/v1/plans/{plan}", "plans_show"),
    ("PATCH", "/admin/v1/plans/{plan}", "plans_edit"),
    ("DELETE", "/admin/v1/plans/{plan}", "plans_delete"),
    ("GET", "/admin/v1/plans/{plan}/codes", "plan_codes_list"),
    ("POST", "/admin/v1/plans/{plan}/codes", "plan_codes_create"),
    ("POST", "/admin/v1/plan-codes/redeem", "plan_codes_redeem"),
    ("GET", "/admin/v1/subscriptions", "subscriptions_list"),
    ("POST", "/admin/v1/subscriptions", "subscriptions_create"),
    ("GET", "/admin/v1/subscriptions/{subscription}", "subscriptions_show"),
    ("PATCH", "/admin/v1/subscriptions/{subscription}", "subscriptions_edit"),
    ("POST", "/admin/v1/subscriptions/{subscription}/renew", "subscriptions_renew"),
    ("POST", "/admin/v1/subscriptions/{subscription}/cancel", "subscriptions_cancel"),
    ("GET", "/admin/v1/subscriptions/{subscription}/keys", "subscription_keys_list"),
    ("POST", "/admin/v1/subscriptions/{subscription}/keys", "subscription_keys_create"),
    ("POST", "/admin/v1/signup", "signup"),
    ("GET", "/admin/v1/users/{user}/invite-codes", "invite_codes_list"),
    ("POST", "/admin/v1/users/{user}/invite-codes", "invite_codes_create"),
    ("GET", "/admin/v1/audit", "audit_list"),
    ("GET", "/admin/v1/usage/series", "usage_series"),
    ("GET", "/admin/v1/usage/models", "usage_models"),
    ("GET", "/admin/v1/requests", "requests_list"),
    ("GET", "/admin/v1/requests/{request_id}", "requests_show"),
    ("GET", "/admin/v1/health", "health_view"),
)
PUBLIC_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/admin/v1/openapi.yaml", "openapi"),
)


def build(gw: Any, worker: Any = None) -> Api:
    admin = Admin(gw)
    api = Api()
    api.prefixes = {PREFIX.encode() + b"/"}
    for method, path, name in PUBLIC_ROUTES:
        api.route(method, path)(mapped(getattr(admin, name)))
    for method, path, name in ROUTES:
        api.route(method, path, guard=admin.guard)(mapped(getattr(admin, name)))
    return api
