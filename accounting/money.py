"""Integer money: nano-USD amounts, their exact parsing and printing, exact multipliers.

1 USD = 1_000_000_000 nano-USD, held as a Python int and bounded to int64 (the
Postgres `bigint` every money column uses). Text goes in and out through this module
only, exactly: no float ever touches an amount, and anything that cannot be represented
exactly (more precision than a nano-USD, a non-finite value, a float object) is refused
with a ValueError or TypeError instead of being rounded silently. This module does no I/O
and knows nothing of prices, tokens or balances.

Decisions, so callers need not guess:

- `parse_usd` accepts plain decimals ("5", "0.15", ".5", "+1.0") and, exactly, exponent
  forms ("1e-3" is 0.001 USD): config.toml's own check (`Decimal`) admits them, so
  refusing them here would turn a config that validated into a failure at start.
  Digits past the 9th decimal place must be zeros ("0.1500000000" is fine,
  "0.0000000001" is not): the rule is "no silent rounding", not a digit count.
  Underscores, whitespace, "NaN" and "Infinity" are refused.
- `round_nano` rounds half up, toward +infinity (-2.5 -> -2), the one rounding a
  request's cost goes through; `ceil_nano` rounds up, for reservations.
"""

from __future__ import annotations

import re
from fractions import Fraction

NANO_PER_USD = 1_000_000_000
MAX_NANO = 2**63 - 1  # Postgres bigint
MIN_NANO = -(2**63)

# Sign, integer digits, fraction digits, exponent. At least one digit before or after
# the point. Length-capped below so "1e999999999" cannot make us build a huge power of 10.
_DECIMAL = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?", re.ASCII)
_MAX_TEXT = 64
_MAX_EXPONENT = 40  # 10**40 nano-USD is far beyond int64 either way


def _require_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        # Floats above all: 0.1 has no exact binary value, so accepting one would
        # hide a rounding the operator never saw.
        raise TypeError(f"{what}: expected a decimal string such as \"0.15\", got {type(value).__name__} {value!r}")
    return value


def check_nano(nano: int, what: str = "amount") -> int:
    """Return `nano` if it is an int inside int64, else raise (TypeError/OverflowError)."""
    if type(nano) is not int:
        raise TypeError(f"{what}: expected an int of nano-USD, got {type(nano).__name__} {nano!r}")
    if nano > MAX_NANO or nano < MIN_NANO:
        raise OverflowError(f"{what}: {nano} nano-USD is outside the int64 range")
    return nano


def _parse_decimal(s: str, what: str) -> tuple[int, int]:
    """Parse a decimal string exactly into (mantissa, scale): value = mantissa / 10**scale."""
    if len(s) > _MAX_TEXT:
        raise ValueError(f"{what}: {s[:20]!r}...: too long for an amount")
    m = _DECIMAL.fullmatch(s)
    if m is None:
        raise ValueError(f"{what}: expected a decimal such as \"0.15\", got {s!r}")
    sign, whole, frac, exp = m.group(1), m.group(2), m.group(3) or "", m.group(4)
    if not whole and not frac:
        raise ValueError(f"{what}: expected a decimal such as \"0.15\", got {s!r}")
    exponent = int(exp) if exp else 0
    if abs(exponent) > _MAX_EXPONENT:
        raise ValueError(f"{what}: exponent out of range in {s!r}")
    mantissa = int(whole + frac)
    if sign == "-":
        mantissa = -mantissa
    return mantissa, len(frac) - exponent


def parse_usd(s: str, *, allow_negative: bool = False, what: str = "amount") -> int:
    """Exact nano-USD from a decimal USD string ("0.15" -> 150_000_000).

    Raises TypeError for non-strings (floats included), ValueError for malformed text,
    negatives (unless `allow_negative`), or precision finer than 1 nano-USD, and
    OverflowError past int64. `what` names the value in error messages (a TOML path).
    """
    mantissa, scale = _parse_decimal(_require_str(s, what), what)
    if scale <= 9:
        nano = mantissa * 10 ** (9 - scale)
    else:
        div = 10 ** (scale - 9)
        nano, rest = divmod(mantissa, div)
        if rest:
            raise ValueError(
                f"{what}: {s!r} has more than 9 decimal places; the smallest unit is "
                "0.000000001 USD (1 nano-USD)"
            )
    if nano < 0 and not allow_negative:
        raise ValueError(f"{what}: expected a non-negative amount, got {s!r}")
    return check_nano(nano, what)


def format_usd(nano: int) -> str:
    """Exact decimal USD for an amount, trailing zeros trimmed: 150_000 -> "0.00015".

    Whole amounts print without a point ("5"); the result always parses back with
    `parse_usd` to the same int.
    """
    if type(nano) is not int:
        raise TypeError(f"format_usd: expected an int of nano-USD, got {type(nano).__name__} {nano!r}")
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


_FRACTION = re.compile(r"(\d+)/(\d+)", re.ASCII)


def parse_multiplier(s: str, what: str = "multiplier") -> Fraction:
    """Exact positive multiplier from "0.8", "1", "1.25" or "2/3" (a group's price factor)."""
    _require_str(s, what)
    if len(s) > _MAX_TEXT:
        raise ValueError(f"{what}: {s[:20]!r}...: too long for a multiplier")
    m = _FRACTION.fullmatch(s)
    if m is not None:
        num, den = int(m.group(1)), int(m.group(2))
        if den == 0:
            raise ValueError(f"{what}: zero denominator in {s!r}")
        value = Fraction(num, den)
    else:
        try:
            mantissa, scale = _parse_decimal(s, what)
        except ValueError:
            raise ValueError(
                f"{what}: expected a positive decimal or fraction such as \"0.8\" or \"2/3\", got {s!r}"
            ) from None
        value = Fraction(mantissa, 10**scale) if scale >= 0 else Fraction(mantissa * 10**-scale)
    if value <= 0:
        raise ValueError(f"{what}: must be greater than 0, got {s!r}")
    return value


def format_fraction(fr: Fraction) -> str:
    """The shortest exact text for a Fraction: "1", "0.8", "-0.125" or "2/3".

    A decimal when one exists (the denominator has no prime factor but 2 and 5),
    else "numerator/denominator"; `parse_multiplier` reads positive values back.
    """
    if fr.denominator == 1:
        return str(fr.numerator)
    d = fr.denominator
    twos = fives = 0
    while d % 2 == 0:
        d //= 2
        twos += 1
    while d % 5 == 0:
        d //= 5
        fives += 1
    if d != 1:
        return f"{fr.numerator}/{fr.denominator}"
    places = max(twos, fives)
    digits = abs(fr.numerator) * 10**places // fr.denominator
    sign = "-" if fr < 0 else ""
    whole, frac = divmod(digits, 10**places)
    return f"{sign}{whole}.{frac:0{places}d}".rstrip("0")


def round_nano(fr: Fraction) -> int:
    """Round an exact nano-USD amount to an int, half up toward +infinity (2.5 -> 3, -2.5 -> -2)."""
    num, den = fr.numerator, fr.denominator
    return check_nano((2 * num + den) // (2 * den))


def ceil_nano(fr: Fraction) -> int:
    """Round an exact nano-USD amount up (toward +infinity): reservations never under-reserve."""
    return check_nano(-((-fr.numerator) // fr.denominator))
