"""Value types that cross package lines: token usage and the settled usage row.

`Usage` holds the four disjoint billable token classes plus reasoning tokens (which
are already inside `output`). `input` is *uncached* input: OpenAI's `prompt_tokens`
includes `cached_tokens`, so extraction subtracts them; Anthropic's `input_tokens`
already excludes cache reads and writes. This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    usage_source: str  # "upstream" | "estimated" | "none"
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
