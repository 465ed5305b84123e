"""accounting.db: the embedded server's lifecycle, shared between processes, and DSN resolution."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from accounting.db import EmbeddedPostgres, _read_postmaster, resolve_dsn
from relay.config import Config, DatabaseConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pgdir() -> Iterator[Path]:
    # Not pytest's pgdir: as root the server runs as another user, and every pytest
    # run resets /tmp/pytest-of-root to 0700, which would cut that user off mid-test.
    with tempfile.TemporaryDirectory(prefix="tollway-db-test-") as tmp:
        yield Path(tmp)


async def _query(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        if ";" in sql:
            return await conn.execute(sql)
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_resolve_dsn_prefers_configured_dsn() -> None:
    cfg = Config(database=DatabaseConfig(dsn="postgresql://u@db.example/x"))
    assert resolve_dsn(cfg) == ("postgresql://u@db.example/x", None)


@pytest.mark.slow
def test_embedded_lifecycle_shared_and_persistent(pgdir: Path) -> None:
    server = EmbeddedPostgres(str(pgdir))
    dsn = server.start()
    try:
        assert dsn.endswith("/tollway")
        assert asyncio.run(_query(dsn, "SELECT current_database()")) == "tollway"
        assert str(asyncio.run(_query(dsn, "SHOW server_version"))).startswith("18")
        asyncio.run(_query(dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)"))
        pid = int((pgdir / "pg" / "postmaster.pid").read_text().split()[0])

        # A second process (the CLI while the gateway runs) joins the same server and
        # leaves it running when it is done.
        script = textwrap.dedent(f"""
            import asyncio, asyncpg, sys
            from accounting.db import EmbeddedPostgres
            s = EmbeddedPostgres({str(pgdir)!r})
            dsn = s.start()
            async def q():
                c = await asyncpg.connect(dsn)
                print(await c.fetchval("SELECT x FROM kept"))
                await c.close()
            asyncio.run(q())
            s.stop()
        """)
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "42"
        info = _read_postmaster(pgdir / "pg")
        assert info is not None and int(info["pid"]) == pid  # same server, still up
    finally:
        server.stop()
    assert _read_postmaster(pgdir / "pg") is None  # last holder stopped it

    t0 = time.monotonic()
    again = EmbeddedPostgres(str(pgdir))
    dsn2 = again.start()
    try:
        assert time.monotonic() - t0 < 5
        assert asyncio.run(_query(dsn2, "SELECT x FROM kept")) == 42  # data dir reused
    finally:
        again.stop()


@pytest.mark.slow
def test_dead_holder_does_not_pin_the_server(pgdir: Path) -> None:
    # A holder killed without stop() (kill -9) must not keep the server up forever.
    server = EmbeddedPostgres(str(pgdir))
    server.start()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    (pgdir / "pg.holders").write_text(f"[{dead_pid}, {__import__('os').getpid()}]")
    server.stop()
    assert _read_postmaster(pgdir / "pg") is None


@pytest.mark.slow
def test_two_holders_in_one_process(pgdir: Path) -> None:
    first, second = EmbeddedPostgres(str(pgdir)), EmbeddedPostgres(str(pgdir))
    dsn = first.start()
    assert second.start() == dsn
    first.stop()
    assert asyncio.run(_query(dsn, "SELECT 1")) == 1  # the other holder still uses it
    second.stop()
    assert _read_postmaster(pgdir / "pg") is None
