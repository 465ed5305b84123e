"""Prometheus metrics: plain counters on the hot path, prometheus_client at scrape time.

Why not prometheus_client's Counter objects per request: each `.labels().inc()` takes a
lock and a dict lookup per metric; with six families per request that is most of a
request's CPU budget. Here a request updates a few dict entries and one histogram
bucket list; the exposition is built by a custom collector only when /metrics is
scraped. Workers write a snapshot of their counters to `<data_dir>/metrics/<pid>.json`
every second, and a scrape on any worker merges every live worker's snapshot, so one
scrape sees the whole host.

Label sets are bounded: route, protocol, status class, model (only models the gateway
knows, else "other"), token class, reason. Never a key, a user or a request id.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from accounting.ledger import MAX_STATS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
MAX_MODELS = 200
TOKEN_CLASSES = ("input", "output", "cache_read", "cache_write")


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, v)] += 1
        self.sum += v


class Metrics:
    def __init__(self, snapshot_dir: Path | None = None, token: str = "") -> None:
        # Counted per request as plain lists under string keys (a tuple key is hashed on
        # every update); `requests` and `tokens` give the labelled view at snapshot time.
        # route name -> model -> requests per status class (index 1..5: 1xx..5xx)
        self._requests: dict[str, dict[str, list[int]]] = {}
        self._protocols: dict[str, str] = {}  # route name -> its protocol
        self._tokens: dict[str, list[int]] = {}  # model -> tokens per class (TOKEN_CLASSES)
        self.latency: dict[str, Histogram] = {}
        self.ttfb: dict[str, Histogram] = {}
        self.upstream_latency: dict[str, Histogram] = {}
        self.spend: dict[str, int] = {}
        self.models: set[str] = set()
        self.snapshot_dir = snapshot_dir
        self.token = token.encode()
        # Worker state read at snapshot time (ledger, limits, channels): a callable
        # returning {family: (kind, doc, label_name | "", merge, {label_value: number})},
        # kind "counter" | "gauge", merge "sum" | "min" | "max". Merged across workers like the rest.
        self.state: Callable[[], dict[str, tuple[str, str, str, str, dict[str, float]]]] | None = None

    def known_models(self, names: list[str]) -> None:
        """Only models the operator configured become label values."""
        self.models.update(names[:MAX_MODELS])

    def request(self, route: Any, status: int, stream: bool, latency: float, ttfb: float,
                model: str, usage: Any, cost: int) -> None:
        m = model if model in self.models else "other"
        name = route.name
        by_model = self._requests.get(name)
        if by_model is None:
            by_model = self._requests[name] = {}
            self._protocols[name] = route.protocol_name
        cells = by_model.get(m)
        if cells is None:
            cells = by_model[m] = [0] * 6
        i = status // 100
        cells[i if 1 <= i <= 5 else 5] += 1
        h = self.latency.get(name)
        if h is None:
            h = self.latency[name] = Histogram()
            self.ttfb[name] = Histogram()
        # Histogram.observe, inlined (twice per request).
        h.counts[bisect_left(LATENCY_BUCKETS, latency)] += 1
        h.sum += latency
        if ttfb >= 0:
            h = self.ttfb[name]
            h.counts[bisect_left(LATENCY_BUCKETS, ttfb)] += 1
            h.sum += ttfb
        if usage is not None:
            t = self._tokens.get(m)
            if t is None:
                t = self._tokens[m] = [0, 0, 0, 0]
            t[0] += usage.input
            t[1] += usage.output
            t[2] += usage.cache_read
            t[3] += usage.cache_write
        if cost:
            self.spend[m] = self.spend.get(m, 0) + cost

    @property
    def requests(self) -> dict[tuple[str, str, str, str], int]:
        """Requests by (route, protocol, status class, model)."""
        out: dict[tuple[str, str, str, str], int] = {}
        for name, by_model in self._requests.items():
            protocol = self._protocols[name]
            for m, cells in by_model.items():
                for i in range(1, 6):
                    if cells[i]:
                        out[(name, protocol, STATUS_CLASS[i], m)] = cells[i]
        return out

    @property
    def tokens(self) -> dict[tuple[str, str], int]:
        """Tokens by (model, token class)."""
        return {(m, cls): n for m, counts in self._tokens.items()
                for cls, n in zip(TOKEN_CLASSES, counts, strict=True) if n}

    # --- snapshots and exposition -----------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "latency": {k: [h.counts, h.sum] for k, h in self.latency.items()},
            "ttfb": {k: [h.counts, h.sum] for k, h in self.ttfb.items()},
            "tokens": [[*k, v] for k, v in self.tokens.items()],
            "spend": self.spend,
            "state": self.state() if self.state is not None else {},
        }

    def write_snapshot(self) -> None:
        if self.snapshot_dir is None:
            return
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_dir / f".{os.getpid()}.tmp"
        tmp.write_bytes(orjson.dumps(self.snapshot()))
        tmp.replace(self.snapshot_dir / f"{os.getpid()}.json")

    def _merged(self) -> dict[str, Any]:
        snaps = [self.snapshot()]
        if self.snapshot_dir is not None and self.snapshot_dir.is_dir():
            me = os.getpid()
            for p in self.snapshot_dir.glob("*.json"):
                try:
                    pid = int(p.stem)
                except ValueError:
                    continue
                if pid == me:
                    continue
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    p.unlink(missing_ok=True)
                    continue
                except PermissionError:
                    pass
                try:
                    snaps.append(orjson.loads(p.read_bytes()))
                except (OSError, orjson.JSONDecodeError):
                    continue
        state: dict[str, tuple[str, str, str, str, dict[str, float]]] = {}
        for snap in snaps:
            for fam, (kind, doc, label, merge, values) in snap.get("state", {}).items():
                cur = state.get(fam)
                if cur is None:
                    state[fam] = (kind, doc, label, merge, dict(values))
                    continue
                acc = cur[4]
                for k, v in values.items():
                    if k not in acc:
                        acc[k] = v
                    else:
                        acc[k] = (min(acc[k], v) if merge == "min" else
                                  max(acc[k], v) if merge == "max" else acc[k] + v)
        req: dict[tuple[str, ...], int] = {}
        tok: dict[tuple[str, ...], int] = {}
        spend: dict[str, int] = {}
        lat: dict[str, list[Any]] = {}
        ttfb: dict[str, list[Any]] = {}
        for s in snaps:
            for *k, v in s["requests"]:
                req[tuple(k)] = req.get(tuple(k), 0) + v
            for *k, v in s["tokens"]:
                tok[tuple(k)] = tok.get(tuple(k), 0) + v
            for k, v in s["spend"].items():
                spend[k] = spend.get(k, 0) + v
            for src, dst in ((s["latency"], lat), (s["ttfb"], ttfb)):
                for k, (counts, total) in src.items():
                    hist = dst.setdefault(k, [[0] * len(counts), 0.0])
                    hist[0] = [a + b for a, b in zip(hist[0], counts, strict=True)]
                    hist[1] += total
        return {"requests": req, "tokens": tok, "spend": spend, "latency": lat, "ttfb": ttfb,
                "state": state}

    def collect(self) -> Iterator[Metric]:
        m = self._merged()
        c = CounterMetricFamily("tollway_requests", "Model requests served",
                                labels=["route", "protocol", "status_class", "model"])
        for k, v in sorted(m["requests"].items()):
            c.add_metric(list(k), v)
        yield c
        for name, doc, data in (
            ("tollway_request_duration_seconds", "Request latency, admission to last byte", m["latency"]),
            ("tollway_time_to_first_byte_seconds", "Time from admission to the upstream's first byte", m["ttfb"]),
        ):
            h = HistogramMetricFamily(name, doc, labels=["route"])
            for route, (counts, total) in sorted(data.items()):
                acc = 0
                buckets = []
                for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    acc += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
                h.add_metric([route], buckets, total)
            yield h
        t = CounterMetricFamily("tollway_tokens", "Tokens settled, by model and token class",
                                labels=["model", "token_class"])
        for k, v in sorted(m["tokens"].items()):
            t.add_metric(list(k), v)
        yield t
        s = CounterMetricFamily("tollway_spend_usd", "Spend settled, in USD (exact in nano-USD in the usage log)",
                                labels=["model"])
        for k, v in sorted(m["spend"].items()):
            s.add_metric([k], v / 1e9)
        yield s
        for fam, (kind, doc, label, _merge, values) in sorted(m["state"].items()):
            labels = [label] if label else []
            fam_obj: Metric = (CounterMetricFamily(fam, doc, labels=labels) if kind == "counter"
                               else GaugeMetricFamily(fam, doc, labels=labels))
            for k, v in sorted(values.items()):
                fam_obj.add_metric([k] if label else [], v)  # type: ignore[attr-defined]
            yield fam_obj

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)

    def serve(self, req: Any, conn: Any) -> None:
        if self.token:
            auth = req.header(b"authorization") or b""
            import hmac

            if not hmac.compare_digest(auth, b"Bearer " + self.token):
                conn.send(401, [(b"content-type", b"text/plain")], b"unauthorized\n")
                return
        conn.send(200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
                  self.render())


def ledger_families(stats: dict[str, float]) -> dict[str, tuple[str, str, str, str, dict[str, float]]]:
    """A flusher's stats (accounting.ledger.Flusher.stats) as `Metrics.state` families,
    summed across the processes that flush (workers, or the ledger process)."""
    out: dict[str, tuple[str, str, str, str, dict[str, float]]] = {}
    for name, value in stats.items():
        if name.endswith("_total"):
            out[f"tollway_ledger_{name[:-6]}"] = (
                "counter", f"Ledger: {name[:-6].replace('_', ' ')}", "", "sum", {"": value})
        else:
            out[f"tollway_ledger_{name}"] = (
                "gauge", f"Ledger: {name.replace('_', ' ')}", "",
                "max" if name in MAX_STATS else "sum", {"": value})
    return out
