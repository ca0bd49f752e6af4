"""Each HTTP request as numbers and as a line: Prometheus metrics and the access log.

An ``Exchange`` is one HTTP request's account. The app opens it before anything else
runs (its request id comes from ``x-request-id`` or is made here) and closes it when the
response is done, a stream included; the kernel client tells ``Metrics`` (its observer)
of every chunk and every end in between, in the request's own task, so time to first
token, the gaps between chunks, the model, the protocol code and the token counts come
from the replies themselves. Closing writes one access line and counts the request.

``/metrics`` is Prometheus's text format from a registry of this app's own. allm serves
HTTP from one process (the managers are the processes that scale), so no multiprocess
collection is needed; the managers' side (queues, capacity, deaths by cause, model loads)
is read at scrape time from their heartbeats and the supervisor. Label values are only
ever catalog model ids, route patterns, status numbers and code names: a client cannot
make new series, save the names of request fields allm ignored, which are capped at
``MAX_IGNORED_SERIES`` (the rest count as ``other``). See docs/design.md, "Logs and metrics".
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from allm.kernel import logs
from allm.kernel import protocol as p
from allm.kernel.codes import AllmError

access = logging.getLogger("allm.access")

REQUEST_ID_HEADER = "x-request-id"
#: a request id we take from a client as is; anything else gets one of ours
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
#: paths a page or a scraper polls: their access lines are DEBUG unless they fail
QUIET_PATHS = frozenset({"/", "/health", "/ready", "/status", "/metrics"})
#: the status of a request whose client left before its response was done (nginx's)
CLIENT_CLOSED = 499
#: the window of the per-model throughput that /status shows
THROUGHPUT_WINDOW_S = 60.0

#: series of allm_ignored_fields_total at most: the field names come from clients
MAX_IGNORED_SERIES = 100
#: an index in a field's path, counted as one field whatever the index
_INDEX = re.compile(r"\[\d+\]")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

#: the exchange of the HTTP request this task serves
current: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("exchange", default=None)


def request_id_for(header: str | None) -> str:
    """The client's ``x-request-id`` if it is a sane one, else a new ``req_…``."""
    if header and _CLIENT_ID.fullmatch(header):
        return header
    return f"req_{uuid.uuid4().hex}"


class Exchange:
    """One HTTP request, from its first byte to its last."""

    __slots__ = (
        "code",
        "completion_tokens",
        "endpoint",
        "finished",
        "first_chunk_s",
        "ignored",
        "last_chunk",
        "method",
        "model",
        "on_close",
        "path",
        "prompt_tokens",
        "request_id",
        "started",
    )

    def __init__(self, request_id: str, method: str, path: str, endpoint: str) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.endpoint = endpoint  # the route's pattern: a label with few values
        self.started = time.monotonic()
        self.model = ""
        self.code = ""  # the protocol code of the last kernel answer; "" when none came
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_chunk_s: float | None = None
        self.last_chunk = 0.0
        self.finished = False
        self.ignored: list[str] = []  # the paths of request fields allm does not know (spec.IGNORED)
        self.on_close: tuple[asyncio.Task[Any], Callable[[asyncio.Task[Any]], None]] | None = None


class _ModelTally:
    __slots__ = ("recent", "requests", "tokens_out")

    def __init__(self) -> None:
        self.requests = 0
        self.tokens_out = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()

    def tokens_per_s(self, now: float) -> float:
        while self.recent and now - self.recent[0][0] > THROUGHPUT_WINDOW_S:
            self.recent.popleft()
        return round(sum(n for _, n in self.recent) / THROUGHPUT_WINDOW_S, 2)


class Metrics:
    """The gateway's counters and histograms, and the kernel client's observer."""

    def __init__(self, managers: Callable[[], Sequence[dict[str, Any]]], *, version: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "allm_requests",
            "HTTP requests by route, model, HTTP status and protocol code (none: no kernel answer)",
            ["endpoint", "model", "status", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "allm_request_duration_seconds",
            "HTTP request latency, first byte in to last byte out (streams included)",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "allm_time_to_first_token_seconds",
            "Streaming requests: from the request's arrival to its first chunk",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "allm_inter_token_latency_seconds",
            "Streaming requests: the gap between one chunk and the next",
            ["model"],
            buckets=GAP_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "allm_tokens",
            "Tokens in (prompt) and out (completion), from the engines' own usage counts",
            ["model", "kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "allm_requests_in_flight", "HTTP requests being served now", registry=self.registry
        )
        self.ignored = Counter(
            "allm_ignored_fields",
            "Request fields allm does not know and ignored, by route and field path ([] for any index)",
            ["endpoint", "field"],
            registry=self.registry,
        )
        self._ignored_series: set[tuple[str, str]] = set()
        info = Gauge("allm_build_info", "allm's version", ["version"], registry=self.registry)
        info.labels(version=version).set(1)
        self.registry.register(ManagerCollector(managers))
        self._models: dict[str, _ModelTally] = {}
        self.serving = 0  # HTTP requests begun and not finished

    # -- the kernel client's observer (allm.kernel.client.Observer) --------------

    def tag(self) -> str:
        exchange = current.get()
        return exchange.request_id if exchange is not None else ""

    def chunk(self, req: p.Request) -> None:
        exchange = current.get()
        if exchange is None:
            return
        now = time.monotonic()
        if exchange.first_chunk_s is None:
            exchange.first_chunk_s = now - exchange.started
            self.ttft.labels(exchange.endpoint, req.model or "none").observe(exchange.first_chunk_s)
        else:
            self.itl.labels(req.model or "none").observe(now - exchange.last_chunk)
        exchange.last_chunk = now

    def end(self, req: p.Request, terminal: p.Result | AllmError) -> None:
        exchange = current.get()
        if exchange is None:
            return
        if req.model:
            exchange.model = req.model
        if isinstance(terminal, AllmError):
            exchange.code = terminal.code.name
            return
        exchange.code = "OK"
        used = terminal.data.get("usage")
        if isinstance(used, dict):
            prompt, completion = used.get("prompt_tokens"), used.get("completion_tokens")
            if isinstance(prompt, int):
                exchange.prompt_tokens += prompt
            if isinstance(completion, int):
                exchange.completion_tokens += completion

    # -- one HTTP request ------------------------------------------------------

    def begin(self, request_id: str, method: str, path: str, endpoint: str) -> Exchange:
        exchange = Exchange(request_id, method, path, endpoint)
        current.set(exchange)
        logs.request_id.set(request_id)
        self.in_flight.inc()
        self.serving += 1
        task = asyncio.current_task()
        if task is not None:
            # A client that leaves mid-stream cancels the task: no response is ever done.
            # Count it then as nginx does, 499 "client closed request".
            def closed(_task: asyncio.Task[Any]) -> None:
                self.finish(exchange, CLIENT_CLOSED)

            task.add_done_callback(closed)
            exchange.on_close = (task, closed)
        return exchange

    def finish(self, exchange: Exchange, status: int) -> None:
        """Count the request and write its access line; once, whoever calls first."""
        if exchange.finished:
            return
        exchange.finished = True
        if exchange.on_close is not None:
            # One connection's task serves request after request: leave nothing on it.
            task, callback = exchange.on_close
            exchange.on_close = None
            task.remove_done_callback(callback)
        self.in_flight.dec()
        self.serving -= 1
        duration_s = time.monotonic() - exchange.started
        model = exchange.model or "none"
        self.requests.labels(exchange.endpoint, model, str(status), exchange.code or "none").inc()
        self.duration.labels(exchange.endpoint, model).observe(duration_s)
        if exchange.prompt_tokens:
            self.tokens.labels(model, "prompt").inc(exchange.prompt_tokens)
        if exchange.completion_tokens:
            self.tokens.labels(model, "completion").inc(exchange.completion_tokens)
        if exchange.model and exchange.endpoint.startswith(("/v1/", "/api/")):  # not /ready's load
            tally = self._models.setdefault(exchange.model, _ModelTally())
            tally.requests += 1
            tally.tokens_out += exchange.completion_tokens
            if exchange.completion_tokens:
                tally.recent.append((time.monotonic(), exchange.completion_tokens))
        if exchange.ignored:
            self._count_ignored(exchange)
        quiet = exchange.path in QUIET_PATHS and status < 400
        access.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s",
            exchange.method,
            exchange.path,
            extra={
                "request_id": exchange.request_id,
                "fields": {
                    "model": exchange.model or None,
                    "status": status,
                    "code": exchange.code or None,
                    "prompt_tokens": exchange.prompt_tokens if exchange.code == "OK" else None,
                    "completion_tokens": exchange.completion_tokens if exchange.code == "OK" else None,
                    "ttft_ms": None
                    if exchange.first_chunk_s is None
                    else round(exchange.first_chunk_s * 1000, 1),
                    "duration_ms": round(duration_s * 1000, 1),
                },
            },
        )

    def _count_ignored(self, exchange: Exchange) -> None:
        fields = list(dict.fromkeys(exchange.ignored))
        access.warning(
            "ignored %d request field(s) allm does not know: %s",
            len(fields),
            ", ".join(fields[:20]) + (" …" if len(fields) > 20 else ""),
            extra={"request_id": exchange.request_id},
        )
        for field in dict.fromkeys(_INDEX.sub("[]", f) for f in fields):
            series = (exchange.endpoint, field)
            if series not in self._ignored_series and len(self._ignored_series) >= MAX_IGNORED_SERIES:
                series = (exchange.endpoint, "other")
            else:
                self._ignored_series.add(series)
            self.ignored.labels(*series).inc()

    def model_activity(self) -> dict[str, dict[str, Any]]:
        """Per model: requests served, tokens out, and tokens/s over the last minute."""
        now = time.monotonic()
        return {
            model: {
                "requests": tally.requests,
                "tokens_out": tally.tokens_out,
                "tokens_per_s": tally.tokens_per_s(now),
            }
            for model, tally in self._models.items()
        }


class ManagerCollector(Collector):
    """The managers' side, read at each scrape from /status's rows."""

    def __init__(self, managers: Callable[[], Sequence[dict[str, Any]]]) -> None:
        self.managers = managers

    def collect(self) -> Iterator[Metric]:
        names = ["manager", "modality"]
        up = GaugeMetricFamily(
            "allm_manager_up", "1 while the manager instance answers heartbeats", labels=names
        )
        info = GaugeMetricFamily(
            "allm_manager_info",
            "each manager instance: its endpoint, and whether it runs on another host",
            labels=[*names, "endpoint", "remote"],
        )
        gauges = {
            key: GaugeMetricFamily(f"allm_manager_{key}", text, labels=names)
            for key, text in (
                ("active", "requests the instance is running"),
                ("queued", "requests waiting in the instance's queue"),
                ("capacity", "most requests the instance takes at once (slots + queue)"),
                ("memory_bytes", "resident memory of the instance and its workers"),
            )
        }
        restarts = CounterMetricFamily(
            "allm_manager_restarts", "new processes for the instance since the gateway started", labels=names
        )
        deaths = CounterMetricFamily(
            "allm_manager_deaths", "deaths of the instance's process by cause", labels=[*names, "cause"]
        )
        model_names = ["manager", "model"]
        loaded = GaugeMetricFamily("allm_model_loaded", "1 while the model is in memory", labels=model_names)
        memory = GaugeMetricFamily(
            "allm_model_memory_bytes",
            "memory the pool reserves for the loaded model (estimated from its files)",
            labels=model_names,
        )
        stats = {
            key: CounterMetricFamily(f"allm_model_{key}", text, labels=model_names)
            for key, text in (
                ("loads", "loads that succeeded, in the current manager process"),
                ("load_failures", "loads that failed, in the current manager process"),
                ("load_seconds", "seconds spent in loads that succeeded, in the current manager process"),
                ("unloads", "unloads (idle, evicted or asked), in the current manager process"),
            )
        }
        # what an engine tells of itself (GGUF models): saved prefixes and speculative drafts
        engine: dict[tuple[str, str], GaugeMetricFamily | CounterMetricFamily] = {
            ("prefix_cache", "bytes"): GaugeMetricFamily(
                "allm_prefix_cache_bytes", "host memory the model's saved prefixes take", labels=model_names
            ),
            ("prefix_cache", "restored_tokens"): CounterMetricFamily(
                "allm_prefix_cache_restored_tokens",
                "prompt tokens restored from saved prefixes instead of computed",
                labels=model_names,
            ),
            ("speculative", "drafted"): CounterMetricFamily(
                "allm_speculative_drafted_tokens",
                "draft tokens decoded (speculative decoding)",
                labels=model_names,
            ),
            ("speculative", "accepted"): CounterMetricFamily(
                "allm_speculative_accepted_tokens",
                "draft tokens the model's own draws kept",
                labels=model_names,
            ),
        }
        for row in self.managers():
            labels = [row["name"], row["modality"]]
            up.add_metric(labels, 1.0 if row["live"] else 0.0)
            info.add_metric([*labels, row["endpoint"], "true" if row.get("remote") else "false"], 1.0)
            for key, family in gauges.items():
                value = row.get(key)
                if value is not None:
                    family.add_metric(labels, float(value))
            restarts.add_metric(labels, float(row["restarts"]))
            for cause, count in sorted((row.get("deaths") or {}).items()):
                deaths.add_metric([*labels, cause], float(count))
            for model in row["models"]:
                loaded.add_metric([row["name"], model], 1.0)
            for model, st in sorted((row.get("model_stats") or {}).items()):
                pair = [row["name"], model]
                if st.get("memory_bytes") is not None:
                    memory.add_metric(pair, float(st["memory_bytes"]))
                stats["loads"].add_metric(pair, float(st.get("loads", 0)))
                stats["load_failures"].add_metric(pair, float(st.get("load_failures", 0)))
                stats["load_seconds"].add_metric(pair, float(st.get("load_s", 0.0)))
                stats["unloads"].add_metric(pair, float(st.get("unloads", 0)))
                for (group, key), told in engine.items():
                    value = (st.get(group) or {}).get(key)
                    if value is not None:
                        told.add_metric(pair, float(value))
        yield up
        yield info
        yield from gauges.values()
        yield restarts
        yield deaths
        yield loaded
        yield memory
        yield from stats.values()
        yield from engine.values()
