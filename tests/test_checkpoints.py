"""A crash mid-stream still bills what was emitted (issue 19, item 7): the gateway's
side, relay.checkpoints (the journal's side is in test_journal, test_ledger and
test_ledgerd), and end to end.

End to end: a real `python -m relay serve`, the bundled mock upstream streaming slowly,
N streams that have each delivered content to their client, then kill -9 of the worker.
After the restart every one of those streams has exactly one usage row, priced, and the
balance moved by exactly their sum. Both ledger modes: the worker flushing its own
journal (the restarted worker replays the dead one's), and `[ledger] process = true`
(the ledger process adopts the dead worker's journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from accounting import journal as jn
from accounting import tokens
from accounting.journal import Journal
from accounting.ledger import Ledger
from accounting.money import parse_usd
from relay.checkpoints import CALIBRATE_BYTES, OutputMeter, StreamCheckpoints
from tests import test_faults
from tests.test_faults import (
    _children,
    _user,
    balance_of,
    by_client_rid,
    chat,
    priced_right,
    rows_of,
    wait_rows,
)
from tests.test_ledger import read_file, rec

serve_env = test_faults.serve_env  # the fixture: a real `serve` beside the mock upstream


class FakeLedger:
    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.forgotten: list[str] = []

    def checkpoint(self, row: tuple[Any, ...]) -> None:
        self.rows.append(row)

    def forget_checkpoint(self, request_id: str) -> None:
        self.forgotten.append(request_id)


async def until(pred: Any, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_one_timer_checkpoints_each_live_stream_with_something_new() -> None:
    ledger = FakeLedger()
    cps = StreamCheckpoints(ledger, asyncio.get_running_loop(), interval=0.01)
    a_rows = iter([(1, "rid-a", 1), None, (1, "rid-a", 2)])
    b_calls = []
    cps.add("a", lambda: next(a_rows, None))
    cps.add("b", lambda: b_calls.append(1))  # never anything new: never journaled
    await until(lambda: len(ledger.rows) == 2 and len(b_calls) >= 4)
    assert ledger.rows == [(1, "rid-a", 1), (1, "rid-a", 2)] and cps.written == 2
    cps.discard("a")
    cps.discard("b")
    cps.discard("never-added")
    assert ledger.forgotten == ["rid-a"]  # b never had a checkpoint to forget
    assert len(cps) == 0
    calls = len(b_calls)
    await until(lambda: cps._handle is None)  # idle: no timer while nothing streams
    assert len(b_calls) <= calls + 1
    cps.add("c", lambda: (1, "rid-c", 3))
    await until(lambda: ledger.rows[-1] == (1, "rid-c", 3))
    cps.close()


async def test_a_failing_row_fn_is_counted_and_the_others_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    ledger = FakeLedger()
    cps = StreamCheckpoints(ledger, asyncio.get_running_loop(), interval=0.01)

    def broken() -> None:
        raise KeyError("bug")

    cps.add("x", broken)
    cps.add("y", lambda: (1, "rid-y", 1))
    await until(lambda: cps.failures >= 3 and len(ledger.rows) >= 3)
    assert sum("stream checkpoint failed" in r.message for r in caplog.records) == 1
    cps.close()


async def test_checkpoints_reach_the_journal_and_a_discarded_stream_is_not_carried_on(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=4096)
    ledger = Ledger(journal)
    cps = StreamCheckpoints(ledger, asyncio.get_running_loop(), interval=0.01)
    row = rec(1, 1, 77, rid="rid-live").row()
    cps.add("k", lambda: row)
    await until(lambda: cps.written >= 1)
    assert journal.live_checkpoints == 1
    on_disk = jn.parse_all(read_file(journal.paths[0]))[1]
    assert {c.request_id for c in on_disk} == {"rid-live"}
    cps.discard("k")
    assert journal.live_checkpoints == 0 and ledger.pending == []
    journal.close(delete=True)


def _chat_events(words: list[str]) -> bytes:
    return b"".join(
        b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                  "choices": [{"index": 0, "delta": {"content": w}}]}) + b"\n\n"
        for w in words)


def test_the_output_meter_counts_each_chunk_once_whatever_the_cuts() -> None:
    words = ["Hello", " there", ",", " how", " are", " you", "?"]
    events = _chat_events(words) + b"data: [DONE]\n\n"
    whole = tokens.count_text("".join(words))
    for step in (1, 7, 50, len(events)):
        meter = OutputMeter("openai", "chat")
        chunks: list[bytes] = []
        counts = []
        for i in range(0, len(events), step):
            chunks.append(events[i:i + step])
            counts.append(meter.count_chunks(chunks, i + step))
        assert counts[-1] == whole and counts == sorted(counts)
        # Nothing new: nothing counted twice.
        assert meter.count_chunks(chunks, len(events)) == whole
    parts_meter = OutputMeter("openai", "chat")
    parts: list[str] = []
    for n, w in enumerate(words):
        parts.append(w)
        parts_meter.count_parts(parts, 100 * n)
    assert abs(parts_meter.tokens - whole) <= 2  # counted in pieces, not as one text


def test_the_output_meter_extrapolates_a_long_stream_from_its_first_bytes() -> None:
    words = [f" word{i % 17} and more" for i in range(3000)]
    events = [_chat_events([w]) for w in words]
    exact = tokens.count_text("".join(words))
    meter = OutputMeter("openai", "chat")
    chunks: list[bytes] = []
    sent = 0
    for n, ev in enumerate(events):
        chunks.append(ev)
        sent += len(ev)
        if n % 20 == 0:  # a tick about every 20 chunks
            meter.count_chunks(chunks, sent)
    assert meter._base_sent and meter._base_sent < 3 * CALIBRATE_BYTES
    chunks.append(b"data: not even json\n\n")  # past calibration, chunks are not read
    got = meter.count_chunks(chunks, sent)
    assert exact <= got <= exact * 1.05, (got, exact)



def journaled_checkpoints(journal_dir: Path) -> dict[str, list[Any]]:
    """The latest checkpoint row journaled for each client request id, read off the files
    as they are (the test's only window on a worker it is about to kill)."""
    out: dict[str, list[Any]] = {}
    for path in sorted(journal_dir.glob("*" + jn.SUFFIX)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # deleted meanwhile (committed)
        frames, _, _ = jn.parse_frames(data)
        for f in frames:
            payload = orjson.loads(f[jn.HEADER_SIZE:])
            if payload and payload[0] == jn.CHECKPOINT:
                row = payload[1]
                out[row[26]] = row
    return out


async def _stream(http: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any], rid: str,
                  content: set[str]) -> None:
    """Read the stream; `rid` joins `content` once a content delta has arrived."""
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid}
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with http.post(url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers,
                             timeout=aiohttp.ClientTimeout(total=60)) as r:
            assert r.status == 200, await r.read()
            seen = b""
            async for chunk in r.content.iter_any():
                if rid not in content:
                    seen += chunk
                    if b'"content":"hello' in seen:
                        content.add(rid)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@pytest.mark.parametrize("process", [False, True], ids=["worker-flushes", "ledger-process"])
async def test_kill9_mid_stream_bills_every_stream_that_sent_content_exactly_once(
        serve_env: Any, pg_dsn: str, http: aiohttp.ClientSession, process: bool) -> None:
    make, _ = serve_env
    ledger = {"flush_interval_ms": 100}
    if process:
        ledger["process"] = "true"  # type: ignore[assignment]
    sp = make(ledger)
    user_id, key = await _user(sp, f"ckpt_{os.getpid()}_{time.monotonic_ns()}")
    await sp.start()
    assert sp.proc is not None
    url = f"http://127.0.0.1:{sp.port}"
    journal_dir = sp.tmp / "data" / "journal"
    n = 40
    rids = [f"ckpt-{i}" for i in range(n)]
    # 20 s streams: far longer than the test needs them to live.
    body = chat(stream=True, mock={"chunks": 400, "delay_ms": 50, "input_tokens": 100})
    content: set[str] = set()
    load = asyncio.gather(*(_stream(http, url, key, body, r, content) for r in rids))
    try:
        deadline = time.monotonic() + 20
        while len(content) < n:
            assert time.monotonic() < deadline, f"{len(content)} of {n} streams got content"
            await asyncio.sleep(0.02)
        # Every stream's checkpoint is on disk (the worker's timer writes about once a
        # second): the state a kill -9 leaves.
        while set(journaled_checkpoints(journal_dir)) < set(rids):
            assert time.monotonic() < deadline, (
                f"checkpoints journaled for {len(journaled_checkpoints(journal_dir))} of {n} streams")
            await asyncio.sleep(0.05)
        assert await rows_of(pg_dsn, user_id) == [], "a live stream's checkpoint was flushed"
        if process:
            ledger_pid, worker_pid = _children(sp.proc.pid)
            os.kill(worker_pid, signal.SIGKILL)
        else:
            sp.kill()
        await asyncio.wait_for(load, 30)
        if process:
            # The supervisor starts a new worker; the ledger process adopts the dead one's
            # journal and charges each interrupted stream its last checkpoint.
            while worker_pid in _children(sp.proc.pid):
                assert time.monotonic() < deadline + 20
                await asyncio.sleep(0.05)
            assert _children(sp.proc.pid)[0] == ledger_pid
        else:
            await sp.start()  # the new worker replays the dead one's journal
        rows = await wait_rows(pg_dsn, user_id, n, within=20)
        seen = by_client_rid(rows)  # exactly once
        assert set(seen) == set(rids)
        for r in seen.values():
            assert r["cost_nano"] > 0 and r["output_tokens"] > 0, dict(r)
            assert r["usage_source"] in ("interrupted", "estimated"), dict(r)
            assert r["status"] in (200, 499), dict(r)
            priced_right(r)
        # Nothing more arrives later (a second replay, a checkpoint charged twice).
        sp.proc.send_signal(signal.SIGTERM)
        assert await sp.wait() == 0
        rows = await rows_of(pg_dsn, user_id)
        assert set(by_client_rid(rows)) == set(rids)
        assert await balance_of(pg_dsn, user_id) == parse_usd("10") - sum(r["cost_nano"] for r in rows)
        assert list(journal_dir.glob("*" + jn.SUFFIX)) == []
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await load
        if sp.proc is not None and sp.proc.poll() is None:
            for pid in _children(sp.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        sp.kill()
