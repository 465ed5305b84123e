"""One request id: the client gets the gateway's; the upstream's is kept in the row; the
row is found by the gateway's id, the client's, or the response body's id."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import orjson

from accounting import journal as jn
from accounting import reports
from accounting.journal import Journal, encode
from accounting.ledger import Flusher, Ledger
from tests.gateway import Harness
from tests.test_ledger import make_account, rec

ANTHROPIC_CH = {"name": "an-only", "protocol": "anthropic", "base_url": "http://127.0.0.1:{port}",
                "api_key_env": "TOLLWAY_TEST_UPSTREAM_KEY", "models": ["claude-*", "x-translated"]}


async def _row(h: Harness, rid: str, key_id: int | None = None) -> dict[str, Any] | None:
    conn = await asyncpg.connect(h.dsn)
    try:
        return await reports.usage_row(conn, rid, key_id=key_id)
    finally:
        await conn.close()


async def _call(s: aiohttp.ClientSession, url: str, path: str, secret: str, body: dict[str, Any],
                client_rid: str = "") -> tuple[aiohttp.ClientResponse, bytes]:
    headers = {"authorization": f"Bearer {secret}"}
    if client_rid:
        headers["x-request-id"] = client_rid
    async with s.post(url + path, json=body, headers=headers) as r:
        return r, await r.read()


def _body_id(raw: bytes, stream: bool) -> str:
    if not stream:
        return str(orjson.loads(raw)["id"])
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            obj = orjson.loads(line[6:])
            if "id" in obj:
                return str(obj["id"])
            for inner in ("message", "response"):
                if isinstance(obj.get(inner), dict):
                    return str(obj[inner]["id"])
    raise AssertionError(raw[:300])


CASES = [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, "chatcmpl-"),
    ("/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]}, "msg_"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}, "resp_"),
]


async def test_each_id_finds_the_row_and_the_upstream_id_is_kept(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn)
    try:
        _, key_id, secret = await h.user_and_key()
        seen = []
        async with aiohttp.ClientSession() as s:
            for path, body, prefix in CASES:
                for stream in (False, True):
                    client_rid = f"cli-{prefix.strip('-_')}-{int(stream)}-{time.monotonic_ns()}"
                    r, raw = await _call(s, h.url, path, secret, {**body, "stream": stream}, client_rid)
                    assert r.status == 200, raw
                    ours = r.headers.getall("x-request-id")
                    assert len(ours) == 1
                    if path == "/v1/messages":
                        assert r.headers.getall("request-id") == ours
                    resp_id = _body_id(raw, stream)
                    assert resp_id.startswith(prefix), resp_id
                    seen.append((client_rid, resp_id))
        await h.flush()
        for client_rid, resp_id in seen:
            by_client = await _row(h, client_rid)
            assert by_client is not None, client_rid
            by_response = await _row(h, resp_id)
            assert by_response is not None and by_response["request_id"] == by_client["request_id"]
            assert by_client["response_id"] == resp_id
            # The mock sends its own id (x-request-id or request-id): kept, never ours.
            assert by_client["upstream_request_id"] not in ("", by_client["request_id"])
            assert await _row(h, by_client["request_id"]) == by_client
            # The key holder's view takes the response id too; another key's view does not.
            assert await _row(h, resp_id, key_id=key_id) is not None
            assert await _row(h, resp_id, key_id=key_id + 10**6) is None
        async with aiohttp.ClientSession() as s:
            async with s.get(h.url + f"/v1/usage/{seen[0][1]}",
                             headers={"authorization": f"Bearer {secret}"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["usage"]["response_id"] == seen[0][1]
    finally:
        await h.stop()


async def test_a_translated_response_is_found_by_the_id_the_client_saw(pg_dsn: str) -> None:
    h = await Harness().start(pg_dsn, channels=[ANTHROPIC_CH])
    try:
        _, _, secret = await h.user_and_key()
        ids = []
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                r, raw = await _call(s, h.url, "/v1/chat/completions", secret, {
                    "model": "x-translated", "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert r.status == 200, raw
                ids.append(_body_id(raw, stream))
        await h.flush()
        for resp_id in ids:
            row = await _row(h, resp_id)
            assert row is not None and row["channel"] == "an-only", resp_id
    finally:
        await h.stop()


async def test_rows_journaled_before_the_new_columns_still_land(pg: asyncpg.Connection, pg_dsn: str,
                                                                tmp_path: Any) -> None:
    import zlib

    uid, (kid,) = await make_account(pg)
    r = rec(uid, kid, 1000)
    t = orjson.loads(encode(r)[jn._HDR_SIZE:])
    payload = orjson.dumps(t[:30])  # the layout before upstream_request_id and response_id
    frame = jn._HDR.pack(jn.MAGIC, len(payload), zlib.crc32(payload)) + payload
    (tmp_path / f"old-000001{jn.SUFFIX}").write_bytes(frame)
    assert [x.request_id for x in jn.replay(tmp_path)] == [r.request_id]
    flusher = Flusher(Ledger(Journal(tmp_path)), pg_dsn, flush_interval_ms=10)
    flusher.start()
    assert await asyncio.wait_for(flusher.stop(timeout=30), 40)
    got = await pg.fetchrow("SELECT response_id, upstream_request_id, cost_nano FROM usage_log"
                            " WHERE request_id = $1", r.request_id)
    assert got is not None and tuple(got) == ("", "", 1000)
