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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from accounting import usage as usage_mod
from relay import admission, settle
from relay import errors as E
from relay.auth import Groups, KeyCache
from relay.authguard import AuthGuard
from relay.call import ONE, ModelCall
from relay.checkpoints import StreamCheckpoints
from relay.config import Config
from relay.credit import OutputCredit
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
    upstream_headers,
)
from relay.request import parse as parse_request
from relay.routing import Breaker, Channel, Router
from relay.seams import Ledger, Limiter
from relay.translated import (
    TranslatingExchange,
    count_tokens_locally,
    plan_for,
)
from relay.upstream import UpstreamPool, build_request

log = logging.getLogger("tollway.relay")


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
    def __init__(self, cfg: Config, *, limiter: Limiter | None = None,
                 ledger: Ledger | None = None, metrics: Any = None,
                 pricebook: Any = None) -> None:
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
        self._reasoning_first_byte = up.first_byte_timeout_reasoning_s
        self._max_attempts = max(1, up.max_attempts)
        self._retry_deadline = up.retry_deadline_s
        self._reasoning = up.reasoning_models
        self._reasoning_cache: dict[str, bool] = {}
        # What relay.admission and relay.settle read of the configuration.
        self.default_out = cfg.limits.default_max_output_tokens
        self.max_out_by_model = {m: p.max_output_tokens for m, p in cfg.prices if p.max_output_tokens}
        self.counting = asyncio.Semaphore(2)  # tight input counts at once (relay.request)
        self.charge_zero_aborts = cfg.ledger.charge_zero_output_aborts
        self._trust_rid = cfg.server.trust_client_request_id
        self.log_ip = cfg.server.log_client_ip
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
            if client is not None and settle.RID_OK.fullmatch(client):
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
        """The request's steps: authenticate, parse (relay.request), route and price,
        bound the bodies and admit (relay.admission), the attempts over channels, then
        settlement (relay.settle), which runs whatever happened."""
        loop = self.loop
        rid_out = self._new_rid(req)
        call = ModelCall(req, route, loop.time(), time.time(), rid_out)
        protocol = route.protocol
        self.in_flight += 1
        try:
            key = self.authguard.known_key(self.keys, req)
            if key is None:
                key = await self._authenticate(req)
            call.key = key
            mr = call.mr = parse_request(req.body, route.name, route.streamable)
            model = call.model = mr.model
            stream = call.stream = mr.stream
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
                    call.price = self.pricebook.lookup(model)
                except LookupError as exc:
                    raise E.ModelNotFound(str(exc))
                call.multiplier = self.groups.multiplier.get(key.group, ONE)
            attempt_plan = self._attempt_plan(model, channels, route)
            sent, bodies, max_out, max_in = admission.bounded_bodies(
                self, req.body, mr, route, attempt_plan)
            if self.limiter is not None:
                try:
                    got = admission.admit_now(self, call, max_in, max_out, allowed)
                    if isinstance(got, admission.Pending):
                        got = await admission.admit(self, call, sent, max_in, max_out, allowed, got)
                    call.lease = got
                except E.InsufficientQuota:
                    fitted = await admission.fit_output(self, call, sent, attempt_plan, max_in)
                    if fitted is None:
                        raise
                    mr, (sent, bodies, max_out, max_in) = fitted
                    call.mr = mr
                    call.lease = await admission.admit(self, call, sent, max_in, max_out, allowed)
            elif not allowed:
                raise E.ModelNotAllowed(f"This key may not use the model '{model}'")
            body = mr.body
            lease = call.lease

            mode = NONSTREAM
            if stream:
                mode = TAP if (mr.include_usage or not route.inject_usage) else WITHHOLD
            fb_timeout, idle_timeout, total_timeout = self._timeouts
            if self.is_reasoning(model):
                fb_timeout = self._reasoning_first_byte
            max_attempts = self._max_attempts
            deadline = call.t0 + self._retry_deadline
            answered = model  # the model whose channel answers (a fallback may)
            failed: set[str] = set()
            ex: Exchange | None = None
            for cand_model, ch in attempt_plan:
                if call.attempts >= max_attempts or ch.name in failed:
                    continue
                plan = None
                if ch.protocol_id != protocol or (route.name == "responses" and ch.chat_only):
                    plan = plan_for(route.name, ch.protocol, ch.chat_only)
                    translated = bodies.get(plan) if plan is not None else None
                    if translated is None:
                        if route.name == "count_tokens":
                            conn.send(200, [JSON_CT, (b"x-request-id", rid_out)],
                                      count_tokens_locally(body))
                            return
                        continue  # this route cannot be expressed in the channel's protocol
                if call.attempts and loop.time() >= deadline:
                    break
                if call.attempts:
                    # Jittered exponential backoff between attempts on different channels.
                    await asyncio.sleep(min(0.05 * (2 ** (call.attempts - 1)), 1.0) * random.random())
                call.attempts += 1
                channel = call.channel = ch
                call.tried.append(channel.name)
                upstream_model = call.upstream_model = channel.upstream_model(cand_model)
                headers_out: list[tuple[bytes, bytes]] = [(b"x-request-id", rid_out)]
                if protocol == ANTHROPIC:
                    headers_out.append((b"request-id", rid_out))
                if lease is not None:
                    lh = lease.headers
                    if lh:
                        headers_out.extend(self.anthropic_headers(lh) if protocol == ANTHROPIC else lh)
                if plan is None:
                    payload = self._upstream_body(sent, body, model, upstream_model, mode)
                    ex = call.ex = Exchange(self, conn, route, mode, headers_out)
                    if stream:
                        credit = ex.credit = OutputCredit(
                            route.protocol_name, route.name, max_out if lease is not None else 0,
                            (lease, call.price, call.multiplier) if lease is not None else None)
                        ex.next_check = credit.first_step()
                    path = route.upstream_path + _query(req)
                else:
                    out = bodies[plan]
                    out["model"] = upstream_model
                    payload = orjson.dumps(out)
                    ex = call.ex = TranslatingExchange(self, conn, route, stream, headers_out,
                                                       plan, cand_model, body)
                    path = plan.upstream_path
                conn.on_disconnect = ex.client_gone
                if stream and self.checkpoints is not None:
                    self.checkpoints.add(req.request_id, settle.checkpoint_fn(
                        self, call, cand_model, ex, channel))
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
                    call.price = self.pricebook.lookup(answered)
                except LookupError:
                    pass
            if ex is None:
                raise E.ModelNotFound(f"The model '{model}' is not available on {req.path.decode()}")
            if not ex.started and not ex.aborted:
                raise ex.error or E.UpstreamError("Upstream failed")
            # Started: a mid-stream failure (or None). Aborted: the client left.
            call.error = ex.error
        except (GatewayError, orjson.JSONEncodeError) as caught:
            # JSONEncodeError: a body the parser took holds an integer beyond 64 bits,
            # which a body the gateway writes for an upstream (a translated one, a bound
            # written in) cannot carry: the client's number, so the client's error.
            failure = caught if isinstance(caught, GatewayError) else E.InvalidRequest(
                "The request body holds an integer outside the 64-bit range")
            call.error = failure
            if not conn.response_started and not conn.closed:
                self._reply_error(conn, failure, protocol, rid_out)
        except asyncio.CancelledError:
            call.error = _CLIENT_GONE
            if call.ex is not None:
                call.ex.client_gone()
            raise
        finally:
            self.in_flight -= 1
            if call.stream and self.checkpoints is not None:
                self.checkpoints.discard(req.request_id)  # the settled row supersedes
            settle.settle(self, call)

    def _attempt_plan(self, model: str, channels: list[Channel],
                      route: Route) -> list[tuple[str, Channel]]:
        """The requested model's channels, then each configured fallback model's."""
        plan = [(model, c) for c in channels]
        if model in self._fallbacks:
            plan.extend(self._fallback_plan(model, route))
        return plan

    def _fallback_plan(self, model: str, route: Route) -> Iterator[tuple[str, Channel]]:
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

    def is_reasoning(self, model: str) -> bool:
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


def breaker_factory(cfg: Config) -> Callable[[], Breaker]:
    up = cfg.upstream

    def make() -> Breaker:
        return Breaker(window_s=up.breaker_window_s, min_requests=up.breaker_min_requests,
                       threshold=up.breaker_error_rate, cooldown=up.breaker_cooldown_s)

    return make


def _query(req: Request) -> bytes:
    return b"?" + req.query if req.query else b""


def _retryable(ex: Exchange) -> bool:
    err = ex.error
    if err is None:
        return False
    if ex.upstream_status:
        return ex.upstream_status == 429 or ex.upstream_status >= 500
    return isinstance(err, E.UpstreamError | E.UpstreamTimeout)
