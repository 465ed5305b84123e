"""What an operator following the README meets: a repeated top-up says nothing was
credited, a subscription is paid from the balance unless --free, codes can be listed,
--config goes before or after the command, and a 402 says how much was needed and how
much was there."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay import cli
from tests.gateway import Harness

USD = 1_000_000_000


@pytest.fixture
def conf(tmp_path: Path, pg_dsn: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\ndsn = "{pg_dsn}"\n')
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def uniq(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def test_a_repeated_topup_says_nothing_was_credited(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    name, ref = uniq("pay"), uniq("pay_ext")
    assert run(capsys, "--config", conf, "users", "create", name, "--balance", "20")[0] == 0
    code, out, _ = run(capsys, "--config", conf, "users", "topup", name, "10", "--external-id", ref)
    assert code == 0 and "10 USD credited, balance 30 USD" in out
    code, out, _ = run(capsys, "--config", conf, "users", "topup", name, "10", "--external-id", ref)
    assert code == 0 and "nothing credited" in out and "balance 30 USD" in out
    again = run_json(capsys, "--config", conf, "users", "topup", name, "10", "--external-id", ref)
    assert again["duplicate"] is True and again["credited_nano"] == 0 and again["balance_nano"] == 30 * USD
    debit = run_json(capsys, "--config", conf, "users", "topup", name, "-5")
    assert debit["balance_nano"] == 25 * USD and debit["duplicate"] is False


def test_a_subscription_is_paid_from_the_balance_unless_free(conf: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    plan, user = uniq("pro"), uniq("sub")
    run_json(capsys, "--config", conf, "plans", "create", plan, "--price", "20", "--credit", "30",
             "--validity", "month")
    assert run(capsys, "--config", conf, "users", "create", user, "--balance", "25")[0] == 0
    sub = run_json(capsys, "--config", conf, "subscriptions", "create", "--user", user, "--plan", plan)
    assert sub["key"].startswith("sk-")
    assert run_json(capsys, "--config", conf, "users", "show", user)["balance_nano"] == 5 * USD
    # Not enough left for another: refused, saying the price, the balance and the way out.
    code, _, err = run(capsys, "--config", conf, "subscriptions", "create", "--user", user, "--plan", plan)
    assert code == 2 and "20 USD" in err and "5 USD" in err and "--free" in err
    run_json(capsys, "--config", conf, "subscriptions", "create", "--user", user, "--plan", plan, "--free")
    assert run_json(capsys, "--config", conf, "users", "show", user)["balance_nano"] == 5 * USD


def test_codes_list_shows_prefixes_and_state_never_the_code(conf: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    made = run_json(capsys, "--config", conf, "codes", "create", "--amount", "5", "--count", "3")
    codes = made["codes"]
    user = uniq("red")
    assert run(capsys, "--config", conf, "users", "create", user)[0] == 0
    assert run(capsys, "--config", conf, "codes", "redeem", codes[0], "--user", user)[0] == 0
    listed = run_json(capsys, "--config", conf, "codes", "list", "--limit", "10000")["data"]
    mine = [c for c in listed if any(code.replace("-", "").startswith(c["prefix"].replace("-", ""))
                                     for code in codes)]
    assert len(mine) >= 3
    assert sorted(c["state"] for c in mine)[:3] == ["redeemed", "unused", "unused"]
    text = json.dumps(listed)
    assert not any(code in text for code in codes)
    unused = run_json(capsys, "--config", conf, "codes", "list", "--state", "unused", "--limit", "10000")
    assert all(c["state"] == "unused" for c in unused["data"])
    code, out, _ = run(capsys, "--config", conf, "codes", "list")
    assert code == 0 and "prefix" in out.splitlines()[0]


def test_config_is_accepted_after_the_command(conf: str, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path / "..")  # no config.toml here: only --config can name the database
    name = uniq("late")
    code, _, err = run(capsys, "users", "create", name, "--balance", "1", "--config", conf)
    assert code == 0, err
    shown = run_json(capsys, "users", "show", name, "--config", conf)
    assert shown["balance_nano"] == USD
    assert run_json(capsys, "keys", "list", "--user", name, "--config", conf) == []
    assert run_json(capsys, "--config", conf, "users", "show", name)["name"] == name


async def test_a_402_says_what_was_needed_and_what_was_available(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn)
    try:
        _, _, secret = await h.user_and_key(balance="0.000001")
        body = {"model": "gpt-4o-mini", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s:
            async with s.post(h.url + "/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {secret}"}) as r:
                assert r.status == 402
                msg = (await r.json())["error"]["message"]
        assert "needs up to 0.00" in msg and "0.000001 USD available" in msg, msg
    finally:
        await h.stop()
