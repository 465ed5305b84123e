"""relay.metrics: what a request adds, as the exposition shows it."""

from __future__ import annotations

import types

from accounting.records import Usage
from relay.metrics import Metrics

CHAT = types.SimpleNamespace(name="chat", protocol_name="openai")
MESSAGES = types.SimpleNamespace(name="messages", protocol_name="anthropic")


def test_requests_tokens_spend_and_latency_are_counted_per_label() -> None:
    m = Metrics()
    m.known_models(["gpt-4o-mini"])
    m.request(CHAT, 200, False, 0.004, 0.003, "gpt-4o-mini", Usage(10, 20, 3, 0), 500)
    m.request(CHAT, 200, True, 0.2, 0.05, "gpt-4o-mini", Usage(1, 2, 0, 4), 0)
    m.request(CHAT, 429, False, 0.001, -1.0, "gpt-4o-mini", None, 0)
    m.request(MESSAGES, 502, True, 0.3, 0.1, "claude-x", Usage(5, 0, 0, 0), 7)
    m.request(MESSAGES, 600, True, 0.3, -1.0, "claude-x", None, 0)  # beyond 5xx: counted as 5xx
    assert m.requests == {
        ("chat", "openai", "2xx", "gpt-4o-mini"): 2,
        ("chat", "openai", "4xx", "gpt-4o-mini"): 1,
        ("messages", "anthropic", "5xx", "other"): 2,  # an unconfigured model's label
    }
    assert m.tokens == {("gpt-4o-mini", "input"): 11, ("gpt-4o-mini", "output"): 22,
                        ("gpt-4o-mini", "cache_read"): 3, ("gpt-4o-mini", "cache_write"): 4,
                        ("other", "input"): 5}
    assert m.spend == {"gpt-4o-mini": 500, "other": 7}
    assert sum(m.latency["chat"].counts) == 3 and sum(m.ttfb["chat"].counts) == 2
    assert m.latency["chat"].counts[0] == 2  # 0.004 and 0.001 s: the first bucket (le 0.005)
    text = m.render().decode()
    assert ('tollway_requests_total{model="gpt-4o-mini",protocol="openai",route="chat",'
            'status_class="2xx"} 2.0') in text
    assert ('tollway_requests_total{model="other",protocol="anthropic",route="messages",'
            'status_class="5xx"} 2.0') in text
    assert 'tollway_tokens_total{model="gpt-4o-mini",token_class="cache_write"} 4.0' in text
