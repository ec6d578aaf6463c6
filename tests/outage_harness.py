"""The outage scenario, for tests/test_outages.py (seconds-long outages) and its long version
bench/bench_outages.py (a minute each).

`surgeflow run` as production runs it (Kafka in and out, tail: true, recovery store, ClickHouse,
a webhook) reads a topic that a producer keeps filling at a steady rate, while, one after the
other and with calm in between:

1. Redis stops answering (SIGSTOP), then answers again (SIGCONT);
2. Redis is killed (SIGKILL) and started again on its append-only file;
3. ClickHouse fails: every table the flow inserts into is detached, then attached again
   (tests/outage_child.py does it inside the flow's process, where chDB lives, on SIGUSR1);
4. the Kafka broker is killed and started again: the source and the three output topics lose it.

Once the producer is done and the run has read everything, it stops (SIGTERM), and a calm run
reads the same topic. Then both must hold the same: Redis, every ClickHouse table, the Kafka
actions, alerts and dead letters and the webhook (by idempotency key, each key with one body);
the run logged one line when each outage started and one when it ended; and the ClickHouse queue
never held more than its byte bound (`clickhouse.max_buffer_bytes`; beyond, it spills to disk).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from confluent_kafka import Producer

from connectors.synthetic import Anomaly, SyntheticSpec, generate
from tests import services
from tests.engine_harness import PAGES_ONLY
from tests.crash_harness import (PROJECT_ROOT, Run, Webhook, clickhouse_tables, delivered,
                                 differences, end_offsets, redis_contents, write_config)

QUEUE_BYTES = 256 * 1024  # the outage run's ClickHouse byte bound: small, so that it spills

START = re.compile(r"\b(Redis|ClickHouse|Kafka)\b.*\bunavailable\b")
END = re.compile(r"\b(Redis|ClickHouse|Kafka)\b.*\bis back\b")


class ServiceStartError(RuntimeError):
    """Kafka or Redis could not start: a skip, or a failure under CI=true."""


@dataclass
class Timeline:
    """Seconds from the run's start: each outage lasts ``outage_s``, with ``calm_s`` between."""

    outage_s: float
    calm_s: float = 4.0
    lead_s: float = 5.0
    starts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        t = self.lead_s
        for name in ("redis_hung", "redis_killed", "clickhouse", "kafka"):
            self.starts[name] = t
            t += self.outage_s + self.calm_s
        self.end = t + self.calm_s


class Producer_:
    """Produces the records at a steady rate in a thread; librdkafka queues them while the
    broker is away and delivers them (idempotent: once each, in order) when it is back."""

    def __init__(self, bootstrap: str, topic: str, records: list, seconds: float):
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                  "linger.ms": 20, "message.timeout.ms": 600_000})
        self.topic, self.records, self.seconds = topic, records, seconds
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.failed: list[str] = []

    def _run(self) -> None:
        start = time.monotonic()
        per_s = len(self.records) / self.seconds
        for i, (key, value, ts) in enumerate(self.records):
            due = start + i / per_s
            time.sleep(max(0.0, due - time.monotonic()))  # one clock read: no race
            while True:
                try:
                    self.producer.produce(self.topic, value, key, timestamp=ts,
                                          on_delivery=self._delivered)
                    break
                except BufferError:
                    self.producer.poll(0.1)
            self.producer.poll(0)
        left = self.producer.flush(600)
        if left:
            self.failed.append(f"{left} records not delivered")

    def _delivered(self, err, _msg) -> None:
        if err is not None:
            self.failed.append(str(err))


class OutageRun(Run):
    """`surgeflow run` through tests/outage_child.py: SIGUSR1 detaches or attaches ClickHouse."""

    def __init__(self, config: Path):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.outage_child", "--config",
                                      str(config)], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def clickhouse(self, verb: str) -> None:
        before = sum(verb in line for line in self.lines)
        self.proc.send_signal(signal.SIGUSR1)
        self.wait(lambda: sum(verb in line for line in self.lines) > before, timeout=60)


def queue_bytes(run: Run) -> float:
    """Bytes the ClickHouse queues hold now (every table, every worker), from /metrics."""
    m = run.metrics() or {}
    return sum(v for k, v in m.items() if k.startswith("surgeflow_sink_queue_bytes"))


def scenario(tmp: Path, outage_s: float, events_per_s: float, log=print) -> dict:
    """Runs the whole scenario; returns what the caller asserts on (and prints)."""
    timeline = Timeline(outage_s)
    try:
        broker = services.KafkaBroker().start()
    except Exception as exc:  # noqa: BLE001
        raise ServiceStartError(f"Kafka: {exc}") from exc
    try:
        redis_proc, redis_port = services.start_redis_aof(tmp / "redis")
    except Exception as exc:  # noqa: BLE001
        broker.stop()
        raise ServiceStartError(f"Redis: {exc}") from exc
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    webhook = Webhook()
    try:
        topic = broker.create_topic("events-outage", partitions=1)
        spec = SyntheticSpec(seed=7, users=800, start_ms=1_795_392_000_000, events_per_s=9.0,
                             duration_s=timeline.end * events_per_s / 9.0, malformed_share=0.01,
                             duplicate_share=0.02, max_disorder_ms=2000,
                             anomalies=(Anomaly("request_flood", 40, 30),))
        records = [(r.key, r.value, r.sent_ms) for r in generate(spec)]
        # one trigger rule, no guards: many actions, so that a lost or doubled one shows
        args = (broker.bootstrap, topic, redis_url, webhook.url, PAGES_ONLY)
        config = write_config(tmp, "outage", *args)
        doc = yaml.safe_load(config.read_text())
        doc["clickhouse"]["max_buffer_bytes"] = QUEUE_BYTES
        doc["redis"].update(socket_timeout_s=1.0, retry_max_backoff_s=1.0)
        config.write_text(yaml.safe_dump(doc))

        producer = Producer_(broker.bootstrap, topic, records, timeline.end)
        run = OutageRun(config)
        run.wait(run.running, timeout=120)
        producer.thread.start()
        clock = time.monotonic()
        peak = [0.0]
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], queue_bytes(run))
                time.sleep(0.25)

        threading.Thread(target=sample, daemon=True).start()

        def at(name: str) -> None:
            left = clock + timeline.starts[name] - time.monotonic()
            if left > 0:
                time.sleep(left)
            log(f"[outage] {name} for {outage_s:g} s")

        at("redis_hung")
        os.kill(redis_proc.pid, signal.SIGSTOP)
        time.sleep(outage_s)
        os.kill(redis_proc.pid, signal.SIGCONT)
        at("redis_killed")
        redis_proc.kill()
        redis_proc.wait()
        time.sleep(outage_s)
        redis_proc, _ = services.start_redis_aof(tmp / "redis", redis_port)
        at("clickhouse")
        run.clickhouse("DETACH")
        time.sleep(outage_s)
        run.clickhouse("ATTACH")
        at("kafka")
        services.kill_kafka(broker)
        time.sleep(outage_s)
        # The flow sees a lost broker at its next poll or after its sink's queue has waited
        # OUTAGE_AFTER_S: a run busy draining the ClickHouse backlog may poll only once the
        # broker is back, and then rightly reports nothing. The broker stays away until the
        # run has noticed (bounded: never noticing fails the log-line test, as it should).
        kafka_seen = lambda: any(START.search(x) and "Kafka" in x for x in run.lines)  # noqa: E731
        deadline = time.monotonic() + 60
        while not kafka_seen() and time.monotonic() < deadline:
            time.sleep(0.2)
        services.restart_kafka(broker)
        producer.thread.join(timeline.end + 600)
        assert not producer.failed, producer.failed
        ends = end_offsets(broker.bootstrap, topic)
        run.wait(lambda: run.read_through(ends), timeout=600)
        run.wait(lambda: queue_bytes(run) == 0, timeout=300)
        sampling.set()
        drain_s = run.stop()
        outage_log = run.lines[:]

        calm = Run(write_config(tmp, "calm", *args))
        calm.wait(lambda: calm.read_through(ends), timeout=600)
        calm.stop()

        redis_diff = differences(redis_contents(redis_url, "outage"),
                                 redis_contents(redis_url, "calm"))
        tables = clickhouse_tables(tmp / "chdb", "calm", "outage")
        table_diff = {t: (len(rows), len(tables["outage"][t]))
                      for t, rows in tables["calm"].items() if rows != tables["outage"][t]}
        got, want = delivered(broker.bootstrap, "outage"), delivered(broker.bootstrap, "calm")
        hooks, calm_hooks = webhook.by_key("/outage"), webhook.by_key("/calm")
        return {
            "records": sum(ends.values()),
            "outage_s": outage_s,
            "redis_differences": redis_diff,
            "redis_keys": len(redis_contents(redis_url, "calm")),
            "table_rows": {t: len(rows) for t, rows in tables["calm"].items()},
            "table_differences": table_diff,
            "kafka_equal": {k: got[k] == want[k] for k in got},
            "kafka_counts": {k: len(want[k]) for k in want},
            "kafka_repeated_bodies": {k: sum(len(b) > 1 for b in got[k].values()) for k in got},
            "webhook_equal": hooks == calm_hooks,
            "webhook_alerts": len(calm_hooks),
            "outage_lines": {service: {"start": sum(bool(m) and m.group(1) == service
                                                    for m in map(START.search, outage_log)),
                                       "end": sum(bool(m) and m.group(1) == service
                                                  for m in map(END.search, outage_log))}
                             for service in ("Redis", "ClickHouse", "Kafka")},
            "queue_bytes_peak": peak[0],
            "queue_bytes_bound": QUEUE_BYTES,
            "drain_s": drain_s,
            "log": [line for line in outage_log if START.search(line) or END.search(line)],
        }
    finally:
        webhook.close()
        with_suppressed(lambda: os.kill(redis_proc.pid, signal.SIGCONT))
        with_suppressed(redis_proc.kill)
        broker.stop()


def with_suppressed(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - cleanup of what may be gone already
        pass


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(scenario(Path(d), float(sys.argv[1]) if sys.argv[1:] else 4.0, 300.0),
                         indent=1, default=str))
