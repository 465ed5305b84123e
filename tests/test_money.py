"""Integer money: exact parsing and printing, multipliers, the one rounding rule."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accounting.money import (
    MAX_NANO,
    NANO_PER_USD,
    ceil_nano,
    check_nano,
    format_fraction,
    format_usd,
    parse_multiplier,
    parse_usd,
    round_nano,
)


@pytest.mark.parametrize(
    ("text", "nano"),
    [
        ("0.15", 150_000_000),
        ("5", 5 * NANO_PER_USD),
        ("0.000000001", 1),
        (".5", 500_000_000),
        ("5.", 5 * NANO_PER_USD),
        ("+1.25", 1_250_000_000),
        ("0", 0),
        ("0.1500000000", 150_000_000),  # trailing zeros past the 9th place lose nothing
        ("1e-3", 1_000_000),  # exponent forms are exact too
        ("1.5E+2", 150 * NANO_PER_USD),
        ("9223372036.854775807", MAX_NANO),
    ],
)
def test_parse_usd_exact(text: str, nano: int) -> None:
    assert parse_usd(text) == nano


@pytest.mark.parametrize(
    "text",
    ["", " 1", "1 ", "abc", "1.2.3", "1_000", "NaN", "Infinity", "0x10", ".", "e5", "1e", "--1", "١"],
)
def test_parse_usd_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="expected a decimal"):
        parse_usd(text)


def test_parse_usd_rejects_precision_finer_than_a_nano() -> None:
    with pytest.raises(ValueError, match="more than 9 decimal places"):
        parse_usd("0.0000000001")
    with pytest.raises(ValueError, match="more than 9 decimal places"):
        parse_usd("1.5e-9")


def test_parse_usd_negatives_only_when_allowed() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        parse_usd("-1")
    assert parse_usd("-1.5", allow_negative=True) == -1_500_000_000
    assert parse_usd("-0") == 0


def test_parse_usd_bounds() -> None:
    with pytest.raises(OverflowError, match="int64"):
        parse_usd("9223372036.854775808")
    with pytest.raises(ValueError, match="exponent out of range"):
        parse_usd("1e999999999")
    with pytest.raises(ValueError, match="too long"):
        parse_usd("1" * 100)


@pytest.mark.parametrize("value", [0.15, 1, Decimal("0.15"), None, b"0.15"])
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(TypeError, match="expected a decimal string"):
        parse_usd(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a decimal string"):
        parse_multiplier(value)  # type: ignore[arg-type]


def test_floats_never_pass_as_amounts() -> None:
    with pytest.raises(TypeError):
        format_usd(0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        check_nano(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_usd(True)


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (150_000, "0.00015"),
        (5 * NANO_PER_USD, "5"),
        (1, "0.000000001"),
        (1_500_000_000, "1.5"),
        (0, "0"),
        (-150_000, "-0.00015"),
        (MAX_NANO, "9223372036.854775807"),
    ],
)
def test_format_usd(nano: int, text: str) -> None:
    assert format_usd(nano) == text


@given(st.integers(min_value=-(2**63), max_value=MAX_NANO))
def test_format_parse_round_trip(nano: int) -> None:
    assert parse_usd(format_usd(nano), allow_negative=True) == nano
    assert Decimal(format_usd(nano)) * NANO_PER_USD == nano


@pytest.mark.parametrize(
    ("text", "value"),
    [("0.8", Fraction(4, 5)), ("1", Fraction(1)), ("2/3", Fraction(2, 3)), ("1.25", Fraction(5, 4)),
     ("10/4", Fraction(5, 2)), ("1e-1", Fraction(1, 10))],
)
def test_parse_multiplier_exact(text: str, value: Fraction) -> None:
    assert parse_multiplier(text) == value


@pytest.mark.parametrize("text", ["0", "0.0", "-1", "0/3", "1/0", "-2/3", "x", "", "2/3/4", "1 /3", "1.5/2"])
def test_parse_multiplier_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_multiplier(text)


@pytest.mark.parametrize(
    ("fr", "text"),
    [(Fraction(4, 5), "0.8"), (Fraction(1), "1"), (Fraction(2, 3), "2/3"), (Fraction(-1, 8), "-0.125"),
     (Fraction(7, 6), "7/6"), (Fraction(3, 1000), "0.003")],
)
def test_format_fraction(fr: Fraction, text: str) -> None:
    assert format_fraction(fr) == text
    if fr > 0:
        assert parse_multiplier(text) == fr


@pytest.mark.parametrize(
    ("fr", "rounded", "up"),
    [
        (Fraction(5, 2), 3, 3),
        (Fraction(7, 3), 2, 3),
        (Fraction(8, 3), 3, 3),
        (Fraction(-5, 2), -2, -2),  # half toward +infinity
        (Fraction(-7, 3), -2, -2),
        (Fraction(4), 4, 4),
        (Fraction(1, 10**9), 0, 1),
    ],
)
def test_round_and_ceil(fr: Fraction, rounded: int, up: int) -> None:
    assert round_nano(fr) == rounded
    assert ceil_nano(fr) == up


def test_rounding_overflow_is_refused() -> None:
    with pytest.raises(OverflowError):
        round_nano(Fraction(MAX_NANO) + 1)
    assert round_nano(Fraction(2 * MAX_NANO + 1, 2) - Fraction(1, 2)) == MAX_NANO
