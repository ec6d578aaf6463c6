"""Alert latency on a live stream: from an anomalous minute closing to its alert on the Kafka
topic (target p99 < 5 s), and from an abusive event to its alert.

    .venv/bin/python -m bench.bench_alerts                 # 8 minutes of live events, ~600/s
    .venv/bin/python -m bench.bench_alerts --minutes 4 --rate 300

A Kafka broker, Redis and chDB are started as in bench/run_bench.py. A producer process sends a
synthetic stream stamped "now" (paced to the wall clock) with an incident every other minute:
traffic spikes (x6 for a minute, on alternate minutes) and request floods from one IP (10 s at
150 requests/s). The flow follows the topic (tail=True) with the shipped rule catalogue, re-tuned
by configuration only for a short run: the traffic rules' warm-up, window, "for", resolve and
cool-down are shortened (a live hour is too long for a benchmark) and the allowed lateness is 5 s.

Figures (stdout JSON, also bench/results/alerts-<time>.json):
* ``minute_close_to_alert_ms``: STATS ``alert_latency_ms``, the wall time from the complete
  minute's release by ``close_minutes`` to the alert's delivery on the alerts topic (the Kafka
  sink records it after its flush);
* ``minute_end_to_alert_ms``: alert message timestamp on the topic minus the end of its minute
  (event time is the wall clock here): includes the allowed lateness the watermark waits;
* ``event_to_alert_ms``: for the per-IP rules, the alert's timestamp on the topic minus the event
  time of the event that crossed the threshold (producer, broker, consumer, flow, sink).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import threading
import time
import uuid
from pathlib import Path

import yaml
from confluent_kafka import Consumer, TopicPartition

from bench.run_bench import (PROJECT_ROOT, Bench, StopAt, StoppableKafkaSource, code_info, end_offsets,
                             live_producer, log, machine_info, percentiles)
from connectors import kafka
from connectors.synthetic import Anomaly, SyntheticSpec, rhythm
from flows import runner
from surgeflow.stats import STATS

RULES = PROJECT_ROOT / "config" / "alert_rules.yaml"
RESULTS = PROJECT_ROOT / "bench" / "results"


def bench_rules(path: Path) -> Path:
    """The shipped catalogue with the traffic rules shortened for a minutes-long run."""
    doc = yaml.safe_load(RULES.read_text())
    for r in doc["rules"]:
        if r["name"] in ("traffic_anomaly", "channel_traffic_anomaly"):
            r["detector"]["params"].update(warmup=4, lik_warmup=8, half_life=30, cooldown=0)
            r.update({"for": "0s", "resolve_after": "0s", "cooldown": "0s"})
    path.write_text(yaml.safe_dump(doc))
    return path


def pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None, "samples": 0}
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"p50": round(at(0.5), 1), "p99": round(at(0.99), 1), "max": round(v[-1], 1),
            "samples": len(v)}


def read_alerts(bootstrap: str, topic: str) -> list[tuple[int, dict]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    ends = end_offsets(bootstrap, topic)
    c.assign([TopicPartition(topic, p, 0) for p in ends])
    out, left = [], sum(ends.values())
    while left > 0:
        for m in c.consume(1000, timeout=5):
            out.append((m.timestamp()[1], json.loads(m.value())))
            left -= 1
    c.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="live minutes after the priming")
    p.add_argument("--rate", type=float, default=600.0, help="records per second")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    bench = Bench(argparse.Namespace(batch_size=1000, workers=1, shards=8, epoch_s=10.0,
                                     partitions=1, seed=args.seed, users=args.users))
    bench.start_services()
    try:
        out = run(bench, args)
    finally:
        bench.stop_services()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"alerts-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def run(bench: Bench, args) -> dict:
    prime_s = 240.0  # sessions reach their steady rate; alerts of the priming are not measured
    # Whole minutes: the live part starts on a minute of the wall clock, so the incidents below
    # fill whole minutes of event time after the shift to "now".
    origin = (int(time.time() * 1000) // 60_000 + 1) * 60_000
    start = origin - int(prime_s * 1000)
    live_s = args.minutes * 60
    # Spikes on even minutes from the 5th (the detectors' warm-up), floods 20 s into odd ones.
    anomalies = []
    for i in range(5, int(args.minutes)):
        at = prime_s + 60 * i
        anomalies.append(Anomaly("traffic_spike", at, 60, 6.0) if i % 2 == 0 else
                         Anomaly("request_flood", at + 20, 10))
    spec = SyntheticSpec(seed=args.seed, users=args.users, start_ms=start,
                         events_per_s=args.rate / rhythm(origin), duration_s=prime_s + live_s,
                         max_disorder_ms=1000, anomalies=tuple(anomalies))
    topic = bench.broker.create_topic(f"bench-alerts-{uuid.uuid4().hex[:8]}")
    alerts_topic = bench.broker.create_topic(f"bench-alerts-out-{uuid.uuid4().hex[:8]}")
    rules = bench_rules(bench.tmp / "rules.yaml")
    settings = bench.settings(topic, tail=True, database="bench_alerts")
    settings = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"alerts_topic": alerts_topic}),
        "flow": settings.flow.model_copy(update={"allowed_lateness_s": 5.0}),
        "alerts": settings.alerts.model_copy(update={"rules": rules}),
        "clickhouse": settings.clickhouse.model_copy(update={"raw_events": False}),
    })
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    producer = ctx.Process(target=live_producer, daemon=True,
                           args=(child, bench.broker.bootstrap, topic, spec, start))
    producer.start()
    log(f"producer generated {conn.recv():,} records ({prime_s:g} s priming + {live_s:g} s live, "
        f"{len(anomalies)} incidents)")
    stop = StopAt()
    source = StoppableKafkaSource(kafka.events_source([bench.broker.bootstrap], topic, tail=True,
                                                      from_beginning=True, batch_size=1000), stop)
    STATS.reset()
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = runner.run(settings, bench.redis_url, 1, source=source, partitions=1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    if not stop.ready.wait(60):
        raise RuntimeError(f"flow did not start: {outcome.get('error')!r}")
    # The priming part is sent as fast as it goes (its event time is in the past), the rest paced
    # from the next whole minute of the wall clock.
    t0 = (int(time.time() * 1000) // 60_000 + 1) * 60_000
    time.sleep(max(0.0, t0 / 1000 - time.time() - 0.5))
    conn.send((t0 - int(prime_s * 1000), t0))
    if not conn.poll(live_s + 900):
        raise RuntimeError("producer did not finish")
    counts = conn.recv()
    time.sleep(8.0)  # the last minute closes (lateness) and its alerts go out
    stop.set(end_offsets(bench.broker.bootstrap, topic))
    thread.join(timeout=300)
    if "error" in outcome:
        raise RuntimeError(f"flow failed: {outcome['error']!r}") from outcome["error"]
    alerts = read_alerts(bench.broker.bootstrap, alerts_topic)
    live_from = t0
    minute_rules = {"traffic_anomaly", "channel_traffic_anomaly"}
    end_to_alert = [ts - a["at_ms"] for ts, a in alerts
                    if a["rule"] in minute_rules and a["at_ms"] >= live_from]
    event_to_alert = [ts - a["at_ms"] for ts, a in alerts
                      if a["rule"] == "ip_request_flood" and a["status"] == "firing"]
    fired = {}
    for _, a in alerts:
        if a["status"] == "firing":
            fired[a["rule"]] = fired.get(a["rule"], 0) + 1
    res = {
        "machine": machine_info(), "code": code_info(),
        "records": sum(v for k, v in counts.items() if k != "measured_s"),
        "live_rate_per_s": round(counts["measured"] / max(counts["measured_s"], 1e-9), 1),
        "incidents": len(anomalies), "alerts_fired": fired, "alert_messages": len(alerts),
        "minute_close_to_alert_ms": percentiles("alert_latency_ms"),
        "minute_end_to_alert_ms": pct(end_to_alert),
        "event_to_alert_ms": pct(event_to_alert),
        "allowed_lateness_s": 5.0,
    }
    return res


if __name__ == "__main__":
    main()
