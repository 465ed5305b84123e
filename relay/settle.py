"""The gateway's settlement step: what a request used, its cost, and its usage row.

`settle` runs once per model request, whatever happened (done, failed, cut, client
gone): it prices the usage (accounting.settlement, never above the reservation, a
stream's extensions included: `lease.reserve` has grown with them),
releases the lease, counts the request in the metrics and records the flat row
(accounting.records.UsageRow) with one synchronous call. `checkpoint_fn` gives a live
stream's checkpoints (relay.checkpoints) the same row as if it ended now.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import orjson

from accounting import settlement, tokens
from accounting.records import ROW_FORMAT, Usage
from relay.call import ONE
from relay.checkpoints import OutputMeter
from relay.credit import OutputCredit
from relay.requestids import first_id
from relay.translated import TranslatingExchange

if TYPE_CHECKING:
    from relay.app import Gateway, Route
    from relay.call import ModelCall
    from relay.httpserver import Request
    from relay.proxy import Exchange
    from relay.routing import Channel

log = logging.getLogger("tollway.relay")
RID_OK = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_NO_USAGE = Usage()  # read only: the counts of a row with no usage


def settle(gw: Gateway, call: ModelCall) -> None:
    """Price what `call` used, release its lease, count it, and record its row."""
    mr = call.mr
    req, route, key, model, stream = call.req, call.route, call.key, call.model, call.stream
    body = mr.body if mr is not None else None
    ex, channel, upstream_model, price = call.ex, call.channel, call.upstream_model, call.price
    multiplier, lease, error, t0 = call.multiplier, call.lease, call.error, call.t0
    now = gw.loop.time()
    usage = None
    source = "none"
    cost = 0
    status = error.status if error is not None and (ex is None or not ex.started) else 200
    if ex is not None and ex.started:
        status = ex.status
    billable = ex is not None and ex.started and ex.status < 400 and route.name != "count_tokens"
    if billable and ex is not None and ex.aborted and ex.bytes_out == 0 and not gw.charge_zero_aborts:
        billable = False
    if billable and ex is not None:
        try:
            usage, source = usage_of(ex, route, body, stream)
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
    if gw.metrics is not None:
        gw.metrics.request(route, status, stream, now - t0,
                             (ex.first_byte - t0) if ex is not None and ex.first_byte else -1.0,
                             model, usage, cost)
    if key is None or gw.ledger is None:
        return
    code = ""
    if error is not None:
        code = error.openai_code
    u = usage if usage is not None else _NO_USAGE
    # The flat row (accounting.records.UsageRow, field order fixed there): building
    # a UsageRecord here cost more than the rest of the ledger's hot path.
    gw.ledger.record((
        ROW_FORMAT, req.request_id, call.ts, key.user_id, key.id, key.group, model,
        upstream_model, channel.name if channel is not None else "", route.protocol_name,
        route.name, stream, status, code, u.input, u.output, u.cache_read, u.cache_write,
        u.reasoning, source, cost, price.version if price is not None else 0,
        int((now - t0) * 1000),
        int((ex.first_byte - t0) * 1000) if ex is not None and ex.first_byte else 0,
        call.attempts, ",".join(call.tried), client_rid(req),
        req.client_ip if gw.log_ip else "",
        # The lease knows whether the plan or the balance paid (plan first, then balance).
        lease.plan_id if lease is not None else key.plan_id,
        fraction_str(multiplier), *ids(ex),
    ))

def checkpoint_fn(gw: Gateway, call: ModelCall, answering: str, ex: Exchange,
                  channel: Channel) -> Callable[[], tuple[Any, ...] | None]:
    """The row `_settle` would record if this stream ended now (relay.checkpoints):
    None until it has emitted output, and while it emits nothing new. Same layout,
    request id and admission time as `_settle`'s row, so the settled row supersedes
    it and a replay lands it once; usage_source "interrupted". The attempt's fields are
    taken now: the call moves on if this attempt fails before it starts."""
    req, route, key, body, model = call.req, call.route, call.key, call.body, call.model
    upstream_model, price, multiplier, lease = (call.upstream_model, call.price,
                                                call.multiplier, call.lease)
    t0, ts, attempts, tried = call.t0, call.ts, call.attempts, list(call.tried)
    if answering != model and gw.pricebook is not None:
        try:
            price = gw.pricebook.lookup(answering)  # a fallback is billed at its price
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
                seen[1] = settlement.input_estimate(route.protocol_name, body)
            u = Usage(input=seen[1], output=out)
        # An estimate never bills past what admission reserved (accounting.settlement).
        reserved = abs(lease.reserve) if lease is not None else None
        cost = settlement.charge(u, price, multiplier, reserved)[0] if price is not None else 0
        now = gw.loop.time()
        return (
            ROW_FORMAT, req.request_id, ts, key.user_id, key.id, key.group, model,
            upstream_model, channel.name, route.protocol_name, route.name, True, ex.status,
            "", u.input, u.output, u.cache_read, u.cache_write, u.reasoning, "interrupted",
            cost, price.version if price is not None else 0, int((now - t0) * 1000),
            int((ex.first_byte - t0) * 1000) if ex.first_byte else 0, attempts,
            ",".join(tried), client_rid(req), req.client_ip if gw.log_ip else "",
            lease.plan_id if lease is not None else key.plan_id, fraction_str(multiplier),
            *ids(ex),
        )

    return row

def usage_of(ex: Exchange, route: Route, body: dict[str, Any] | None,
             stream: bool) -> tuple[Usage | None, str]:
    """What the exchange used, and where the figure comes from (accounting.settlement)."""
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


def fraction_str(f: Fraction) -> str:
    # A group's multiplier is one object until the groups reload: remember its text
    # (Fraction's numerator/denominator are Python properties, slow per request).
    if f is _last_fraction[0]:
        return _last_fraction[1]
    text = str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    _last_fraction[:] = [f, text]
    return text


_last_fraction: list[Any] = [ONE, "1"]


def ids(ex: Exchange | None) -> tuple[str, str]:
    """The row's upstream request id and response id (relay.requestids)."""
    if ex is None:
        return "", ""
    up = ex.upstream_rid[:128].decode("latin-1") if ex.upstream_rid else ""
    if not ex.started:
        return up, ""
    return up, ex.response_id or (first_id(ex.body_chunks) if ex.status < 400 else "")


def client_rid(req: Request) -> str:
    v = req.header(b"x-request-id")
    if v is not None and RID_OK.fullmatch(v):
        return v.decode()
    return ""
