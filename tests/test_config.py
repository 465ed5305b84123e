"""config.toml parsing: the shipped quick-start file, and errors that name their TOML path."""

from __future__ import annotations

from pathlib import Path

import pytest

from accounting.money import parse_usd
from relay.config import ConfigError, load, parse

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_the_quick_start() -> None:
    cfg = load(ROOT / "config.toml")
    assert (cfg.server.host, cfg.server.port, cfg.server.workers) == ("127.0.0.1", 8080, 1)
    assert cfg.database.dsn == "" and cfg.data_dir == (ROOT / ".tollway").resolve()
    assert cfg.demo.mock_upstream and cfg.demo.mock_port == 8090
    chans = {c.name: c for c in cfg.channels}
    assert set(chans) == {"mock-openai", "mock-anthropic"}
    assert (chans["mock-openai"].protocol, chans["mock-openai"].base_url, chans["mock-openai"].models) == (
        "openai", "http://127.0.0.1:8090/v1", ("gpt-4o-mini", "gpt-5.5"))
    assert chans["mock-openai"].api_key_env == "MOCK_UPSTREAM_KEY"
    assert (chans["mock-anthropic"].protocol, chans["mock-anthropic"].base_url, chans["mock-anthropic"].models) == (
        "anthropic", "http://127.0.0.1:8090", ("claude-sonnet-4-6", "claude-haiku-4-5"))
    prices = dict(cfg.prices)
    assert set(prices) == {"gpt-4o-mini", "gpt-5.5", "claude-sonnet-4-6", "claude-haiku-4-5"}
    assert parse_usd(prices["gpt-4o-mini"].input) == 150_000_000
    for model, p in prices.items():  # every price is exact money
        for v in (p.input, p.output, p.cache_read, p.cache_write):
            if v:
                assert parse_usd(v, what=model) >= 0
    assert parse_usd(cfg.demo.demo_balance) == 5_000_000_000


@pytest.mark.parametrize(
    "toml, path",
    [
        ("[server]\nprot = 1\n", "server.prot"),
        ("[server]\nport = \"80\"\n", "server.port"),
        ("[server]\nworkers = 0\n", "server.workers"),
        ("[database]\npool_max = -1\n", "database.pool_max"),
        ("[limits]\nrpm = 5\n", "limits.rpm"),
        ("[demo]\nmock_upstream = \"yes\"\n", "demo.mock_upstream"),
        ("[[channels]]\nname = \"a\"\nprotocol = \"grpc\"\nbase_url = \"http://x\"\n", "channels[0].protocol"),
        ("[[channels]]\nname = \"a\"\nprotocol = \"openai\"\n", "channels[0]"),
        ("[[channels]]\nname = \"a\"\nprotocol = \"openai\"\nbase_url = \"ftp://x\"\n", "channels[0].base_url"),
        ("[[channels]]\nname = \"a\"\nprotocol = \"openai\"\nbase_url = \"http://x\"\nmodels = [1]\n",
         "channels[0].models"),
        ("[prices.\"gpt-4o\"]\ninput = \"abc\"\noutput = \"1\"\n", "prices.gpt-4o.input"),
        ("[prices.\"gpt-4o\"]\ninput = 0.15\noutput = \"1\"\n", "prices.gpt-4o.input"),
        ("[prices.\"gpt-4o\"]\ninput = \"1\"\noutput = \"1\"\ncache_red = \"1\"\n", "prices.gpt-4o.cache_red"),
        ("[serverr]\nport = 1\n", "serverr"),
    ],
)
def test_errors_name_the_toml_path(tmp_path: Path, toml: str, path: str) -> None:
    f = tmp_path / "config.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load(f)
    assert str(exc.value).startswith(f"{path}:") or str(exc.value).startswith(f"{path} "), str(exc.value)


def test_syntax_error_and_missing_file_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load(f)
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "absent.toml")


def test_workers_auto_and_relative_data_dir(tmp_path: Path) -> None:
    cfg = parse({"server": {"workers": "auto"}, "database": {"data_dir": "state"}}, str(tmp_path / "c.toml"))
    assert cfg.server.workers >= 1
    assert cfg.data_dir == (tmp_path / "state").resolve()  # relative to the config file
