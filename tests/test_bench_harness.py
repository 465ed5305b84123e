"""The load harness's own parts: wrk parsing, the stream client, the thin proxy, /proc probes.

Real servers on 127.0.0.1 port 0; no load worth the name (each test well under a second
of traffic).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import procstat, run, streamclient, thin_proxy

WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:41000/v1/chat/completions
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.90ms    1.13ms  21.36ms   82.15%
    Req/Sec    11.23k     1.02k   13.01k    70.00%
  Latency Distribution
     50%    2.70ms
     75%    3.27ms
     90%    4.07ms
     99%  750.00us
  67047 requests in 3.00s, 33.37MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  22344.43
Transfer/sec:     11.12MB
"""

SSE_PARTS = [b"data: {\"n\":%d}\n\n" % i for i in range(5)] + [b"data: [DONE]\n\n"]


def test_parse_wrk_reads_counts_percentiles_and_errors() -> None:
    w = run.parse_wrk(WRK_OUTPUT)
    assert w["requests"] == 67047
    assert w["seconds"] == 3.0
    assert w["p50"] == 2.70
    assert w["p99"] == 0.75  # microseconds converted to ms
    assert w["non2xx"] == 5
    assert w["errors"] == 5 + 3


def test_nginx_template_has_no_placeholder_left(tmp_path: Path) -> None:
    import argparse

    b = run.Bench(argparse.Namespace(mock_workers=0), tmp_path)
    b.mock_port = 40001
    text = b.nginx_conf(40002).read_text()
    assert "{{" not in text
    assert "listen 127.0.0.1:40002" in text and "server 127.0.0.1:40001" in text
    assert "proxy_buffering off;" in text and "keepalive 64;" in text


async def _upstream() -> TestServer:
    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + body[:10] + b"\n\n")
        for part in SSE_PARTS:
            await asyncio.sleep(0.002)
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def plain(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "nope"}}, status=503)

    app = web.Application()
    app.router.add_post("/stream", stream)
    app.router.add_post("/plain", plain)
    app.router.add_post("/fail", fail)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_stream_client_measures_ttfb_gaps_and_counts_errors() -> None:
    up = await _upstream()
    try:
        base = f"http://127.0.0.1:{up.port}"
        ok = await streamclient.run(base + "/stream", b"{}", [], concurrency=4, duration=0.4)
        assert ok["errors"] == 0 and int(ok["requests"]) > 4  # type: ignore[call-overload]
        lat, ttfb, gap = ok["latency_ms"], ok["ttfb_ms"], ok["gap_ms"]
        assert isinstance(lat, dict) and isinstance(ttfb, dict) and isinstance(gap, dict)
        # six paced parts after the first: the stream cannot finish faster than ~12 ms
        assert lat["p50"] >= 10.0 and ttfb["p50"] < lat["p50"]
        assert gap["p50"] is not None and gap["p50"] >= 1.0
        plain = await streamclient.run(base + "/plain", b"{}", [], concurrency=2, duration=0.2)
        assert plain["errors"] == 0 and int(plain["requests"]) > 2  # type: ignore[call-overload]
        bad = await streamclient.run(base + "/fail", b"{}", [], concurrency=2, duration=0.2)
        assert bad["requests"] == 0 and int(bad["errors"]) > 0  # type: ignore[call-overload]
        assert bad["error_kinds"] == {"http_503": bad["errors"]}
        assert "nope" in str(bad["error_sample"])
    finally:
        await up.close()


async def test_thin_proxy_passes_stream_bytes_through_unchanged() -> None:
    up = await _upstream()
    proxy = TestServer(thin_proxy.make_app(f"http://127.0.0.1:{up.port}"), host="127.0.0.1")
    await proxy.start_server()
    try:
        r1, b1 = await asyncio.to_thread(run.http_post, up.port, "/stream", b"hello-body", {})
        r2, b2 = await asyncio.to_thread(run.http_post, proxy.port, "/stream", b"hello-body", {})
        assert r1 == r2 == 200

        def dechunk(raw: bytes) -> bytes:
            out, pos = b"", 0
            while True:
                eol = raw.index(b"\r\n", pos)
                size = int(raw[pos:eol], 16)
                if size == 0:
                    return out
                out += raw[eol + 2 : eol + 2 + size]
                pos = eol + 4 + size

        assert dechunk(b2) == dechunk(b1) == b"data: hello-body\n\n" + b"".join(SSE_PARTS)
        status, _ = await asyncio.to_thread(run.http_post, proxy.port, "/fail", b"{}", {})
        assert status == 503  # upstream errors pass through
    finally:
        await proxy.close()
        await up.close()


def test_procstat_charges_children_and_tracks_rss() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass\ntime.sleep(5)"]
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and procstat.tree_cpu_s([child.pid]) < 0.25:
            time.sleep(0.05)
        assert child.pid in procstat.tree(os.getpid())
        assert procstat.tree_cpu_s([child.pid]) >= 0.25
        with procstat.PeakRss([child.pid], interval_s=0.01) as rss:
            time.sleep(0.05)
        assert rss.peak > 1 << 20
    finally:
        child.kill()
        child.wait()


def test_component_costs_pair_runs_in_order_and_pool_them() -> None:
    rows = [
        run.Row("chat_c64", "direct", rps=15000.0),
        run.Row("chat_c64", "tollway1", rps=900.0),
        run.Row("chat_c64", "tollway1-noledger", rps=1000.0),
        run.Row("chat_c64", "tollway1", rps=1100.0),
        run.Row("chat_c64", "tollway1-noledger", rps=1000.0),
        run.Row("chat_c64", "tollway1-nolimits", rps=1200.0),  # no second pair: one only
        run.Row("chat_c64", "tollway1-noledger", rps=500.0, errors=3),  # failed: left out
    ]
    text = run.component_costs(rows, ["chat_c64"])
    lines = text.splitlines()
    assert len(lines) == 4
    assert "| chat_c64 | tollway1 vs tollway1-noledger | 2 | 2000 / 2000 | +0.0 % | +0.0 % |" in text
    assert "-10.0 %, +10.0 %" in text
    assert "| tollway1 vs tollway1-nolimits | 1 | 900 / 1200 | -25.0 % | -25.0 % |" in text
    assert run.component_costs(rows[:2], ["chat_c64"]) == ""


def test_component_costs_median_pair_resists_one_disturbed_pair() -> None:
    rows = []
    for with_rps in (950.0, 960.0, 500.0):  # the third pair ran while the host was busy
        rows += [run.Row("chat_c64", "tollway1-proc", rps=with_rps),
                 run.Row("chat_c64", "tollway1-noledger", rps=1000.0)]
    text = run.component_costs(rows, ["chat_c64"])
    assert "| tollway1-proc vs tollway1-noledger | 3 | 2410 / 3000 | -19.7 % | -5.0 % |" in text
    assert text.rstrip().endswith("| — |")  # no CPU figures in these rows


def test_component_costs_give_the_gateway_cpu_per_request() -> None:
    rows = [run.Row("chat_c64", "tollway1", rps=900.0, cpu_ms=0.110),
            run.Row("chat_c64", "tollway1-noledger", rps=1000.0, cpu_ms=0.100),
            run.Row("chat_c64", "tollway1", rps=900.0, cpu_ms=0.130),
            run.Row("chat_c64", "tollway1-noledger", rps=1000.0, cpu_ms=0.100)]
    assert run.component_costs(rows, ["chat_c64"]).rstrip().endswith("| +20.0 % |")


def test_icount_measures_a_real_worker(pg_server_dsn: str) -> None:
    # --plain: the same worker and client as under callgrind, CPU from /proc instead.
    admin = pg_server_dsn.rsplit("/", 1)[0] + "/postgres"
    out = subprocess.run(
        [sys.executable, "-m", "bench.icount", "--plain", "--n", "64", "--warm", "16",
         "--conc", "4"],
        cwd=Path(run.__file__).resolve().parent.parent,
        env={**os.environ, "TOLLWAY_BENCH_PG": admin}, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    line = out.stdout.decode().strip().splitlines()[-1]
    fields = dict(f.split("=", 1) for f in line.split())
    assert fields["n"] == "64" and float(fields["cpu_ms/request"]) > 0
    assert int(fields["req/s"]) > 0
