"""Streaming load generator: N keep-alive connections posting one body in a loop.

It records, per request, the time to the first body byte (TTFB), the total
latency, and the gaps between body reads (what a user sees as stutter), and
prints one JSON summary on stdout. It speaks just enough HTTP/1.1 for the
targets under test (Content-Length or chunked replies, keep-alive) on raw
asyncio protocols, with no per-chunk parsing beyond the chunked framing, so the
generator stays cheaper than the proxies it measures. It must not judge bodies
beyond the status code: correctness belongs to the tests, not to load.

    python -m bench.streamclient --url http://127.0.0.1:8080/v1/chat/completions \
        --body-file body.json --header 'authorization: Bearer k' -c 64 -d 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

_now = time.perf_counter


class _Conn(asyncio.Protocol):
    """One connection; one request in flight at a time; parses the reply incrementally."""

    __slots__ = (
        "_buf", "_chunked", "_closed", "_done", "_first", "_last", "_left", "_state", "_wants_close",
        "err_body", "gaps", "status", "transport",
    )

    def __init__(self, gaps: list[float]) -> None:
        self.gaps = gaps
        self.transport: asyncio.Transport | None = None
        self._closed = False
        self._wants_close = False
        self._done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("connection closed mid-reply"))

    def start(self, request: bytes) -> asyncio.Future[None]:
        self._buf = b""
        self._state = 0  # 0 head, 1 sized body, 2 chunk size line, 3 chunk data, 4 trailer
        self._left = 0
        self._first = 0.0
        self._last = 0.0
        self.status = 0
        self.err_body = b""
        self._done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self._done

    def _body_seen(self) -> None:
        t = _now()
        if self._first == 0.0:
            self._first = t
        else:
            self.gaps.append(t - self._last)
        self._last = t

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if self._state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            head = buf[:end].lower()
            self.status = int(head[9:12])
            self._chunked = b"transfer-encoding: chunked" in head
            self._wants_close = b"connection: close" in head
            if self._chunked:
                self._state = 2
            else:
                i = head.find(b"content-length:")
                if i < 0:
                    self._fail("reply without length")
                    return
                eol = head.find(b"\r\n", i)
                self._left = int(head[i + 15 : eol if eol > 0 else None])
                self._state = 1
            buf = buf[end + 4 :]
            if not buf:
                self._buf = b""
                if self._state == 1 and self._left == 0:
                    self._finish()
                return
        self._body_seen()
        self._buf = b""
        if self.status >= 300 and len(self.err_body) < 300:
            self.err_body += buf[:300]  # kept only for the summary's sample of an error reply
        if self._state == 1:
            self._left -= len(buf)
            if self._left <= 0:
                self._finish()
            return
        # chunked framing: only the size lines are read, the data is skipped by length
        pos, n = 0, len(buf)
        while pos < n:
            if self._state == 3:
                take = min(self._left, n - pos)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = 2
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                self._buf = buf[pos:]
                return
            if self._state == 4:
                if eol == pos:  # blank line ends the trailer
                    self._finish()
                    return
                pos = eol + 2
                continue
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                self._state = 4
            else:
                self._left = size + 2  # data plus its CRLF
                self._state = 3

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _fail(self, why: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    @property
    def ttfb(self) -> float:
        return self._first

    @property
    def reusable(self) -> bool:
        return not self._closed and not self._wants_close and not self._buf


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, int(q * len(values)))] * 1000.0


async def _worker(
    host: str, port: int, request: bytes, deadline: float, ok: list[int],
    ttfb: list[float], lat: list[float], gaps: list[float], errors: dict[str, int],
    sample: list[str], ramp: float,
) -> None:
    loop = asyncio.get_running_loop()
    conn: _Conn | None = None
    # Open connections over a short ramp, not in one burst: a thousand simultaneous SYNs
    # overflow the accept queue and measure the kernel's retransmit timer instead of the target.
    await asyncio.sleep(ramp)
    while _now() < deadline:
        try:
            if conn is None or not conn.reusable:
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                _, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: _Conn(gaps), host, port), 10.0
                )
            t0 = _now()
            await conn.start(request)
            t1 = _now()
            if 200 <= conn.status < 300:
                ok[0] += 1
                lat.append(t1 - t0)
                if conn.ttfb:
                    ttfb.append(conn.ttfb - t0)
            else:
                key = f"http_{conn.status}"
                errors[key] = errors.get(key, 0) + 1
                if not sample:
                    sample.append(conn.err_body[:300].decode(errors="replace"))
        except asyncio.CancelledError:
            raise
        except (TimeoutError, OSError, ConnectionError, ValueError) as exc:
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            conn = None
            await asyncio.sleep(0.05)  # do not spin on a refusing target
    if conn is not None and conn.transport is not None:
        conn.transport.close()


async def run(
    url: str, body: bytes, headers: list[tuple[str, str]], concurrency: int, duration: float,
    grace: float = 5.0,
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {path} HTTP/1.1", f"host: {host}:{port}", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    ttfb: list[float] = []
    lat: list[float] = []
    gaps: list[float] = []
    errors: dict[str, int] = {}
    ok_box = [0]
    sample: list[str] = []
    start = _now()
    deadline = start + duration
    tasks = [
        asyncio.create_task(_worker(host, port, request, deadline, ok_box, ttfb, lat, gaps, errors, sample,
                                   ramp=min(1.0, duration / 5) * i / concurrency))
        for i in range(concurrency)
    ]
    # Requests still running at the deadline get a grace period, then are cut and not counted.
    _, pending = await asyncio.wait(tasks, timeout=duration + grace)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)
    elapsed = _now() - start
    ok = ok_box[0]
    return {
        "requests": ok,
        "elapsed_s": round(elapsed, 3),
        "rps": ok / duration,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "cut": len(pending),
        "error_sample": sample[0] if sample else "",
        "latency_ms": {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)},
        "ttfb_ms": {"p50": _pct(ttfb, 0.5), "p99": _pct(ttfb, 0.99)},
        "gap_ms": {"p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99), "max": _pct(gaps, 1.0)},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--body-file", required=True)
    ap.add_argument("--header", action="append", default=[], help="'name: value', repeatable")
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    ap.add_argument("--grace", type=float, default=5.0)
    args = ap.parse_args(argv)
    with open(args.body_file, "rb") as fh:
        body = fh.read()
    headers: list[tuple[str, str]] = []
    for h in args.header:
        name, _, value = h.partition(":")
        headers.append((name.strip(), value.strip()))
    if not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("content-type", "application/json"))
    coro = run(args.url, body, headers, args.concurrency, args.duration, args.grace)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
