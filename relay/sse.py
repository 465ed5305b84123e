"""Sans-IO server-sent-events framer: bytes in, complete event blocks out.

The framer never decodes, copies only a partial trailing event, and returns raw
slices (terminator included), so the concatenation of everything it returns plus
its pending tail is exactly the input: passthrough stays byte-exact even when the
proxy forwards event by event. No line reader, no line-length limit.
"""

from __future__ import annotations

import re

# An event ends at a blank line; upstreams use LF, CRLF or (rarely) CR line endings.
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r|\n\r\n")


class SSEFramer:
    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._tail + data if self._tail else data
        out: list[bytes] = []
        start = 0
        for m in _BOUNDARY.finditer(buf):
            end = m.end()
            out.append(buf[start:end])
            start = end
        self._tail = buf[start:] if start < len(buf) else b""
        return out

    @property
    def pending(self) -> bytes:
        return self._tail


def fields(block: bytes) -> tuple[bytes, bytes]:
    """(event name, data payload) of one event block; data lines joined by LF."""
    event = b""
    data: list[bytes] = []
    for line in block.splitlines():
        if line.startswith(b"data:"):
            v = line[5:]
            data.append(v[1:] if v[:1] == b" " else v)
        elif line.startswith(b"event:"):
            v = line[6:]
            event = v[1:] if v[:1] == b" " else v
    return event, b"\n".join(data)


def has_usage_object(block: bytes) -> bool:
    """True when the block holds `"usage": {` (not `"usage": null`): cheap pre-filter."""
    i = block.find(b'"usage"')
    while i >= 0:
        j = i + 7
        n = len(block)
        while j < n and block[j] in b" \t\r\n:":
            j += 1
        if j < n and block[j] == 0x7B:  # "{"
            return True
        i = block.find(b'"usage"', i + 7)
    return False
