"""Value types that cross package lines: token usage and the settled usage row.

`Usage` holds the four disjoint billable token classes plus reasoning tokens (which
are already inside `output`). `input` is *uncached* input: OpenAI's `prompt_tokens`
includes `cached_tokens`, so extraction subtracts them; Anthropic's `input_tokens`
already excludes cache reads and writes. This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A settled row as one flat tuple, the journal's payload (accounting.journal): ROW_FORMAT,
# then the UsageRecord fields in declaration order with `usage` spread into its five
# counts. The gateway builds this tuple directly at settlement (relay.app): 26 keyword
# arguments to a dataclass cost 1.3 us, the tuple 0.1 us, and encoding it needs no
# attribute gathering. `UsageRecord.row()` and `UsageRecord.from_row()` convert.
UsageRow = tuple[Any, ...]
ROW_FORMAT = 1  # first element of every row, so the layout can evolve
ROW_FIELDS = 32  # a current row's length, ROW_FORMAT included; older rows are shorter


@dataclass(slots=True)
class Usage:
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0  # informational: part of `output`, never billed twice

    def total(self) -> int:
        return self.input + self.output + self.cache_read + self.cache_write


@dataclass(slots=True)
class UsageRecord:
    """One settled request: the usage log row (metadata only, never bodies).

    Built by relay at settlement and handed to `accounting.ledger.Ledger.record()`,
    which must not await or lock. `request_id` is the gateway's own id and the
    idempotency key of the row; `client_request_id` is the client's, when it sent one.
    """

    request_id: str
    ts: float  # unix seconds when the request was admitted
    user_id: int
    key_id: int
    group: str
    model: str  # as requested by the client
    upstream_model: str  # as sent to the channel ("" when no channel was reached)
    channel: str
    protocol: str  # "openai" | "anthropic"
    route: str  # "chat" | "completions" | "responses" | "embeddings" | "messages" | "count_tokens"
    stream: bool
    status: int
    error_code: str
    usage: Usage
    # "upstream" | "estimated" | "none", or "interrupted": a stream cut by a crash, billed
    # from its last checkpoint (accounting.journal)
    usage_source: str
    cost_nano: int  # exact, rounded once
    price_version: int
    latency_ms: int
    ttfb_ms: int
    attempts: int = 1
    channels_tried: str = ""
    client_request_id: str = ""
    client_ip: str = ""
    plan_id: int = 0  # subscription drawn on, 0: the user's balance
    multiplier: str = "1"  # the price multiplier applied, as an exact fraction ("4/5")
    upstream_request_id: str = ""  # the channel's own id for the request, when it sent one
    response_id: str = ""  # the response body's id the client saw (chatcmpl-…, msg_…, resp_…)

    def row(self) -> UsageRow:
        """This record as a flat row (see UsageRow)."""
        u = self.usage
        return (
            ROW_FORMAT, self.request_id, self.ts, self.user_id, self.key_id, self.group,
            self.model, self.upstream_model, self.channel, self.protocol, self.route,
            self.stream, self.status, self.error_code, u.input, u.output, u.cache_read,
            u.cache_write, u.reasoning, self.usage_source, self.cost_nano,
            self.price_version, self.latency_ms, self.ttfb_ms, self.attempts,
            self.channels_tried, self.client_request_id, self.client_ip, self.plan_id,
            self.multiplier, self.upstream_request_id, self.response_id,
        )

    @classmethod
    def from_row(cls, t: UsageRow | list[Any]) -> UsageRecord:
        """The record of a flat row (raises ValueError on an unknown format)."""
        if t[0] != ROW_FORMAT:
            raise ValueError(f"unknown usage row format {t[0]!r}")
        return cls(
            request_id=t[1], ts=t[2], user_id=t[3], key_id=t[4], group=t[5], model=t[6],
            upstream_model=t[7], channel=t[8], protocol=t[9], route=t[10], stream=t[11],
            status=t[12], error_code=t[13],
            usage=Usage(input=t[14], output=t[15], cache_read=t[16], cache_write=t[17],
                        reasoning=t[18]),
            usage_source=t[19], cost_nano=t[20], price_version=t[21], latency_ms=t[22],
            ttfb_ms=t[23], attempts=t[24], channels_tried=t[25], client_request_id=t[26],
            client_ip=t[27], plan_id=t[28],
            # Appended fields. A row written before `multiplier` existed reads "" (not
            # recorded), which reports explain with the group's multiplier.
            multiplier=t[29] if len(t) > 29 else "",
            upstream_request_id=t[30] if len(t) > 30 else "",
            response_id=t[31] if len(t) > 31 else "",
        )
