"""The gateway's admission step: what a request may cost, and the lease that covers it.

`bounded_bodies` builds every body an attempt may send, each with an explicit output
bound (relay.request), and the most any of them may cost; `admit` reserves that much
(limits) or raises the denial; near exhaustion the input is counted as the upstream
will count it first (`tight`); a group that opted in gets its bound lowered to what it
can afford instead of a 402 (`fit_output`). A price's long-context tier is reserved
whenever the input bound (or the tight count) is above its threshold
(accounting.pricing.estimate_max_cost), so the tier never overdraws. Never on the stream path: once per request.
"""

from __future__ import annotations

import time
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import orjson

from accounting.money import format_usd
from accounting.pricing import estimate_max_cost, tier_for
from accounting.tokens import MEDIA_TOKENS
from limits.admission import NEAR
from relay import errors as E
from relay.request import (
    BOUND_FIELDS,
    BOUNDED_ROUTES,
    ModelRequest,
    bound_field,
    bound_of,
    choices_of,
    inject_raw,
    tight_input_tokens,
    upstream_bound,
)
from relay.translated import Plan, plan_for, translate_body

if TYPE_CHECKING:
    from relay.app import Gateway, Route
    from relay.call import ModelCall
    from relay.routing import Channel
    from relay.seams import Lease

# A lowered bound below this many tokens per choice is no answer: the 402 stands.
FIT_OUTPUT_MIN = 16
MIN_THINKING_BUDGET = 1024  # Anthropic's least thinking budget

# A request whose fast reservation would take more than 1/8 of what is left is counted
# exactly before admission (relay.request.tight_input_tokens).
NEAR_EXHAUSTION = 8


def needed(message: str, reserve: int) -> str:
    """A 402's message with what the request needs, in USD."""
    if not reserve or "needs" in message:
        return message
    return f"{message}: this request needs up to {format_usd(reserve)} USD"


def bounded_bodies(
    gw: Gateway, raw: bytes, mr: ModelRequest, route: Route, attempt_plan: list[tuple[str, Channel]],
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
        return raw, translations(route, mr, attempt_plan), 0, len(raw)
    per_choice = mr.bound
    if not per_choice:
        per_choice = gw.max_out_by_model.get(mr.model, gw.default_out)
        name = bound_field(route.name, gw.is_reasoning(mr.model))
        if name in body:
            # Named as null: splicing would forward the key twice, so serialise.
            body[name] = per_choice
            raw = orjson.dumps(body)
        else:
            body[name] = per_choice
            raw = inject_raw(raw, name, per_choice)
    max_out = per_choice * mr.choices
    max_in = len(raw)
    bodies = translations(route, mr, attempt_plan)
    for plan, out in bodies.items():
        up_route = "messages" if plan.upstream_protocol == "anthropic" else "chat"
        bound = upstream_bound(up_route, out)
        if not bound:
            # The mapping dropped the bound (it never should): restore the reserved one.
            out[bound_field(up_route, gw.is_reasoning(mr.model))] = per_choice
            bound = upstream_bound(up_route, out)
        max_out = max(max_out, bound)
        max_in = max(max_in, len(orjson.dumps(out)))
    return raw, bodies, max_out, max_in

def translations(route: Route, mr: ModelRequest,
                 attempt_plan: list[tuple[str, Channel]]) -> dict[Plan, dict[str, Any]]:
    """The translated body per plan the attempts need, built once (the model is set
    per attempt)."""
    out: dict[Plan, dict[str, Any]] = {}
    protocol, responses = route.protocol, route.name == "responses"
    for _, ch in attempt_plan:
        if ch.protocol_id == protocol and not (responses and ch.chat_only):
            continue
        plan = plan_for(route.name, ch.protocol, ch.chat_only)
        if plan is not None and plan not in out:
            out[plan] = translate_body(plan, mr.body, mr.model, mr.stream)
    return out

class Pending:
    """An admission its first try did not settle (a refill, an exact count or a
    denial to explain): what `admit` continues from."""

    __slots__ = ("decision", "est_in", "reserve")

    def __init__(self, decision: Any, est_in: int, reserve: int) -> None:
        self.decision = decision
        self.est_in = est_in
        self.reserve = reserve


def admit_now(gw: Gateway, call: ModelCall, max_in: int, max_out: int,
              allowed: bool) -> Lease | Pending:
    """The first try at admission, without awaiting: the lease, as nearly every request
    gets it, or what `admit` continues from. (A coroutine per request cost more than
    the check.) The largest body an attempt may send costs `max_in` bytes of input and
    `max_out` tokens of output."""
    mr, price = call.mr, call.price
    # Upper bound of input tokens: a token is at least one byte of the body; media
    # parts (images, audio, files) cost tokens their bytes do not show.
    est_in = max_in
    if mr is not None and mr.media:
        est_in += mr.media * MEDIA_TOKENS
    reserve = estimate_max_cost(est_in, max_out, price, call.multiplier) if price is not None else 0
    limiter = gw.limiter
    assert limiter is not None
    decision = limiter.admit(call.key, call.model, est_in // 4 + max_out, reserve,
                             call.req.client_ip, allowed, time.time(),
                             NEAR_EXHAUSTION if reserve else 0)
    if decision is not None and decision is not NEAR and hasattr(decision, "release"):
        return decision
    return Pending(decision, est_in, reserve)


async def admit(gw: Gateway, call: ModelCall, raw: bytes, max_in: int, max_out: int,
                allowed: bool, pending: Pending | None = None) -> Lease:
    """A lease for `call`, or the denial raised as a GatewayError: `admit_now`, then
    whatever it left (a refill awaited, the input counted exactly near exhaustion or
    before refusing, the denial explained)."""
    if pending is None:
        first = admit_now(gw, call, max_in, max_out, allowed)
        if not isinstance(first, Pending):
            return first
        pending = first
    key, model, body, req = call.key, call.model, call.mr.body if call.mr else {}, call.req
    price, multiplier, route = call.price, call.multiplier, call.route
    decision, est_in, reserve = pending.decision, pending.est_in, pending.reserve
    limiter = gw.limiter
    assert limiter is not None
    counted_once = not reserve
    for attempt in range(4):
        if attempt:
            decision = limiter.admit(key, model, est_in // 4 + max_out, reserve, req.client_ip,
                                     allowed, time.time(), 0 if counted_once else NEAR_EXHAUSTION)
        if decision is None:
            await limiter.refill(key)
            continue
        if decision is NEAR:
            # Near exhaustion the byte bound would refuse requests the balance can
            # pay for: count the input the way the upstream will first.
            counted_once = True
            est_in, reserve = await tight(gw, route, body, raw, model, est_in, max_out,
                                          price, multiplier)
            continue
        if hasattr(decision, "release"):
            return decision
        if decision.status == 402 and price is not None and not counted_once:
            # The fast bound refused: count the input the way the upstream will
            # before refusing, and try once more with that.
            counted_once = True
            counted, tighter = await tight(gw, route, body, raw, model, est_in, max_out,
                                           price, multiplier)
            if tighter < reserve:
                est_in, reserve = counted, tighter
                continue
        message = decision.message
        if decision.status == 402:
            message = needed(message, reserve)
        raise E.from_code(decision.code, message, decision.status,
                          retry_after=decision.retry_after, headers=decision.headers)
    raise E.RateLimited("Rate limit state unavailable, retry shortly", retry_after=1)


async def fit_output(
    gw: Gateway, call: ModelCall, sent: bytes, attempt_plan: list[tuple[str, Channel]],
    max_in: int,
) -> tuple[ModelRequest, tuple[bytes, dict[Plan, dict[str, Any]], int, int]] | None:
    """For a group that opted in (groups.fit_output): the bodies with their output
    bound lowered to what the key can still afford, or None (the 402 stands). The
    upstream then stops at that bound: the client sees finish_reason "length"."""
    key, route, mr, price, multiplier = call.key, call.route, call.mr, call.price, call.multiplier
    if (mr is None or key.group not in gw.groups.fit_output or price is None
            or route.name not in BOUNDED_ROUTES or gw.limiter is None):
        return None
    room = gw.limiter.headroom(key)
    if not room or room <= 0:
        return None
    body = mr.body
    est_in, _ = await tight(gw, route, body, sent, mr.model,
                            max_in + mr.media * MEDIA_TOKENS, 0, price, multiplier)
    # Solve at the prices this input is reserved at (the long-context tier above its
    # threshold): a per-token price from the base row would overshoot the room.
    price = tier_for(price, est_in)
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
        fitted[bound_field(route.name, gw.is_reasoning(mr.model))] = per_choice
    th = fitted.get("thinking")
    if type(th) is dict and type(th.get("budget_tokens")) is int and th["budget_tokens"] >= per_choice:
        if per_choice - 1 < MIN_THINKING_BUDGET:
            return None  # thinking cannot fit: the 402 says what is needed
        fitted["thinking"] = {**th, "budget_tokens": per_choice - 1}
    fitted_mr = ModelRequest(fitted, mr.model, mr.stream, mr.include_usage,
                             bound_of(route.name, fitted), choices, mr.media)
    return fitted_mr, bounded_bodies(gw, orjson.dumps(fitted), fitted_mr, route, attempt_plan)

async def tight(gw: Gateway, route: Route, body: dict[str, Any], raw: bytes, model: str,
                est_in: int, max_out: int, price: Any, multiplier: Fraction) -> tuple[int, int]:
    """(input tokens, reservation) with the input counted as the upstream will count
    it, if that is lower than `est_in`. Off the event loop: a long prompt takes
    milliseconds to tokenize (tiktoken releases the GIL), and others keep flowing."""
    async with gw.counting:
        counted = await gw.loop.run_in_executor(
            None, tight_input_tokens, route.protocol_name, body, raw, model)
    counted = min(counted, est_in)
    return counted, estimate_max_cost(counted, max_out, price, multiplier)
