"""relay.request.parse against bodies a hostile client shapes: duplicate keys at any
depth and spelled with escapes, escaped media types, and the bound it reads in the same
pass as the checks."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import errors as E
from relay.request import BOUND_FIELDS, bound_of, choices_of, parse


@pytest.mark.parametrize("raw", [
    # The same key twice, once spelled with a \u escape: a parser sees a duplicate,
    # a byte scan for '"max_tokens"' sees one.
    rb'{"model": "gpt-4o-mini", "max_\u0074okens": 100000, "max_tokens": 1, "messages": []}',
    rb'{"model": "gpt-4o-mini", "max_tokens": 1, "max_\u0074okens": 100000, "messages": []}',
    rb'{"m\u006fdel": "claude-opus-4-1", "model": "gpt-4o-mini", "messages": []}',
    rb'{"model": "gpt-4o-mini", "messages": [], "stream": true,'
    rb' "stream_options": {"include_usage": true, "include_\u0075sage": false}}',
])
def test_an_escaped_duplicate_key_is_refused(raw: bytes) -> None:
    with pytest.raises(E.InvalidRequest, match="Duplicate key"):
        parse(raw, "chat", True)


@pytest.mark.parametrize("raw", [
    # Nested, where a byte scan of top-level names never looked.
    rb'{"model": "gpt-4o-mini", "messages": [{"role": "user", "role": "system", "content": "hi"}]}',
    rb'{"model": "gpt-4o-mini", "messages": [], "tools": [{"type": "function", "function":'
    rb' {"name": "a", "name": "b"}}]}',
])
def test_a_nested_duplicate_key_is_refused(raw: bytes) -> None:
    with pytest.raises(E.InvalidRequest, match="Duplicate key"):
        parse(raw, "chat", True)


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"model": "m", "messages": [' + b"[" * 400 + b"]" * 400 + b"]}", "nested too deeply"),
    (b'{"model": "m", "temperature": NaN}', "Malformed JSON"),
    (b'{"model": "m"} trailing', "Malformed JSON"),
    (b'\xef\xbb\xbf{"model": "m"}', "Malformed JSON"),
    (b'{"model": "m", "x": "\\ud800"}', "Malformed JSON"),
])
def test_a_body_the_parser_refuses_is_a_400_naming_why(raw: bytes, message: str) -> None:
    with pytest.raises(E.InvalidRequest, match=message):
        parse(raw, "chat", True)


def test_escapes_in_values_are_not_duplicates() -> None:
    raw = rb'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\u4f60\u597d: \"x\":"}]}'
    mr = parse(raw, "chat", True)
    assert mr.model == "gpt-4o-mini"


@pytest.mark.parametrize(("raw", "parts"), [
    (rb'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', 0),
    (rb'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}', 0),
    (rb'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",'
     rb' "image_url": {"url": "https://x/a.png"}}]}]}', 1),
    # The type spelled with escapes: no byte of "image" shows, the upstream still sees one.
    (rb'{"model": "m", "messages": [{"role": "user", "content": [{"type": "\u0069mage_url",'
     rb' "image_url": {"url": "https://x/a.png"}}, {"\u0074ype": "input_audio"}]}]}', 2),
])
def test_media_parts_are_found_however_spelled(raw: bytes, parts: int) -> None:
    assert parse(raw, "chat", True).media == parts


_INTS = st.one_of(st.none(), st.integers(min_value=1, max_value=1 << 24))


@settings(max_examples=300, deadline=None)
@given(route=st.sampled_from(sorted(BOUND_FIELDS)), fields=st.dictionaries(
    st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens"]), _INTS),
    n=st.one_of(st.none(), st.integers(min_value=1, max_value=128)),
    best_of=st.one_of(st.none(), st.integers(min_value=1, max_value=128)),
    budget=st.one_of(st.none(), st.integers(min_value=1, max_value=1 << 24)))
def test_the_bound_read_in_the_parse_is_the_protocols(route: str, fields: dict[str, int | None],
                                                      n: int | None, best_of: int | None,
                                                      budget: int | None) -> None:
    body: dict[str, object] = {"model": "m", **fields}
    if n is not None:
        body["n"] = n
    if best_of is not None:
        body["best_of"] = best_of
    if budget is not None:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    mr = parse(orjson.dumps(body), route, True)
    assert mr.bound == bound_of(route, body)
    assert mr.choices == choices_of(route, body)
