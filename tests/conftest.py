"""Shared fixtures: a real Postgres for the whole run, a fresh database per session.

The server is the one named by TOLLWAY_TEST_DSN, else the local one on
127.0.0.1:5432 (database `test`), else an embedded Postgres started for this run.
Each test session creates its own database (so parallel runs never collide),
applies every migration, and drops it at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator

import asyncpg
import pytest

from accounting import migrate


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def _server_dsn() -> Iterator[str]:
    env = os.environ.get("TOLLWAY_TEST_DSN")
    if env:
        yield env
        return
    local = "postgresql://postgres@127.0.0.1:5432/test"
    if asyncio.run(_reachable(local)):
        yield local
        return
    from accounting.db import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="tollway-pg-") as tmp:
        server = EmbeddedPostgres(tmp)
        yield server.start()
        server.stop()


def _with_db(dsn: str, db: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{db}"


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    yield from _server_dsn()


@pytest.fixture(scope="session")
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    """DSN of a fresh, fully migrated database that lives for the whole test session."""
    name = f"tollway_t_{secrets.token_hex(4)}"

    async def setup() -> None:
        conn = await asyncpg.connect(pg_server_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate.apply_dsn(_with_db(pg_server_dsn, name))

    async def teardown() -> None:
        conn = await asyncpg.connect(pg_server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(setup())
    yield _with_db(pg_server_dsn, name)
    asyncio.run(teardown())


@pytest.fixture
async def pg(pg_dsn: str):
    """One asyncpg connection to the session database."""
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


class _ReapedElsewhere(logging.Handler):
    """Collects asyncio's "Unknown child process pid" warnings: a child reaped behind
    asyncio's watcher reports 255, not its status (see tests/children.py)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Unknown child process pid" in msg:
            self.seen.append(msg)


@pytest.fixture(autouse=True)
def _no_child_reaped_behind_asyncio() -> Iterator[None]:
    handler = _ReapedElsewhere()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.seen:
        pytest.fail("a child process was reaped behind asyncio's watcher (use tests.children.stop): "
                    + "; ".join(handler.seen))
