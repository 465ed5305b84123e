"""The `tollway` CLI against the session database: output shapes, exit codes, DB state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sys
import types
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay import cli

USD = 1_000_000_000


@pytest.fixture
def conf(tmp_path: Path, pg_dsn: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\ndsn = "{pg_dsn}"\n')
    return str(path)


def run(conf: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--config", conf, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(conf: str, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(conf, capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def uniq(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def test_users_create_topup_show_list(conf: str, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    name = uniq("ann")
    created = run_json(conf, capsys, "users", "create", name, "--balance", "1.5")
    assert created["name"] == name
    assert (created["balance_usd"], created["balance_nano"]) == ("1.5", 1_500_000_000)

    for _ in range(3):  # 0.1 + 0.1 + 0.1 is exactly 0.3 here
        code, out, err = run(conf, capsys, "users", "topup", name, "0.1")
        assert code == 0, err
    assert "balance 1.8 USD" in out
    shown = run_json(conf, capsys, "users", "show", name)
    assert (shown["balance_usd"], shown["balance_nano"]) == ("1.8", 1_800_000_000)
    assert set(shown) == {"id", "name", "status", "balance_usd", "balance_nano", "concurrency",
                          "rpm", "tpm", "max_ips", "created_at"}
    rows = fetch(pg_dsn, "SELECT amount_nano FROM topups WHERE user_id = $1 ORDER BY id", shown["id"])
    assert [r["amount_nano"] for r in rows] == [1_500_000_000] + [100_000_000] * 3
    # The shell's create is the admin API's action (relay.ops): it names the user by id.
    audit = fetch(pg_dsn, "SELECT action, actor FROM audit_log WHERE target IN ($1, $2) ORDER BY id",
                  name, str(shown["id"]))
    assert [r["action"] for r in audit] == ["user.create"] + ["user.topup"] * 3
    assert audit[0]["actor"].startswith("cli:")

    listed = run_json(conf, capsys, "users", "list")
    assert any(u["name"] == name and u["balance_nano"] == 1_800_000_000 for u in listed)
    code, out, _ = run(conf, capsys, "users", "list")
    assert code == 0 and name in out and "1.8" in out


def test_topup_with_external_id_is_idempotent(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    name = uniq("ben")
    run_json(conf, capsys, "users", "create", name)
    ref = uniq("pay")
    for _ in range(2):
        res = run_json(conf, capsys, "users", "topup", name, "2", "--external-id", ref)
        assert res["balance_nano"] == 2 * USD


@pytest.mark.parametrize(
    "argv, message",
    [
        (["users", "topup", "nobody-here", "1"], "not found"),
        (["users", "topup", "{user}", "1.2.3"], "decimal"),
        (["users", "topup", "{user}", "0.0000000001"], "amount"),
        (["users", "topup", "{user}", "1e400"], "amount"),
        (["users", "create", "{user}"], "already exists"),
        (["users", "show", "nobody-here"], "not found"),
        (["keys", "create", "--user", "nobody-here"], "not found"),
        (["keys", "create", "--user", "{user}", "--cap", "-1"], "--cap"),
        (["keys", "create", "--user", "{user}", "--expires", "next tuesday"], "--expires"),
        (["keys", "create", "--user", "{user}", "--group", "no-such-group"], "group"),
        (["keys", "create", "--user", "{user}", "--cidrs", "300.1.1.1/8"], "allowed_cidrs"),
        (["keys", "show", "987654321"], "not found"),
        (["keys", "disable", "987654321"], "not found"),
        (["keys", "edit", "987654321", "--rpm", "5"], "not found"),
    ],
)
def test_errors_are_one_line_exit_2(conf: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    user = uniq("err")
    assert run(conf, capsys, "users", "create", user)[0] == 0
    code, out, err = run(conf, capsys, *[a.replace("{user}", user) for a in argv])
    assert code == 2
    assert err.startswith("tollway: error:") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err and out == ""


def test_usage_error_and_help_exit_codes(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", conf, "keys", "show", "not-a-number"]) == 2
    assert cli.main(["--help"]) == 0
    capsys.readouterr()
    assert cli.main(["--config", str(Path(conf).with_name("missing.toml")), "users", "list"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_keys_lifecycle(conf: str, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    user = uniq("cat")
    run_json(conf, capsys, "users", "create", user, "--balance", "10")
    made = run_json(
        conf, capsys, "keys", "create", "--user", user, "--name", "ci", "--models", "gpt-4o-mini,claude-*",
        "--expires", "2031-06-01", "--cap", "2.5", "--concurrency", "4", "--rpm", "60", "--tpm", "9000",
        "--cidrs", "10.0.0.0/8,192.168.1.7",
    )
    secret, key_id = made["key"], made["id"]
    assert secret.startswith("sk-") and len(secret) == 51 and made["key_prefix"] == secret[:8]
    assert made["models"] == ["gpt-4o-mini", "claude-*"]
    assert (made["cap_usd"], made["cap_nano"], made["spent_nano"]) == ("2.5", 2_500_000_000, 0)
    assert made["expires_at"].startswith("2031-06-01T00:00:00")
    assert made["allowed_cidrs"] == ["10.0.0.0/8", "192.168.1.7/32"]
    row = fetch(pg_dsn, "SELECT key_hash, concurrency, rpm, tpm FROM keys WHERE id = $1", key_id)[0]
    assert bytes(row["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert (row["concurrency"], row["rpm"], row["tpm"]) == (4, 60, 9000)
    logged = fetch(pg_dsn, "SELECT detail::text AS d FROM audit_log WHERE target = $1", str(key_id))
    assert logged and all(secret[8:] not in r["d"] for r in logged)

    code, out, _ = run(conf, capsys, "keys", "create", "--user", user)
    assert code == 0 and out.strip().splitlines()[-1].startswith("sk-")  # plain: secret printed once

    shown = run_json(conf, capsys, "keys", "show", str(key_id))
    assert "key" not in shown and shown["user"] == user and shown["name"] == "ci"
    listed = run_json(conf, capsys, "keys", "list", "--user", user)
    assert len(listed) == 2 and listed[0]["id"] == key_id

    assert run(conf, capsys, "keys", "disable", str(key_id))[0] == 0
    assert fetch(pg_dsn, "SELECT status FROM keys WHERE id = $1", key_id)[0]["status"] == "disabled"
    assert run(conf, capsys, "keys", "enable", str(key_id))[0] == 0
    assert fetch(pg_dsn, "SELECT status FROM keys WHERE id = $1", key_id)[0]["status"] == "active"

    edited = run_json(conf, capsys, "keys", "edit", str(key_id), "--all-models", "--never-expires",
                      "--rpm", "0", "--cap", "0.000000001", "--cidrs", "")
    assert edited["models"] is None and edited["expires_at"] is None and edited["rpm"] == 0
    assert edited["cap_nano"] == 1 and edited["allowed_cidrs"] == []

    reset = run_json(conf, capsys, "keys", "reset", str(key_id))
    assert reset["id"] == key_id and reset["key"] != secret
    row = fetch(pg_dsn, "SELECT key_hash FROM keys WHERE id = $1", key_id)[0]
    assert bytes(row["key_hash"]) == hashlib.sha256(reset["key"].encode()).digest()

    assert run(conf, capsys, "keys", "delete", str(key_id))[0] == 0
    assert key_id not in [k["id"] for k in run_json(conf, capsys, "keys", "list", "--user", user)]
    assert run(conf, capsys, "keys", "enable", str(key_id))[0] == 2  # deleted is final


def test_channels_list(conf: str, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from accounting import store
    from relay.config import ChannelConfig

    name = uniq("chan")

    async def seed() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await store.sync_config_channels(conn, [ChannelConfig(
                name=name, protocol="anthropic", base_url="http://127.0.0.1:9/", models=("claude-*",),
                model_map=(("a", "b"),))])
        finally:
            await conn.close()

    asyncio.run(seed())
    chans = {c["name"]: c for c in run_json(conf, capsys, "channels", "list")}
    c = chans[name]
    assert (c["protocol"], c["models"], c["model_map"], c["source"], c["enabled"]) == (
        "anthropic", ["claude-*"], {"a": "b"}, "config", True)


def test_migrate_is_a_no_op_on_a_migrated_database(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_json(conf, capsys, "migrate") == {"applied": []}


def test_serve_applies_overrides(conf: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    fake = types.ModuleType("relay.server")
    fake.run = lambda cfg: seen.append(cfg) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "relay.server", fake)
    import relay

    monkeypatch.setattr(relay, "server", fake, raising=False)
    assert cli.main(["--config", conf, "serve", "--host", "127.0.0.2", "--port", "0", "--workers", "3"]) == 0
    (cfg,) = seen
    assert (cfg.server.host, cfg.server.port, cfg.server.workers) == ("127.0.0.2", 0, 3)
    assert cfg.database.dsn  # the rest of the config came through
    assert cli.main(["--config", conf, "serve", "--workers", "0"]) == 2


def test_command_modules_extend_the_cli(conf: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("tollway_test_cli_ext")

    def register(sub: Any) -> None:
        p = sub.add_parser("hello")
        p.add_argument("who")
        p.set_defaults(func=lambda args: print(f"hello {args.who}") or 7)

    mod.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tollway_no_such_cli_module", mod.__name__])
    assert cli.main(["--config", conf, "hello", "world"]) == 7
    assert capsys.readouterr().out == "hello world\n"


def test_default_config_is_the_one_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.load_config(None).database.dsn == ""  # built-in defaults
    (tmp_path / "config.toml").write_text('[database]\ndsn = "postgresql://x@127.0.0.1/y"\n')
    assert cli.load_config(None).database.dsn == "postgresql://x@127.0.0.1/y"
