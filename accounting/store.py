"""Storage of the core records: users, balances' topup journal, keys, groups, channels, audit.

Plain async functions over an asyncpg connection or pool (no module state), used by the
CLI, the admin API and the gateway's change pollers. Key secrets exist only in the
return value of `create_key`/`reset_key`: the database holds their SHA-256 and an
8-character display prefix. This module does not price requests or move balances for
usage (that is the ledger's job), and never imports relay.

Change feed: `fetch_*(conn, since_version)` return the rows whose `version` (stamped
from `tollway_change_seq` on every insert/update) is above the cursor, plus the new
cursor. A sequence value is taken when a row is written, not when its transaction
commits, so a long transaction can commit a version below a cursor a poller already
passed; pollers should therefore also reload everything (`since_version=0`) now and
then (say every minute) as a backstop.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import string
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import orjson

from limits.keys import KeyState

Conn = Any  # asyncpg.Connection, a pool's connection proxy, or asyncpg.Pool

SECRET_PREFIX = "sk-"
SECRET_LEN = 48  # random characters after the prefix: 48 * log2(62) ~ 285 bits
DISPLAY_PREFIX_LEN = 8
_ALPHABET = string.ascii_letters + string.digits


class StoreError(Exception):
    """A request to the store that cannot be honoured; the message is safe to show."""


class NotFound(StoreError):
    """The named user, key or group does not exist."""


class Conflict(StoreError):
    """The change contradicts existing data (duplicate name, reused external id...)."""


# --- records ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    status: str
    balance_nano: int
    concurrency: int
    rpm: int
    tpm: int
    max_ips: int
    created_at: datetime
    version: int


@dataclass(frozen=True, slots=True)
class Key:
    id: int
    user_id: int
    user_name: str
    name: str
    key_prefix: str
    status: str
    expires_at: datetime | None
    models: tuple[str, ...] | None  # None: every model the group reaches
    group: str
    cap_nano: int
    spent_nano: int
    concurrency: int
    rpm: int
    tpm: int
    allowed_cidrs: tuple[str, ...]
    plan_id: int
    created_at: datetime
    version: int


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    multiplier: str
    models: tuple[str, ...]
    version: int


@dataclass(frozen=True, slots=True)
class Channel:
    id: int
    name: str
    protocol: str
    base_url: str
    api_key_env: str
    models: tuple[str, ...]
    model_map: dict[str, str]
    headers: dict[str, str]
    priority: int
    weight: int
    max_concurrency: int
    enabled: bool
    source: str
    version: int


class ChannelSpec(Protocol):
    """What `sync_config_channels` reads from a configured channel (relay.config.ChannelConfig)."""

    @property
    def name(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def api_key_env(self) -> str: ...
    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def model_map(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def priority(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...


# --- helpers ----------------------------------------------------------------------------


@asynccontextmanager
async def _transaction(db: Conn) -> AsyncIterator[Any]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return SECRET_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LEN))


def _json(value: Any) -> Any:
    # Plain connections return jsonb as text; a pool with a codec would return objects.
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _tuple(value: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _user(r: asyncpg.Record) -> User:
    return User(
        id=r["id"], name=r["name"], status=r["status"], balance_nano=r["balance_nano"],
        concurrency=r["concurrency"], rpm=r["rpm"], tpm=r["tpm"], max_ips=r["max_ips"],
        created_at=r["created_at"], version=r["version"],
    )


def _key(r: asyncpg.Record) -> Key:
    return Key(
        id=r["id"], user_id=r["user_id"], user_name=r["user_name"], name=r["name"],
        key_prefix=r["key_prefix"], status=r["status"], expires_at=r["expires_at"],
        models=_tuple(r["models"]), group=r["group_name"], cap_nano=r["cap_nano"],
        spent_nano=r["spent_nano"], concurrency=r["concurrency"], rpm=r["rpm"], tpm=r["tpm"],
        allowed_cidrs=tuple(r["allowed_cidrs"]), plan_id=r["plan_id"],
        created_at=r["created_at"], version=r["version"],
    )


def _channel(r: asyncpg.Record) -> Channel:
    return Channel(
        id=r["id"], name=r["name"], protocol=r["protocol"], base_url=r["base_url"],
        api_key_env=r["api_key_env"], models=tuple(r["models"]),
        model_map=_json(r["model_map"]), headers=_json(r["headers"]), priority=r["priority"],
        weight=r["weight"], max_concurrency=r["max_concurrency"], enabled=r["enabled"],
        source=r["source"], version=r["version"],
    )


def _check_limit(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**31 - 1:
        raise StoreError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


def _check_models(models: Iterable[str] | None) -> list[str] | None:
    if models is None:
        return None
    out = [m.strip() for m in models if m.strip()]
    if not out:
        raise StoreError("models: empty list (omit it to allow every model of the group)")
    return out


def _check_cidrs(cidrs: Iterable[str]) -> list[str]:
    out = []
    for c in cidrs:
        try:
            out.append(str(ipaddress.ip_network(c.strip(), strict=False)))
        except ValueError:
            raise StoreError(f"allowed_cidrs: {c!r} is not an IP network such as 10.0.0.0/8")
    return out


def _check_expiry(expires_at: datetime | None) -> datetime | None:
    if expires_at is not None and expires_at.tzinfo is None:
        raise StoreError("expires_at: a timezone-aware datetime is required")
    return expires_at


async def _user_id(conn: Conn, user: int | str) -> int:
    if isinstance(user, int):
        uid = await conn.fetchval("SELECT id FROM users WHERE id = $1", user)
    else:
        uid = await conn.fetchval("SELECT id FROM users WHERE name = $1", user)
    if uid is None:
        raise NotFound(f"user {user!r} not found")
    return int(uid)


# --- users ------------------------------------------------------------------------------

_USER_COLS = "id, name, status, balance_nano, concurrency, rpm, tpm, max_ips, created_at, version"


async def create_user(conn: Conn, name: str, balance_nano: int = 0, *, note: str = "initial balance") -> int:
    """Create a user; return its id. An opening balance is journaled as a topup in the
    same transaction."""
    name = name.strip()
    if not name:
        raise StoreError("user name: must not be empty")
    if balance_nano < 0:
        raise StoreError("balance: must not be negative")
    async with _transaction(conn) as tx:
        try:
            uid = await tx.fetchval(
                "INSERT INTO users (name, balance_nano) VALUES ($1, $2) RETURNING id", name, balance_nano
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"user {name!r} already exists")
        if balance_nano:
            await tx.execute(
                "INSERT INTO topups (user_id, amount_nano, note) VALUES ($1, $2, $3)",
                uid, balance_nano, note,
            )
    return int(uid)


async def get_user(conn: Conn, user: int | str) -> User | None:
    col = "id" if isinstance(user, int) else "name"
    row = await conn.fetchrow(f"SELECT {_USER_COLS} FROM users WHERE {col} = $1", user)
    return None if row is None else _user(row)


async def list_users(conn: Conn) -> list[User]:
    return [_user(r) for r in await conn.fetch(f"SELECT {_USER_COLS} FROM users ORDER BY id")]


_USER_FIELDS = {"status", "concurrency", "rpm", "tpm", "max_ips"}


async def edit_user(conn: Conn, user: int | str, **fields: Any) -> User:
    """Change a user's status or limits (status: 'active' | 'disabled')."""
    unknown = set(fields) - _USER_FIELDS
    if unknown:
        raise StoreError(f"cannot edit user field {sorted(unknown)[0]!r}")
    if "status" in fields and fields["status"] not in ("active", "disabled"):
        raise StoreError(f"status: expected active or disabled, got {fields['status']!r}")
    for f in _USER_FIELDS - {"status"}:
        if f in fields:
            _check_limit(f, fields[f])
    uid = await _user_id(conn, user)
    if not fields:
        u = await get_user(conn, uid)
        assert u is not None
        return u
    names = sorted(fields)
    sets = ", ".join(f"{n} = ${i + 2}" for i, n in enumerate(names))
    row = await conn.fetchrow(
        f"UPDATE users SET {sets} WHERE id = $1 RETURNING {_USER_COLS}", uid, *(fields[n] for n in names)
    )
    return _user(row)


async def topup(
    conn: Conn, user: int | str, amount_nano: int, external_id: str | None = None, note: str = ""
) -> int:
    """Credit (or, negative, debit) a balance and journal it; return the new balance.

    With an `external_id` the call is idempotent: a repeat returns the current balance
    without crediting twice. A debit never takes a balance below zero.
    """
    if isinstance(amount_nano, bool) or not isinstance(amount_nano, int) or amount_nano == 0:
        raise StoreError(f"amount: expected a non-zero integer of nano-USD, got {amount_nano!r}")
    async with _transaction(conn) as tx:
        uid = await _user_id(tx, user)
        if external_id is not None:
            inserted = await tx.fetchval(
                "INSERT INTO topups (user_id, amount_nano, external_id, note) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (external_id) DO NOTHING RETURNING id",
                uid, amount_nano, external_id, note,
            )
            if inserted is None:
                prior = await tx.fetchrow(
                    "SELECT user_id, amount_nano FROM topups WHERE external_id = $1", external_id
                )
                if prior["user_id"] != uid or prior["amount_nano"] != amount_nano:
                    raise Conflict(f"external id {external_id!r} was already used for another topup")
                return int(await tx.fetchval("SELECT balance_nano FROM users WHERE id = $1", uid))
        else:
            await tx.execute(
                "INSERT INTO topups (user_id, amount_nano, note) VALUES ($1, $2, $3)",
                uid, amount_nano, note,
            )
        try:
            balance = await tx.fetchval(
                "UPDATE users SET balance_nano = balance_nano + $2"
                " WHERE id = $1 AND balance_nano + $2 >= 0 RETURNING balance_nano",
                uid, amount_nano,
            )
        except asyncpg.NumericValueOutOfRangeError:
            raise StoreError("amount: the balance would exceed the int64 range")
        if balance is None:
            raise StoreError("amount: a debit may not take the balance below zero")
        return int(balance)


# --- keys -------------------------------------------------------------------------------

_KEY_SELECT = (
    "SELECT k.id, k.user_id, u.name AS user_name, k.name, k.key_prefix, k.status, k.expires_at,"
    " k.models, k.group_name, k.cap_nano, k.spent_nano, k.concurrency, k.rpm, k.tpm,"
    " k.allowed_cidrs, k.plan_id, k.created_at, k.version"
    " FROM keys k JOIN users u ON u.id = k.user_id"
)


async def create_key(
    conn: Conn,
    user_id: int | str,
    name: str = "",
    models: Iterable[str] | None = None,
    expires_at: datetime | None = None,
    group: str = "default",
    cap_nano: int = 0,
    concurrency: int = 0,
    rpm: int = 0,
    tpm: int = 0,
    allowed_cidrs: Iterable[str] = (),
) -> tuple[int, str]:
    """Create a key for a user (id or name); return (key_id, secret). The secret is shown once."""
    values = (
        name, _check_models(models), _check_expiry(expires_at), group,
        _check_cap(cap_nano), _check_limit("concurrency", concurrency), _check_limit("rpm", rpm),
        _check_limit("tpm", tpm), _check_cidrs(allowed_cidrs),
    )
    uid = await _user_id(conn, user_id)
    secret = new_secret()
    try:
        key_id = await conn.fetchval(
            "INSERT INTO keys (user_id, key_hash, key_prefix, name, models, expires_at, group_name,"
            " cap_nano, concurrency, rpm, tpm, allowed_cidrs)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
            uid, hash_secret(secret), secret[:DISPLAY_PREFIX_LEN], *values,
        )
    except asyncpg.ForeignKeyViolationError:
        raise NotFound(f"group {group!r} not found")
    return int(key_id), secret


def _check_cap(cap_nano: int) -> int:
    if isinstance(cap_nano, bool) or not isinstance(cap_nano, int) or cap_nano < 0:
        raise StoreError(f"cap: expected an amount >= 0, got {cap_nano!r}")
    return cap_nano


async def get_key(conn: Conn, key_id: int) -> Key | None:
    row = await conn.fetchrow(f"{_KEY_SELECT} WHERE k.id = $1", key_id)
    return None if row is None else _key(row)


async def list_keys(conn: Conn, user: int | str | None = None, *, include_deleted: bool = False) -> list[Key]:
    where = [] if include_deleted else ["k.status <> 'deleted'"]
    args: list[Any] = []
    if user is not None:
        args.append(await _user_id(conn, user))
        where.append("k.user_id = $1")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return [_key(r) for r in await conn.fetch(f"{_KEY_SELECT}{clause} ORDER BY k.id", *args)]


async def set_key_status(conn: Conn, key_id: int, status: str) -> None:
    """Enable or disable a key. A deleted key stays deleted."""
    if status not in ("active", "disabled"):
        raise StoreError(f"status: expected active or disabled, got {status!r}")
    await _update_live_key(conn, key_id, "status = $2", status)


async def delete_key(conn: Conn, key_id: int) -> None:
    """Mark a key deleted (kept for usage history; the gateway drops it from its cache)."""
    await _update_live_key(conn, key_id, "status = 'deleted'")


async def reset_key(conn: Conn, key_id: int) -> str:
    """Replace a key's secret, keeping its id, settings and history; return the new secret."""
    secret = new_secret()
    await _update_live_key(
        conn, key_id, "key_hash = $2, key_prefix = $3", hash_secret(secret), secret[:DISPLAY_PREFIX_LEN]
    )
    return secret


async def _update_live_key(conn: Conn, key_id: int, sets: str, *args: Any) -> None:
    done = await conn.fetchval(
        f"UPDATE keys SET {sets} WHERE id = $1 AND status <> 'deleted' RETURNING id", key_id, *args
    )
    if done is None:
        raise NotFound(f"key {key_id} not found")


_KEY_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", lambda v: str(v)),
    "models": ("models", _check_models),
    "expires_at": ("expires_at", _check_expiry),
    "group": ("group_name", lambda v: str(v)),
    "cap_nano": ("cap_nano", _check_cap),
    "concurrency": ("concurrency", lambda v: _check_limit("concurrency", v)),
    "rpm": ("rpm", lambda v: _check_limit("rpm", v)),
    "tpm": ("tpm", lambda v: _check_limit("tpm", v)),
    "allowed_cidrs": ("allowed_cidrs", _check_cidrs),
    "plan_id": ("plan_id", lambda v: _check_limit("plan_id", v)),
}


async def edit_key(conn: Conn, key_id: int, **fields: Any) -> Key:
    """Change any of: name, models (None: all), expires_at (None: never), group, cap_nano,
    concurrency, rpm, tpm, allowed_cidrs, plan_id. Returns the updated key."""
    unknown = set(fields) - set(_KEY_FIELDS)
    if unknown:
        raise StoreError(f"cannot edit key field {sorted(unknown)[0]!r}")
    cols, args = [], []
    for f in sorted(fields):
        col, check = _KEY_FIELDS[f]
        cols.append(col)
        args.append(check(fields[f]))
    if cols:
        sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
        try:
            await _update_live_key(conn, key_id, sets, *args)
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"group {fields.get('group')!r} not found")
    key = await get_key(conn, key_id)
    if key is None or key.status == "deleted":
        raise NotFound(f"key {key_id} not found")
    return key


# --- change feeds for the gateway ------------------------------------------------------

_STATE_SELECT = (
    "SELECT k.key_hash, k.id, k.user_id, k.name, k.status, u.status AS user_status,"
    " extract(epoch FROM k.expires_at)::float8 AS expires, k.models, k.group_name, k.cap_nano,"
    " k.concurrency, k.rpm, k.tpm, k.allowed_cidrs, k.plan_id,"
    " extract(epoch FROM CASE WHEN s.cancelled_at < s.expires_at THEN s.cancelled_at"
    " ELSE s.expires_at END)::float8 AS plan_ends, s.balance_fallback,"
    " greatest(k.version, u.version, s.version) AS v"
    " FROM keys k JOIN users u ON u.id = k.user_id"
    " LEFT JOIN subscriptions s ON k.plan_id <> 0 AND s.id = k.plan_id"
)
# A key bound to a subscription that does not exist draws on nothing: it reads as a
# plan that ended at the epoch's first second.
_NO_PLAN_ENDS = 1.0


async def fetch_key_states(
    conn: Conn, since_version: int = 0
) -> tuple[list[tuple[bytes, KeyState, str]], int]:
    """Keys changed (or whose user or subscription changed) after `since_version`:
    (sha256, state, status). A key bound to a subscription (keys.plan_id = its id)
    carries when the subscription ends (its term, or its cancellation if earlier).

    Disabled and deleted keys are included so a cache can drop them. Returns the rows
    and the cursor for the next call.
    """
    if since_version <= 0:
        rows = await conn.fetch(_STATE_SELECT)
    else:
        rows = await conn.fetch(
            f"{_STATE_SELECT} WHERE k.id IN ("
            " SELECT id FROM keys WHERE version > $1"
            " UNION SELECT k2.id FROM keys k2 JOIN users u2 ON u2.id = k2.user_id"
            " WHERE u2.version > $1"
            " UNION SELECT k3.id FROM keys k3 JOIN subscriptions s3 ON s3.id = k3.plan_id"
            " WHERE s3.version > $1)",
            since_version,
        )
    out = []
    cursor = since_version
    for r in rows:
        models = r["models"]
        state = KeyState(
            id=r["id"], user_id=r["user_id"], name=r["name"], enabled=r["status"] == "active",
            user_enabled=r["user_status"] == "active", expires_at=r["expires"] or 0.0,
            models=None if models is None else frozenset(models), group=r["group_name"],
            cap_nano=r["cap_nano"], concurrency=r["concurrency"], rpm=r["rpm"], tpm=r["tpm"],
            allowed_cidrs=tuple(r["allowed_cidrs"]), plan_id=r["plan_id"],
            plan_expires_at=(r["plan_ends"] or _NO_PLAN_ENDS) if r["plan_id"] else 0.0,
            plan_fallback=bool(r["balance_fallback"]),
        )
        out.append((bytes(r["key_hash"]), state, r["status"]))
        cursor = max(cursor, r["v"])
    return out, cursor


async def fetch_user_balances(
    conn: Conn, since_version: int = 0
) -> tuple[list[tuple[int, int, str]], int]:
    """(user_id, balance_nano, status) of users changed after `since_version`, and the cursor."""
    rows = await conn.fetch(
        "SELECT id, balance_nano, status, version FROM users WHERE version > $1", since_version
    )
    cursor = max((r["version"] for r in rows), default=since_version)
    return [(r["id"], r["balance_nano"], r["status"]) for r in rows], max(cursor, since_version)


async def fetch_groups(conn: Conn, since_version: int = 0) -> tuple[list[Group], int]:
    rows = await conn.fetch(
        "SELECT name, multiplier, models, version FROM groups WHERE version > $1 ORDER BY name",
        since_version,
    )
    groups = [Group(r["name"], r["multiplier"], tuple(r["models"]), r["version"]) for r in rows]
    return groups, max([since_version, *(g.version for g in groups)])


async def upsert_group(conn: Conn, name: str, multiplier: str = "1", models: Sequence[str] = ("*",)) -> Group:
    row = await conn.fetchrow(
        "INSERT INTO groups (name, multiplier, models) VALUES ($1, $2, $3)"
        " ON CONFLICT (name) DO UPDATE SET multiplier = EXCLUDED.multiplier, models = EXCLUDED.models"
        " RETURNING name, multiplier, models, version",
        name, multiplier, list(models),
    )
    return Group(row["name"], row["multiplier"], tuple(row["models"]), row["version"])


# --- channels ---------------------------------------------------------------------------

_CHANNEL_COLS = (
    "id, name, protocol, base_url, api_key_env, models, model_map, headers, priority, weight,"
    " max_concurrency, enabled, source, version"
)


async def sync_config_channels(conn: Conn, channels: Iterable[ChannelSpec]) -> None:
    """Make the configured channels the rows with source 'config'.

    Each is inserted or updated (and enabled) by name, only when something differs, so
    a restart with the same config does not wake every poller. Config channels no
    longer in the config are disabled, not deleted (usage history refers to them).
    The admin API's channels (source 'admin') are left alone unless a configured
    channel takes their name, in which case the config wins.
    """
    names = []
    async with _transaction(conn) as tx:
        for ch in channels:
            names.append(ch.name)
            await tx.execute(
                "INSERT INTO channels AS c (name, protocol, base_url, api_key_env, models, model_map,"
                " headers, priority, weight, max_concurrency, enabled, source)"
                " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8, $9, $10, true, 'config')"
                " ON CONFLICT (name) DO UPDATE SET protocol = EXCLUDED.protocol,"
                " base_url = EXCLUDED.base_url, api_key_env = EXCLUDED.api_key_env,"
                " models = EXCLUDED.models, model_map = EXCLUDED.model_map,"
                " headers = EXCLUDED.headers, priority = EXCLUDED.priority,"
                " weight = EXCLUDED.weight, max_concurrency = EXCLUDED.max_concurrency,"
                " enabled = true, source = 'config'"
                " WHERE (c.protocol, c.base_url, c.api_key_env, c.models, c.model_map, c.headers,"
                " c.priority, c.weight, c.max_concurrency, c.enabled, c.source)"
                " IS DISTINCT FROM (EXCLUDED.protocol, EXCLUDED.base_url, EXCLUDED.api_key_env,"
                " EXCLUDED.models, EXCLUDED.model_map, EXCLUDED.headers, EXCLUDED.priority,"
                " EXCLUDED.weight, EXCLUDED.max_concurrency, true, 'config')",
                ch.name, ch.protocol, ch.base_url, ch.api_key_env, list(ch.models),
                orjson.dumps(dict(ch.model_map)).decode(), orjson.dumps(dict(ch.headers)).decode(),
                ch.priority, ch.weight, ch.max_concurrency,
            )
        await tx.execute(
            "UPDATE channels SET enabled = false"
            " WHERE source = 'config' AND enabled AND NOT (name = ANY($1::text[]))",
            names,
        )


async def list_channels(conn: Conn) -> list[Channel]:
    return [_channel(r) for r in await conn.fetch(f"SELECT {_CHANNEL_COLS} FROM channels ORDER BY id")]


async def fetch_channels(conn: Conn, since_version: int = 0) -> tuple[list[Channel], int]:
    rows = await conn.fetch(
        f"SELECT {_CHANNEL_COLS} FROM channels WHERE version > $1 ORDER BY id", since_version
    )
    chans = [_channel(r) for r in rows]
    return chans, max([since_version, *(c.version for c in chans)])


# --- audit ------------------------------------------------------------------------------


async def audit(
    conn: Conn, actor: str, action: str, target: str = "", detail: dict[str, Any] | None = None,
    *, before: dict[str, Any] | None = None,
) -> None:
    """Record who did what: `detail` is what the change set, `before` what it replaced.
    Callers pass no secrets in either (ids and prefixes only)."""
    await conn.execute(
        "INSERT INTO audit_log (actor, action, target, detail, before)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)",
        actor, action, target, orjson.dumps(detail or {}, default=str).decode(),
        None if before is None else orjson.dumps(before, default=str).decode(),
    )


async def search_keys(conn: Conn, *, user_id: int | None = None, prefix: str | None = None,
                      group: str | None = None, status: str | None = None,
                      name: str | None = None, before_id: int | None = None,
                      limit: int = 100) -> tuple[list[Key], int | None]:
    """Keys newest first, one keyset page: (keys, before_id of the next page or None).
    `status` None hides deleted keys; "all" shows every key."""
    where: list[str] = []
    args: list[Any] = []

    def add(cond: str, value: Any) -> None:
        args.append(value)
        where.append(cond.replace("$?", f"${len(args)}"))

    if status is None:
        where.append("k.status <> 'deleted'")
    elif status != "all":
        add("k.status = $?", status)
    if user_id is not None:
        add("k.user_id = $?", user_id)
    if prefix:
        add("k.key_prefix LIKE $? || '%'", prefix.replace("\\", "").replace("%", "").replace("_", "\\_"))
    if group:
        add("k.group_name = $?", group)
    if name:
        add("k.name ILIKE '%' || $? || '%'", name.replace("\\", "").replace("%", "").replace("_", "\\_"))
    if before_id is not None:
        add("k.id < $?", before_id)
    args.append(max(1, min(limit, 1000)) + 1)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await conn.fetch(f"{_KEY_SELECT}{clause} ORDER BY k.id DESC LIMIT ${len(args)}", *args)
    keys = [_key(r) for r in rows[:limit]]
    return keys, (keys[-1].id if len(rows) > limit else None)
