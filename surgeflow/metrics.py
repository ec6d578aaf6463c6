"""Operations surface: Prometheus metrics, ``/healthz`` and ``/readyz`` on one small HTTP port.

Nothing here counts anything. A custom prometheus-client collector reads ``STATS``
(surgeflow/stats.py) when scraped, so there is one set of counters only:

| STATS call in the flow | exposed as |
|---|---|
| ``add(name, n)`` | ``surgeflow_<name>_total`` (counter) |
| ``add_labeled(name, value, n)`` | ``surgeflow_<name>_total{<label>="value"}``, label from ``LABELS`` |
| ``gauge(name, fn)`` | ``surgeflow_<name>`` (gauge; labelled when fn returns a dict) |
| ``set(name, v)`` / ``set_labeled(name, value, v)`` | ``surgeflow_<name>`` / ``surgeflow_<name>{<label>="value"}`` |
| ``observe_since(name, ...)`` | ``surgeflow_<name>{quantile="0.5"|"0.99"}`` (gauge) and ``surgeflow_<name>_samples_total`` |
| ``outage(component, detail)`` | ``surgeflow_outage{component=...}`` 1 and ``surgeflow_outage_seconds{component=...}`` |

and derived figures: ``surgeflow_watermark_delay_seconds`` (wall now - ``watermark_ms``),
``surgeflow_stream_clock_delay_seconds``, ``surgeflow_heartbeat_age_seconds``, and with a Kafka
source ``surgeflow_consumer_lag{partition}`` / ``surgeflow_source_end_offset{partition}``
(``KafkaLag``). The process collector adds ``process_*`` (CPU, memory, open files).

``/healthz``: 200 unless the flow thread is wedged (its last ``STATS.set("heartbeat_ms", ...)``
is older than 60 s; before the first heartbeat it is healthy). ``/readyz``: 200 once the run has
started (``STATS.set("ready", 1)``) and no outage is open; else 503 naming the open outages.
Both answer JSON. ``serve(settings)`` is the one call for the CLI.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from surgeflow.stats import STATS, Stats

log = logging.getLogger(__name__)

PREFIX = "surgeflow_"
# The label name of each labelled family (counters, gauges, set values); others get "label".
LABELS = {
    "dead_letters": "reason",
    "evictions": "kind",
    "redis_command_errors": "error",
    "kafka_rejected": "topic",
    "clickhouse_rejected_blocks": "table",
    "step_errors": "step",
    "step_in": "step",
    "step_out": "step",
    "sink_queue_rows": "sink",
    "sink_queue_bytes": "sink",
    "sink_spool_files": "sink",
    "source_offset": "partition",
    "source_end_offset": "partition",
    "consumer_lag": "partition",
}
# Families whose name starts with one of these get that label (state sizes per shard).
LABEL_PREFIXES = (("state_", "shard"),)
# A set value (wall epoch ms) -> the derived "how far behind now" gauge, in seconds.
DELAYS = {
    "watermark_ms": "watermark_delay_seconds",
    "stream_clock_ms": "stream_clock_delay_seconds",
    "heartbeat_ms": "heartbeat_age_seconds",
}
QUANTILES = (0.5, 0.99)
MAX_QUANTILE_SAMPLES = 20_000  # a scrape sorts at most this many latency samples per name
HEARTBEAT_STALE_S = 60.0


def metric_name(name: str) -> str:
    """The exposed name of a STATS name: prefixed, anything but [a-zA-Z0-9_] made ``_``.

    >>> metric_name("events_in")
    'surgeflow_events_in'
    >>> metric_name("sink queue.rows")
    'surgeflow_sink_queue_rows'
    """
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def label_name(family: str) -> str:
    """The label name of a labelled family.

    >>> label_name("dead_letters"), label_name("state_profiles"), label_name("something_new")
    ('reason', 'shard', 'label')
    """
    if family in LABELS:
        return LABELS[family]
    for prefix, label in LABEL_PREFIXES:
        if family.startswith(prefix):
            return label
    return "label"


def split_key(key: str) -> tuple[str, str | None]:
    """A STATS key into (family, label value or None): ``name{label}`` as ``add_labeled`` and
    ``set_labeled`` store it.

    >>> split_key("dead_letters{invalid_json}")
    ('dead_letters', 'invalid_json')
    >>> split_key("events_in")
    ('events_in', None)
    >>> split_key("kafka_rejected{odd{topic}}")
    ('kafka_rejected', 'odd{topic}')
    """
    brace = key.find("{")
    if brace > 0 and key.endswith("}"):
        return key[:brace], key[brace + 1:-1]
    return key, None


def quantiles(samples: list[float], qs: Iterable[float] = QUANTILES) -> dict[float, float]:
    """Quantiles the way ``Stats.percentile`` takes them (one sort for all); at most
    ``MAX_QUANTILE_SAMPLES`` evenly strided samples are sorted, so a scrape stays short.

    >>> quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    {0.5: 3.0, 0.99: 5.0}
    >>> quantiles([])
    {}
    """
    if not samples:
        return {}
    if len(samples) > MAX_QUANTILE_SAMPLES:  # reservoir slots hold a uniform sample already
        samples = samples[:: -(-len(samples) // MAX_QUANTILE_SAMPLES)]
    ordered = sorted(samples)
    return {q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in qs}


def consumer_lag(end_offsets: Mapping[int, int], positions: Mapping[int, float]) -> dict[int, int]:
    """Records not yet processed per partition: the end offset (last record + 1) minus the next
    offset to read (last processed offset + 1). Partitions the flow has not reported are left
    out (their position is unknown); never below 0.

    >>> consumer_lag({0: 10, 1: 7}, {0: 3})
    {0: 6}
    >>> consumer_lag({0: 10}, {0: 9})
    {0: 0}
    """
    return {p: max(0, int(end) - (int(positions[p]) + 1))
            for p, end in end_offsets.items() if p in positions}


def health(heartbeat_ms: float | None, now_ms: float, stale_after_s: float = HEARTBEAT_STALE_S
           ) -> tuple[bool, str]:
    """Liveness from the flow's last heartbeat (wall epoch ms).

    >>> health(None, 1_000_000)
    (True, 'ok (no heartbeat yet)')
    >>> health(990_000, 1_000_000)
    (True, 'ok')
    >>> health(900_000, 1_000_000)
    (False, 'no heartbeat from the flow for 100 s (limit 60 s)')
    """
    if heartbeat_ms is None:
        return True, "ok (no heartbeat yet)"
    age = (now_ms - heartbeat_ms) / 1000
    if age > stale_after_s:
        return False, f"no heartbeat from the flow for {age:.0f} s (limit {stale_after_s:.0f} s)"
    return True, "ok"


def readiness(started: bool, outages: Mapping[str, tuple[str, float]]) -> tuple[bool, str]:
    """Ready once the run has started and no outage is open.

    >>> readiness(False, {})
    (False, 'the run has not started')
    >>> readiness(True, {"redis": ("connection refused", 0.0)})
    (False, 'outage: redis (connection refused)')
    >>> readiness(True, {})
    (True, 'ok')
    """
    if not started:
        return False, "the run has not started"
    if outages:
        return False, "outage: " + ", ".join(f"{c} ({d})" for c, (d, _) in sorted(outages.items()))
    return True, "ok"


def ready_state(stats: Stats = STATS) -> tuple[bool, str]:
    """The default ``/readyz`` check, on a Stats object."""
    with stats.lock:
        started = bool(stats.values.get("ready"))
        outages = dict(stats.outages)
    return readiness(started, outages)


def health_state(stats: Stats = STATS) -> tuple[bool, str]:
    """The default ``/healthz`` check, on a Stats object."""
    return health(stats.values.get("heartbeat_ms"), time.time() * 1000)


class StatsCollector:
    """prometheus-client collector over a Stats object, read at scrape time.

    ``extra_gauges`` are more ``name -> fn`` gauges that are not global (e.g. ``KafkaLag``).
    A gauge function that raises is left out of that scrape (logged once per name).
    """

    def __init__(self, stats: Stats = STATS, extra_gauges: Mapping[str, Callable] | None = None):
        self.stats = stats
        self.extra_gauges = dict(extra_gauges or {})
        self._failed: set[str] = set()

    def describe(self) -> list[Metric]:
        return []  # names change at run time; registration must not scrape

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        with s.lock:  # copies only: sorting and gauge functions run outside the lock
            counts = dict(s.counts)
            values = dict(s.values)
            outages = dict(s.outages)
            gauges = {**s.gauges, **self.extra_gauges}
            samples = {name: list(v) for name, v in s.samples.items()}
            seen = dict(s.seen)
        now = time.time()
        emitted: set[str] = set()

        def fresh(name: str) -> bool:
            if name in emitted:
                return False
            emitted.add(name)
            return True

        # counters, plain and labelled, grouped by family
        families: dict[str, list[tuple[str | None, float]]] = {}
        for key, n in counts.items():
            family, label = split_key(key)
            families.setdefault(family, []).append((label, n))
        for family, rows in sorted(families.items()):
            name = metric_name(family)
            if not fresh(name):
                continue
            labelled = any(label is not None for label, _ in rows)
            metric = CounterMetricFamily(name, f"STATS counter {family}",
                                         labels=[label_name(family)] if labelled else None)
            for label, n in sorted(rows, key=lambda r: r[0] or ""):
                metric.add_metric([] if label is None else [label], n)
            yield metric

        # values set by the flow, and the derived delays
        set_families: dict[str, list[tuple[str | None, float]]] = {}
        for key, v in values.items():
            family, label = split_key(key)
            set_families.setdefault(family, []).append((label, v))
        for family, rows in sorted(set_families.items()):
            yield from self._gauge(family, rows, fresh, f"value set by the flow: {family}")
        for source, derived in DELAYS.items():
            if isinstance(values.get(source), (int, float)) and fresh(metric_name(derived)):
                yield GaugeMetricFamily(metric_name(derived), f"wall now - {source}, seconds",
                                        value=now - values[source] / 1000)

        # gauges sampled now
        for family, fn in sorted(gauges.items()):
            try:
                got = fn()
            except Exception as exc:  # noqa: BLE001 - a broken gauge must not break the scrape
                if family not in self._failed:
                    self._failed.add(family)
                    log.warning("metrics: gauge %s failed: %r", family, exc)
                continue
            if got is None:
                continue
            rows = ([(str(k), v) for k, v in got.items()] if isinstance(got, Mapping)
                    else [(None, got)])
            yield from self._gauge(family, rows, fresh, f"sampled at scrape: {family}")

        # latency samples
        for family, values_ in sorted(samples.items()):
            qs = quantiles(values_)
            if qs and fresh(metric_name(family)):
                metric = GaugeMetricFamily(metric_name(family),
                                           f"quantiles of {family} (uniform sample of the run)",
                                           labels=["quantile"])
                for q, v in qs.items():
                    metric.add_metric([str(q)], v)
                yield metric
            if fresh(metric_name(family + "_samples")):
                yield CounterMetricFamily(metric_name(family + "_samples"),
                                          f"observations of {family}", value=seen.get(family, 0))

        # outages
        if fresh(metric_name("outage")):
            up = GaugeMetricFamily(metric_name("outage"), "1 per open outage",
                                   labels=["component"])
            since = GaugeMetricFamily(metric_name("outage_seconds"), "how long it has been open",
                                      labels=["component"])
            for component, (_detail, started) in sorted(outages.items()):
                up.add_metric([component], 1)
                since.add_metric([component], max(0.0, now - started))
            emitted.add(metric_name("outage_seconds"))
            yield up
            yield since

    def _gauge(self, family: str, rows: list[tuple[str | None, float]], fresh, doc: str):
        rows = [(label, v) for label, v in rows if isinstance(v, (int, float))]
        name = metric_name(family)
        if not rows or not fresh(name):
            return
        labelled = any(label is not None for label, _ in rows)
        metric = GaugeMetricFamily(name, doc, labels=[label_name(family)] if labelled else None)
        for label, v in sorted(rows, key=lambda r: r[0] or ""):
            metric.add_metric([] if label is None else [label], float(v))
        yield metric


class KafkaLag:
    """Consumer lag per partition of the source topic, as a gauge function (``{partition: lag}``).

    End offsets come from ``Consumer.get_watermark_offsets`` on a consumer of its own that never
    subscribes, joins a group or commits; positions are the flow's
    ``STATS.set_labeled("source_offset", partition, offset of the last record processed)``.
    lag = end offset - (position + 1). Cached ~2 s; one refresh spends at most ``timeout_s``
    (<= 2 s) in all; when the broker does not answer it returns {} and waits ``backoff_s``
    before asking again, so a scrape is never held for long.
    """

    def __init__(self, brokers: list[str] | str, topic: str,
                 client_config: Mapping[str, str] | None = None, *, stats: Stats = STATS,
                 cache_s: float = 2.0, timeout_s: float = 2.0, backoff_s: float = 10.0):
        self.topic, self.stats = topic, stats
        self.cache_s, self.timeout_s, self.backoff_s = cache_s, min(timeout_s, 2.0), backoff_s
        self.config = {
            **dict(client_config or {}),
            "bootstrap.servers": brokers if isinstance(brokers, str) else ",".join(brokers),
            "group.id": "surgeflow-metrics-lag",  # never joined: no subscribe, no commit
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "allow.auto.create.topics": False,
            "socket.connection.setup.timeout.ms": 2000,
            "log_level": 2,  # its connection errors are the flow's to report, not ours
            "error_cb": self._error,  # queued until poll: drained each refresh
        }
        self._consumer = None
        self._lock = threading.Lock()
        self._partitions: list[int] = []
        self._partitions_at = 0.0
        self._ends: dict[int, int] = {}
        self._at = 0.0  # monotonic time of the last refresh (successful or not)
        self._ok = False

    def _error(self, err) -> None:
        log.debug("metrics: Kafka lag client: %s", err)

    def _refresh(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        deadline = time.monotonic() + self.timeout_s
        if self._consumer is None:
            self._consumer = Consumer(self.config)
        if not self._partitions or time.monotonic() - self._partitions_at > 30:
            meta = self._consumer.list_topics(self.topic, timeout=self.timeout_s)
            info = meta.topics.get(self.topic)
            if info is None or info.error is not None or not info.partitions:
                raise LookupError(f"topic {self.topic!r}: {getattr(info, 'error', 'missing')}")
            self._partitions = sorted(info.partitions)
            self._partitions_at = time.monotonic()
        ends = {}
        for p in self._partitions:
            left = deadline - time.monotonic()
            if left <= 0.05:
                raise TimeoutError("watermark offsets took longer than the budget")
            got = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=left)
            if got is None:
                raise TimeoutError(f"watermark offsets of partition {p} timed out")
            ends[p] = got[1]
        self._consumer.poll(0)  # serves the queued error callbacks: the queue stays empty
        self._ends = ends

    def end_offsets(self) -> dict[int, int]:
        """End offset (last record + 1) per partition: refreshed if older than ``cache_s``."""
        if not self._lock.acquire(blocking=False):  # another scrape is refreshing: use the cache
            return dict(self._ends) if self._ok else {}
        try:
            wait = self.cache_s if self._ok else self.backoff_s
            if self._at and time.monotonic() - self._at < wait:
                return dict(self._ends) if self._ok else {}
            try:
                self._refresh()
                self._ok = True
            except Exception as exc:  # noqa: BLE001 - unreachable broker, missing topic, timeout
                if self._ok or not self._at:
                    log.warning("metrics: consumer lag unavailable: %s", exc)
                self._ok, self._ends = False, {}
                self._drop()  # no client reconnecting in the background until the next try
            self._at = time.monotonic()
            return dict(self._ends)
        finally:
            self._lock.release()

    def __call__(self) -> dict[int, int]:
        ends = self.end_offsets()
        positions = {}
        with self.stats.lock:
            values = list(self.stats.values.items())
        for key, v in values:
            family, label = split_key(key)
            if family == "source_offset" and label is not None and label.isdigit():
                positions[int(label)] = v
        return consumer_lag(ends, positions)

    def _drop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            self._partitions = []
            threading.Thread(target=consumer.close, daemon=True).start()  # never waits

    def close(self) -> None:
        with self._lock:
            self._drop()


def make_registry(stats: Stats = STATS, extra_gauges: Mapping[str, Callable] | None = None,
                  process: bool = True) -> CollectorRegistry:
    """A registry of our own (the global one is left alone): STATS, plus process_* figures."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats, extra_gauges))
    if process:
        ProcessCollector(registry=registry)
    return registry


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        srv = self.server
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(srv.registry), content_type)
            elif path == "/healthz":
                ok, reason = srv.healthy()
                self._json(200 if ok else 503, {"status": "ok" if ok else "unhealthy",
                                                "reason": reason})
            elif path == "/readyz":
                ok, reason = srv.ready()
                with srv.stats.lock:
                    outages = dict(srv.stats.outages)
                self._json(200 if ok else 503, {
                    "status": "ready" if ok else "not ready", "reason": reason,
                    "outages": {c: {"detail": d, "since": round(t, 3)}
                                for c, (d, t) in sorted(outages.items())}})
            elif path == "/":
                self._json(200, {"endpoints": ["/metrics", "/healthz", "/readyz"]})
            else:
                self._json(404, {"error": f"no such path: {path}"})
        except Exception as exc:  # noqa: BLE001 - answer 500, keep serving
            log.exception("metrics: %s failed", path)
            self._json(500, {"error": repr(exc)})

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 - scrapes are not logged
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, registry, ready, healthy, stats):
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        self.registry, self.ready, self.healthy, self.stats = registry, ready, healthy, stats
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()


def start_server(host: str, port: int, ready: Callable[[], tuple[bool, str]] | None = None, *,
                 healthy: Callable[[], tuple[bool, str]] | None = None,
                 registry: CollectorRegistry | None = None, stats: Stats = STATS
                 ) -> tuple[_Server, int]:
    """Serve ``/metrics``, ``/healthz``, ``/readyz`` from a daemon thread; port 0 = any free
    port. Returns (server, bound port); ``server.stop()`` ends it. Raises OSError when the
    port is taken."""
    srv = _Server((host, port), registry or make_registry(stats),
                  ready or (lambda: ready_state(stats)), healthy or (lambda: health_state(stats)),
                  stats)
    srv._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                                   name="surgeflow-metrics", daemon=True)
    srv._thread.start()
    return srv, srv.server_address[1]


def address_of(host: str, port: int) -> str:
    """The URL to print.

    >>> address_of("127.0.0.1", 9464), address_of("::1", 9464), address_of("0.0.0.0", 80)
    ('http://127.0.0.1:9464', 'http://[::1]:9464', 'http://0.0.0.0:80')
    """
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(settings, *, stats: Stats = STATS, any_port_if_busy: bool = False
          ) -> tuple[str | None, Callable[[], None]]:
    """The CLI's one call: start the server from ``settings.metrics`` (and Kafka consumer lag
    when ``settings.source.kind == "kafka"``). Returns (address like ``http://127.0.0.1:9464``,
    stop function); (None, no-op) when ``metrics.enabled`` is false. A taken port raises
    OSError naming it, or with ``any_port_if_busy`` (the demo) falls back to a free port."""
    m = settings.metrics
    if not m.enabled:
        return None, lambda: None
    extra: dict[str, Callable] = {}
    lag = None
    if settings.source.kind == "kafka":
        k = settings.kafka
        from privacy.secrets import kafka_client_config

        lag = KafkaLag(k.brokers, k.events_topic, kafka_client_config(k), stats=stats)
        extra = {"consumer_lag": lag, "source_end_offset": lag.end_offsets}
    registry = make_registry(stats, extra)
    try:
        srv, port = start_server(m.host, m.port, registry=registry, stats=stats)
    except OSError as exc:
        if not (any_port_if_busy and m.port):
            if lag is not None:
                lag.close()
            raise OSError(exc.errno, f"metrics server cannot listen on {m.host}:{m.port}: "
                          f"{exc.strerror or exc}") from None
        log.warning("metrics: port %s is taken, using any free port", m.port)
        srv, port = start_server(m.host, 0, registry=registry, stats=stats)

    def stop() -> None:
        srv.stop()
        if lag is not None:
            lag.close()

    return address_of(m.host, port), stop
