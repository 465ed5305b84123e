"""deploy/ and deploy/OPERATIONS.md against the code they describe.

Parses the compose stack, the Prometheus scrape config and alert rules, the Grafana
dashboard, the systemd unit and the Containerfile, and checks that they agree with
the gateway: every metric an alert or a panel reads is one a real worker exposes (with
the labels it filters on), every setting the docs name exists, and every hostname the
compose config points at is a compose service. With promtool installed, the rules
and the dashboard's queries are also compiled and the alert unit tests run.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay import config as C
from tests.children import stop
from tests.gateway import Harness

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TARGET_LABELS = {"instance", "job", "le"}  # added by Prometheus or part of histograms
FLUSHER_STOP_TIMEOUT_S = 30  # relay.worker.Worker.stop: flusher.stop(timeout=30)


def load_yaml(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml("alerts.yml")["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def all_exprs() -> list[str]:
    return [r["expr"] for r in alert_rules()] + dashboard_exprs()


SELECTOR = re.compile(r"\b(tollway_[a-z0-9_]+)(\{[^}]*\})?")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


# --- compose -----------------------------------------------------------------------------


def test_compose_stack_shape() -> None:
    compose = load_yaml("compose.yaml")
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:18")
    assert "/var/lib/postgresql" in services["postgres"]["volumes"][0]
    assert services["redis"]["image"].startswith("redis:7")
    gateways = [n for n in services if n.startswith("gateway")]
    assert len(gateways) == 2
    data_volumes = set()
    for name in gateways:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Containerfile"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["command"] == ["--workers", "auto"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts["/etc/tollway/config.toml"] == "./config.compose.toml"
        data_volumes.add(mounts["/var/lib/tollway"])  # the journal must persist
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace > C.ServerConfig().drain_grace_s + FLUSHER_STOP_TIMEOUT_S
        assert svc["environment"]["PGPASSWORD"] and svc["environment"]["TOLLWAY_ADMIN_TOKEN"]
    assert len(data_volumes) == 2, "each gateway needs its own journal volume"
    assert data_volumes <= set(compose["volumes"])
    mock = services["mock"]["entrypoint"]
    assert mock[:3] == ["python", "-m", "bench.mock_upstream"] and "0.0.0.0" in mock
    assert services["lb"]["ports"] == ["8080:8080"]
    prom_mounts = " ".join(services["prometheus"]["volumes"])
    assert "./prometheus.yml:" in prom_mounts and "./alerts.yml:" in prom_mounts


def test_compose_config_points_at_compose_services() -> None:
    compose = load_yaml("compose.yaml")
    services = set(compose["services"])
    cfg = C.load(DEPLOY / "config.compose.toml")
    assert cfg.server.host == "0.0.0.0"
    assert str(cfg.data_dir) == "/var/lib/tollway"
    dsn = urlsplit(cfg.database.dsn)
    assert dsn.hostname in services and dsn.password is None  # the password comes from PGPASSWORD
    assert urlsplit(cfg.limits.redis_url).hostname in services
    from limits.admission import check_workers

    assert check_workers(cfg.limits, 64) is None
    for ch in cfg.channels:
        assert urlsplit(ch.base_url).hostname in services
        assert ch.api_key_env in compose["x-gateway"]["environment"]
    assert cfg.admin.token_env in compose["x-gateway"]["environment"]
    assert not cfg.demo.mock_upstream  # the mock is its own service
    # Postgres must admit every worker's pool on every gateway plus the CLI.
    pg_cmd = compose["services"]["postgres"]["command"]
    max_conn = int(next(a for a in pg_cmd if a.startswith("max_connections=")).split("=")[1])
    assert max_conn >= 2 * 32 * cfg.database.pool_max + 20

    upstreams = re.findall(r"^\s*server\s+([a-z0-9_-]+):(\d+)", (DEPLOY / "nginx.conf").read_text(), re.M)
    assert {h for h, _ in upstreams} == {n for n in services if n.startswith("gateway")}
    assert {int(p) for _, p in upstreams} == {cfg.server.port}
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_buffering off" in nginx  # streams must not wait in the proxy


def test_container_config_is_valid() -> None:
    cfg = C.load(DEPLOY / "config.container.toml")
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    assert str(cfg.data_dir) == "/var/lib/tollway"


# --- Prometheus ----------------------------------------------------------------------------


def test_prometheus_scrapes_every_gateway() -> None:
    prom = load_yaml("prometheus.yml")
    assert prom["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "tollway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    gateways = {n for n in load_yaml("compose.yaml")["services"] if n.startswith("gateway")}
    port = C.load(DEPLOY / "config.compose.toml").server.port
    assert targets == {f"{g}:{port}" for g in gateways}


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    text = " ".join(r["expr"] for r in rules)
    for needed in ('status_class="5xx"', "tollway_request_duration_seconds_bucket",
                   "tollway_time_to_first_byte_seconds_bucket", "tollway_ledger_pending_rows",
                   "tollway_ledger_journal_bytes", "tollway_ledger_flush_failures_total",
                   "tollway_channel_up", 'up{job="tollway"}'):
        assert needed in text, needed


# --- Grafana -------------------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 39 and d["uid"] and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
    text = json.dumps(d)
    for family in ("tollway_requests_total", "tollway_request_duration_seconds_bucket",
                   "tollway_time_to_first_byte_seconds_bucket", "tollway_tokens_total",
                   "tollway_spend_usd_total", "tollway_in_flight_requests",
                   "tollway_ledger_pending_rows", "tollway_ledger_journal_bytes",
                   "tollway_limit_denials_total", "tollway_channel_up"):
        assert family in text, family


# --- the metrics the gateway really exposes --------------------------------------------------


async def test_every_referenced_metric_is_exposed(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn)
    try:
        _, _, secret = await h.user_and_key(rpm=1)
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(2):  # the second is over the key's RPM: a limit denial
                async with s.post(h.url + "/v1/chat/completions", data=body, headers=headers) as r:
                    statuses.append(r.status)
                    await r.read()
            assert statuses == [200, 429]
            await h.flush()
            async with s.get(h.url + "/metrics") as r:
                assert r.status == 200
                exposition = await r.text()
    finally:
        await h.stop()

    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    assert "tollway_limit_denials_total" in exposed and "tollway_spend_usd_total" in exposed

    for expr in all_exprs():
        for name, braces in SELECTOR.findall(expr):
            assert name in exposed, f"{name} (in {expr!r}) is not exposed by the gateway"
            for label in MATCHER_LABEL.findall(braces or ""):
                assert label in exposed[name] | TARGET_LABELS, f"{name} has no label {label!r}"
        names = SELECTOR.findall(expr)
        labels = set().union(*(exposed[n] for n, _ in names)) | TARGET_LABELS
        for group in GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels, f"grouping by {label!r} in {expr!r}: no such label"


# --- systemd and the image ------------------------------------------------------------------


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "tollway.service")
    svc = unit["Service"]
    assert svc["ExecStart"].endswith("tollway serve --config /etc/tollway/config.toml")
    assert svc["User"] == "tollway" and svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM" and svc["KillMode"] == "mixed"
    stop_s = int(svc["TimeoutStopSec"])
    assert stop_s > C.ServerConfig().drain_grace_s + FLUSHER_STOP_TIMEOUT_S
    assert int(svc["LimitNOFILE"]) >= 65536
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "true"),
                       ("PrivateTmp", "true"), ("ReadWritePaths", "/var/lib/tollway")):
        assert svc[key] == value, key
    assert svc["EnvironmentFile"] == "/etc/tollway/tollway.env"


def test_systemd_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at a stand-in.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "tollway"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        unit = Path(tmp) / "tollway.service"
        unit.write_text((DEPLOY / "tollway.service").read_text().replace("/opt/tollway/bin/tollway", str(exe)))
        out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert "Unknown key" not in out.stderr and "Unknown section" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr


def test_containerfile() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 8080" in lines
    assert any(ln.startswith("HEALTHCHECK") for ln in lines) and "/healthz" in text
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    assert entry == ["tollway", "serve", "--config", "/etc/tollway/config.toml", "--host", "0.0.0.0"]
    assert "RUN pip install ." in text
    # Every top-level package the wheel ships is copied into the build.
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY ")}
    assert packages <= copied, packages - copied
    for src in copied:
        assert (ROOT / src).exists(), src


# --- docs -------------------------------------------------------------------------------------


SECTIONS = {f.name: f.type for f in dataclasses.fields(C.Config)}


def test_docs_name_only_real_settings() -> None:
    text = (ROOT / "deploy" / "OPERATIONS.md").read_text()
    classes = {
        "server": C.ServerConfig, "database": C.DatabaseConfig, "upstream": C.UpstreamConfig,
        "ledger": C.LedgerConfig, "limits": C.LimitsConfig, "metrics": C.MetricsConfig,
        "admin": C.AdminConfig, "demo": C.DemoConfig, "channels": C.ChannelConfig,
    }
    named = re.findall(r"\b(server|database|upstream|ledger|limits|metrics|admin|demo|channels)\.([a-z_]+)\b", text)
    assert len(named) >= 10
    for section, key in named:
        known = {f.name for f in dataclasses.fields(classes[section])}
        assert key in known, f"deploy/OPERATIONS.md names {section}.{key}, which does not exist"


# --- promtool (when installed) ---------------------------------------------------------------


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return exe


def test_promtool_checks_rules_config_and_unit_tests() -> None:
    exe = _promtool()
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        out = subprocess.run([exe, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_compiles_dashboard_queries(tmp_path: Path) -> None:
    exe = _promtool()
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    f = tmp_path / "dashboard-queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([exe, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- nginx in front of a real gateway (when nginx is installed) --------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def _nginx_conf(tmp: Path, gateway_port: int, port: int) -> Path:
    """deploy/nginx.conf with the compose gateways replaced by one local gateway."""
    conf = (DEPLOY / "nginx.conf").read_text()
    conf = re.sub(r"gateway\d+:8080", f"127.0.0.1:{gateway_port}", conf)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/tmp/", f"{tmp}/")
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


async def test_nginx_config_streams_through_and_hides_metrics(pg_dsn: str, tmp_path: Path) -> None:
    import asyncio

    nginx = _nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed")
    h = await Harness().start(pg_dsn)
    proc = None
    try:
        assert h.worker is not None
        port = _free_port()
        conf = _nginx_conf(tmp_path, h.worker.port, port)
        proc = await asyncio.create_subprocess_exec(
            nginx, "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
            "-g", "daemon off;", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        _, _, secret = await h.user_and_key()
        body = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}],
                             "mock": {"chunks": 4, "delay_ms": 150}})
        headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(base + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("nginx did not come up")
            async with s.post(base + "/v1/chat/completions", data=body, headers=headers) as r:
                assert r.status == 200
                loop = asyncio.get_running_loop()
                arrivals = []
                async for chunk in r.content.iter_any():
                    if b"data:" in chunk:
                        arrivals.append(loop.time())
                    last = chunk
            assert b"[DONE]" in last
            # Unbuffered: the events arrive spread over the stream, not all at its end.
            assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] >= 0.3
            async with s.get(base + "/metrics") as r:
                assert r.status == 404
            async with s.get(h.url + "/metrics") as r:
                assert r.status == 200
    finally:
        if proc is not None:
            await stop(proc, signal.SIGTERM)
        await h.stop()
