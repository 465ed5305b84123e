"""What a key may call and what it costs: models reachable through a group (and a key's
own model list), priced with the current price version times the group's multiplier.
Shared by the Keys page ("access configuration") and the public /pricing page."""

from __future__ import annotations

from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Any

from accounting.money import round_nano
from accounting.pricing import DEFAULT_MODEL, UnknownPrice


def known_models(gw: Any) -> list[str]:
    names = {m for m, _ in gw.router.listed_models()}
    if gw.pricebook is not None:
        names.update(m for m in gw.pricebook.models() if m != DEFAULT_MODEL)
    return sorted(names)


def _allowed(model: str, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(fnmatchcase(model, p) for p in patterns)


def priced(gw: Any, group: str, key_models: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """[{model, input, output, cache_read, cache_write}] in nano-USD per 1M tokens after the
    group's multiplier (rounded to the nano-USD), for each model the group and key allow."""
    mult = gw.groups.multiplier.get(group, Fraction(1))
    patterns = gw.groups.models.get(group, ("*",))
    out = []
    for m in known_models(gw):
        if not _allowed(m, patterns) or not _allowed(m, key_models):
            continue
        row: dict[str, Any] = {"model": m}
        try:
            price = gw.pricebook.lookup(m) if gw.pricebook is not None else None
        except UnknownPrice:
            price = None
        for cls in ("input", "output", "cache_read", "cache_write"):
            row[cls] = None if price is None else round_nano(getattr(price, cls) * mult)
        out.append(row)
    return out


def multiplier_text(gw: Any, group: str) -> str:
    from accounting.money import format_fraction

    return format_fraction(gw.groups.multiplier.get(group, Fraction(1)))


def pick(models: list[str], prefer: tuple[str, ...]) -> str:
    for p in prefer:
        for m in models:
            if fnmatchcase(m, p):
                return m
    return models[0] if models else "gpt-4o-mini"
