"""The shipped config.toml tells the truth: every model /v1/models lists answers, and a
model it does not list is 404 model_not_found (no catch-all channel or price).

The gateway runs with the shipped file as is (only the address, the database and the
mock's port changed) on a database of its own, so no price another test set leaks in.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from accounting import migrate, store
from accounting.money import parse_usd
from bench import mock_upstream
from relay.config import parse
from relay.server import bind_socket, prepare
from relay.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def _shipped(dsn: str, mock_port: int, data_dir: str) -> Any:
    raw = tomllib.loads((ROOT / "config.toml").read_text())
    raw["server"] = {**raw.get("server", {}), "port": 0}
    raw["database"] = {"dsn": dsn, "data_dir": data_dir}
    raw["demo"] = {**raw.get("demo", {}), "mock_upstream": False, "create_demo_user": False}
    for ch in raw["channels"]:
        ch["base_url"] = ch["base_url"].replace(":8090", f":{mock_port}")
    return parse(raw, "")


@pytest.fixture
async def shipped(pg_server_dsn: str) -> AsyncIterator[tuple[str, str]]:
    name = f"tollway_qs_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = pg_server_dsn.rpartition("/")[0] + "/" + name
    mock = await mock_upstream.start("127.0.0.1", 0)
    os.environ["MOCK_UPSTREAM_KEY"] = "mock"
    worker = None
    try:
        await migrate.apply_dsn(dsn)
        with tempfile.TemporaryDirectory(prefix="tollway-qs-") as tmp:
            cfg = _shipped(dsn, mock.port, tmp)
            await prepare(cfg, dsn)
            worker = Worker(cfg, dsn, 0)
            await worker.start(bind_socket("127.0.0.1", 0, reuse_port=False))
            conn = await asyncpg.connect(dsn)
            try:
                uid = await store.create_user(conn, "demo", parse_usd("5"))
                _, secret = await store.create_key(conn, uid, name="demo")
            finally:
                await conn.close()
            yield f"http://127.0.0.1:{worker.port}", secret
    finally:
        if worker is not None:
            await worker.stop()
        await mock.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _call(s: aiohttp.ClientSession, url: str, secret: str, model: str) -> tuple[int, Any]:
    if model.startswith("claude"):
        body: dict[str, Any] = {"model": model, "max_tokens": 16,
                                "messages": [{"role": "user", "content": "Hello"}]}
        path = "/v1/messages"
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
        path = "/v1/chat/completions"
    async with s.post(url + path, json=body, headers={"authorization": f"Bearer {secret}"}) as r:
        return r.status, await r.json()


async def test_the_shipped_config_lists_what_answers_and_404s_the_rest(
    shipped: tuple[str, str],
) -> None:
    url, secret = shipped
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/v1/models", headers={"authorization": f"Bearer {secret}"}) as r:
            assert r.status == 200
            listed = [m["id"] for m in (await r.json())["data"]]
        assert "gpt-4o-mini" in listed  # the README's curl example
        assert any(m.startswith("claude-") for m in listed)
        for model in listed:
            status, body = await _call(s, url, secret, model)
            assert status == 200, (model, body)
        for model in ("gpt-made-up-9", "claude-made-up-9", "llama-3"):
            status, body = await _call(s, url, secret, model)
            assert status == 404, (model, body)
            err = body["error"]
            assert err.get("code") == "model_not_found" or err.get("type") == "not_found_error"


async def test_retrieving_one_model_agrees_with_the_list(shipped: tuple[str, str]) -> None:
    url, secret = shipped
    async with aiohttp.ClientSession() as s:
        headers = {"authorization": f"Bearer {secret}"}
        async with s.get(url + "/v1/models/claude-made-up-9", headers=headers) as r:
            assert r.status == 404
        async with s.get(url + "/v1/models/gpt-4o-mini", headers=headers) as r:
            assert r.status == 200
