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

from accounting import settlement, tokens
from accounting import usage as usage_mod
from accounting.money import format_usd
from accounting.pricing import estimate_max_cost
from accounting.records import ROW_FORMAT, Usage
from relay import errors as E
from relay.auth import Groups, KeyCache
from relay.authguard import AuthGuard
from relay.checkpoints import OutputMeter, StreamCheckpoints
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
from relay.request import (
    BOUND_FIELDS,
    BOUNDED_ROUTES,
    ModelRequest,
    bound_field,
    bound_of,
    choices_of,
    inject_raw,
    media_tokens,
    tight_input_tokens,
    upstream_bound,
)
from relay.request import parse as parse_request
from relay.requestids import first_id
from relay.routing import Breaker, Channel, Router
from relay.translated import (
    Plan,
    TranslatingExchange,
    count_tokens_locally,
    plan_for,
    translate_body,
)
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
        self._max_out = {m: p.max_output_tokens for m, p in cfg.prices if p.max_output_tokens}
        self._counting = asyncio.Semaphore(2)  # tight input counts at once (relay.request)
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
            mr = parse_request(req.body, route.name, route.streamable)
            body = mr.body
            model = mr.model
            stream = mr.stream
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
            attempt_plan = list(self._attempt_plan(model, channels, route))
            sent, bodies, max_out, max_in = self._bounded_bodies(req.body, mr, route, attempt_plan)
            if self.limiter is not None:
                try:
                    lease = await self._admit(key, model, body, sent, max_in, max_out, req,
                                              price, multiplier, allowed, route)
                except E.InsufficientQuota:
                    fitted = await self._fit_output(key, route, mr, sent, attempt_plan, price,
                                                    multiplier, max_in)
                    if fitted is None:
                        raise
                    mr, (sent, bodies, max_out, max_in) = fitted
                    body = mr.body
                    lease = await self._admit(key, model, body, sent, max_in, max_out, req,
                                              price, multiplier, allowed, route)
            elif not allowed:
                raise E.ModelNotAllowed(f"This key may not use the model '{model}'")

            mode = NONSTREAM
            if stream:
                mode = TAP if (mr.include_usage or not route.inject_usage) else WITHHOLD
            fb_timeout, idle_timeout, total_timeout = self._timeouts
            if self._is_reasoning(model):
                fb_timeout = self.cfg.upstream.first_byte_timeout_reasoning_s
            max_attempts = max(1, self.cfg.upstream.max_attempts)
            deadline = t0 + self.cfg.upstream.retry_deadline_s
            answered = model  # the model whose channel answers (a fallback may)
            failed: set[str] = set()
            for cand_model, ch in attempt_plan:
                if attempts >= max_attempts or ch.name in failed:
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
                    payload = self._upstream_body(sent, body, model, upstream_model, mode)
                    ex = Exchange(self, conn, route, mode, headers_out)
                    if stream:
                        credit = ex.credit = OutputCredit(
                            route.protocol_name, route.name, max_out if lease is not None else 0)
                        ex.next_check = credit.first_step()
                    path = route.upstream_path + _query(req)
                else:
                    out = bodies[plan]
                    out["model"] = upstream_model
                    payload = orjson.dumps(out)
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

    def _bounded_bodies(
        self, raw: bytes, mr: ModelRequest, route: Route, attempt_plan: list[tuple[str, Channel]],
    ) -> tuple[bytes, dict[Plan, dict[str, Any]], int, int]:
        """Every body an attempt may send, each with an explicit output bound, and the
        largest output and input any of them may cost: what admission must reserve.

        A body that names no bound gets the model's `max_output_tokens` (else
        limits.default_max_output_tokens), written in the field its protocol reads, so
        no upstream is asked for more than was reserved. A translated body is bounded
        as its upstream will read it, not as the client wrote it.
        """
        body = mr.body
        if route.name not in BOUNDED_ROUTES:
            return raw, self._translations(route, mr, attempt_plan), 0, len(raw)
        per_choice = bound_of(route.name, body)
        if not per_choice:
            per_choice = self._max_out.get(mr.model, self._default_out)
            name = bound_field(route.name, self._is_reasoning(mr.model))
            if name in body:
                # Named as null: splicing would forward the key twice, so serialise.
                body[name] = per_choice
                raw = orjson.dumps(body)
            else:
                body[name] = per_choice
                raw = inject_raw(raw, name, per_choice)
        max_out = per_choice * choices_of(route.name, body)
        max_in = len(raw)
        bodies = self._translations(route, mr, attempt_plan)
        for plan, out in bodies.items():
            up_route = "messages" if plan.upstream_protocol == "anthropic" else "chat"
            bound = upstream_bound(up_route, out)
            if not bound:
                # The mapping dropped the bound (it never should): restore the reserved one.
                out[bound_field(up_route, self._is_reasoning(mr.model))] = per_choice
                bound = upstream_bound(up_route, out)
            max_out = max(max_out, bound)
            max_in = max(max_in, len(orjson.dumps(out)))
        return raw, bodies, max_out, max_in

    def _translations(self, route: Route, mr: ModelRequest,
                      attempt_plan: list[tuple[str, Channel]]) -> dict[Plan, dict[str, Any]]:
        """The translated body per plan the attempts need, built once (the model is set
        per attempt)."""
        out: dict[Plan, dict[str, Any]] = {}
        for _, ch in attempt_plan:
            if ch.protocol_id == route.protocol and not (route.name == "responses" and ch.chat_only):
                continue
            plan = plan_for(route.name, ch.protocol, ch.chat_only)
            if plan is not None and plan not in out:
                out[plan] = translate_body(plan, mr.body, mr.model, mr.stream)
        return out

    async def _admit(self, key: Any, model: str, body: dict[str, Any], raw: bytes, max_in: int,
                     max_out: int, req: Request, price: Any, multiplier: Fraction, allowed: bool,
                     route: Route) -> Any:
        # Upper bound of input tokens: a token is at least one byte of the body; media
        # parts (images, audio, files) cost tokens their bytes do not show.
        est_in = max_in + media_tokens(raw, body)
        reserve = 0
        if price is not None:
            reserve = estimate_max_cost(est_in, max_out, price, multiplier)
        limiter = self.limiter
        tight = False
        if reserve:
            room = limiter.headroom(key)
            if room is None:
                await limiter.refill(key)  # what admit would ask for first anyway
                room = limiter.headroom(key)
            if room is not None and reserve * NEAR_EXHAUSTION > room:
                # Near exhaustion the byte bound would refuse requests the balance can
                # pay for: count the input the way the upstream will first.
                tight = True
                est_in, reserve = await self._tight(route, body, raw, model, est_in, max_out,
                                                    price, multiplier)
        for _ in range(4):
            decision = limiter.admit(key, model, est_in // 4 + max_out, reserve, req.client_ip,
                                     allowed, time.time())
            if decision is None:
                await limiter.refill(key)
                continue
            if hasattr(decision, "release"):
                return decision
            if decision.status == 402 and price is not None and not tight:
                # The fast bound refused: count the input the way the upstream will
                # before refusing, and try once more with that.
                tight = True
                counted, tighter = await self._tight(route, body, raw, model, est_in, max_out,
                                                     price, multiplier)
                if tighter < reserve:
                    est_in, reserve = counted, tighter
                    continue
            message = decision.message
            if decision.status == 402:
                message = _needed(message, reserve)
            raise E.from_code(decision.code, message, decision.status,
                              retry_after=decision.retry_after, headers=decision.headers)
        raise E.RateLimited("Rate limit state unavailable, retry shortly", retry_after=1)

    async def _fit_output(
        self, key: Any, route: Route, mr: ModelRequest, sent: bytes,
        attempt_plan: list[tuple[str, Channel]], price: Any, multiplier: Fraction, max_in: int,
    ) -> tuple[ModelRequest, tuple[bytes, dict[Plan, dict[str, Any]], int, int]] | None:
        """For a group that opted in (groups.fit_output): the bodies with their output
        bound lowered to what the key can still afford, or None (the 402 stands). The
        upstream then stops at that bound: the client sees finish_reason "length"."""
        if (key.group not in self.groups.fit_output or price is None
                or route.name not in BOUNDED_ROUTES or self.limiter is None):
            return None
        room = self.limiter.headroom(key)
        if not room or room <= 0:
            return None
        body = mr.body
        est_in, _ = await self._tight(route, body, sent, mr.model,
                                      max_in + media_tokens(sent, body), 0, price, multiplier)
        choices = choices_of(route.name, body)
        # The reservation is linear in the output: solve, then step down past rounding.
        per_token = estimate_max_cost(0, 1_000_000, price, multiplier)
        spare = room - estimate_max_cost(est_in, 0, price, multiplier)
        total = spare * 1_000_000 // per_token if per_token else 0
        while total > 0 and estimate_max_cost(est_in, total, price, multiplier) > room:
            total -= 1
        per_choice = total // choices
        if per_choice < FIT_OUTPUT_MIN:
            return None
        fitted = dict(body)
        present = [n for n in BOUND_FIELDS[route.name] if fitted.get(n) is not None]
        for name in present:
            fitted[name] = min(fitted[name], per_choice)
        if not present:
            fitted[bound_field(route.name, self._is_reasoning(mr.model))] = per_choice
        th = fitted.get("thinking")
        if type(th) is dict and type(th.get("budget_tokens")) is int and th["budget_tokens"] >= per_choice:
            if per_choice - 1 < MIN_THINKING_BUDGET:
                return None  # thinking cannot fit: the 402 says what is needed
            fitted["thinking"] = {**th, "budget_tokens": per_choice - 1}
        fitted_mr = ModelRequest(fitted, mr.model, mr.stream, mr.include_usage)
        return fitted_mr, self._bounded_bodies(orjson.dumps(fitted), fitted_mr, route, attempt_plan)

    async def _tight(self, route: Route, body: dict[str, Any], raw: bytes, model: str,
                     est_in: int, max_out: int, price: Any, multiplier: Fraction) -> tuple[int, int]:
        """(input tokens, reservation) with the input counted as the upstream will count
        it, if that is lower than `est_in`. Off the event loop: a long prompt takes
        milliseconds to tokenize (tiktoken releases the GIL), and others keep flowing."""
        async with self._counting:
            counted = await self.loop.run_in_executor(
                None, tight_input_tokens, route.protocol_name, body, raw, model)
        counted = min(counted, est_in)
        return counted, estimate_max_cost(counted, max_out, price, multiplier)

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
                reserved = abs(lease.reserve) if lease is not None else None
                cost, capped = settlement.charge(usage, price, multiplier, reserved)
                if capped:
                    source = "capped"
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
            reported: Usage | None
            if plan is not None:
                if meter is None:
                    meter = OutputMeter(plan.upstream_protocol,
                                        "messages" if plan.upstream_protocol == "anthropic" else "chat")
                chunks = ex.body_chunks
                ex.body_chunks = []  # counted: a stream holds no more than a tick's bytes
                out = meter.count_chunks(chunks, ex.bytes_out)
                mapper = ex.stream_mapper  # type: ignore[attr-defined]
                reported = getattr(mapper.m, "usage", None) if mapper is not None else None
            else:
                out = ex.emitted_tokens()  # the credit's count (relay.credit)
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
            # An estimate never bills past what admission reserved (accounting.settlement).
            reserved = abs(lease.reserve) if lease is not None else None
            cost = settlement.charge(u, price, multiplier, reserved)[0] if price is not None else 0
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
        completed = ex.error is None
        if isinstance(ex, TranslatingExchange):
            u, src = ex.usage()
            if u is not None:
                return u, src
            emitted = tokens.count_text(ex.emitted_text())
            return Usage(input=settlement.input_estimate(route.protocol_name, body),
                         output=emitted), "estimated"
        if not stream:
            obj = None
            if completed:
                try:
                    obj = orjson.loads(b"".join(ex.body_chunks))
                except orjson.JSONDecodeError:
                    obj = None
            return settlement.reply_usage(route.protocol_name, route.name, obj, body)
        tap_usage = ex.tap.usage if ex.tap is not None else None
        if completed and tap_usage is not None:
            return tap_usage, "upstream"
        credit = ex.credit
        if credit is None:
            credit = OutputCredit(route.protocol_name, route.name, 0)
        emitted = credit.finish(ex.body_chunks, ex.bytes_out)
        ex.body_chunks = []
        return settlement.stream_usage(route.protocol_name, tap_usage, completed, emitted, body)


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


# A lowered bound below this many tokens per choice is no answer: the 402 stands.
FIT_OUTPUT_MIN = 16
MIN_THINKING_BUDGET = 1024  # Anthropic's least thinking budget

# A request whose fast reservation would take more than 1/8 of what is left is counted
# exactly before admission (relay.request.tight_input_tokens).
NEAR_EXHAUSTION = 8


def _needed(message: str, reserve: int) -> str:
    """A 402's message with what the request needs, in USD."""
    if not reserve or "needs" in message:
        return message
    return f"{message}: this request needs up to {format_usd(reserve)} USD"


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
