"""One-command load benchmark: every scenario against every target, one table.

Targets: the mock upstream called directly (the floor), nginx (proxy_buffering
off, upstream keepalive), the reference thin aiohttp proxy (bench/thin_proxy.py),
and Tollway with 1 and N workers on its full path (auth, limits, metering, ledger
to Postgres, metrics). Non-stream load comes from wrk, streams from
bench/streamclient.py. For each target it reports req/s, latency and TTFB
percentiles, latency added over direct, CPU ms per request of the target's
process tree (from /proc) and its peak RSS. When a target ran with and without a
component (`tollway1` and `tollway1-noledger`, alternated), a second table pairs the
runs in order and gives the component's cost in req/s summed over the pairs.

It installs nothing: a missing nginx or wrk is reported with the apt command and
the affected rows are skipped. Every process it starts binds 127.0.0.1, is
stopped by its own PID (process group) on exit, Ctrl-C or error, and every load
run is bounded in time.

    .venv/bin/python -m bench.run [--quick] [--scenarios a,b] [--targets direct,nginx,...]
                                  [--duration S] [--results]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PY = sys.executable
APT_HINT = "apt-get update && apt-get install -y nginx-light wrk"
UPSTREAM_KEY = "bench-upstream-key"  # what the mock sees; it accepts any bearer token
MOCK_MODULE = os.environ.get("TOLLWAY_BENCH_MOCK_MODULE", "bench.mock_upstream")
PG_ADMIN_DSN = os.environ.get("TOLLWAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
EMBED_MODEL = "text-embedding-3-small"


# --- scenarios -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    tool: str  # "wrk" (non-stream) or "stream" (bench.streamclient)
    path: str
    body: dict[str, object]
    concurrency: int
    protocol: str = "openai"  # which credential header the client sends
    mock_headers: tuple[tuple[str, str], ...] = ()
    tollway_only: bool = False  # only a gateway can serve it (protocol translation)
    about: str = ""


def _chat(stream: bool, **mock: int) -> dict[str, object]:
    body: dict[str, object] = {
        "model": OPENAI_MODEL,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 64,
        "stream": stream,
        "mock": mock,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _messages(model: str, **mock: int) -> dict[str, object]:
    return {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "stream": True,
        "mock": mock,
    }


def _embeddings(total_bytes: int) -> dict[str, object]:
    # The body is large, the reply is not: 16 long inputs, 256-dimension vectors.
    piece = ("lorem ipsum dolor sit amet " * (total_bytes // 16 // 27 + 1))[: total_bytes // 16]
    return {"model": EMBED_MODEL, "input": [piece] * 16, "dimensions": 256}


def _hdrs(chunks: int, delay_ms: int) -> tuple[tuple[str, str], ...]:
    return (("x-mock-chunks", str(chunks)), ("x-mock-delay-ms", str(delay_ms)))


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("chat_c1", "wrk", "/v1/chat/completions", _chat(False, delay_ms=0), 1,
             about="non-stream chat, 1 connection"),
    Scenario("chat_c64", "wrk", "/v1/chat/completions", _chat(False, delay_ms=0), 64,
             about="non-stream chat, 64 connections"),
    Scenario("stream20_c64", "stream", "/v1/chat/completions",
             _chat(True, chunks=20, chunk_size=32, delay_ms=0), 64, mock_headers=_hdrs(20, 0),
             about="OpenAI chat stream, 20 chunks, no pacing"),
    Scenario("anthropic_stream_c64", "stream", "/v1/messages",
             _messages(ANTHROPIC_MODEL, chunks=20, chunk_size=32, delay_ms=0), 64,
             protocol="anthropic", mock_headers=_hdrs(20, 0),
             about="Anthropic messages stream, 20 deltas"),
    Scenario("paced_c256", "stream", "/v1/chat/completions",
             _chat(True, chunks=20, chunk_size=32, delay_ms=5), 256, mock_headers=_hdrs(20, 5),
             about="OpenAI stream, 20 chunks 5 ms apart, 256 connections"),
    Scenario("paced_c1024", "stream", "/v1/chat/completions",
             _chat(True, chunks=20, chunk_size=32, delay_ms=5), 1024, mock_headers=_hdrs(20, 5),
             about="OpenAI stream, 20 chunks 5 ms apart, 1,024 connections"),
    Scenario("embeddings_1mb", "wrk", "/v1/embeddings", _embeddings(1 << 20), 8,
             about="embeddings with a 1 MiB request body, 8 connections"),
    Scenario("translated_c64", "stream", "/v1/messages",
             _messages(OPENAI_MODEL, chunks=20, chunk_size=32, delay_ms=0), 64,
             protocol="anthropic", mock_headers=_hdrs(20, 0), tollway_only=True,
             about="Anthropic client, OpenAI channel (translated), 20 chunks"),
)


# --- processes -----------------------------------------------------------------------


class Procs:
    """Every process the run starts, each in its own process group, stopped by PID."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        fh = log.open("ab")
        p = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=ROOT, env=env, start_new_session=True,
        )
        fh.close()
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)  # the group we created: p.pid == its pgid
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        else:
            # The leader exited; stragglers in its group (workers) still go.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.live)):
            self.stop(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]


def http_post(port: int, path: str, body: bytes, headers: dict[str, str], timeout: float = 5.0) -> tuple[int, bytes]:
    """One small request on a fresh connection (readiness probes; not for load)."""
    head = [f"POST {path} HTTP/1.1", f"host: 127.0.0.1:{port}", f"content-length: {len(body)}",
            "content-type: application/json", "connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                continue
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if (m and len(rest) >= int(m.group(1))) or rest.endswith(b"0\r\n\r\n"):
                break  # complete reply, whether or not the server honours connection: close
    status = int(data[9:12]) if data.startswith(b"HTTP/1.") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def wait_ready(p: subprocess.Popen[bytes], port: int, headers: dict[str, str], log: Path,
               timeout: float = 30.0) -> str | None:
    """Poll with a real non-stream chat until it answers 200; return an error note or None."""
    body = json.dumps(_chat(False, delay_ms=0)).encode()
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if p.poll() is not None:
            return f"exited with {p.returncode}: {_tail(log)}"
        try:
            status, reply = http_post(port, "/v1/chat/completions", body, headers)
            if status == 200:
                return None
            last = f"HTTP {status}: {reply[:200].decode(errors='replace')}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    return f"not ready after {timeout:.0f} s ({last}); log: {_tail(log)}"


# --- targets -------------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    name: str
    port: int = 0
    key: str = UPSTREAM_KEY  # the credential clients send
    pids: list[int] = field(default_factory=list)  # process-tree roots charged for CPU/RSS
    note: str = ""  # why it was skipped, if it was
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs = Procs()
        self.mock: subprocess.Popen[bytes] | None = None
        self.mock_port = 0
        self.mock_pids: list[int] = []
        self.pg_db = ""
        self.tollway_key = ""
        self.tollway_setup_note: str | None = None

    # mock upstream ------------------------------------------------------------------

    def start_mock(self) -> None:
        self.mock_port = free_port()
        log = self.work / "mock.log"
        argv = [PY, "-m", MOCK_MODULE, "--host", "127.0.0.1", "--port", str(self.mock_port)]
        if self.args.mock_workers:
            argv += ["--workers", str(self.args.mock_workers)]
        self.mock = self.procs.spawn(argv, log)
        self.mock_pids = [self.mock.pid]
        err = wait_ready(self.mock, self.mock_port, {"authorization": f"Bearer {UPSTREAM_KEY}"}, log)
        if err:
            raise SystemExit(f"mock upstream ({MOCK_MODULE}) did not start: {err}")

    # per target ---------------------------------------------------------------------

    def start(self, name: str) -> Target:
        t = Target(name)
        if name == "direct":
            t.port = self.mock_port
            return t
        t.port = free_port()
        log = self.work / f"{name}.log"
        if name == "nginx":
            nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
            if not nginx:
                t.note = f"skipped: nginx not installed ({APT_HINT})"
                return t
            conf = self.nginx_conf(t.port)
            argv = [nginx, "-p", str(conf.parent), "-e", str(conf.parent / "error.log"),
                    "-c", str(conf), "-g", "daemon off;"]
            log = conf.parent / "error.log"
        elif name == "thin":
            argv = [PY, "-m", "bench.thin_proxy", "--port", str(t.port),
                    "--upstream", f"http://127.0.0.1:{self.mock_port}"]
        elif name.startswith("tollway"):
            # tollway1: one worker, in-process limits (exact, no Redis); tollwayN: one worker
            # per core sharing limits through Redis. Variants of tollway1 measure what each
            # component costs: -redis (limits leased from Redis), -nolimits, -noledger, -bare
            # (both off; TOLLWAY_BENCH_OFF, benchmarks only).
            base, _, variant = name.partition("-")
            workers = 1 if base == "tollway1" else self.args.workers
            redis = base == "tollwayN" or variant == "redis"
            off = {"nolimits": "limits", "noledger": "ledger", "bare": "limits,ledger",
                   "noconsole": "console"}.get(variant, "")
            # -proc: the ledger in its own process ([ledger] process = true)
            argv_or_note = self.tollway_argv(t, workers, redis=redis,
                                             ledger_process=variant == "proc")
            if off:
                os.environ["TOLLWAY_BENCH_OFF"] = off
            else:
                os.environ.pop("TOLLWAY_BENCH_OFF", None)
            if isinstance(argv_or_note, str):
                t.note = argv_or_note
                return t
            argv = argv_or_note
        else:
            raise SystemExit(f"unknown target {name!r}")
        p = self.procs.spawn(argv, log)
        os.environ.pop("TOLLWAY_BENCH_OFF", None)
        t.procs.append(p)
        t.pids = [p.pid]
        headers = {"authorization": f"Bearer {t.key}"}
        err = wait_ready(p, t.port, headers, log, timeout=60.0 if name.startswith("tollway") else 20.0)
        if err:
            t.note = f"skipped: {name} {err}"
            self.stop(t)
        return t

    def stop(self, t: Target) -> None:
        for p in t.procs:
            self.procs.stop(p)
        t.procs.clear()

    def nginx_conf(self, port: int) -> Path:
        d = self.work / "nginx"
        d.mkdir(exist_ok=True)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(exist_ok=True)
        text = (BENCH_DIR / "nginx.conf.tmpl").read_text()
        values = {
            "DIR": str(d), "PORT": str(port), "UPSTREAM_PORT": str(self.mock_port),
            # Run as root, nginx would switch workers to "nobody", who cannot enter the
            # private temp dir; as any other user the directive would only warn.
            "USER": "user root;" if os.geteuid() == 0 else "",
        }
        for k, v in values.items():
            text = text.replace("{{" + k + "}}", v)
        conf = d / "nginx.conf"
        conf.write_text(text)
        return conf

    # tollway ------------------------------------------------------------------------

    def relay_cli(self, config: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the gateway CLI; accept --config before or after the subcommand."""
        env = dict(os.environ, BENCH_UPSTREAM_KEY=UPSTREAM_KEY)
        res = subprocess.run([PY, "-m", "relay", "--config", str(config), *args], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode == 2:  # argparse usage error: try the other placement
            res = subprocess.run([PY, "-m", "relay", *args, "--config", str(config)], cwd=ROOT,
                                 env=env, capture_output=True, text=True, timeout=timeout, check=False)
        return res

    def tollway_config(self, port: int, workers: int, redis: bool = True,
                       ledger_process: bool = False) -> Path:
        mock = f"http://127.0.0.1:{self.mock_port}"
        text = f"""# written by bench/run.py for one run; deleted with its temp dir
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}

[database]
dsn = "{_with_db(PG_ADMIN_DSN, self.pg_db)}"
data_dir = "{self.work / 'tollway-data'}"

[ledger]
journal_dir = "{self.work / 'tollway-data' / f'journal-{port}'}"
process = {str(ledger_process).lower()}

[limits]
redis_url = "{self.args.redis_url if redis else ''}"
key_concurrency = 100000

[[channels]]
name = "mock-openai"
protocol = "openai"
base_url = "{mock}/v1"
api_key_env = "BENCH_UPSTREAM_KEY"
forward_headers = ["x-mock-*"]
models = ["{OPENAI_MODEL}", "{EMBED_MODEL}"]

[[channels]]
name = "mock-anthropic"
protocol = "anthropic"
base_url = "{mock}"
api_key_env = "BENCH_UPSTREAM_KEY"
forward_headers = ["x-mock-*"]
models = ["{ANTHROPIC_MODEL}"]

[prices."default"]
input = "0.01"
output = "0.01"
"""
        path = self.work / f"tollway-{port}.toml"
        path.write_text(text)
        return path

    def tollway_setup(self) -> str | None:
        """Database, migrations, user and key, once for both Tollway targets."""
        if not ((ROOT / "relay" / "__main__.py").exists() or (ROOT / "relay" / "cli.py").exists()):
            return "skipped: Tollway not runnable yet (no relay/__main__.py or relay/cli.py)"
        try:
            self.pg_db = f"tollway_bench_{os.getpid()}"
            asyncio.run(_pg_exec(PG_ADMIN_DSN, f'CREATE DATABASE "{self.pg_db}"'))
        except Exception as exc:  # any driver or connection failure makes the target unrunnable
            self.pg_db = ""
            return f"skipped: cannot create the bench database at {PG_ADMIN_DSN}: {exc}"
        config = self.tollway_config(free_port(), 1)  # the CLI only needs the database
        res = self.relay_cli(config, "migrate")
        if res.returncode != 0:
            # No migrate command: apply the same migrations the gateway ships, directly.
            from accounting import migrate

            try:
                asyncio.run(migrate.apply_dsn(_with_db(PG_ADMIN_DSN, self.pg_db)))
            except Exception as exc:
                return f"skipped: migrations failed: {exc}"
        res = self.relay_cli(config, "users", "create", "bench", "--balance", "1000")
        if res.returncode != 0:
            return f"skipped: `users create` failed: {(res.stderr or res.stdout).strip()[-300:]}"
        res = self.relay_cli(config, "keys", "create", "--user", "bench", "--json")
        try:
            self.tollway_key = str(json.loads(res.stdout[res.stdout.index("{"):])["key"])
        except (ValueError, KeyError, IndexError, TypeError):
            return f"skipped: `keys create` gave no key: {(res.stderr or res.stdout).strip()[-300:]}"
        return None

    def tollway_argv(self, t: Target, workers: int, redis: bool = True,
                     ledger_process: bool = False) -> list[str] | str:
        if self.tollway_setup_note is None and not self.tollway_key:
            self.tollway_setup_note = self.tollway_setup() or ""
        if self.tollway_setup_note:
            return self.tollway_setup_note
        t.key = self.tollway_key
        config = self.tollway_config(t.port, workers, redis=redis, ledger_process=ledger_process)
        os.environ["BENCH_UPSTREAM_KEY"] = UPSTREAM_KEY  # inherited by the gateway
        return [PY, "-m", "relay", "--config", str(config), "serve"]

    def drop_db(self) -> None:
        if self.pg_db:
            with contextlib.suppress(Exception):
                asyncio.run(_pg_exec(PG_ADMIN_DSN, f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)'))
            self.pg_db = ""


def _with_db(dsn: str, db: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{db}"


async def _pg_exec(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# --- load ----------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    scenario: str
    target: str
    rps: float | None = None
    p50: float | None = None
    p99: float | None = None
    ttfb50: float | None = None
    ttfb99: float | None = None
    gap99: float | None = None
    added: float | None = None
    cpu_ms: float | None = None
    rss_mib: float | None = None
    requests: int = 0
    errors: int | None = None
    gen_cpu: float | None = None  # % of one core used by the load generator
    mock_cpu: float | None = None  # % of one core used by the mock upstream
    note: str = ""


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests, duration, errors and p50/p99 from `wrk --latency` output."""
    res: dict[str, float] = {}
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out):
        res["requests"] = int(m.group(1))
        res["seconds"] = _ms(m.group(2) + m.group(3)) / 1e3
    for q in ("50", "99"):
        if m := re.search(rf"^\s+{q}(?:\.000)?%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M):
            res[f"p{q}"] = _ms(m.group(1))
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
        res["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    res["errors"] = errors
    return res


def _lua(body_file: Path, headers: dict[str, str]) -> str:
    lines = [
        f'local f = assert(io.open("{body_file}", "rb"))',
        'wrk.method = "POST"',
        "wrk.body = f:read(\"*a\")",
        "f:close()",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def client_headers(sc: Scenario, key: str) -> dict[str, str]:
    h = {"authorization": f"Bearer {key}"}
    if sc.protocol == "anthropic":
        h["x-api-key"] = key
        h["anthropic-version"] = "2023-06-01"
    h.update(sc.mock_headers)
    return h


def run_load(sc: Scenario, t: Target, duration: float, work: Path) -> tuple[dict[str, object], str]:
    """Run one bounded load; return (result fields, error note)."""
    body_file = work / f"{sc.name}.json"
    if not body_file.exists():
        body_file.write_bytes(json.dumps(sc.body).encode())
    headers = client_headers(sc, t.key)
    url = f"http://127.0.0.1:{t.port}{sc.path}"
    limit = duration + 20.0
    if sc.tool == "wrk":
        wrk = shutil.which("wrk")
        if not wrk:
            return {}, f"skipped: wrk not installed ({APT_HINT})"
        script = work / f"{sc.name}-{t.name}.lua"
        script.write_text(_lua(body_file, headers))
        threads = 1 if sc.concurrency == 1 else 2
        argv = [wrk, f"-t{threads}", f"-c{sc.concurrency}", f"-d{duration:g}s", "--timeout", "10s",
                "--latency", "-s", str(script), url]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            return {}, "wrk overran its time bound"
        w = parse_wrk(res.stdout)
        if "requests" not in w:
            return {}, f"wrk failed: {(res.stderr or res.stdout).strip()[-200:]}"
        ok = int(w["requests"] - w.get("non2xx", 0))
        return {"requests": ok, "rps": ok / (w["seconds"] or duration), "p50": w.get("p50"),
                "p99": w.get("p99"), "errors": int(w["errors"])}, ""
    argv = [PY, "-m", "bench.streamclient", "--url", url, "--body-file", str(body_file),
            "-c", str(sc.concurrency), "-d", f"{duration:g}", "--grace", "3"]
    for k, v in headers.items():
        argv += ["--header", f"{k}: {v}"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {}, "stream client overran its time bound"
    try:
        r = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}, f"stream client failed: {res.stderr.strip()[-200:]}"
    lat, ttfb, gap = r["latency_ms"], r["ttfb_ms"], r["gap_ms"]
    out: dict[str, object] = {
        "requests": r["requests"], "rps": r["rps"], "p50": lat["p50"], "p99": lat["p99"],
        "ttfb50": ttfb["p50"], "ttfb99": ttfb["p99"], "gap99": gap["p99"], "errors": r["errors"],
    }
    note = ""
    if r["errors"]:
        note = "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(r["error_kinds"].items()))
        if r.get("error_sample"):
            note += f" (first: {_one_line(r['error_sample'], 160)})"
    return out, note


def _one_line(text: str, limit: int) -> str:
    text = re.sub(r"\s+", " ", text).replace("|", "/").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _children_cpu_s() -> float:
    """CPU of this process's reaped children: the load generator of the run just finished."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(sc: Scenario, t: Target, duration: float, work: Path, mock_pids: list[int]) -> Row:
    row = Row(sc.name, t.name)
    if t.note:
        row.note = t.note
        return row
    if sc.tollway_only and not t.name.startswith("tollway"):
        row.note = "n/a (needs protocol translation)"
        return row
    cpu0 = procstat.tree_cpu_s(t.pids) if t.pids else 0.0
    mock0 = procstat.tree_cpu_s(mock_pids)
    gen0 = _children_cpu_s()
    drops0 = procstat.listen_overflows()
    t0 = time.monotonic()
    with procstat.PeakRss(t.pids) as rss:
        res, note = run_load(sc, t, duration, work)
    wall = time.monotonic() - t0
    cpu1 = procstat.tree_cpu_s(t.pids) if t.pids else 0.0
    row.gen_cpu = (_children_cpu_s() - gen0) / wall * 100
    row.mock_cpu = (procstat.tree_cpu_s(mock_pids) - mock0) / wall * 100
    row.note = note
    drops = procstat.listen_overflows() - drops0
    if drops:
        row.note = f"{drops} accept-queue overflows; " + row.note
    if not res:
        return row
    for k, v in res.items():
        setattr(row, k, v)
    if t.pids:
        row.rss_mib = rss.peak / (1 << 20)
        if row.requests:
            row.cpu_ms = (cpu1 - cpu0) * 1e3 / row.requests
    if row.requests == 0 and not row.note:
        row.note = "no request succeeded"
    time.sleep(0.5)  # let closing connections settle before the next run
    return row


# --- report --------------------------------------------------------------------------


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def table(rows: list[Row], order: list[str]) -> str:
    head = ("| scenario | target | req/s | p50 ms | p99 ms | TTFB p50 | TTFB p99 | gap p99 "
            "| added p50 vs direct | CPU ms/req | peak RSS MiB | errors | load/mock CPU % | note |")
    out = [head, "|" + "---|" * 14]
    direct = {r.scenario: r for r in rows if r.target == "direct"}
    for name in order:
        for r in (r for r in rows if r.scenario == name):
            d = direct.get(name)
            if r.target != "direct" and d and d.p50 is not None and r.p50 is not None:
                r.added = r.p50 - d.p50
            out.append(
                f"| {r.scenario} | {r.target} | {_f(r.rps, '{:.0f}')} | {_f(r.p50)} | {_f(r.p99)} "
                f"| {_f(r.ttfb50)} | {_f(r.ttfb99)} | {_f(r.gap99)} | {_f(r.added, '{:+.2f}')} "
                f"| {_f(r.cpu_ms, '{:.3f}')} | {_f(r.rss_mib, '{:.0f}')} "
                f"| {'—' if r.errors is None else r.errors} "
                f"| {_f(r.gen_cpu, '{:.0f}')}/{_f(r.mock_cpu, '{:.0f}')} | {r.note} |"
            )
    return "\n".join(out)


_WITHOUT = ("-noledger", "-nolimits", "-bare", "-noconsole")


def component_costs(rows: list[Row], order: list[str]) -> str:
    """What a component costs in throughput, from targets run with and without it
    (`tollway1` against `tollway1-noledger`...): the i-th run of one is paired with the
    i-th of the other, and req/s are summed over the pairs. On a shared, noisy host a
    single pair can be off by more than the effect; alternate several (`--targets
    a,b,a,b,a,b`) and read the pooled figure, with the median pair beside it (one
    disturbed pair moves the pooled figure, not the median). The last column is what
    the component adds to the gateway's own CPU per request (its process tree: workers
    and a ledger process, not Postgres), the mean over the pairs: the cost where the
    gateway's CPU is what bounds throughput. Empty when no such pair ran."""
    out: list[str] = []
    for name in order:
        runs: dict[str, list[Row]] = {}
        for r in rows:
            if r.scenario == name and r.rps is not None and not r.errors:
                runs.setdefault(r.target, []).append(r)
        for variant, without in sorted(runs.items()):
            base = next((variant[:-len(x)] for x in _WITHOUT if variant.endswith(x)), None)
            if base is None:
                continue
            # `-proc` (the ledger in its own process) is paired with `-noledger` too.
            for full in (base, f"{base}-proc"):
                if full not in runs:
                    continue
                pairs = list(zip(runs[full], without, strict=False))
                with_sum = sum(a.rps or 0 for a, _ in pairs)
                without_sum = sum(b.rps or 0 for _, b in pairs)
                costs = [((a.rps or 0) / (b.rps or 1) - 1) * 100 for a, b in pairs]
                each = ", ".join(f"{c:+.1f} %" for c in costs)
                cpu = [(a.cpu_ms / b.cpu_ms - 1) * 100 for a, b in pairs if a.cpu_ms and b.cpu_ms]
                cpu_text = f"{statistics.mean(cpu):+.1f} %" if cpu else "—"
                out.append(f"| {name} | {full} vs {variant} | {len(pairs)} | {with_sum:.0f} / "
                           f"{without_sum:.0f} | {(with_sum / without_sum - 1) * 100:+.1f} % | "
                           f"{statistics.median(costs):+.1f} % | {each} | {cpu_text} |")
    if not out:
        return ""
    return "\n".join([
        "| scenario | with vs without | pairs | req/s summed, with / without | cost | median pair"
        " | each pair | gateway CPU per request |",
        "|---|---|---|---|---|---|---|---|", *out])


def environment() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    tools = []
    for tool, flag in (("nginx", "-v"), ("wrk", "-v")):
        exe = shutil.which(tool)
        if exe:
            r = subprocess.run([exe, flag], capture_output=True, text=True, check=False)
            first = (r.stdout + r.stderr).strip().splitlines()
            tools.append(first[0] if first else tool)
        else:
            tools.append(f"{tool}: missing")
    return (f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, {'; '.join(tools)}")


# --- main ----------------------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per scenario instead of 10")
    ap.add_argument("--duration", type=float, help="seconds per scenario (default 10, --quick 3)")
    ap.add_argument("--scenarios", default="", help="comma list; default all: "
                    + ",".join(s.name for s in SCENARIOS))
    ap.add_argument("--targets", default="direct,nginx,thin,tollway1,tollwayN",
                    help="also: tollway1-redis, tollway1-nolimits, tollway1-noledger, tollway1-bare,"
                    " tollway1-noconsole (no console pages),"
                    " tollway1-proc (the ledger in its own process)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for tollwayN")
    ap.add_argument("--mock-workers", type=int, default=0, help="passed to the mock as --workers")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Tollway limits.redis_url")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="wall-clock seconds after which remaining runs are skipped")
    ap.add_argument("--results", action="store_true", help="also append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    known = {s.name: s for s in SCENARIOS}
    names = [n for n in args.scenarios.split(",") if n] or list(known)
    bad = [n for n in names if n not in known]
    targets = [n for n in args.targets.split(",") if n]
    if bad:
        raise SystemExit(f"unknown scenario {bad[0]!r}; known: {', '.join(known)}")
    if "direct" not in targets:
        targets.insert(0, "direct")  # the baseline the added latency is measured against
    scenarios = [known[n] for n in names]
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not (tool == "nginx" and Path("/usr/sbin/nginx").exists()):
            print(f"note: {tool} is missing; its rows are skipped. Install: {APT_HINT}", file=sys.stderr)
    _raise_nofile()
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = dt.datetime.now()
    t_end = time.monotonic() + args.budget
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="tollway-bench-"))
    bench = Bench(args, work)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        bench.start_mock()
        for tname in targets:
            if time.monotonic() > t_end:
                rows += [Row(s.name, tname, note="skipped: over the time budget") for s in scenarios]
                continue
            print(f"[bench] starting {tname}", file=sys.stderr, flush=True)
            t = bench.start(tname)
            try:
                if not t.note:
                    warm = Scenario("warmup", "stream", "/v1/chat/completions",
                                    _chat(True, chunks=5, chunk_size=32, delay_ms=0), 8)
                    run_load(warm, t, 1.0, work)
                for sc in scenarios:
                    if time.monotonic() > t_end:
                        rows.append(Row(sc.name, tname, note="skipped: over the time budget"))
                        continue
                    print(f"[bench]   {tname} {sc.name} ({args.duration:g} s)", file=sys.stderr, flush=True)
                    rows.append(measure(sc, t, args.duration, work, bench.mock_pids))
            finally:
                bench.stop(t)
    except KeyboardInterrupt:
        interrupted = True
        print("[bench] interrupted; stopping everything started", file=sys.stderr)
    finally:
        bench.procs.stop_all()
        bench.drop_db()
        shutil.rmtree(work, ignore_errors=True)

    text = _report(rows, names, command, started, args, interrupted)
    print(text)
    out_dir = BENCH_DIR / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{started:%Y%m%d-%H%M%S}.md").open("a").write(text + "\n")
    if args.results:
        with (BENCH_DIR / "RESULTS.md").open("a") as fh:
            fh.write("\n" + text + "\n")
    return 130 if interrupted else 0


def _report(rows: list[Row], order: list[str], command: str, started: dt.datetime,
            args: argparse.Namespace, interrupted: bool) -> str:
    lines = [
        f"## {started:%Y-%m-%d %H:%M} — `{command}`",
        "",
        f"{environment()}. {args.duration:g} s per scenario; load generator, mock upstream and "
        "target share the same cores.",
        "",
        table(rows, order),
    ]
    costs = component_costs(rows, order)
    if costs:
        lines += ["", costs]
    if interrupted:
        lines += ["", "**Interrupted**: partial results."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
