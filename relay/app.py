"""Composition of one worker: the route table, the request handler, and its components.

`Gateway` owns the upstream pool, the router, the key cache, the price book, the
limiter, the ledger and the metrics, and runs each model request from admission to
settlement (`_model_request`). Limiter and ledger are optional so the benchmark can
measure what each costs; production wiring (relay.server) always sets both.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import orjson

from accounting import usage as usage_mod
from accounting.pricing import cost_nano, estimate_max_cost
from accounting.records import ROW_FORMAT, Usage
from relay import errors as E
from relay.auth import Groups, KeyCache
from relay.authguard import AuthGuard
from relay.checkpoints import OutputMeter, StreamCheckpoints
from relay.config import Config
from relay.errors import ANTHROPIC, OPENAI, GatewayError
from relay.httpserver import HttpConnection, Request
from relay.proxy import (
    _CLIENT_GONE,
    JSON_CT,
    NONSTREAM,
    TAP,
    WITHHOLD,
    Exchange,
    inject_include_usage,
    max_output_tokens,
    upstream_headers,
)
from relay.requestids import first_id
from relay.routing import Breaker, Channel, Router
from relay.sse import SSEFramer
from relay.sse import fields as sse_fields
from relay.translated import TranslatingExchange, build_body, count_tokens_locally, plan_for
from relay.upstream import UpstreamPool, build_request

log = logging.getLogger("tollway.relay")
_RID_OK = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_NO_USAGE = Usage()  # read only: the counts of a row with no usage
_ONE = Fraction(1)  # immutable; building one per request cost 0.3 us twice


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # "chat" | "completions" | "responses" | "embeddings" | "messages" | "count_tokens"
    protocol: int  # OPENAI | ANTHROPIC
    protocol_name: str
    upstream_path: bytes  # appended to the channel's base URL path
    streamable: bool
    inject_usage: bool  # OpenAI chat/completions: ask for the usage chunk
    tap_factory: Callable[[], Any] | None

    def new_tap(self) -> Any:
        return self.tap_factory() if self.tap_factory is not None else None


def _routes() -> dict[bytes, Route]:
    chat = Route("chat", OPENAI, "openai", b"/chat/completions", True, True,
                 usage_mod.OpenAIChatStreamTap)
    comp = Route("completions", OPENAI, "openai", b"/completions", True, True,
                 usage_mod.OpenAIChatStreamTap)
    resp = Route("responses", OPENAI, "openai", b"/responses", True, False,
                 usage_mod.ResponsesStreamTap)
    emb = Route("embeddings", OPENAI, "openai", b"/embeddings", False, False, None)
    msgs = Route("messages", ANTHROPIC, "anthropic", b"/v1/messages", True, False,
                 usage_mod.AnthropicStreamTap)
    count = Route("count_tokens", ANTHROPIC, "anthropic", b"/v1/messages/count_tokens", False,
                  False, None)
    table = {
        b"/v1/chat/completions": chat,
        b"/v1/completions": comp,
        b"/v1/responses": resp,
        b"/v1/embeddings": emb,
        b"/v1/messages": msgs,
        b"/v1/messages/count_tokens": count,
    }
    # Clients configured with a base URL lacking /v1 (OpenAI style) reach the same routes.
    for path, route in list(table.items()):
        if route.protocol == OPENAI:
            table[path[3:]] = route
    return table


ROUTES = _routes()


class Gateway:
    def __init__(self, cfg: Config, *, limiter: Any = None, ledger: Any = None,
                 metrics: Any = None, pricebook: Any = None) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.pool = UpstreamPool(cfg.upstream.connect_timeout_s, cfg.upstream.pool_size)
        self.router = Router(cfg.channels, breaker=breaker_factory(cfg),
                             prefer_native=cfg.upstream.prefer_native)
        self.keys = KeyCache()
        self.groups = Groups()
        self.limiter = limiter
        self.ledger = ledger
        # A crash mid-stream still bills what was emitted (relay.checkpoints).
        self.checkpoints = StreamCheckpoints(ledger, self.loop) if ledger is not None else None
        self.metrics = metrics
        self.pricebook = pricebook
        self.db: Any = None  # asyncpg pool, set by the worker
        self.apis: list[Any] = []  # relay.webapi.Api instances for the non-model routes
        # Rate-limit header names for Anthropic routes (limits.admission.anthropic_headers).
        self.anthropic_headers: Callable[[Any], Any] = lambda h: h
        self._rid_prefix = "req_" + os.urandom(6).hex()
        self._rid_n = 0
        self.in_flight = 0
        up = cfg.upstream
        self._timeouts = (up.first_byte_timeout_s, up.idle_timeout_s, up.total_timeout_s)
        self._reasoning = up.reasoning_models
        self._reasoning_cache: dict[str, bool] = {}
        self._default_out = cfg.limits.default_max_output_tokens
        self._charge_zero_aborts = cfg.ledger.charge_zero_output_aborts
        self._trust_rid = cfg.server.trust_client_request_id
        self._log_ip = cfg.server.log_client_ip
        self._fallbacks = dict(cfg.fallbacks)
        self.authguard = AuthGuard(cfg.limits.auth_failures_per_minute)

    # --- dispatch -----------------------------------------------------------------

    async def handle(self, req: Request, conn: HttpConnection) -> None:
        route = ROUTES.get(req.path)
        if route is not None:
            if req.method != b"POST":
                self._reply_error(conn, E.MethodNotAllowed(f"Use POST for {req.path.decode()}"),
                                  route.protocol, self._new_rid(req))
                return
            await self._model_request(req, conn, route)
            return
        path = req.path
        if path == b"/healthz":
            conn.send(200, [JSON_CT], b'{"status":"ok"}')
        elif path == b"/readyz":
            await self._readyz(conn)
        elif path == b"/metrics" and self.metrics is not None:
            self.metrics.serve(req, conn)
        elif path in (b"/v1/models", b"/models") or path.startswith((b"/v1/models/", b"/models/")):
            await self._models(req, conn)
        else:
            for api in self.apis:
                if api.matches(path):
                    await api.dispatch(req, conn, self._new_rid(req))
                    return
            proto = ANTHROPIC if path.startswith(b"/v1/messages") else OPENAI
            self._reply_error(conn, E.NotFound(f"No route for {req.method.decode()} {path.decode('latin-1')}"),
                              proto, self._new_rid(req))

    def _new_rid(self, req: Request) -> bytes:
        self._rid_n += 1
        rid = f"{self._rid_prefix}{self._rid_n:x}"
        req.request_id = rid
        if self._trust_rid:
            client = req.header(b"x-request-id")
            if client is not None and _RID_OK.fullmatch(client):
                return client
        return rid.encode()

    def _reply_error(self, conn: HttpConnection, exc: GatewayError, protocol: int,
                     rid: bytes) -> None:
        headers = [JSON_CT, (b"x-request-id", rid)]
        if protocol == ANTHROPIC:
            headers.append((b"request-id", rid))  # the name Anthropic's SDK reads
        if exc.retry_after and not any(k == b"retry-after" for k, _ in exc.headers):
            headers.append((b"retry-after", b"%d" % max(1, int(exc.retry_after + 0.999))))
        headers.extend(exc.headers)
        body = getattr(exc, "upstream_body", None) or E.render(exc, protocol)
        conn.send(exc.status, headers, body)

    async def _readyz(self, conn: HttpConnection) -> None:
        ok = False
        if self.db is not None:
            try:
                async with asyncio.timeout(2):
                    ok = await self.db.fetchval("SELECT 1") == 1
            except Exception:
                ok = False
        if ok:
            conn.send(200, [JSON_CT], b'{"status":"ready"}')
        else:
            conn.send(503, [JSON_CT], b'{"status":"unavailable","reason":"database unreachable"}')

    # --- auth and scope -------------------------------------------------------------

    async def _authenticate(self, req: Request) -> Any:  # a limits.keys.KeyState
        return await self.authguard.key(self.keys, req)

    def model_allowed(self, key: Any, model: str) -> bool:
        if key.models is not None and model not in key.models:
            if not any(fnmatch.fnmatchcase(model, p) for p in key.models):
                return False
        patterns = self.groups.models.get(key.group, ("*",))
        if patterns == ("*",):
            return True
        return any(p == model or fnmatch.fnmatchcase(model, p) for p in patterns)

    async def _models(self, req: Request, conn: HttpConnection) -> None:
        rid = self._new_rid(req)
        proto = ANTHROPIC if req.header(b"anthropic-version") is not None else OPENAI
        if req.method != b"GET":
            self._reply_error(conn, E.MethodNotAllowed("Use GET for the model list"), proto, rid)
            return
        try:
            key = await self._authenticate(req)
        except GatewayError as exc:
            self._reply_error(conn, exc, proto, rid)
            return
        listed = {m for m, _ in self.router.listed_models()}
        if self.pricebook is not None:
            listed.update(m for m in self.pricebook.models() if m != "default"
                          and self.router.known_model(m))
        names = sorted(m for m in listed if self.model_allowed(key, m) and self._priced(m))
        if key.models is not None:
            names = sorted(set(names) | {m for m in key.models if "*" not in m
                                          and self.router.known_model(m) and self._priced(m)})
        path = req.path
        one = None
        if path.count(b"/") >= (3 if path.startswith(b"/v1/") else 2) and not path.endswith(b"/models"):
            one = path.rsplit(b"/", 1)[1].decode("utf-8", "replace")
        if proto == ANTHROPIC:
            items: list[dict[str, Any]] = [{"type": "model", "id": m, "display_name": m,
                      "created_at": "2025-01-01T00:00:00Z"} for m in names]
        else:
            items = [{"id": m, "object": "model", "created": 0, "owned_by": "tollway"}
                     for m in names]
        headers = [JSON_CT, (b"x-request-id", rid)]
        if one is not None:
            for it in items:
                if it["id"] == one:
                    conn.send(200, headers, orjson.dumps(it))
                    return
            if self.router.known_model(one) and self.model_allowed(key, one) and self._priced(one):
                # Served through a channel pattern (e.g. "gpt-*"): usable, so retrievable.
                item: dict[str, Any] = (
                    {"type": "model", "id": one, "display_name": one, "created_at": "2025-01-01T00:00:00Z"}
                    if proto == ANTHROPIC else
                    {"id": one, "object": "model", "created": 0, "owned_by": "tollway"})
                conn.send(200, headers, orjson.dumps(item))
                return
            self._reply_error(conn, E.ModelNotFound(f"The model '{one}' does not exist or is not available to this key"), proto, rid)
            return
        if proto == ANTHROPIC:
            body = {"data": items, "has_more": False,
                    "first_id": items[0]["id"] if items else None,
                    "last_id": items[-1]["id"] if items else None}
        else:
            body = {"object": "list", "data": items}
        conn.send(200, headers, orjson.dumps(body))

    def _priced(self, model: str) -> bool:
        """A model without a price is refused (404), so it is not listed either."""
        if self.pricebook is None:
            return True
        try:
            self.pricebook.lookup(model)
        except LookupError:
            return False
        return True

    # --- the model request ------------------------------------------------------------

    async def _model_request(self, req: Request, conn: HttpConnection, route: Route) -> None:
        loop = self.loop
        t0 = loop.time()
        ts = time.time()
        rid_out = self._new_rid(req)
        protocol = route.protocol
        lease = None
        key = None
        body: dict[str, Any] | None = None
        model = ""
        stream = False
        ex: Exchange | None = None
        channel: Channel | None = None
        upstream_model = ""
        price = None
        multiplier = _ONE
        attempts = 0
        tried: list[str] = []
        error: GatewayError | None = None
        self.in_flight += 1
        try:
            key = await self._authenticate(req)
            try:
                body = orjson.loads(req.body)
            except orjson.JSONDecodeError as exc:
                raise E.InvalidRequest(f"Malformed JSON body: {exc}")
            if type(body) is not dict:
                raise E.InvalidRequest("The request body must be a JSON object")
            m = body.get("model")
            if type(m) is not str or not m:
                raise E.InvalidRequest("Missing required field: model (a string)")
            if len(m) > 256 or not m.isprintable():
                raise E.InvalidRequest("Invalid model name: at most 256 printable characters")
            model = m
            stream = body.get("stream") is True and route.streamable
            channels = self.router.candidates(model, False, protocol, route.name == "responses")
            if not channels:
                if not self.router.known_model(model):
                    raise E.ModelNotFound(f"The model '{model}' does not exist")
                if not any(self.router.candidates(fb, last_resort=False)
                           for fb in self._fallbacks.get(model, ())):
                    raise E.NoChannel(f"Every channel serving '{model}' is unhealthy or at capacity; retry shortly",
                                      retry_after=1)
            allowed = self.model_allowed(key, model)
            if self.pricebook is not None and route.name != "count_tokens":
                try:
                    price = self.pricebook.lookup(model)
                except LookupError as exc:
                    raise E.ModelNotFound(str(exc))
                multiplier = self.groups.multiplier.get(key.group, _ONE)
            if self.limiter is not None:
                lease = await self._admit(key, model, body, req, price, multiplier, allowed)
            elif not allowed:
                raise E.ModelNotAllowed(f"This key may not use the model '{model}'")

            mode = NONSTREAM
            if stream:
                asked = False
                if route.inject_usage:
                    so = body.get("stream_options")
                    asked = type(so) is dict and so.get("include_usage") is True
                mode = TAP if (asked or not route.inject_usage) else WITHHOLD
            fb_timeout, idle_timeout, total_timeout = self._timeouts
            if self._is_reasoning(model):
                fb_timeout = self.cfg.upstream.first_byte_timeout_reasoning_s
            max_attempts = max(1, self.cfg.upstream.max_attempts)
            deadline = t0 + self.cfg.upstream.retry_deadline_s
            answered = model  # the model whose channel answers (a fallback may)
            failed: set[str] = set()
            for cand_model, ch in self._attempt_plan(model, channels, route):
                if attempts >= max_attempts or ch.name in failed:
                    continue
                plan = None
                if ch.protocol_id != protocol or (route.name == "responses" and ch.chat_only):
                    plan = plan_for(route.name, ch.protocol, ch.chat_only)
                    if plan is None:
                        if route.name == "count_tokens":
                            conn.send(200, [JSON_CT, (b"x-request-id", rid_out)],
                                      count_tokens_locally(body))
                            return
                        continue  # this route cannot be expressed in the channel's protocol
                if attempts and loop.time() >= deadline:
                    break
                if attempts:
                    # Jittered exponential backoff between attempts on different channels.
                    await asyncio.sleep(min(0.05 * (2 ** (attempts - 1)), 1.0) * random.random())
                attempts += 1
                channel = ch
                tried.append(channel.name)
                upstream_model = channel.upstream_model(cand_model)
                headers_out: list[tuple[bytes, bytes]] = [(b"x-request-id", rid_out)]
                if protocol == ANTHROPIC:
                    headers_out.append((b"request-id", rid_out))
                if lease is not None:
                    lh = lease.headers
                    if lh:
                        headers_out.extend(self.anthropic_headers(lh) if protocol == ANTHROPIC else lh)
                if plan is None:
                    payload = self._upstream_body(req.body, body, model, upstream_model, mode)
                    ex = Exchange(self, conn, route, mode, headers_out)
                    path = route.upstream_path + _query(req)
                else:
                    payload = build_body(plan, body, upstream_model, stream)
                    ex = TranslatingExchange(self, conn, route, stream, headers_out, plan,
                                             cand_model, body)
                    path = plan.upstream_path
                conn.on_disconnect = ex.client_gone
                if stream and self.checkpoints is not None:
                    self.checkpoints.add(req.request_id, self._checkpoint_fn(
                        req, route, key, body, model, cand_model, ex, channel, upstream_model,
                        price, multiplier, lease, t0, ts, attempts, tried))
                raw = build_request(channel.origin, b"POST", path,
                                    upstream_headers(req, channel, translated=plan is not None),
                                    payload)
                channel.in_flight += 1
                try:
                    await self._send(ex, channel, raw, fb_timeout, idle_timeout, total_timeout)
                finally:
                    channel.in_flight -= 1
                fault = not ex.started and not ex.aborted and _retryable(ex)
                channel.breaker.record(not fault, loop.time())
                answered = cand_model
                if ex.started or ex.aborted or not fault:
                    break
                failed.add(channel.name)
            if answered != model and self.pricebook is not None and ex is not None and ex.started:
                # The fallback model answered: it is billed at its own price.
                try:
                    price = self.pricebook.lookup(answered)
                except LookupError:
                    pass
            if ex is None:
                raise E.ModelNotFound(f"The model '{model}' is not available on {req.path.decode()}")
            if not ex.started and not ex.aborted:
                raise ex.error or E.UpstreamError("Upstream failed")
            # Started: a mid-stream failure (or None). Aborted: the client left.
            error = ex.error
        except GatewayError as exc:
            error = exc
            if not conn.response_started and not conn.closed:
                self._reply_error(conn, exc, protocol, rid_out)
        except asyncio.CancelledError:
            error = _CLIENT_GONE
            if ex is not None:
                ex.client_gone()
            raise
        finally:
            self.in_flight -= 1
            if self.checkpoints is not None:
                self.checkpoints.discard(req.request_id)  # the settled row supersedes
            self._settle(req, route, key, body, model, stream, ex, channel, upstream_model,
                         price, multiplier, lease, error, t0, ts, attempts, tried)

    def _attempt_plan(self, model: str, channels: list[Channel],
                      route: Route) -> Iterator[tuple[str, Channel]]:
        """The requested model's channels, then each configured fallback model's."""
        for c in channels:
            yield model, c
        for fb in self._fallbacks.get(model, ()):
            for c in self.router.candidates(fb, False, route.protocol, route.name == "responses"):
                yield fb, c

    async def _send(self, ex: Exchange, channel: Channel, raw: bytes, fb: float, idle: float,
                    total: float) -> None:
        for _fresh in (False, True):
            try:
                up = await (self.pool.connect(channel.origin) if _fresh
                            else self.pool.acquire(channel.origin))
            except GatewayError as exc:
                ex.error = exc
                return
            if ex.aborted:
                up.abort()
                return
            ex.upstream = up
            ex.error = None
            up.send(ex, raw)
            ex.arm(fb, idle, total)
            await ex.done
            # A pooled connection the upstream had already closed fails with nothing
            # received: the request never reached it, so one fresh connection is safe.
            if (ex.error is not None and not ex.started and not ex.aborted and up.reused
                    and up.bytes_in == 0 and isinstance(ex.error, E.UpstreamError)):
                ex.done = self.loop.create_future()
                continue
            return

    async def _admit(self, key: Any, model: str, body: dict[str, Any], req: Request, price: Any,
                     multiplier: Fraction, allowed: bool) -> Any:
        # Upper bound of input tokens: a token is at least one byte of the body.
        est_in = len(req.body)
        max_out = max_output_tokens(body) or self._default_out
        reserve = 0
        if price is not None:
            reserve = estimate_max_cost(est_in, max_out, price, multiplier)
        limiter = self.limiter
        for _ in range(3):
            decision = limiter.admit(key, model, est_in // 4 + max_out, reserve, req.client_ip,
                                     allowed, time.time())
            if decision is None:
                await limiter.refill(key)
                continue
            if hasattr(decision, "release"):
                return decision
            exc = E.from_code(decision.code, decision.message, decision.status,
                              retry_after=decision.retry_after, headers=decision.headers)
            raise exc
        raise E.RateLimited("Rate limit state unavailable, retry shortly", retry_after=1)

    def _is_reasoning(self, model: str) -> bool:
        # Pattern matching per request showed in profiles; a model's class never changes.
        hit = self._reasoning_cache.get(model)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(model, p) for p in self._reasoning)
            if len(self._reasoning_cache) < 10_000:  # bounded: model names come from clients
                self._reasoning_cache[model] = hit
        return hit

    @staticmethod
    def _upstream_body(raw: bytes, body: dict[str, Any], model: str, upstream_model: str,
                       mode: int) -> bytes:
        if upstream_model == model:
            if mode == WITHHOLD:
                if "stream_options" in body:
                    merged = dict(body)
                    so = dict(body["stream_options"]) if type(body["stream_options"]) is dict else {}
                    so["include_usage"] = True
                    merged["stream_options"] = so
                    return orjson.dumps(merged)
                return inject_include_usage(raw)
            return raw
        # A mapped model name needs a rewrite; the rest of the body is kept as sent.
        new = dict(body)
        new["model"] = upstream_model
        if mode == WITHHOLD:
            so = dict(body["stream_options"]) if type(body.get("stream_options")) is dict else {}
            so["include_usage"] = True
            new["stream_options"] = so
        return orjson.dumps(new)

    # --- settlement ----------------------------------------------------------------

    def _settle(self, req: Request, route: Route, key: Any, body: dict[str, Any] | None,
                model: str, stream: bool, ex: Exchange | None, channel: Channel | None,
                upstream_model: str, price: Any, multiplier: Fraction, lease: Any,
                error: GatewayError | None, t0: float, ts: float, attempts: int,
                tried: list[str]) -> None:
        now = self.loop.time()
        usage = None
        source = "none"
        cost = 0
        status = error.status if error is not None and (ex is None or not ex.started) else 200
        if ex is not None and ex.started:
            status = ex.status
        billable = ex is not None and ex.started and ex.status < 400 and route.name != "count_tokens"
        if billable and ex is not None and ex.aborted and ex.bytes_out == 0 and not self._charge_zero_aborts:
            billable = False
        if billable and ex is not None:
            try:
                usage, source = self._usage(ex, route, body, stream)
            except Exception:
                # An estimate over a body we could not read must not lose the row: the
                # output side is still counted, the input side is taken as zero.
                log.exception("usage estimate failed; recording output only")
                usage, source = Usage(output=max(1, ex.bytes_out // 4)), "estimated"
            if price is not None and usage is not None:
                cost = cost_nano(usage, price, multiplier)
        if lease is not None:
            lease.release(cost, usage.total() if usage is not None else 0)
        if self.metrics is not None:
            self.metrics.request(route, status, stream, now - t0,
                                 (ex.first_byte - t0) if ex is not None and ex.first_byte else -1.0,
                                 model, usage, cost)
        if key is None or self.ledger is None:
            return
        code = ""
        if error is not None:
            code = error.openai_code
        u = usage if usage is not None else _NO_USAGE
        # The flat row (accounting.records.UsageRow, field order fixed there): building
        # a UsageRecord here cost more than the rest of the ledger's hot path.
        self.ledger.record((
            ROW_FORMAT, req.request_id, ts, key.user_id, key.id, key.group, model,
            upstream_model, channel.name if channel is not None else "", route.protocol_name,
            route.name, stream, status, code, u.input, u.output, u.cache_read, u.cache_write,
            u.reasoning, source, cost, price.version if price is not None else 0,
            int((now - t0) * 1000),
            int((ex.first_byte - t0) * 1000) if ex is not None and ex.first_byte else 0,
            attempts, ",".join(tried), _client_rid(req),
            req.client_ip if self._log_ip else "",
            # The lease knows whether the plan or the balance paid (plan first, then balance).
            lease.plan_id if lease is not None else key.plan_id,
            _fraction_str(multiplier), *_ids(ex),
        ))

    def _checkpoint_fn(self, req: Request, route: Route, key: Any, body: dict[str, Any] | None,
                       model: str, answering: str, ex: Exchange, channel: Channel,
                       upstream_model: str, price: Any, multiplier: Fraction, lease: Any,
                       t0: float, ts: float, attempts: int,
                       tried: list[str]) -> Callable[[], tuple[Any, ...] | None]:
        """The row `_settle` would record if this stream ended now (relay.checkpoints):
        None until it has emitted output, and while it emits nothing new. Same layout,
        request id and admission time as `_settle`'s row, so the settled row supersedes
        it and a replay lands it once; usage_source "interrupted"."""
        if answering != model and self.pricebook is not None:
            try:
                price = self.pricebook.lookup(answering)  # a fallback is billed at its price
            except LookupError:
                pass
        # A translated stream's text is counted in the upstream's events (its body_chunks).
        plan = ex.plan if isinstance(ex, TranslatingExchange) else None
        meter: OutputMeter | None = None  # made at the first tick: most streams end before
        seen = [0, -1]  # bytes_out at the last call; the input estimate, once needed

        def row() -> tuple[Any, ...] | None:
            nonlocal meter
            if not ex.started or ex.status >= 400 or ex.bytes_out == seen[0]:
                return None
            seen[0] = ex.bytes_out
            if meter is None:
                meter = (OutputMeter(route.protocol_name, route.name) if plan is None else
                         OutputMeter(plan.upstream_protocol,
                                     "messages" if plan.upstream_protocol == "anthropic" else "chat"))
            out = meter.count_chunks(ex.body_chunks, ex.bytes_out)
            reported: Usage | None
            if plan is not None:
                mapper = ex.stream_mapper  # type: ignore[attr-defined]
                reported = getattr(mapper.m, "usage", None) if mapper is not None else None
            else:
                reported = ex.tap.usage if ex.tap is not None else None
            if out <= 0:
                return None  # no output yet: nothing is owed (invariant 4)
            if reported is not None:
                out = max(out, reported.output)
            if reported is not None and reported.input:
                u = Usage(input=reported.input, output=out, cache_read=reported.cache_read,
                          cache_write=reported.cache_write, reasoning=reported.reasoning)
            else:
                if seen[1] < 0:
                    from accounting import tokens
                    seen[1] = tokens.estimate_input_tokens(route.protocol_name, body or {})
                u = Usage(input=seen[1], output=out)
            cost = cost_nano(u, price, multiplier) if price is not None else 0
            if lease is not None and 0 < lease.reserve < cost:
                cost = lease.reserve  # an estimate never bills past what admission reserved
            now = self.loop.time()
            return (
                ROW_FORMAT, req.request_id, ts, key.user_id, key.id, key.group, model,
                upstream_model, channel.name, route.protocol_name, route.name, True, ex.status,
                "", u.input, u.output, u.cache_read, u.cache_write, u.reasoning, "interrupted",
                cost, price.version if price is not None else 0, int((now - t0) * 1000),
                int((ex.first_byte - t0) * 1000) if ex.first_byte else 0, attempts,
                ",".join(tried), _client_rid(req), req.client_ip if self._log_ip else "",
                lease.plan_id if lease is not None else key.plan_id, _fraction_str(multiplier),
                *_ids(ex),
            )

        return row

    def _usage(self, ex: Exchange, route: Route, body: dict[str, Any] | None,
               stream: bool) -> tuple[Usage | None, str]:
        from accounting import tokens

        if isinstance(ex, TranslatingExchange):
            u, src = ex.usage()
            if u is not None:
                return u, src
            est_in = tokens.estimate_input_tokens(route.protocol_name, body or {})
            return Usage(input=est_in, output=tokens.count_text(ex.emitted_text())), "estimated"
        completed = ex.error is None
        if not stream:
            if completed:
                try:
                    obj = orjson.loads(b"".join(ex.body_chunks))
                except orjson.JSONDecodeError:
                    obj = None
                if type(obj) is dict:
                    u = (usage_mod.from_anthropic_body(obj) if route.protocol == ANTHROPIC
                         else usage_mod.from_openai_body(obj))
                    if u is not None:
                        return u, "upstream"
            text = ""
        else:
            tap_usage = ex.tap.usage if ex.tap is not None else None
            if completed and tap_usage is not None:
                return tap_usage, "upstream"
            events = []
            framer = SSEFramer()
            for chunk in ex.body_chunks:
                events.extend(framer.feed(chunk))
            payloads = [sse_fields(b)[1] for b in events]
            text = usage_mod.text_from_events(route.protocol_name, route.name, payloads)
            if tap_usage is not None and route.protocol == ANTHROPIC:
                # message_start told us the input side exactly; only output is estimated.
                return Usage(input=tap_usage.input, cache_read=tap_usage.cache_read,
                             cache_write=tap_usage.cache_write,
                             output=max(tap_usage.output, tokens.count_text(text))), "estimated"
        est_in = tokens.estimate_input_tokens(route.protocol_name, body or {})
        return Usage(input=est_in, output=tokens.count_text(text)), "estimated"


def breaker_factory(cfg: Config) -> Callable[[], Breaker]:
    up = cfg.upstream

    def make() -> Breaker:
        return Breaker(window_s=up.breaker_window_s, min_requests=up.breaker_min_requests,
                       threshold=up.breaker_error_rate, cooldown=up.breaker_cooldown_s)

    return make


def _fraction_str(f: Fraction) -> str:
    # A group's multiplier is one object until the groups reload: remember its text
    # (Fraction's numerator/denominator are Python properties, slow per request).
    if f is _last_fraction[0]:
        return _last_fraction[1]
    text = str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    _last_fraction[:] = [f, text]
    return text


_last_fraction: list[Any] = [_ONE, "1"]


def _query(req: Request) -> bytes:
    return b"?" + req.query if req.query else b""


def _ids(ex: Exchange | None) -> tuple[str, str]:
    """The row's upstream request id and response id (relay.requestids)."""
    if ex is None:
        return "", ""
    up = ex.upstream_rid[:128].decode("latin-1") if ex.upstream_rid else ""
    if not ex.started:
        return up, ""
    return up, ex.response_id or (first_id(ex.body_chunks) if ex.status < 400 else "")


def _client_rid(req: Request) -> str:
    v = req.header(b"x-request-id")
    if v is not None and _RID_OK.fullmatch(v):
        return v.decode()
    return ""


def _retryable(ex: Exchange) -> bool:
    err = ex.error
    if err is None:
        return False
    if ex.upstream_status:
        return ex.upstream_status == 429 or ex.upstream_status >= 500
    return isinstance(err, E.UpstreamError | E.UpstreamTimeout)
