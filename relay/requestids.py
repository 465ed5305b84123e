"""The ids one request goes by, and where each comes from.

- `request_id`: the gateway's (`req_…`), made per request; it is the usage row's key and
  is sent back as `x-request-id` (and `request-id` on Anthropic routes, the name its SDK
  reads). A well-formed `x-request-id` the client sent is kept as `client_request_id`,
  and echoed in those headers instead while `server.trust_client_request_id` is on (the
  default).
- `upstream_request_id`: the channel's own (`x-request-id` from OpenAI, `request-id` from
  Anthropic); never sent on, so the client sees one id, kept in the row for the operator
  who talks to the provider.
- `response_id`: the id in the body the client got (`chatcmpl-…`, `msg_…`, `resp_…`), what
  SDK users have at hand. Read at settlement from the first bytes the client received,
  never by parsing a stream per chunk.

`tollway usage show ID` and `/v1/usage/{id}` accept any of the gateway's, the client's or
the response's id.
"""

from __future__ import annotations

import re

# The first `"id": "…"` of a body or of a stream's first events. OpenAI chat and
# completions bodies and chunks start with it; Anthropic's message (and message_start's
# message) and a Responses object (response.created's response) carry theirs first too.
_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_\-.:]{1,128})"')
_SCAN = 8192  # bytes: the first event is always within this


def first_id(chunks: list[bytes]) -> str:
    """The response id in the first bytes of `chunks`, else ""."""
    head = b""
    for c in chunks:
        head += c
        if len(head) >= _SCAN:
            break
    m = _ID.search(head, 0, _SCAN)
    return m.group(1).decode() if m else ""
