"""A short run of bench/hostile.py: hostile key holders, a worker killed, books intact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_hostile_key_holders_never_overdraw(pg_server_dsn: str) -> None:
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except Exception:
        pytest.skip("Redis on 127.0.0.1:6379 is needed for two workers")
    admin = pg_server_dsn.rsplit("/", 1)[0] + "/postgres"
    out = subprocess.run(
        [sys.executable, "-m", "bench.hostile", "--duration", "8", "--users", "12",
         "--concurrency", "16", "--json"],
        cwd=ROOT, env={**os.environ, "TOLLWAY_BENCH_PG": admin}, capture_output=True,
        timeout=110)
    assert out.returncode in (0, 1), out.stderr.decode()[-3000:]
    report = orjson.loads(out.stdout.splitlines()[-1])
    assert report["users_below_zero"] == 0 and report["min_balance_nano"] >= 0
    assert report["keys_over_cap"] == 0 and report["plans_over_credit"] == 0
    assert report["duplicate_rows"] == 0 and report["completed_without_row"] == 0
    assert report["refused_with_row"] == 0
    assert report["workers_killed"] == 1
    assert report["statuses"].get("200", 0) > 20 and report["statuses"].get("400", 0) > 0
    assert report["ok"] is True
