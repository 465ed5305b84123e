"""Process model: the supervisor prepares storage, then runs one worker per core.

Supervisor: resolve the DSN (starting the embedded Postgres when none is set), apply
migrations, sync config channels and prices, create the demo user on an empty
database, start the bundled mock upstream when configured, then fork the workers
(one `SO_REUSEPORT` listening socket each, so the kernel spreads connections) and
restart any that die. SIGTERM is forwarded; each worker drains: it stops accepting,
lets in-flight streams finish within `server.drain_grace_s`, flushes its ledger and
exits. With one worker everything runs in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from relay.config import Config

log = logging.getLogger("tollway")


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


# --- supervisor -----------------------------------------------------------------------


async def prepare(cfg: Config, dsn: str) -> str | None:
    """Migrations, config sync, demo user. Returns a demo key when one was created."""
    import asyncpg

    from accounting import migrate, pricing, store

    conn = await asyncpg.connect(dsn)
    try:
        await migrate.apply(conn)
        await store.sync_config_channels(conn, cfg.channels)
        await pricing.sync_config_prices(conn, cfg.prices)
        for g in cfg.groups:
            await conn.execute(
                "INSERT INTO groups (name, multiplier, models, fit_output) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (name) DO UPDATE SET multiplier = EXCLUDED.multiplier,"
                " models = EXCLUDED.models, fit_output = EXCLUDED.fit_output"
                " WHERE groups.multiplier IS DISTINCT FROM EXCLUDED.multiplier"
                " OR groups.models IS DISTINCT FROM EXCLUDED.models"
                " OR groups.fit_output IS DISTINCT FROM EXCLUDED.fit_output",
                g.name, g.multiplier, list(g.models), g.fit_output,
            )
        await _owner_setup(cfg, conn)
        if cfg.demo.create_demo_user and await conn.fetchval("SELECT count(*) FROM users") == 0:
            from accounting.money import parse_usd

            user_id = await store.create_user(conn, "demo", parse_usd(cfg.demo.demo_balance))
            _, secret = await store.create_key(conn, user_id, name="demo")
            await _demo_login(cfg, conn, user_id)
            return secret
    finally:
        await conn.close()
    return None


DEMO_EMAIL = "demo@tollway.local"


async def _owner_setup(cfg: Config, conn: Any) -> None:
    """While the site has no owner, every start prints a fresh one-time link to the page
    that creates one (`tollway users create NAME --email E --role owner` does the same)."""
    from accounting import accounts

    token = await accounts.new_owner_setup(conn)
    if token is not None:
        host = cfg.accounts.public_url or f"http://{cfg.server.host}:{cfg.server.port}"
        print(f"tollway: this site has no owner yet; create one (link valid 24 h, once):\n"
              f"  {host.rstrip('/')}/console/setup-owner?token={token}", flush=True)


async def _demo_login(cfg: Config, conn: Any, user_id: int) -> None:
    """Give the demo user a console login: a generated password, written to
    <data_dir>/demo-login (the start prints it once)."""
    import secrets

    from accounting import accounts

    password = secrets.token_urlsafe(12)
    a = cfg.accounts
    hasher = accounts.Passwords(time_cost=a.argon2_time_cost, memory_kib=a.argon2_memory_kib,
                                threads=1)
    try:
        hashed = await hasher.hash(password)
    finally:
        hasher.close()
    await accounts.demo_login(conn, user_id, DEMO_EMAIL, hashed)
    path = cfg.data_dir / "demo-login"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"email: {DEMO_EMAIL}\npassword: {password}\n")
    path.chmod(0o600)


_PR_SET_PDEATHSIG = 1


def _prctl() -> Any:
    """libc's prctl, looked up in the parent: a child between fork and exec should not
    call the dynamic loader. None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with(parent: int, prctl: Any) -> None:
    """Have the kernel send this process SIGTERM when `parent` (the supervisor) dies,
    even by kill -9. Without it a worker would go on serving on the shared port, beside
    the workers of the next supervisor, and the mock would keep its port. SIGTERM is the
    ordinary drain: whatever a worker has not flushed stays in its journal, which the
    next start replays."""
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _start_mock(cfg: Config) -> subprocess.Popen[bytes] | None:
    if not cfg.demo.mock_upstream:
        return None
    os.environ.setdefault("MOCK_UPSTREAM_KEY", "mock-upstream-key")
    root = Path(__file__).resolve().parent.parent
    me, prctl = os.getpid(), _prctl()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.mock_upstream", "--host", "127.0.0.1",
         "--port", str(cfg.demo.mock_port)],
        cwd=str(root),
        stdout=subprocess.DEVNULL,
        # The supervisor has no other thread at this point, so a preexec_fn is safe.
        preexec_fn=lambda: _die_with(me, prctl),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", cfg.demo.mock_port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"tollway: the mock upstream exited (code {proc.returncode})")
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit("tollway: the mock upstream did not start within 10 s")


def run(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from limits.admission import check_workers

    problem = check_workers(cfg.limits, cfg.server.workers)
    if problem:
        print(f"tollway: {problem}", file=sys.stderr)
        return 2
    from accounting.db import resolve_dsn

    dsn, embedded = resolve_dsn(cfg)
    mock = None
    try:
        demo_key = asyncio.run(prepare(cfg, dsn))
        if demo_key:
            key_file = cfg.data_dir / "demo-key"
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(demo_key + "\n")
            key_file.chmod(0o600)
            print(f"tollway: created user 'demo'; demo key (shown once, also in {key_file}):\n"
                  f"  {demo_key}", flush=True)
            login_file = cfg.data_dir / "demo-login"
            if login_file.exists():
                host = cfg.accounts.public_url or f"http://{cfg.server.host}:{cfg.server.port}"
                print(f"tollway: console login for 'demo' (also in {login_file}):\n"
                      f"  {host.rstrip('/')}/console\n"
                      + "".join(f"  {line}\n" for line in login_file.read_text().splitlines()),
                      end="", flush=True)
        mock = _start_mock(cfg)
        if cfg.server.workers == 1 and not _ledger_process(cfg):
            worker_main(cfg, dsn, 0, None)
            return 0
        return _supervise(cfg, dsn)
    finally:
        if mock is not None:
            mock.terminate()
            try:
                mock.wait(5)
            except subprocess.TimeoutExpired:
                mock.kill()
        if embedded is not None:
            embedded.stop()


def _ledger_process(cfg: Config) -> bool:
    return cfg.ledger.process and "ledger" not in _bench_off()


def _bench_off() -> set[str]:
    return {x.strip() for x in os.environ.get("TOLLWAY_BENCH_OFF", "").split(",") if x.strip()}


_LEDGER = -1  # the ledger process's index among the supervisor's children


def _supervise(cfg: Config, dsn: str) -> int:
    children: dict[int, int] = {}
    stopping = False

    supervisor, prctl = os.getpid(), _prctl()

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with(supervisor, prctl)
                if index == _LEDGER:
                    code = ledger_main(cfg, dsn)
                else:
                    worker_main(cfg, dsn, index, None)
            except BaseException:
                log.exception("%s failed", "ledger process" if index == _LEDGER else f"worker {index}")
                code = 1
            finally:
                os._exit(code)
        children[pid] = index

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        # Workers first: they drain and close their journals, which the ledger process
        # then flushes to the last row before it exits.
        for pid, index in list(children.items()):
            if index == _LEDGER:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ledger = _ledger_process(cfg)
    if ledger:
        spawn(_LEDGER)
    for i in range(cfg.server.workers):
        spawn(i)
    while children:
        if stopping and ledger and set(children.values()) == {_LEDGER}:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            ledger = False
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        if not stopping:
            log.warning("%s (pid %d) exited with status %d; restarting",
                        "ledger process" if index == _LEDGER else f"worker {index}", pid, status)
            time.sleep(0.2)
            spawn(index)
        elif index == _LEDGER:
            print("tollway: stopped (drained, ledger flushed)" if status == 0 else
                  "tollway: stopped (drained; unflushed rows left in the journal for the next start)",
                  flush=True)
    return 0


def ledger_main(cfg: Config, dsn: str) -> int:
    """Run the ledger process (accounting.ledgerd) until SIGTERM; 0 once all is flushed."""
    import uvloop

    return 0 if uvloop.run(_ledger(cfg, dsn)) else 1


async def _ledger(cfg: Config, dsn: str) -> bool:
    from accounting.ledgerd import LedgerDaemon
    from relay.metrics import Metrics, ledger_families

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    journal_dir = cfg.ledger.journal_dir or str(cfg.data_dir / "journal")
    daemon = LedgerDaemon(journal_dir, dsn, cfg.ledger)
    starting = asyncio.ensure_future(daemon.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        # Stopped while another ledger process still had the directory: it flushes the
        # journals, so this one has nothing of its own to flush.
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return not daemon.journals_left()
    stopped.cancel()
    starting.result()
    metrics = None
    if cfg.metrics.enabled:
        # The workers' /metrics merge this process's snapshot file with theirs.
        metrics = Metrics(cfg.data_dir / "metrics")
        metrics.state = lambda: ledger_families(daemon.stats())
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await stop.wait()
        if metrics is not None:
            try:
                metrics.write_snapshot()
            except OSError as exc:
                log.warning("ledger metrics snapshot failed: %s", exc)
    ok = await daemon.stop()
    if metrics is not None and metrics.snapshot_dir is not None:
        (metrics.snapshot_dir / f"{os.getpid()}.json").unlink(missing_ok=True)
    return ok


# --- worker ---------------------------------------------------------------------------


# The cyclic collector's first generation passes this many net allocations of tracked
# objects apart (Python's default: 700).
GC_GEN0 = 20_000


def tune_gc() -> None:
    """The collector, set for a server whose requests leave no reference cycles.

    With Python's defaults a first-generation pass runs every ~50 requests at 64 in
    flight, and each walks every in-flight request's objects: a few per cent of a
    request's CPU (bench/RESULTS.md). What start-up built (modules, config, templates,
    caches) lives as long as the worker: frozen, no pass walks it again. A request
    creates no cycle (tests/test_money_hostile.py), so passing less often leaves
    nothing to pile up; a connection's few cycles wait a little longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, 10, 10)


def worker_main(cfg: Config, dsn: str, index: int, sock: socket.socket | None) -> None:
    """Run one worker. With `sock` None it binds its own SO_REUSEPORT socket, and only
    once it is ready: a connection the kernel accepts is one the worker will serve."""
    import uvloop

    uvloop.run(_worker(cfg, dsn, index, sock))


async def _worker(cfg: Config, dsn: str, index: int, sock: socket.socket | None) -> None:
    from relay.worker import Worker

    # Benchmarks only: TOLLWAY_BENCH_OFF=limits,ledger,console measures what each component
    # costs by running the same gateway without it. Never set in production: without the
    # ledger nothing is billed, without limits nothing is enforced.
    off = _bench_off()
    if off:
        log.warning("TOLLWAY_BENCH_OFF=%s: running without %s (benchmarks only)",
                    ",".join(sorted(off)), " and ".join(sorted(off)))
    worker = Worker(cfg, dsn, index, with_limits="limits" not in off,
                    with_ledger="ledger" not in off, with_console="console" not in off)
    # Handlers first: the listening socket already accepts (the kernel queues
    # connections), so a SIGTERM during start-up must still mean "drain", not death.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start(sock)
    tune_gc()
    if index == 0:
        n = cfg.server.workers
        print(f"tollway: listening on http://{cfg.server.host}:{worker.port} "
              f"({n} worker{'s' if n > 1 else ''})", flush=True)
        print(f"tollway: console at http://{cfg.server.host}:{worker.port}/console", flush=True)
    await stop.wait()
    await worker.stop()
    if index == 0 and not _ledger_process(cfg):
        # With a ledger process, the supervisor says so once that process has flushed.
        print("tollway: stopped (drained, ledger flushed)", flush=True)
