"""The gateway under faults, attacked from outside, with the money checked afterwards.

Each scenario runs bounded load through a real worker (or a real `python -m relay serve`
process), injects one fault (Postgres unreachable, upstream reset or stall mid-stream, a
client reading one byte a second, a thousand clients vanishing, SIGTERM, kill -9) and
then checks the invariants: every settled request has exactly one usage row with the
right cost, each balance equals its opening amount minus the sum of its rows, no
admission lease leaked and nothing is left in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from accounting.ledgerd import socket_address
from accounting.money import parse_usd
from bench import mock_upstream
from tests.faultproxy import FaultProxy
from tests.gateway import Harness

ROOT = Path(__file__).resolve().parent.parent
# gpt-4o-mini in the harness: 0.15 / 0.60 USD per 1M tokens = 150 / 600 nano-USD a token.
IN_NANO, OUT_NANO = 150, 600
PROMPT = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": PROMPT, **kw}


async def fire(http: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any], rid: str,
               within: float = 20) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid}
    try:
        async with http.post(url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers,
                             timeout=aiohttp.ClientTimeout(total=within)) as r:
            return r.status, await r.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return -1, repr(exc).encode()


async def rows_of(pg_dsn: str, user_id: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return await conn.fetch(
            "SELECT request_id, client_request_id, status, input_tokens, output_tokens,"
            " cache_read_tokens, usage_source, cost_nano, error_code FROM usage_log WHERE user_id = $1",
            user_id)
    finally:
        await conn.close()


async def balance_of(pg_dsn: str, user_id: int) -> int:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return int(await conn.fetchval("SELECT balance_nano FROM users WHERE id = $1", user_id))
    finally:
        await conn.close()


async def wait_rows(pg_dsn: str, user_id: int, n: int, within: float = 20) -> list[asyncpg.Record]:
    deadline = time.monotonic() + within
    rows = await rows_of(pg_dsn, user_id)
    while len(rows) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        rows = await rows_of(pg_dsn, user_id)
    return rows


async def wait_rows_for(pg_dsn: str, user_id: int, rids: set[str],
                        within: float = 20) -> list[asyncpg.Record]:
    """The user's rows once every client request id in `rids` has one (bounded)."""
    deadline = time.monotonic() + within
    rows = await rows_of(pg_dsn, user_id)
    while not rids <= {r["client_request_id"] for r in rows} and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        rows = await rows_of(pg_dsn, user_id)
    return rows


def by_client_rid(rows: list[asyncpg.Record]) -> dict[str, asyncpg.Record]:
    seen: dict[str, asyncpg.Record] = {}
    for r in rows:
        rid = r["client_request_id"]
        assert rid not in seen, f"two usage rows for request {rid}"
        seen[rid] = r
    assert len({r["request_id"] for r in rows}) == len(rows), "duplicate request_id rows"
    return seen


def priced_right(row: asyncpg.Record) -> None:
    assert row["cost_nano"] == row["input_tokens"] * IN_NANO + row["output_tokens"] * OUT_NANO, dict(row)


async def assert_books_balance(h: Harness, pg_dsn: str, user_id: int, opening: str) -> list[asyncpg.Record]:
    await h.flush()
    rows = await rows_of(pg_dsn, user_id)
    by_client_rid(rows)
    assert await balance_of(pg_dsn, user_id) == parse_usd(opening) - sum(r["cost_nano"] for r in rows)
    gw = h.worker.gw  # type: ignore[union-attr]
    for _ in range(50):
        if gw.in_flight == 0 and gw.limiter.inflight == 0:
            break
        await asyncio.sleep(0.05)
    assert gw.in_flight == 0
    assert gw.limiter.inflight == 0, "admission lease leaked"
    return rows


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


# --- Postgres unreachable under load --------------------------------------------------


async def test_postgres_outage_requests_keep_flowing_rows_land_after(pg_dsn: str,
                                                                      http: aiohttp.ClientSession) -> None:
    """Postgres away for 30 s under load (every connection reset, new ones refused):
    every request is served, and every settled row lands once when it is back."""
    port = int(pg_dsn.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = await FaultProxy(port).start()
    # All of the worker's Postgres traffic (pool, sync, flusher) goes through the proxy.
    h = await Harness().start(proxy.dsn(pg_dsn))
    try:
        user_id, _, key = await h.user_and_key(balance="10")
        ok = await fire(http, h.url, key, chat(mock={"input_tokens": 100}), "warm")
        assert ok[0] == 200
        proxy.reset()  # every Postgres connection dies and new ones are refused with RST
        t0 = time.monotonic()
        results: dict[str, tuple[int, bytes]] = {}
        wave = 0
        while time.monotonic() - t0 < 30:
            rids = [f"pgout-{wave}-{i}" for i in range(40)]
            body = chat(stream=wave % 2 == 1, mock={"input_tokens": 100})
            got = await asyncio.gather(*(fire(http, h.url, key, body, r) for r in rids))
            results.update(zip(rids, got, strict=True))
            wave += 1
            await asyncio.sleep(0.3)
        assert wave >= 20
        statuses = {s for s, _ in results.values()}
        assert statuses == {200}, f"requests failed while Postgres was away: {statuses}"
        assert h.worker.flusher.failures >= 1  # type: ignore[union-attr]
        proxy.restore()
        rows = await wait_rows(pg_dsn, user_id, len(results) + 1, within=20)
        seen = by_client_rid(rows)
        assert set(results) | {"warm"} == set(seen)
        for row in seen.values():
            assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (100, 5, "upstream")
            assert row["cost_nano"] == 100 * IN_NANO + 5 * OUT_NANO
        await assert_books_balance(h, pg_dsn, user_id, "10")
    finally:
        proxy.restore()
        await h.stop()
        await proxy.close()


async def test_flusher_alone_behind_a_blackhole(pg_dsn: str, http: aiohttp.ClientSession) -> None:
    """Only the flusher loses Postgres, and silently (no RST): rows wait, then land once."""
    port = int(pg_dsn.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = await FaultProxy(port).start()
    h = await Harness().start(pg_dsn)
    try:
        flusher = h.worker.flusher  # type: ignore[union-attr]
        flusher.dsn = proxy.dsn(pg_dsn)
        flusher._connect_timeout = 0.5  # a blackholed connect gives up fast
        user_id, _, key = await h.user_and_key(balance="10")
        await fire(http, h.url, key, chat(), "bh-warm")
        await h.flush()
        proxy.stall()
        # Move the live flusher connection onto the proxy: terminate it server-side.
        conn = await asyncpg.connect(pg_dsn)
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                           " AND query LIKE '%usage_log%'")
        await conn.close()
        proxy.blackhole()
        rids = [f"bh-{i}" for i in range(100)]
        got = await asyncio.gather(*(fire(http, h.url, key, chat(stream=True), r) for r in rids))
        assert {s for s, _ in got} == {200}
        await asyncio.sleep(1.5)
        assert h.worker.gw.ledger.backlog > 0  # type: ignore[union-attr]
        proxy.restore()
        rows = await wait_rows(pg_dsn, user_id, 101, within=20)
        assert set(by_client_rid(rows)) == {*rids, "bh-warm"}
        for r in rows:
            priced_right(r)
        await assert_books_balance(h, pg_dsn, user_id, "10")
    finally:
        proxy.restore()
        await h.stop()
        await proxy.close()


# --- upstream faults mid-stream -------------------------------------------------------


def _events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.strip()]


def _error_events(body: bytes) -> list[bytes]:
    return [e for e in _events(body) if b'"error"' in e]


async def test_upstream_reset_mid_stream_under_load(pg_dsn: str, http: aiohttp.ClientSession) -> None:
    h = await Harness().start(pg_dsn)
    try:
        user_id, _, key = await h.user_and_key(balance="10")
        body = chat(stream=True, mock={"fail": "reset", "fail_after": 3, "input_tokens": 100})
        rids = [f"rst-{i}" for i in range(100)]
        got = await asyncio.gather(*(fire(http, h.url, key, body, r) for r in rids))
        for status, raw in got:
            assert status == 200
            assert len(_error_events(raw)) == 1, raw
            assert orjson.loads(_events(raw)[-1][6:])["error"]["code"] == "upstream_error"
            assert b"[DONE]" not in raw
        rows = await assert_books_balance(h, pg_dsn, user_id, "10")
        seen = by_client_rid(rows)
        assert set(seen) == set(rids)
        for row in seen.values():
            assert row["usage_source"] == "estimated"
            assert 1 <= row["output_tokens"] < 5  # what was emitted, not what was planned
            assert row["input_tokens"] > 0
            priced_right(row)
    finally:
        await h.stop()


async def _stalled_streams(h: Harness, http: aiohttp.ClientSession, n: int,
                           tag: str) -> tuple[int, float, list[tuple[int, bytes]], list[str]]:
    user_id, _, key = await h.user_and_key(balance="10")
    body = chat(stream=True, mock={"fail": "stall", "fail_after": 3})
    rids = [f"{tag}-{i}" for i in range(n)]
    t0 = time.monotonic()
    got = await asyncio.gather(*(fire(http, h.url, key, body, r, within=10) for r in rids))
    return user_id, time.monotonic() - t0, got, rids


async def test_upstream_stall_mid_stream_billed_as_emitted(pg_dsn: str, http: aiohttp.ClientSession) -> None:
    h = await Harness().start(pg_dsn, upstream={"idle_timeout_s": 0.5, "first_byte_timeout_s": 1.0})
    try:
        user_id, elapsed, got, rids = await _stalled_streams(h, http, 50, "stall")
        assert elapsed < 5.0, elapsed
        for status, raw in got:
            assert status == 200
            errs = _error_events(raw)
            assert len(errs) == 1
            assert orjson.loads(errs[0][6:])["error"]["code"] == "upstream_timeout"
            assert b"[DONE]" not in raw
        rows = await assert_books_balance(h, pg_dsn, user_id, "10")
        seen = by_client_rid(rows)
        assert set(seen) == set(rids)
        for row in seen.values():
            assert row["usage_source"] == "estimated"
            assert 1 <= row["output_tokens"] < 5
            priced_right(row)
        assert h.mock.stats.streams_completed == 0
    finally:
        await h.stop()


async def test_upstream_stall_error_event_after_idle_timeout(pg_dsn: str,
                                                             http: aiohttp.ClientSession) -> None:
    h = await Harness().start(pg_dsn, upstream={"idle_timeout_s": 0.5, "first_byte_timeout_s": 3.0})
    try:
        _, elapsed, got, _ = await _stalled_streams(h, http, 20, "idle")
        assert all(len(_error_events(raw)) == 1 for _, raw in got)
        assert 0.45 <= elapsed < 1.5, f"stalled stream ended after {elapsed:.2f}s, idle timeout 0.5s"
    finally:
        await h.stop()


# --- slow and vanishing clients -------------------------------------------------------


async def test_client_reading_one_byte_a_second(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn)
    try:
        user_id, _, key = await h.user_and_key(balance="10")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", h.worker.port))  # type: ignore[union-attr]
        # 16 KiB of text per chunk is about 2,700 tokens: the bound covers all of it, so
        # the cut is the client's doing, not the credit's (relay.credit).
        body = orjson.dumps(chat(stream=True, max_tokens=12_000_000,
                                 mock={"chunks": 4000, "chunk_size": 16384}))
        await loop.sock_sendall(sock, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                b"authorization: Bearer " + key.encode() + b"\r\nx-request-id: slow-1\r\n"
                                b"content-length: %d\r\n\r\n" % len(body) + body)
        for _ in range(4):
            assert len(await loop.sock_recv(sock, 1)) == 1
            await asyncio.sleep(1.0)
        conns = list(h.worker.state.connections)  # type: ignore[union-attr]
        assert max(c.transport.get_write_buffer_size() for c in conns) < 1024 * 1024
        assert h.mock.stats.write_pauses >= 1  # the gateway stopped reading the upstream
        assert h.mock.stats.streams_completed == 0
        sock.close()
        rows = await wait_rows(pg_dsn, user_id, 1, within=10)
        rows = await assert_books_balance(h, pg_dsn, user_id, "10")
        assert len(rows) == 1 and rows[0]["client_request_id"] == "slow-1"
        assert rows[0]["usage_source"] == "estimated" and rows[0]["output_tokens"] > 0
        priced_right(rows[0])
    finally:
        await h.stop()


async def test_thousand_clients_vanish_mid_stream(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, limits={"key_concurrency": 2000})
    try:
        user_id, _, key = await h.user_and_key(balance="100")
        before = h.mock.stats.streams_aborted_by_client
        body = orjson.dumps(chat(stream=True, mock={"chunks": 400, "delay_ms": 20}))
        sem = asyncio.Semaphore(500)

        async def one(i: int) -> bool:
            async with sem:
                reader, writer = await asyncio.open_connection("127.0.0.1", h.worker.port)  # type: ignore[union-attr]
                try:
                    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                                 + key.encode() + b"\r\nx-request-id: gone-%d\r\ncontent-length: %d\r\n\r\n"
                                 % (i, len(body)) + body)
                    first = await asyncio.wait_for(reader.read(2048), 10)
                    return first.startswith(b"HTTP/1.1 200")
                finally:
                    writer.transport.abort()

        ok = await asyncio.gather(*(one(i) for i in range(1000)))
        assert all(ok)
        deadline = time.monotonic() + 10
        while h.mock.stats.streams_aborted_by_client < before + 1000 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert h.mock.stats.streams_aborted_by_client == before + 1000
        assert h.mock.stats.streams_completed == 0
        rows = await wait_rows(pg_dsn, user_id, 1000)
        rows = await assert_books_balance(h, pg_dsn, user_id, "100")
        assert set(by_client_rid(rows)) == {f"gone-{i}" for i in range(1000)}
        for r in rows:
            priced_right(r)
    finally:
        await h.stop()


# --- a real `python -m relay serve` process: SIGTERM and kill -9 ----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    def __init__(self, tmp: Path, dsn: str, mock_port: int, ledger: dict[str, Any]) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.config = tmp / "config.toml"
        ledger_lines = "".join(f"{k} = {v}\n" for k, v in ledger.items())
        self.config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nworkers = 1\ndrain_grace_s = 10\n\n'
            f'[database]\ndsn = "{dsn}"\ndata_dir = "{tmp / "data"}"\n\n'
            f"[ledger]\n{ledger_lines}\n"
            f"[demo]\ncreate_demo_user = false\n\n"
            f'[[channels]]\nname = "mock"\nprotocol = "openai"\n'
            f'base_url = "http://127.0.0.1:{mock_port}/v1"\napi_key_env = "TOLLWAY_FAULTS_UPSTREAM_KEY"\n'
            f'models = ["gpt-*"]\n\n'
            f'[prices."gpt-4o-mini"]\ninput = "0.15"\noutput = "0.60"\n')
        self.env = {**os.environ, "TOLLWAY_FAULTS_UPSTREAM_KEY": "faults-upstream-credential"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "serve.log"

    def cli(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "relay", "--config", str(self.config), *args, "--json"],
                             cwd=ROOT, env=self.env, capture_output=True, timeout=30, check=True)
        return orjson.loads(out.stdout)

    async def start(self) -> None:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [sys.executable, "-m", "relay", "--config", str(self.config), "serve"],
                cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                await w.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("serve did not start: " + self.log.read_text())

    async def wait(self, within: float = 30) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + within
        while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - a child process
            await asyncio.sleep(0.05)
        code = self.proc.poll()
        assert code is not None, "serve did not exit"
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
async def serve_env(pg_dsn: str, tmp_path: Path):
    mock = await mock_upstream.start("127.0.0.1", 0)
    procs: list[ServeProcess] = []

    def make(ledger: dict[str, Any]) -> ServeProcess:
        p = ServeProcess(tmp_path, pg_dsn, mock.port, ledger)
        procs.append(p)
        return p

    yield make, mock
    for p in procs:
        p.kill()
    await mock.close()


async def _user(sp: ServeProcess, name: str) -> tuple[int, str]:
    user = await asyncio.to_thread(sp.cli, "users", "create", name, "--balance", "10")
    key = await asyncio.to_thread(sp.cli, "keys", "create", "--user", name)
    return int(user["id"]), str(key["key"])


async def test_sigterm_under_load_finishes_streams_and_exits_0(serve_env: Any, pg_dsn: str,
                                                                http: aiohttp.ClientSession) -> None:
    make, mock = serve_env
    sp = make({"flush_interval_ms": 100})
    user_id, key = await _user(sp, f"sigterm_{os.getpid()}_{time.monotonic_ns()}")
    await sp.start()
    url = f"http://127.0.0.1:{sp.port}"
    rids = [f"term-{i}" for i in range(60)]
    body = chat(stream=True, mock={"chunks": 20, "delay_ms": 50, "input_tokens": 100})
    mock.stats.reset()
    load = asyncio.gather(*(fire(http, url, key, body, r) for r in rids))
    # SIGTERM once every request is in flight (a fixed sleep raced with a loaded host:
    # a request not yet accepted when the listener closes is refused, as it should be).
    deadline = time.monotonic() + 15
    while mock.stats.streams_started < len(rids):
        assert time.monotonic() < deadline, mock.stats.streams_started
        await asyncio.sleep(0.01)
    assert sp.proc is not None
    sp.proc.send_signal(signal.SIGTERM)
    got = await load
    assert await sp.wait() == 0
    print(sp.log.read_text())
    for status, raw in got:
        assert status == 200, raw
        assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    rows = await rows_of(pg_dsn, user_id)
    seen = by_client_rid(rows)
    assert set(seen) == set(rids)
    for row in seen.values():
        assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (100, 20, "upstream")
        priced_right(row)
    assert await balance_of(pg_dsn, user_id) == parse_usd("10") - sum(r["cost_nano"] for r in rows)


async def test_kill9_under_load_journal_replayed_exactly_once(serve_env: Any, pg_dsn: str,
                                                             http: aiohttp.ClientSession) -> None:
    make, _ = serve_env
    # No flush before the kill (a minute's cadence, a batch size never reached): every
    # settled row exists only in the journal, so the restart must replay all of them.
    sp = make({"flush_interval_ms": 60000, "flush_rows": 100000})
    user_id, key = await _user(sp, f"kill9_{os.getpid()}_{time.monotonic_ns()}")
    await sp.start()
    url = f"http://127.0.0.1:{sp.port}"
    done: list[str] = []
    for wave in range(3):
        rids = [f"k9-{wave}-{i}" for i in range(50)]
        got = await asyncio.gather(*(fire(http, url, key, chat(mock={"input_tokens": 100}), r) for r in rids))
        assert {s for s, _ in got} == {200}
        done += rids
    # Load still running at the kill: long streams, half-way through.
    inflight_rids = [f"k9-live-{i}" for i in range(30)]
    live = asyncio.gather(*(fire(http, url, key, chat(stream=True, mock={"chunks": 50, "delay_ms": 50}), r)
                            for r in inflight_rids))
    await asyncio.sleep(0.5)
    sp.kill()
    live_got = await live
    assert all(s in (-1, 200) for s, _ in live_got)
    before = {r["client_request_id"] for r in await rows_of(pg_dsn, user_id)}
    assert len(before & set(done)) < len(done), "everything was flushed before the kill: no replay tested"
    journal = sp.tmp / "data" / "journal"
    assert sum(f.stat().st_size for f in journal.glob("*.wal")) > 0, "the settled rows are on disk"
    # The restarted gateway flushes at the usual cadence.
    sp.config.write_text(sp.config.read_text().replace(
        "flush_interval_ms = 60000\nflush_rows = 100000\n", "flush_interval_ms = 100\n"))
    await sp.start()
    try:
        # By id, not by count: replayed checkpoints of the in-flight streams count too.
        rows = await wait_rows_for(pg_dsn, user_id, set(done), within=15)
        seen = by_client_rid(rows)  # exactly once
        assert set(done) <= set(seen)
        assert set(seen) <= set(done) | set(inflight_rids)
        for rid in done:
            assert seen[rid]["cost_nano"] == 100 * IN_NANO + 5 * OUT_NANO
        await asyncio.sleep(0.5)
        rows = await rows_of(pg_dsn, user_id)
        assert await balance_of(pg_dsn, user_id) == parse_usd("10") - sum(r["cost_nano"] for r in rows)
    finally:
        assert sp.proc is not None
        sp.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            await sp.wait(15)


def _children(pid: int) -> list[int]:
    """`pid`'s child processes, oldest first (by start time, /proc/<pid>/stat field 22)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append((int(fields[19]), int(entry)))
    return [p for _, p in sorted(out)]


async def test_ledger_process_kill9_of_a_worker_then_sigterm_loses_and_doubles_nothing(
        serve_env: Any, pg_dsn: str, http: aiohttp.ClientSession) -> None:
    """[ledger] process = true: the worker only journals, the ledger process flushes. A
    worker killed under load is restarted, its journal adopted and flushed by the ledger
    process; SIGTERM then flushes the rest before the supervisor exits 0."""
    make, _ = serve_env
    sp = make({"flush_interval_ms": 100, "process": "true"})
    user_id, key = await _user(sp, f"ledgerd_{os.getpid()}_{time.monotonic_ns()}")
    await sp.start()
    assert sp.proc is not None
    try:
        url = f"http://127.0.0.1:{sp.port}"
        done: list[str] = []
        for wave in range(3):
            rids = [f"ld-{wave}-{i}" for i in range(50)]
            got = await asyncio.gather(*(fire(http, url, key, chat(mock={"input_tokens": 100}), r)
                                         for r in rids))
            assert {s for s, _ in got} == {200}
            done += rids
        ledger_pid, worker_pid = _children(sp.proc.pid)
        inflight = [f"ld-live-{i}" for i in range(30)]
        live = asyncio.gather(*(fire(http, url, key, chat(stream=True, mock={"chunks": 50, "delay_ms": 50}), r)
                                for r in inflight))
        await asyncio.sleep(0.5)
        os.kill(worker_pid, signal.SIGKILL)
        await live
        # The supervisor starts a new worker; the ledger process goes on.
        deadline = time.monotonic() + 20
        while True:
            kids = _children(sp.proc.pid)
            if len(kids) == 2 and worker_pid not in kids:
                break
            assert time.monotonic() < deadline, kids
            await asyncio.sleep(0.05)
        assert kids[0] == ledger_pid
        while True:  # the new worker listens
            try:
                _, w = await asyncio.open_connection("127.0.0.1", sp.port)
                w.close()
                break
            except OSError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        after = [f"ld-after-{i}" for i in range(20)]
        got = await asyncio.gather(*(fire(http, url, key, chat(mock={"input_tokens": 100}), r) for r in after))
        assert {s for s, _ in got} == {200}
        # Wait for these rows by id, not by count: the in-flight streams' rows (settled
        # or charged from their checkpoints) can make up the count while the dead
        # worker's journal is still being adopted.
        rows = await wait_rows_for(pg_dsn, user_id, {*done, *after}, within=30)
        seen = by_client_rid(rows)  # exactly once
        assert set(done) | set(after) <= set(seen) <= set(done) | set(after) | set(inflight)
        for rid in done + after:
            assert seen[rid]["cost_nano"] == 100 * IN_NANO + 5 * OUT_NANO
        # /metrics (served by the worker) includes the ledger process's flusher.
        deadline = time.monotonic() + 10
        while True:
            async with http.get(f"{url}/metrics") as resp:
                text = await resp.text()
            flushed = [float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("tollway_ledger_flushed_rows_total ")]
            if flushed and flushed[0] >= len(done) + len(after):
                break
            assert time.monotonic() < deadline, [x for x in text.splitlines() if "ledger" in x]
            await asyncio.sleep(0.2)
        sp.proc.send_signal(signal.SIGTERM)
        assert await sp.wait() == 0
        assert "stopped (drained, ledger flushed)" in sp.log.read_text()
        rows = await rows_of(pg_dsn, user_id)
        assert len(rows) == len(by_client_rid(rows))
        assert await balance_of(pg_dsn, user_id) == parse_usd("10") - sum(r["cost_nano"] for r in rows)
        assert list((sp.tmp / "data" / "journal").glob("*.wal")) == []
    finally:
        for pid in _children(sp.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sp.kill()


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_supervisor_kill9_its_children_drain_and_exit(
        serve_env: Any, pg_dsn: str, http: aiohttp.ClientSession) -> None:
    """kill -9 of the supervisor: the kernel sends its children SIGTERM (PR_SET_PDEATHSIG),
    so the worker drains and the ledger process flushes instead of serving on, orphaned.
    A new start then serves, and every settled row is in Postgres exactly once."""
    make, _ = serve_env
    sp = make({"flush_interval_ms": 100, "process": "true"})
    user_id, key = await _user(sp, f"orphan_{os.getpid()}_{time.monotonic_ns()}")
    await sp.start()
    assert sp.proc is not None
    url = f"http://127.0.0.1:{sp.port}"
    kids = _children(sp.proc.pid)
    try:
        assert len(kids) == 2, kids  # the ledger process and one worker
        rids = [f"orphan-{i}" for i in range(40)]
        got = await asyncio.gather(*(fire(http, url, key, chat(mock={"input_tokens": 100}), r)
                                     for r in rids))
        assert {s for s, _ in got} == {200}
        sp.proc.kill()
        sp.proc.wait(5)
        deadline = time.monotonic() + 20
        while any(_running(pid) for pid in kids):
            assert time.monotonic() < deadline, f"children {kids} outlived the supervisor"
            await asyncio.sleep(0.05)
        with pytest.raises(OSError):  # nothing listens on the port any more
            _, w = await asyncio.open_connection("127.0.0.1", sp.port)
            w.close()
        await sp.start()
        more = [f"orphan-after-{i}" for i in range(10)]
        got = await asyncio.gather(*(fire(http, url, key, chat(mock={"input_tokens": 100}), r)
                                     for r in more))
        assert {s for s, _ in got} == {200}
        sp.proc.send_signal(signal.SIGTERM)
        assert await sp.wait() == 0
        rows = await rows_of(pg_dsn, user_id)
        seen = by_client_rid(rows)
        assert len(rows) == len(seen) and set(seen) == set(rids) | set(more)
        for rid in seen:
            assert seen[rid]["cost_nano"] == 100 * IN_NANO + 5 * OUT_NANO
        assert await balance_of(pg_dsn, user_id) == parse_usd("10") - sum(r["cost_nano"] for r in rows)
    finally:
        for pid in kids + (_children(sp.proc.pid) if sp.proc.poll() is None else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sp.kill()


async def test_a_ledger_process_waits_while_another_holds_the_journals(
        serve_env: Any, pg_dsn: str, http: aiohttp.ClientSession) -> None:
    """While another ledger process holds the journal directory (here: this test holds
    its socket), the new one waits instead of flushing beside it; the workers go on
    journaling, SIGTERM leaves the rows in the journal and says so, and the next start
    writes each of them once."""
    make, _ = serve_env
    sp = make({"flush_interval_ms": 100, "process": "true"})
    user_id, key = await _user(sp, f"held_{os.getpid()}_{time.monotonic_ns()}")
    journal_dir = sp.tmp / "data" / "journal"
    journal_dir.mkdir(parents=True, exist_ok=True)
    holder = await asyncio.start_unix_server(lambda r, w: w.close(),
                                             path=socket_address(str(journal_dir)))
    try:
        await sp.start()
        url = f"http://127.0.0.1:{sp.port}"
        rids = [f"held-{i}" for i in range(30)]
        got = await asyncio.gather(*(fire(http, url, key, chat(mock={"input_tokens": 100}), r)
                                     for r in rids))
        assert {s for s, _ in got} == {200}
        await asyncio.sleep(0.5)  # several flush intervals: nothing may be written
        assert await rows_of(pg_dsn, user_id) == []
        assert sp.proc is not None
        sp.proc.send_signal(signal.SIGTERM)
        assert await sp.wait() == 0
        log_text = sp.log.read_text()
        assert "another ledger process serves" in log_text
        assert "unflushed rows left in the journal" in log_text
        assert list(journal_dir.glob("*.wal"))
    finally:
        holder.close()
        await holder.wait_closed()
    await sp.start()
    rows = await wait_rows(pg_dsn, user_id, len(rids))
    seen = by_client_rid(rows)
    assert len(rows) == len(seen) and set(seen) == set(rids)
    assert sp.proc is not None
    sp.proc.send_signal(signal.SIGTERM)
    assert await sp.wait() == 0
    assert await balance_of(pg_dsn, user_id) == parse_usd("10") - sum(r["cost_nano"] for r in rows)
    assert list(journal_dir.glob("*.wal")) == []
