"""Rate-limit headers from one protocol in the other's names.

OpenAI sends `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` with resets as
durations ("1s", "6m0s", "20ms"); Anthropic sends `anthropic-ratelimit-{requests,tokens}-
{limit,remaining,reset}` with resets as RFC 3339 instants, plus input/output token
families OpenAI has no name for (those are dropped for an OpenAI client). `retry-after`
is shared. Pure functions: `now` is passed in (wall clock, seconds since the epoch).
"""

from __future__ import annotations

from datetime import UTC, datetime

Headers = list[tuple[bytes, bytes]]

_OPENAI_TO_ANTHROPIC = {
    b"x-ratelimit-limit-requests": b"anthropic-ratelimit-requests-limit",
    b"x-ratelimit-remaining-requests": b"anthropic-ratelimit-requests-remaining",
    b"x-ratelimit-reset-requests": b"anthropic-ratelimit-requests-reset",
    b"x-ratelimit-limit-tokens": b"anthropic-ratelimit-tokens-limit",
    b"x-ratelimit-remaining-tokens": b"anthropic-ratelimit-tokens-remaining",
    b"x-ratelimit-reset-tokens": b"anthropic-ratelimit-tokens-reset",
}
_ANTHROPIC_TO_OPENAI = {v: k for k, v in _OPENAI_TO_ANTHROPIC.items()}
_OPENAI_PREFIX = b"x-ratelimit-"
_ANTHROPIC_PREFIX = b"anthropic-ratelimit-"


def is_rate_limit_header(name: bytes) -> bool:
    return name.startswith((_OPENAI_PREFIX, _ANTHROPIC_PREFIX)) or name in (
        b"retry-after", b"retry-after-ms")


def parse_duration(v: bytes) -> float | None:
    """OpenAI's reset durations: "20ms", "1s", "1.5s", "6m0s", "1h2m3s"; None if not one."""
    text = v.decode("latin-1").strip()
    if text.endswith("ms"):
        try:
            return float(text[:-2]) / 1000
        except ValueError:
            return None
    total, num = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in "hms" and num:
            try:
                total += float(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            except ValueError:
                return None
            num = ""
        else:
            return None
    return None if num else total


def format_duration(seconds: float) -> bytes:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return b"%dms" % round(seconds * 1000)
    m, s = divmod(int(seconds + 0.999), 60)
    return b"%dm%ds" % (m, s) if m else b"%ds" % s


def _parse_instant(v: bytes) -> float | None:
    try:
        return datetime.fromisoformat(v.decode("latin-1").strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _instant(at: float) -> bytes:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()


def to_anthropic(headers: Headers, now: float) -> Headers:
    """OpenAI rate-limit headers renamed for an Anthropic client; the rest unchanged."""
    out: Headers = []
    for k, v in headers:
        new = _OPENAI_TO_ANTHROPIC.get(k)
        if new is None:
            if not k.startswith(_OPENAI_PREFIX):
                out.append((k, v))
            continue
        if new.endswith(b"-reset"):
            d = parse_duration(v)
            if d is None:
                continue
            v = _instant(now + d)
        out.append((new, v))
    return out


def to_openai(headers: Headers, now: float) -> Headers:
    """Anthropic rate-limit headers renamed for an OpenAI client; the rest unchanged."""
    out: Headers = []
    for k, v in headers:
        new = _ANTHROPIC_TO_OPENAI.get(k)
        if new is None:
            if not k.startswith(_ANTHROPIC_PREFIX):
                out.append((k, v))
            continue
        if new.startswith(b"x-ratelimit-reset-"):
            at = _parse_instant(v)
            if at is None:
                continue
            v = format_duration(at - now)
        out.append((new, v))
    return out


def for_client(headers: Headers, client_anthropic: bool, now: float) -> Headers:
    return to_anthropic(headers, now) if client_anthropic else to_openai(headers, now)
