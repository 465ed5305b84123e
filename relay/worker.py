"""One worker's life: build the gateway's components, serve, keep caches fresh, drain.

The background sync runs every `SYNC_INTERVAL` seconds off the request path: keys,
groups and prices whose version moved, and the balances of users and keys that
changed, which it hands to the limiter as snapshots. Snapshots and the flusher's
`on_flushed` deltas are applied in the same event loop, one after the other, and a
snapshot is only applied when no flush committed while it was being read, so the
limiter's view of each balance is exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import logging
import os
import socket
import time
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from accounting import plans, pricing, store, tokens
from accounting.db import create_pool
from accounting.ledger import Ledger, open_ledger
from accounting.ledgerd import LedgerLink
from accounting.money import parse_multiplier
from limits.admission import Limiter, anthropic_headers
from limits.namespace import redis_prefix
from relay import errors as E
from relay.app import Gateway, breaker_factory
from relay.clientaddr import TrustedProxies
from relay.config import ChannelConfig, Config
from relay.healthcheck import HealthChecker
from relay.httpserver import ServerState, drain, make_factory
from relay.metrics import Metrics, ledger_families
from relay.routing import Router, channel_state

log = logging.getLogger("tollway.worker")
SYNC_INTERVAL = 0.5
# Modules exposing `build(gateway, worker) -> relay.webapi.Api` for the non-model routes.
API_MODULES = ("relay.admin", "relay.keyapi", "relay.console")

_BY_STATUS: dict[int, type[E.GatewayError]] = {
    400: E.InvalidRequest, 404: E.NotFound, 405: E.MethodNotAllowed, 408: E.InvalidRequest,
    413: E.RequestTooLarge, 431: E.InvalidRequest, 500: E.GatewayError,
}


class Worker:
    def __init__(self, cfg: Config, dsn: str, index: int = 0, *,
                 with_limits: bool = True, with_ledger: bool = True,
                 with_console: bool = True) -> None:
        self.cfg = cfg
        self.dsn = dsn
        self.index = index
        self.with_limits = with_limits
        self.with_ledger = with_ledger
        self.with_console = with_console
        self.gw: Gateway | None = None
        self.limiter: Limiter | None = None
        self.ledger: Ledger | None = None
        self.state: ServerState | None = None
        self.server: asyncio.base_events.Server | None = None
        self.flusher: Any = None
        self.health: HealthChecker | None = None
        self.db: Any = None
        self._sync_task: asyncio.Task[None] | None = None
        self._flush_epoch = 0
        self._flush_open = False  # the ledger process began a batch not yet reported
        self.link: LedgerLink | None = None
        self._link_down = False
        self._user_version = 0
        self._group_version = 0
        self._price_version = 0
        self._channel_version = 0
        self.port = 0

    async def start(self, sock: socket.socket | None = None) -> None:
        cfg = self.cfg
        tokens.load()
        self.db = db = await create_pool(self.dsn, cfg.database.pool_min, cfg.database.pool_max)
        pricebook = pricing.PriceBook()
        limiter = None
        if self.with_limits:
            prefix = await redis_prefix(db) if cfg.limits.redis_url else "tollway:"
            limiter = Limiter(cfg.limits, workers=cfg.server.workers, loader=self._load_budget,
                              plan_loader=plans.loader(db, time.time), redis_prefix=prefix)
            await limiter.start()
        ledger = None
        if self.with_ledger:
            journal_dir = cfg.ledger.journal_dir or str(cfg.data_dir / "journal")
            # The journal's file name must be unique per process life: a restarted
            # worker must find its predecessor's segments dead (unlocked) and replay them.
            ledger, self.flusher = open_ledger(cfg.ledger, journal_dir, self.dsn,
                                               on_flushed=self._on_flushed,
                                               keep=not cfg.ledger.process)
            self.flusher.on_plans_flushed = self._on_plans_flushed
            self.flusher.start()
            if cfg.ledger.process:
                # The ledger process (accounting.ledgerd) flushes this journal; this
                # flusher only takes rows the journal could not write.
                assert ledger.journal is not None
                self.link = LedgerLink(journal_dir, ledger.journal.name,
                                       self._on_flush_begin, self._on_flush_done)
                self.link.connect()
        metrics = None
        if cfg.metrics.enabled:
            metrics = Metrics(cfg.data_dir / "metrics", cfg.metrics.token)
        # The worker keeps the concrete limiter and ledger (the gateway sees only their
        # seams, relay.seams): it feeds them what the flushers and snapshots learn.
        self.limiter = limiter
        self.ledger = ledger
        gw = self.gw = Gateway(cfg, limiter=limiter, ledger=ledger, metrics=metrics,
                               pricebook=pricebook)
        gw.db = db
        gw.keys.pool = db
        if limiter is not None:
            gw.anthropic_headers = anthropic_headers
        for module in API_MODULES:
            if module == "relay.console" and not self.with_console:
                continue
            if importlib.util.find_spec(module) is not None:
                gw.apis.append(importlib.import_module(module).build(gw, self))
        await self._sync_once()
        if metrics is not None:
            names = [m for m, _ in gw.router.listed_models()] + pricebook.models()
            metrics.known_models(names)
            metrics.state = self._state_metrics
        self.state = ServerState(
            gw.handle,
            max_body=cfg.server.max_body_bytes,
            max_header=cfg.server.max_header_bytes,
            header_timeout=cfg.server.header_timeout_s,
            keepalive_timeout=cfg.server.keepalive_timeout_s,
            error_body=self._error_body,
            proxies=TrustedProxies(cfg.server.trusted_proxies) if cfg.server.trusted_proxies else None,
        )
        loop = asyncio.get_running_loop()
        if sock is None:
            from relay.server import bind_socket

            sock = bind_socket(cfg.server.host, cfg.server.port, reuse_port=True)
        self.server = await loop.create_server(make_factory(self.state), sock=sock, backlog=4096)
        self.port = sock.getsockname()[1]
        self._sync_task = loop.create_task(self._sync_loop(), name="sync")
        if cfg.upstream.health_check_interval_s > 0:
            self.health = HealthChecker(lambda: gw.router, cfg.upstream.health_check_interval_s,
                                        cfg.upstream.health_check_timeout_s)
            self.health.start()

    def _error_body(self, status: int, message: str,
                    req: Any) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """Errors raised while parsing HTTP, before any route ran, in the route's shape."""
        exc = _BY_STATUS.get(status, E.InvalidRequest)(message, status=status)
        proto = E.OPENAI
        headers = [(b"content-type", b"application/json")]
        if req is not None:
            if req.path.startswith(b"/v1/messages"):
                proto = E.ANTHROPIC
            if self.gw is not None:
                headers.append((b"x-request-id", self.gw._new_rid(req)))
        return E.render(exc, proto), headers

    async def stop(self) -> None:
        """Drain: stop accepting, let in-flight finish within the grace, flush, close."""
        if self.server is not None:
            self.server.close()
        if self.state is not None:
            await drain(self.state, self.cfg.server.drain_grace_s)
        if self.gw is not None:
            for api in self.gw.apis:  # background tasks of the non-model routes (console)
                aclose = getattr(api, "aclose", None)
                if aclose is not None:
                    await aclose()
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except asyncio.CancelledError:
                pass
        if self.health is not None:
            await self.health.stop()
        if self.flusher is not None:
            await self.flusher.stop(timeout=30)
        if self.link is not None:
            self.link.close()
        if self.gw is not None:
            self.gw.pool.close()
            if self.limiter is not None:
                await self.limiter.close()
            if self.gw.metrics is not None and self.gw.metrics.snapshot_dir is not None:
                (self.gw.metrics.snapshot_dir / f"{os.getpid()}.json").unlink(missing_ok=True)
        if self.db is not None:
            await self.db.close()

    # --- background sync -------------------------------------------------------------

    def _on_flushed(self, user_deltas: dict[int, int], key_deltas: dict[int, int]) -> None:
        self._flush_epoch += 1
        if self.limiter is not None:
            self.limiter.on_flushed(user_deltas, key_deltas)

    def _on_flush_begin(self) -> None:
        self._flush_open = True
        self._flush_epoch += 1

    def _on_flush_done(self, msg: dict[str, Any]) -> None:
        self._flush_open = False
        self._flush_epoch += 1
        try:
            users = {int(i): int(d) for i, d in msg["u"].items()}
            keys = {int(i): int(d) for i, d in msg["k"].items()}
            subs = {int(i): int(d) for i, d in msg["p"].items()}
            at = float(msg["at"])
            segment, offset = int(msg["s"]), int(msg["o"])
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("ledger process sent a malformed commit report: %r", msg)
            return
        if self.limiter is not None and (users or keys or subs):
            self.limiter.on_flushed(users, keys, at, subs)
        journal = self.ledger.journal if self.ledger is not None else None
        if journal is not None:
            journal.committed_through(segment, offset)

    def _on_plans_flushed(self, deltas: dict[int, int]) -> None:
        # Runs just before _on_flushed, which bumps the flush epoch for both.
        if self.limiter is not None:
            self.limiter.on_plan_flushed(deltas)

    async def _load_budget(self, user_id: int, key_id: int) -> tuple[int, int]:
        row = await self.db.fetchrow(
            "SELECT u.balance_nano, k.spent_nano FROM keys k JOIN users u ON u.id = k.user_id"
            " WHERE k.id = $1", key_id)
        if row is None:
            bal = await self.db.fetchval("SELECT balance_nano FROM users WHERE id = $1", user_id)
            return int(bal or 0), 0
        return int(row[0]), int(row[1])

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await self._sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Postgres away: keep serving from the caches
                log.warning("cache sync failed: %s", exc)
            if self.gw is not None and self.gw.metrics is not None:
                try:
                    self.gw.metrics.write_snapshot()
                except OSError as exc:
                    log.warning("metrics snapshot failed: %s", exc)

    async def _sync_once(self) -> None:
        gw = self.gw
        assert gw is not None
        db = self.db
        await gw.keys.refresh(db)
        rows = await db.fetch(
            "SELECT name, multiplier, models, fit_output, version FROM groups WHERE version > $1",
            self._group_version)
        for r in rows:
            try:
                mult = parse_multiplier(r["multiplier"])
            except ValueError:
                log.warning("group %s has an invalid multiplier %r; using 1", r["name"], r["multiplier"])
                mult = Fraction(1)
            gw.groups.set(r["name"], mult, tuple(r["models"]), r["fit_output"])
            self._group_version = max(self._group_version, r["version"])
        changed, cursor = await store.fetch_channels(db, self._channel_version)
        if changed or self._channel_version == 0:
            self._channel_version = cursor
            self._reload_channels(await store.list_channels(db))
        prices = await pricing.load_since(db, self._price_version)
        if prices:
            gw.pricebook.apply(prices)
            self._price_version = max(p.version for p in prices)
        limiter = self.limiter
        if limiter is None:
            return
        link = self.link
        if link is not None:
            if not link.connect():
                if not self._link_down:
                    log.warning("ledger process not reachable; budget snapshots wait for it")
                self._link_down = True
                return
            self._link_down = False
            link.drain()
            if self._flush_open:
                return  # a batch is being committed: its report comes first
        epoch = self._flush_epoch
        async with db.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            users = await conn.fetch(
                "SELECT id, balance_nano, version FROM users WHERE version > $1",
                self._user_version)
            keys = await conn.fetch(
                "SELECT id, spent_nano FROM keys WHERE id = ANY($1::bigint[])",
                list(limiter.keys))
            budgets = await plans.budgets(conn, list(limiter.plans), datetime.now(UTC))
        if link is not None:
            link.drain()  # a batch announced before this snapshot's reply is seen now
        if epoch != self._flush_epoch or self._flush_open:
            return  # a flush committed meanwhile: this snapshot may predate it; next round
        for r in users:
            limiter.apply_user_snapshot(r["id"], r["balance_nano"])
            self._user_version = max(self._user_version, r["version"])
        for r in keys:
            limiter.apply_key_snapshot(r["id"], r["spent_nano"])
        for sub_id, remaining in budgets.items():
            limiter.apply_plan_snapshot(sub_id, remaining)

    def _reload_channels(self, rows: list[Any]) -> None:
        """Channels live in Postgres (config ones synced at start, admin ones added at run
        time); the router is rebuilt when any changed, keeping breakers of unchanged ones."""
        gw = self.gw
        assert gw is not None
        configured = {c.name: c for c in self.cfg.channels}
        specs = []
        for r in rows:
            if not r.enabled:
                continue
            base = configured.get(r.name)
            spec = ChannelConfig(
                name=r.name, protocol=r.protocol, base_url=r.base_url, api_key_env=r.api_key_env,
                models=tuple(r.models), model_map=tuple(r.model_map.items()),
                headers=tuple(r.headers.items()), priority=r.priority, weight=r.weight,
                max_concurrency=r.max_concurrency,
                responses_api=base.responses_api if base is not None else True,
            )
            if base is not None:
                # File-only settings (not in the channels table) come from config.toml.
                spec = dataclasses.replace(spec, forward_headers=base.forward_headers,
                                           anthropic_beta=base.anthropic_beta)
            specs.append(spec)
        old = {c.name: c for c in gw.router.channels}
        router = Router(specs, breaker=breaker_factory(self.cfg),
                        prefer_native=self.cfg.upstream.prefer_native)
        for c in router.channels:
            prev = old.get(c.name)
            if prev is not None and prev.cfg == c.cfg:
                c.breaker = prev.breaker
        gw.router = router

    def _state_metrics(self) -> dict[str, tuple[str, str, str, str, dict[str, float]]]:
        """This worker's ledger, limits and channel state, merged across workers at scrape."""
        gw = self.gw
        assert gw is not None
        out: dict[str, tuple[str, str, str, str, dict[str, float]]] = {
            "tollway_in_flight_requests": ("gauge", "Model requests in flight", "", "sum",
                                           {"": gw.in_flight}),
            "tollway_channel_up": ("gauge", "1 when every worker's breaker for the channel is closed",
                                   "channel", "min",
                                   {c.name: 1 if c.breaker.state == 0 else 0 for c in gw.router.channels}),
        }
        if self.flusher is not None:
            out.update(ledger_families(self.flusher.stats()))
        if gw.checkpoints is not None:
            out["tollway_stream_checkpoints"] = (
                "counter", "Checkpoints of streams in flight journaled (billed only after a crash)",
                "", "sum", {"": gw.checkpoints.written})
            out["tollway_stream_checkpoint_failures"] = (
                "counter", "Stream checkpoints that could not be built (a bug: see the log)",
                "", "sum", {"": gw.checkpoints.failures})
        out.update(channel_state(gw.router))
        if self.limiter is not None:
            out["tollway_limit_denials"] = ("counter", "Admission denials by reason", "reason", "sum",
                                            dict(self.limiter.denials))
            out["tollway_limit_leases_in_flight"] = ("gauge", "Admission leases not yet released",
                                                     "", "sum", {"": self.limiter.inflight})
        return out
