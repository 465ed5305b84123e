"""Active health checks: probe channels whose breaker is open, close it when they answer.

Passive recovery alone (a half-open breaker lets one real request through after the
cooldown) spends a client's request on a channel that may still be down, and a channel
in a low priority tier may see no traffic to probe it at all. This background task
asks each open or half-open channel a cheap question instead (GET /models: OpenAI
channels' base URL has /v1, Anthropic's does not) and closes the breaker on a healthy
answer. A failed probe leaves the breaker as it is. It never probes closed channels,
never retries, and never touches the gateway's connection pool (its own connections
are closed after each probe). Off unless the worker starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from relay.errors import GatewayError
from relay.routing import Breaker, Channel, Router
from relay.upstream import UpstreamPool, build_request

log = logging.getLogger("tollway.health")

# An answer below 500 means the provider is up, except when it refuses us: a rejected
# credential or a rate limit means this channel cannot serve requests now.
_UNHEALTHY_4XX = frozenset({401, 403, 429})


class _Probe:
    """A Sink that only wants the status line."""

    __slots__ = ("done", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.done: asyncio.Future[None] = loop.create_future()

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.status = status

    def on_body(self, data: bytes) -> None:
        pass

    def on_done(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_fail(self, exc: GatewayError) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass


def probe_path(channel: Channel) -> bytes:
    return b"/models" if channel.protocol == "openai" else b"/v1/models"


class HealthChecker:
    """Every `interval_s`, probe each channel whose breaker is not closed, concurrently."""

    def __init__(self, get_router: Callable[[], Router], interval_s: float,
                 timeout_s: float = 5.0) -> None:
        self.get_router = get_router
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        # max_idle=0: every probe connection is closed when its answer ends.
        self.pool = UpstreamPool(timeout_s, max_idle=0)
        self.probes = 0
        self.recovered = 0
        self._task: asyncio.Task[None] | None = None

    async def probe(self, channel: Channel) -> bool:
        """One GET /models on a fresh connection: True when the channel answers healthily."""
        headers = list(channel.auth_headers)
        if channel.protocol == "anthropic":
            headers.append((b"anthropic-version", b"2023-06-01"))
        headers.extend(channel.extra_headers)
        raw = build_request(channel.origin, b"GET", probe_path(channel), headers, b"")
        sink = _Probe(asyncio.get_running_loop())
        try:
            up = await self.pool.connect(channel.origin)
        except GatewayError:
            return False
        try:
            up.send(sink, raw)
            async with asyncio.timeout(self.timeout_s):
                await sink.done
        except TimeoutError:
            return False
        finally:
            up.abort()
        return 200 <= sink.status < 500 and sink.status not in _UNHEALTHY_4XX

    async def run_once(self) -> dict[str, bool]:
        router = self.get_router()
        due = [c for c in router.channels if c.breaker.state != Breaker.CLOSED]
        if not due:
            return {}
        results = await asyncio.gather(*(self.probe(c) for c in due))
        now = router.clock()
        for c, ok in zip(due, results, strict=True):
            self.probes += 1
            if ok and c.breaker.state != Breaker.CLOSED:
                c.breaker.reset(now)
                self.recovered += 1
        return {c.name: ok for c, ok in zip(due, results, strict=True)}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe bug must not end the checks
                log.exception("health check round failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Capture(_Probe):
    """A Sink keeping the status and the first bytes of the answer (for the operator's
    channel test; never stored or logged)."""

    __slots__ = ("head",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.head = b""

    def on_body(self, data: bytes) -> None:
        if len(self.head) < 300:
            self.head += bytes(data[: 300 - len(self.head)])


async def test_request(channel: Channel, model: str, timeout_s: float = 20.0) -> dict[str, object]:
    """One smallest real request to `channel` (a one-token chat, on a fresh connection):
    the status, the time to the whole answer, and the answer's first bytes. The operator's
    "test" button; it goes around the router, its breaker and the ledger."""
    import time

    import orjson

    upstream_model = channel.model_map.get(model, model)
    headers = [*channel.auth_headers, (b"content-type", b"application/json")]
    if channel.protocol == "anthropic":
        headers.append((b"anthropic-version", b"2023-06-01"))
        path = b"/v1/messages"
    else:
        path = b"/chat/completions"
    headers.extend(channel.extra_headers)
    body = orjson.dumps({"model": upstream_model, "max_tokens": 1,
                         "messages": [{"role": "user", "content": "ping"}]})
    raw = build_request(channel.origin, b"POST", path, headers, body)
    pool = UpstreamPool(timeout_s, max_idle=0)
    sink = _Capture(asyncio.get_running_loop())
    started = time.perf_counter()
    try:
        up = await pool.connect(channel.origin)
    except GatewayError as exc:
        return {"status": 0, "latency_ms": round((time.perf_counter() - started) * 1000),
                "model": upstream_model, "detail": exc.message}
    try:
        up.send(sink, raw)
        async with asyncio.timeout(timeout_s):
            await sink.done
    except TimeoutError:
        return {"status": 0, "latency_ms": round((time.perf_counter() - started) * 1000),
                "model": upstream_model, "detail": f"no answer within {timeout_s:g} s"}
    finally:
        up.abort()
    return {"status": sink.status, "latency_ms": round((time.perf_counter() - started) * 1000),
            "model": upstream_model, "detail": sink.head.decode("utf-8", "replace")}
