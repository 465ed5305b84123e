"""One operator action as the resource modules see it: who acts, on what, with which fields.

The JSON API builds an `Op` from an HTTP call, an operator page from its form, the CLI
from its arguments; the resource module does the rest (validation, the change and its
audit row in one transaction). `Env` is what an action may touch: the configuration,
a pool (or, for the CLI, one connection) and, inside the gateway, the live worker state
(router, price book, groups) that some read views show. Nothing here speaks HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from accounting import growth, store
from accounting.money import parse_usd
from relay import errors as E
from relay.ops.parse import ref

DEFAULT_MIN_TOPUP = "0.01"


class OneConnection:
    """A pool-like face over one connection (the CLI's): `acquire()` lends it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        yield self.conn


@dataclass(slots=True)
class Env:
    cfg: Any
    db: Any  # asyncpg.Pool, accounting.db.Database or OneConnection: anything with acquire()
    gw: Any = None  # the gateway, when the action runs inside one
    settings: Any = None  # live settings (relay.ops.settings.Live), when inside a gateway


@dataclass(slots=True)
class Op:
    env: Env
    actor: str
    params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] | Callable[[], dict[str, Any]] | None = None
    # The acting operator's role: the admin token and the shell act as the owner.
    role: str = "owner"

    @property
    def gw(self) -> Any:
        return self.env.gw

    @property
    def cfg(self) -> Any:
        return self.env.cfg

    def body(self) -> dict[str, Any]:
        if callable(self.fields):
            self.fields = self.fields()
        return self.fields if self.fields is not None else {}

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Any]:
        async with self.env.db.acquire() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        async with self.env.db.acquire() as conn:
            yield conn

    async def _user(self, conn: Any, user_ref: str | int) -> store.User:
        if user_ref == "":
            raise E.InvalidRequest("user: required (the user's id or name)")
        u = await store.get_user(conn, ref(user_ref) if isinstance(user_ref, str) else user_ref)
        if u is None:
            raise E.NotFound(f"user {user_ref!r} not found")
        return u

    async def _user_id(self, conn: Any, query: dict[str, str]) -> int | None:
        return None if not query.get("user") else (await self._user(conn, query["user"])).id

    def _min_topup(self) -> int:
        live = self.env.settings
        if live is not None and live.get("min_topup"):
            return parse_usd(live.get("min_topup"), what="min_topup")
        raw = getattr(self.cfg.admin, "min_topup", "") or DEFAULT_MIN_TOPUP
        return parse_usd(raw, what="admin.min_topup")

    def _growth(self) -> growth.Terms:
        terms = growth.Terms.of(self.cfg.growth)
        live = self.env.settings
        return live.growth(terms) if live is not None else terms

    def now(self) -> datetime:
        return datetime.now(UTC)


def need_owner(op: Op, what: str) -> None:
    if op.role != "owner":
        from relay.webapi import ApiError

        raise ApiError(403, "forbidden", f"Only an owner can {what}")


def audit_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in fields.items()}
