"""In-process gateway harness for tests: the mock upstream, a worker, a user and a key.

Everything is real: the mock is an HTTP server on 127.0.0.1, the worker listens on a
port-0 socket, storage is the session's Postgres database.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
from typing import Any

import asyncpg

from accounting import store
from accounting.money import parse_usd
from bench import mock_upstream
from relay.config import Config, parse
from relay.server import bind_socket, prepare
from relay.worker import Worker


def make_config(dsn: str, mock_port: int, data_dir: str, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_grace_s": 2.0},
        "database": {"dsn": dsn, "data_dir": data_dir},
        "ledger": {"flush_interval_ms": 50},
        "demo": {"create_demo_user": False},
        "channels": [
            {"name": "mock-openai", "protocol": "openai",
             "base_url": f"http://127.0.0.1:{mock_port}/v1", "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY",
             "models": ["gpt-*", "text-embedding-*", "o3-mini"],
             "model_map": {"gpt-mapped": "gpt-4o-mini"}, "forward_headers": ["x-mock-*"]},
            {"name": "mock-anthropic", "protocol": "anthropic",
             "base_url": f"http://127.0.0.1:{mock_port}", "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY",
             "models": ["claude-*"], "forward_headers": ["x-mock-*"]},
        ],
        "prices": {
            "gpt-4o-mini": {"input": "0.15", "output": "0.60", "cache_read": "0.075"},
            "claude-sonnet-4-6": {"input": "3", "output": "15", "cache_read": "0.30",
                                  "cache_write": "3.75"},
            "default": {"input": "1", "output": "2"},
        },
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    return parse(raw, "")


class Harness:
    def __init__(self) -> None:
        self.mock: Any = None
        self.worker: Worker | None = None
        self.url = ""
        self.cfg: Config | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="tollway-test-")
        self.dsn = ""

    async def start(self, dsn: str, *, with_limits: bool = True, with_ledger: bool = True,
                    **sections: Any) -> Harness:
        import os

        os.environ["TOLLWAY_TEST_UPSTREAM_KEY"] = "upstream-secret-credential"
        self.dsn = dsn
        self.mock = await mock_upstream.start("127.0.0.1", 0)
        if "channels" in sections:
            # The mock's controls travel as x-mock-* headers, which no channel forwards
            # unless it says so (relay.headers).
            sections["channels"] = [
                {"forward_headers": ["x-mock-*"], **c,
                 "base_url": c["base_url"].replace("{port}", str(self.mock.port))}
                for c in sections["channels"]
            ]
        self.cfg = make_config(dsn, self.mock.port, self.tmp.name, **sections)
        await prepare(self.cfg, dsn)
        self.worker = Worker(self.cfg, dsn, 0, with_limits=with_limits, with_ledger=with_ledger)
        await self.worker.start(bind_socket("127.0.0.1", 0, reuse_port=False))
        self.url = f"http://127.0.0.1:{self.worker.port}"
        return self

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self.mock is not None:
            await self.mock.close()
        self.tmp.cleanup()

    async def user_and_key(self, balance: str = "10", **key_fields: Any) -> tuple[int, int, str]:
        conn = await asyncpg.connect(self.dsn)
        try:
            name = f"u_{secrets.token_hex(4)}"
            user_id = await store.create_user(conn, name, parse_usd(balance))
            key_id, secret = await store.create_key(conn, user_id, name="test", **key_fields)
        finally:
            await conn.close()
        return user_id, key_id, secret

    async def flush(self) -> None:
        """Wait until every settled row is in Postgres."""
        import asyncio

        assert self.worker is not None
        ledger = self.worker.gw.ledger if self.worker.gw is not None else None
        for _ in range(200):
            if ledger is None or ledger.backlog == 0:
                await asyncio.sleep(0.12)  # one flush interval for the in-flight batch
                if ledger is None or ledger.backlog == 0:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("ledger did not drain")


async def read_request(reader: Any) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request (head, body by Content-Length) from an asyncio.StreamReader:
    what a scripted upstream in a test needs before it answers."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def replace(cfg: Config, **kw: Any) -> Config:
    return dataclasses.replace(cfg, **kw)
