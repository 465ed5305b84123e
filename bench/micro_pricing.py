"""Micro-benchmark: per-call cost of the settlement path (`PriceBook.lookup`, `cost`) and the taps.

Run: .venv/bin/python bench/micro_pricing.py
Prints microseconds per call for each case. Not a test: numbers depend on the host.
"""

from __future__ import annotations

import sys
import timeit
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from accounting.pricing import PriceBook, PriceRow, cost, cost_nano, estimate_max_cost
from accounting.records import Usage
from accounting.usage import AnthropicStreamTap, OpenAIChatStreamTap

N = 200_000


def per_call_us(stmt: str, env: dict[str, object], number: int = N) -> float:
    best = min(timeit.repeat(stmt, globals=env, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    price = PriceRow(1, "gpt-4o-mini", 150_000_000, 600_000_000, 75_000_000, 150_000_000)
    odd = PriceRow(2, "odd", 150_000_007, 600_000_000, 75_000_000, 150_000_000)
    book = PriceBook([price, PriceRow(3, "default", 1, 1, 1, 1)])
    usage = Usage(input=1200, output=350, cache_read=1024, reasoning=64)
    one, two_thirds, pt8 = Fraction(1), Fraction(2, 3), Fraction(4, 5)
    openai_chunk = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {
        "prompt_tokens": 2224, "completion_tokens": 350, "total_tokens": 2574,
        "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 64}}})
    anthropic_delta = orjson.dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": 350}})
    env: dict[str, object] = dict(
        book=book, price=price, odd=odd, usage=usage, one=one, two_thirds=two_thirds, pt8=pt8, cost=cost, cost_nano=cost_nano,
        estimate_max_cost=estimate_max_cost, OpenAIChatStreamTap=OpenAIChatStreamTap,
        AnthropicStreamTap=AnthropicStreamTap, openai_chunk=openai_chunk, anthropic_delta=anthropic_delta,
    )
    cases = [
        ("lookup (exact model)", "book.lookup('gpt-4o-mini')"),
        ("lookup (default fallback)", "book.lookup('unlisted')"),
        ("cost, multiplier 1, whole nano (fast path)", "cost(usage, price, one)"),
        ("cost, multiplier 1, fractional nano", "cost(usage, odd, one)"),
        ("cost, multiplier 4/5", "cost(usage, price, pt8)"),
        ("cost, multiplier 2/3, fractional", "cost(usage, odd, two_thirds)"),
        ("cost_nano, multiplier 1 (settlement)", "cost_nano(usage, price, one)"),
        ("cost_nano, multiplier 2/3 (settlement)", "cost_nano(usage, odd, two_thirds)"),
        ("estimate_max_cost, 2/3", "estimate_max_cost(2224, 4096, price, two_thirds)"),
        ("OpenAI chat tap, usage chunk", "OpenAIChatStreamTap().feed_event(openai_chunk)"),
        ("Anthropic tap, message_delta", "AnthropicStreamTap().feed_event(anthropic_delta)"),
    ]
    print(f"python {sys.version.split()[0]}, best of 5 x {N} calls")
    for name, stmt in cases:
        print(f"{per_call_us(stmt, env):8.3f} us  {name}")


if __name__ == "__main__":
    main()
