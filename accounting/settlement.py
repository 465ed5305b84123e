"""Settlement: what an exchange saw, turned into usage, its source and the cost.

One seam for every route x channel protocol x stream mode, so a reply is billed the
same way whichever path carried it:

- a reply (non-streamed) is billed from its `usage` object; without one, from its text
  (`estimated`), never as zero output;
- a stream is billed from the usage its events reported when it completed; otherwise
  from what the relay counted it emitting (relay.credit), keeping the exact input side
  an Anthropic `message_start` already gave;
- the cost is rounded once (accounting.pricing) and never exceeds what admission
  reserved, with the extensions a stream was granted (relay.credit, Lease.extend): an
  upstream that produced more than that is billed the reservation (`capped`), so no
  balance, key cap or plan credit goes below zero.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from accounting import tokens
from accounting import usage as usage_mod
from accounting.pricing import PriceRow, cost_nano
from accounting.records import Usage


def reply_usage(protocol: str, route: str, obj: Any, body: dict[str, Any] | None) -> tuple[Usage, str]:
    """Usage of a non-streamed reply in the upstream's `protocol` ("openai"/"anthropic")."""
    if type(obj) is dict:
        u = (usage_mod.from_anthropic_body(obj) if protocol == "anthropic"
             else usage_mod.from_openai_body(obj))
        if u is not None:
            return u, "upstream"
        text = usage_mod.text_from_body(protocol, route, obj)
    else:
        text = ""
    return Usage(input=input_estimate(protocol, body), output=tokens.count_text(text)), "estimated"


def stream_usage(protocol: str, reported: Usage | None, completed: bool, emitted: int,
                 body: dict[str, Any] | None) -> tuple[Usage, str]:
    """Usage of a stream: what it reported if it completed, else what it emitted."""
    if completed and reported is not None:
        return reported, "upstream"
    if reported is not None and protocol == "anthropic":
        # message_start told the input side exactly; only the output is estimated.
        return Usage(input=reported.input, cache_read=reported.cache_read,
                     cache_write=reported.cache_write,
                     output=max(reported.output, emitted)), "estimated"
    return Usage(input=input_estimate(protocol, body), output=emitted), "estimated"


def input_estimate(protocol: str, body: dict[str, Any] | None) -> int:
    return tokens.estimate_input_tokens(protocol, body or {})


def charge(usage: Usage, price: PriceRow, multiplier: Fraction, reserved: int | None) -> tuple[int, bool]:
    """(cost in nano-USD, capped): the exact cost, never above the reservation."""
    cost = cost_nano(usage, price, multiplier)
    if reserved is not None and cost > reserved:
        return reserved, True
    return cost, False
