"""Channels an operator manages at run time (source 'admin'): create, edit, enable, disable.

Rows land in the `channels` table, whose version trigger lets every worker's poller pick
a change up within a second. Channels from config.toml (source 'config') are owned by
the file and rewritten at each start, so this module refuses to edit them and only
toggles them (which lasts until the next start). Credentials never reach the database:
a channel names the environment variable that holds its key. Never imports relay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from accounting.store import Channel, Conflict, NotFound, StoreError

Conn = Any

_COLS = (
    "id, name, protocol, base_url, api_key_env, models, model_map, headers, priority, weight,"
    " max_concurrency, enabled, source, version"
)
PROTOCOLS = ("openai", "anthropic")
EDITABLE = ("protocol", "base_url", "api_key_env", "models", "model_map", "headers", "priority",
            "weight", "max_concurrency", "enabled")


def _json(v: Any) -> Any:
    return orjson.loads(v) if isinstance(v, str | bytes) else v


def _channel(r: asyncpg.Record) -> Channel:
    return Channel(
        id=r["id"], name=r["name"], protocol=r["protocol"], base_url=r["base_url"],
        api_key_env=r["api_key_env"], models=tuple(r["models"]), model_map=_json(r["model_map"]),
        headers=_json(r["headers"]), priority=r["priority"], weight=r["weight"],
        max_concurrency=r["max_concurrency"], enabled=r["enabled"], source=r["source"],
        version=r["version"],
    )


def _check(field: str, value: Any) -> Any:
    """Validate one field; return the value as the column takes it."""
    if field == "protocol":
        if value not in PROTOCOLS:
            raise StoreError(f"protocol: expected openai or anthropic, got {value!r}")
        return value
    if field == "base_url":
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise StoreError(f"base_url: expected an http(s) URL, got {value!r}")
        return value.rstrip("/")
    if field == "api_key_env":
        if not isinstance(value, str):
            raise StoreError(f"api_key_env: expected the name of an environment variable, got {value!r}")
        return value
    if field == "models":
        if (isinstance(value, str) or not isinstance(value, Sequence)
                or not all(isinstance(m, str) and m.strip() for m in value) or not value):
            raise StoreError(f"models: expected a non-empty list of model names or patterns, got {value!r}")
        return [m.strip() for m in value]
    if field in ("model_map", "headers"):
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise StoreError(f"{field}: expected an object of strings, got {value!r}")
        return orjson.dumps(dict(value)).decode()
    if field in ("priority", "weight", "max_concurrency"):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
            raise StoreError(f"{field}: expected an integer >= 0, got {value!r}")
        return value
    if field == "enabled":
        if not isinstance(value, bool):
            raise StoreError(f"enabled: expected true or false, got {value!r}")
        return value
    raise StoreError(f"cannot set channel field {field!r}")


async def get_channel(conn: Conn, ref: int | str) -> Channel | None:
    col = "id" if isinstance(ref, int) else "name"
    r = await conn.fetchrow(f"SELECT {_COLS} FROM channels WHERE {col} = $1", ref)
    return None if r is None else _channel(r)


async def create_channel(conn: Conn, name: str, protocol: str, base_url: str, **fields: Any) -> Channel:
    """Insert a channel with source 'admin'; unspecified fields take the table defaults."""
    if not isinstance(name, str) or not name.strip():
        raise StoreError("name: must not be empty")
    values = {"protocol": protocol, "base_url": base_url, **fields}
    cols = sorted(values)
    checked = [_check(c, values[c]) for c in cols]
    casts = [f"${i + 2}::jsonb" if c in ("model_map", "headers") else f"${i + 2}"
             for i, c in enumerate(cols)]
    try:
        r = await conn.fetchrow(
            f"INSERT INTO channels (name, source, {', '.join(cols)})"
            f" VALUES ($1, 'admin', {', '.join(casts)}) RETURNING {_COLS}",
            name.strip(), *checked)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"channel {name.strip()!r} already exists")
    return _channel(r)


async def edit_channel(conn: Conn, ref: int | str, **fields: Any) -> Channel:
    """Change an admin channel's fields; a config channel may only be enabled or disabled."""
    ch = await get_channel(conn, ref)
    if ch is None:
        raise NotFound(f"channel {ref!r} not found")
    if ch.source == "config" and set(fields) - {"enabled"}:
        raise Conflict(f"channel {ch.name!r} comes from config.toml: edit the file"
                       " (the admin API can only enable or disable it)")
    if not fields:
        return ch
    cols = sorted(fields)
    checked = [_check(c, fields[c]) for c in cols]
    sets = ", ".join(
        f"{c} = ${i + 2}::jsonb" if c in ("model_map", "headers") else f"{c} = ${i + 2}"
        for i, c in enumerate(cols))
    r = await conn.fetchrow(f"UPDATE channels SET {sets} WHERE id = $1 RETURNING {_COLS}",
                            ch.id, *checked)
    return _channel(r)
