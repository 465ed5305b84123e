"""Instructions per request of one gateway worker, which the machine's load does not change.

CPU ms per request from `bench.run` moves by ±10 % between runs on two shared cores,
more than the differences worth measuring on the request path. This counts the
instructions the worker executes instead: `tollway serve` (one worker, in-process
limits, ledger to Postgres, the bundled mock upstream) runs under valgrind's
callgrind with collection off; a client on loopback sends `--warm` requests, then
collection is switched on (`callgrind_control -i on`) for `--n` more requests at
`--conc` connections, then off. The worker's idle background (pollers, the flusher,
the limiter's syncs) is measured for `--idle` seconds first and subtracted at its
rate over the load's wall time, so what is left is the requests' own cost.

Run it in a checkout of each commit to compare (a worktree each), alternately:

    apt-get install -y valgrind
    .venv/bin/python -m bench.icount --scenario chat --conc 64
    .venv/bin/python -m bench.icount --scenario stream --conc 64

`--plain` runs the worker without valgrind and reports CPU ms per request from
/proc (the worker's threads), for a wall-clock figure from the same client.
Everything binds 127.0.0.1, is bounded in count, and is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import run as B


def _total(path: str) -> int:
    """The instruction total of one callgrind dump."""
    total = 0
    with open(path) as fh:
        for line in fh:
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def _request(scenario: str, key: str) -> bytes:
    stream = scenario == "stream"
    body = json.dumps(B._chat(stream, chunks=20, chunk_size=32, delay_ms=0) if stream
                      else B._chat(False, delay_ms=0)).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (B._hdrs(20, 0) if stream else ()))
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def _one(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> None:
    w.write(request)
    status = await r.readline()
    if b" 200 " not in status:
        raise SystemExit(f"the gateway answered {status!r}")
    length, chunked = -1, False
    while True:
        line = await r.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length >= 0:
        await r.readexactly(length)
    elif chunked:
        while True:
            size = int((await r.readline()).strip().split(b";")[0], 16)
            await r.readexactly(size + 2)
            if size == 0:
                break


async def _load(port: int, request: bytes, n: int, conc: int) -> int:
    per = max(1, n // conc)

    async def connection() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(per):
            await _one(r, w, request)
        w.close()

    await asyncio.gather(*(connection() for _ in range(conc)))
    return per * conc


def _thread_ticks(pid: int) -> int:
    ticks = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=("chat", "stream"), default="chat")
    ap.add_argument("--n", type=int, default=1280, help="requests measured")
    ap.add_argument("--warm", type=int, default=640, help="requests before measuring")
    ap.add_argument("--conc", type=int, default=64, help="connections")
    ap.add_argument("--idle", type=float, default=8.0, help="seconds of idle measured")
    ap.add_argument("--plain", action="store_true", help="no valgrind: CPU ms per request")
    args = ap.parse_args(argv)
    if not args.plain and shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install -y valgrind", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="tollway-icount-"))
    bench = B.Bench(argparse.Namespace(mock_workers=0, redis_url="", workers=1), work)
    try:
        bench.start_mock()
        t = B.Target("tollway1")
        t.port = B.free_port()
        argv_or_note = bench.tollway_argv(t, 1, redis=False)
        if isinstance(argv_or_note, str):
            print(argv_or_note, file=sys.stderr)
            return 2
        out = work / "callgrind.out"
        cmd = argv_or_note if args.plain else [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}.%p", *argv_or_note]
        p = bench.procs.spawn(cmd, work / "gateway.log")
        err = B.wait_ready(p, t.port, {"authorization": f"Bearer {t.key}"}, work / "gateway.log",
                           timeout=300)
        if err:
            print(f"the gateway did not start: {err}", file=sys.stderr)
            return 1
        request = _request(args.scenario, t.key)
        asyncio.run(_load(t.port, request, args.warm, args.conc))
        time.sleep(1)
        if args.plain:
            before, t0 = _thread_ticks(p.pid), time.time()
            n = asyncio.run(_load(t.port, request, args.n, args.conc))
            wall = time.time() - t0
            ms = (_thread_ticks(p.pid) - before) * 1000 / os.sysconf("SC_CLK_TCK") / n
            print(f"scenario={args.scenario} conc={args.conc} n={n} cpu_ms/request={ms:.4f} "
                  f"req/s={n / wall:.0f}")
            return 0

        def ctl(*what: str) -> None:
            subprocess.run(["callgrind_control", *what, str(p.pid)], check=True,
                           capture_output=True, timeout=60)

        def last_dump() -> str:
            files = glob.glob(f"{out}.{p.pid}.*")
            return max(files, key=lambda f: int(f.rsplit(".", 1)[1]))

        ctl("-z")
        ctl("-i", "on")
        t0 = time.time()
        time.sleep(args.idle)
        ctl("-i", "off")
        idle_wall = time.time() - t0
        ctl("-d")
        time.sleep(0.5)
        idle_rate = _total(last_dump()) / idle_wall
        ctl("-i", "on")
        t0 = time.time()
        n = asyncio.run(_load(t.port, request, args.n, args.conc))
        ctl("-i", "off")
        wall = time.time() - t0
        ctl("-d")
        time.sleep(0.5)
        total = _total(last_dump())
        print(f"scenario={args.scenario} conc={args.conc} n={n} "
              f"instructions/request={(total - idle_rate * wall) / n:,.0f} "
              f"(raw {total / n:,.0f}, idle {idle_rate:,.0f}/s over {wall:.1f} s)")
        return 0
    finally:
        bench.procs.stop_all()
        bench.drop_db()


if __name__ == "__main__":
    raise SystemExit(main())
