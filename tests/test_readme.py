"""The README's operator commands work as printed, in order, on a fresh database.

Each `.venv/bin/tollway …` line of README.md's "Operating it" section runs through the
CLI (in-process, with `--config` after the command, as an operator may write it),
against a database of its own, so "alice" and subscription 1 are the README's.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shlex
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from accounting import migrate
from relay import cli

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Operating it"):]
    lines = [line for block in re.findall(r"```sh\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    return [shlex.split(line, comments=True)[1:] for line in lines
            if line.startswith(".venv/bin/tollway ")]


@pytest.fixture
def fresh_conf(pg_server_dsn: str, tmp_path: Path) -> Iterator[str]:
    name = f"tollway_rd_{secrets.token_hex(4)}"
    dsn = pg_server_dsn.rpartition("/")[0] + "/" + name

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(migrate.apply_dsn(dsn))
        conf = tmp_path / "config.toml"
        conf.write_text((ROOT / "config.toml").read_text().replace('dsn = ""', f'dsn = "{dsn}"', 1))
        yield str(conf)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_the_readme_shows_the_commands_an_operator_needs() -> None:
    cmds = [" ".join(c[:2]) for c in _commands()]
    for needed in ("users create", "keys create", "users topup", "codes create", "codes list",
                   "plans create", "subscriptions create", "usage show"):
        assert needed in cmds, needed


def test_every_readme_command_works_as_printed(fresh_conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in _commands():
        if argv[:2] == ["usage", "show"]:
            continue  # needs a request id: tests/test_request_ids.py covers the lookup
        code = cli.main([*argv, "--config", fresh_conf])
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
    # The repeat of the README's top-up credits nothing, and says so.
    code = cli.main(["users", "topup", "alice", "10", "--external-id", "pay_123", "--config", fresh_conf])
    out, _ = capsys.readouterr()
    assert code == 0 and "nothing credited" in out
    # alice: 20 + 10, less the plan's 20 USD price.
    assert cli.main(["users", "show", "alice", "--json", "--config", fresh_conf]) == 0
    assert '"balance_usd": "10"' in capsys.readouterr()[0]
