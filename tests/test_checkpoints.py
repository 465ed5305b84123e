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
import asyncpg
import orjson
import pytest

from accounting import journal as jn
from accounting import tokens
from accounting.journal import Journal
from accounting.ledger import Ledger
from accounting.money import parse_usd
from relay.checkpoints import OutputMeter, StreamCheckpoints
from tests import test_faults
from tests.gateway import Harness
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
    # The last word waits for what follows it (a word cut between two counts would
    # count a token too many), so the count stands at the text before it.
    upto = tokens.count_text("Hello there, how are")
    for step in (1, 7, 50, len(events)):
        meter = OutputMeter("openai", "chat")
        chunks: list[bytes] = []
        counts = []
        for i in range(0, len(events), step):
            chunks.append(events[i:i + step])
            counts.append(meter.count_chunks(chunks, i + step))
        assert counts[-1] == upto and counts == sorted(counts)
        # Nothing new: nothing counted twice.
        assert meter.count_chunks(chunks, len(events)) == upto
    # An exchange that hands its chunks on and starts a new list loses none of them here.
    meter = OutputMeter("openai", "chat")
    first = [_chat_events(["Hello there,"])]
    meter.count_chunks(first, 10)
    first.append(_chat_events([" how are"]))
    second = [_chat_events([" you today?"])]
    assert meter.count_chunks(second, 30) == tokens.count_text("Hello there, how are you")
    # A word split between two counts is counted once, as a whole.
    meter = OutputMeter("openai", "chat")
    chunks = [_chat_events(["Hello wonder"])]
    meter.count_chunks(chunks, 10)
    chunks.append(_chat_events(["ful world and"]))
    assert meter.count_chunks(chunks, 20) == tokens.count_text("Hello wonderful world")


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
    assert meter._base_events  # calibrated: from here on, events are counted, not parsed
    chunks.append(b"data: not even json\n\n")  # past calibration, chunks are not read
    got = meter.count_chunks(chunks, sent)
    assert abs(got - exact) <= exact * 0.05, (got, exact)



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


# --- the gateway's checkpoints against its settled rows --------------------------------


class Recorder:
    """The gateway's ledger, with every row it is given kept for the test."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.checkpoints: list[tuple[Any, ...]] = []
        self.settled: list[tuple[Any, ...]] = []

    def checkpoint(self, row: tuple[Any, ...]) -> None:
        self.checkpoints.append(row)
        self.ledger.checkpoint(row)

    def forget_checkpoint(self, request_id: str) -> None:
        self.ledger.forget_checkpoint(request_id)

    def record(self, row: tuple[Any, ...]) -> None:
        self.settled.append(row)
        self.ledger.record(row)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)


ROUTES = {
    # route, model: passthrough on both protocols, translated both ways, Responses
    "chat": ("/v1/chat/completions", "gpt-4o-mini"),
    "messages": ("/v1/messages", "claude-sonnet-4-6"),
    "chat-to-anthropic": ("/v1/chat/completions", "claude-sonnet-4-6"),
    "messages-to-openai": ("/v1/messages", "gpt-4o-mini"),
    "responses": ("/v1/responses", "gpt-4o-mini"),
}
# Fields a checkpoint shares with the row its stream settles with (accounting.records):
# all but the usage counts, usage_source, cost and latency.
SHARED = [i for i in range(30) if i not in (14, 15, 16, 17, 18, 19, 20, 22)]


@pytest.mark.parametrize("case", list(ROUTES))
async def test_a_checkpoint_is_the_row_its_stream_settles_with_as_far_as_it_went(
        pg_dsn: str, case: str) -> None:
    path, model = ROUTES[case]
    h = await Harness().start(pg_dsn)
    try:
        _, _, secret = await h.user_and_key()
        gw = h.worker.gw  # type: ignore[union-attr]
        rec_ledger = Recorder(gw.ledger)
        gw.ledger = rec_ledger
        gw.checkpoints._ledger = rec_ledger
        gw.checkpoints._interval = 0.05
        body: dict[str, Any] = {"model": model, "stream": True, "max_tokens": 100}
        if path == "/v1/responses":
            body["input"] = "hi"
            del body["max_tokens"]
        else:
            body["messages"] = [{"role": "user", "content": "hi"}]
        # The mock's knobs as headers: a translated body carries no "mock" member.
        headers = {"Authorization": f"Bearer {secret}", "x-request-id": f"cmp-{case}",
                   "anthropic-version": "2023-06-01", "x-mock-chunks": "40",
                   "x-mock-delay-ms": "25", "x-mock-input-tokens": "321"}
        async with aiohttp.ClientSession() as s, s.post(
                h.url + path, json=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=30)) as r:
            assert r.status == 200, await r.text()
            await r.read()
        await until(lambda: bool(rec_ledger.settled))
        (final,) = rec_ledger.settled
        assert rec_ledger.checkpoints, "a 1 s stream checkpointed every 50 ms left none"
        assert {c[1] for c in rec_ledger.checkpoints} == {final[1]}
        assert gw.ledger.journal.live_checkpoints == 0  # forgotten once settled
        last = rec_ledger.checkpoints[-1]
        assert len(last) == len(final)
        assert [last[i] for i in SHARED] == [final[i] for i in SHARED]
        assert last[19] == "interrupted" and final[19] == "upstream"
        # Output so far, counted (40 "hello " deltas: 40 tokens in all, reported by the
        # mock at the end), at most one word behind what was sent.
        outs = [c[15] for c in rec_ledger.checkpoints]
        assert final[15] == 40 and len(outs) >= 3
        assert outs == sorted(outs) and 0 < outs[0] and outs[-1] <= final[15] + 2
        if case in ("messages", "chat-to-anthropic"):
            assert last[14] == final[14] == 321  # message_start gave the input exactly
        assert last[20] > 0
        await h.flush()
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT usage_source, cost_nano FROM usage_log WHERE request_id = $1",
                                    final[1])
        finally:
            await conn.close()
        assert [(r["usage_source"], r["cost_nano"]) for r in rows] == [("upstream", final[20])]
        async with aiohttp.ClientSession() as s, s.get(h.url + "/metrics") as r:
            text = await r.text()
        written = [float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("tollway_stream_checkpoints_total ")]
        assert written == [float(len(rec_ledger.checkpoints))]
        assert "tollway_stream_checkpoint_failures_total 0" in text
    finally:
        await h.stop()
