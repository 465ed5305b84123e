"""Versioned SQL migrations: files `accounting/migrations/NNN_name.sql`, applied in order.

Each file runs once, in its own transaction, and is recorded in `schema_migrations`.
An advisory lock serialises concurrent starters (several workers or hosts) so a
migration never runs twice.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_ID = 0x70_6C_77_61_79  # "tollway", any constant shared by every starter


def available() -> list[tuple[int, str, Path]]:
    out = []
    for p in sorted(MIGRATIONS_DIR.glob("*.sql")):
        num, _, name = p.stem.partition("_")
        if num.isdigit():
            out.append((int(num), name, p))
    return out


async def apply(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; return the names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, path in available():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(f"{version:03d}_{name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied


async def apply_dsn(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return await apply(conn)
    finally:
        await conn.close()
