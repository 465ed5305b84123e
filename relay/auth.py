"""API-key authentication against an in-memory cache of every key's state.

Secrets are never stored: the cache maps SHA-256(secret) to a `limits.keys.KeyState`.
The whole table is loaded at start, then only rows whose version moved (a Postgres
sequence bumped by trigger on every change) are re-read every `interval` seconds, so
disabling a key reaches every worker within one interval. A miss is final for
well-formed secrets only after one coalesced refresh, so a key created a moment ago
works at once while a flood of guesses costs at most one query per interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from fractions import Fraction

import asyncpg

from limits.keys import KeyState

_WELL_FORMED = re.compile(rb"sk-[A-Za-z0-9]{20,200}")


class KeyCache:
    def __init__(self) -> None:
        self.by_hash: dict[bytes, KeyState] = {}
        self.by_id: dict[int, bytes] = {}
        self.version = 0
        self._refreshing: asyncio.Future[None] | None = None
        self.pool: asyncpg.Pool | None = None

    def lookup(self, secret: bytes) -> KeyState | None:
        return self.by_hash.get(hashlib.sha256(secret).digest())

    async def lookup_slow(self, secret: bytes) -> KeyState | None:
        if not _WELL_FORMED.fullmatch(secret) or self.pool is None:
            return None
        await self.refresh_now()
        return self.lookup(secret)

    def apply(self, rows: list[tuple[bytes, KeyState, str]]) -> None:
        for key_hash, state, status in rows:
            old = self.by_id.pop(state.id, None)
            if old is not None:
                self.by_hash.pop(old, None)
            if status != "deleted":
                self.by_hash[key_hash] = state
                self.by_id[state.id] = key_hash

    async def refresh(self, conn: asyncpg.Connection | asyncpg.Pool) -> int:
        from accounting import store

        rows, version = await store.fetch_key_states(conn, self.version)
        self.apply(rows)
        if version > self.version:
            self.version = version
        return len(rows)

    async def refresh_now(self) -> None:
        """Coalesced: concurrent misses share one query."""
        fut = self._refreshing
        if fut is not None:
            await asyncio.shield(fut)
            return
        fut = self._refreshing = asyncio.get_running_loop().create_future()
        try:
            assert self.pool is not None
            await self.refresh(self.pool)
        finally:
            self._refreshing = None
            fut.set_result(None)


class Groups:
    """Group name -> (price multiplier, model patterns); 'default' always exists."""

    def __init__(self) -> None:
        self.multiplier: dict[str, Fraction] = {"default": Fraction(1)}
        self.models: dict[str, tuple[str, ...]] = {"default": ("*",)}
        self.fit_output: set[str] = set()  # groups whose bounds are lowered, not refused

    def set(self, name: str, multiplier: Fraction, models: tuple[str, ...],
            fit_output: bool = False) -> None:
        self.multiplier[name] = multiplier
        self.models[name] = models
        if fit_output:
            self.fit_output.add(name)
        else:
            self.fit_output.discard(name)
