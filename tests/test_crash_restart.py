"""Kill -9 at random moments, restart, and nothing is missing or doubled; SIGTERM stops a run
that follows a Kafka topic, and the next start resumes where it stopped.

The production command (`surgeflow run`, Kafka in and out, `tail: true`, recovery store, webhook,
ClickHouse) runs once without interruption, and once killed with SIGKILL at three random moments
(the flow snapshots every 0.5 s and its sinks flush continuously, so kills land in snapshots and
in flushes) and restarted each time. Both end with SIGTERM once every partition was read. Then:

- Redis: every key and field equal, the online models' scores included (the wall-clock
  `updated_at` excepted);
- ClickHouse: every table equal row for row (aggregate states finalised);
- Kafka actions, alerts and dead letters, and the webhook's alerts: the same set of idempotency
  keys with the same bodies. These sinks are at-least-once: a key may arrive twice after a
  crash, always with the same body, so a consumer that drops repeated keys sees one clean run.

The long version (more kills, more data, several partitions) is bench/bench_crash.py.
"""
from __future__ import annotations

import json
import os
import random
import time

import pytest

from connectors.kafka import produce
from connectors.synthetic import Anomaly, SyntheticSpec, generate
from tests.crash_harness import (Run, Webhook, clickhouse_tables, delivered, differences,
                                 end_offsets, redis_contents, write_config)

SPEC = SyntheticSpec(seed=41, users=1200, start_ms=1_795_392_000_000, events_per_s=9.0,
                     duration_s=7200.0, malformed_share=0.01, duplicate_share=0.03,
                     max_disorder_ms=3000,
                     anomalies=(Anomaly("click_fraud", 3000, 300), Anomaly("request_flood", 4200, 60),
                                Anomaly("traffic_spike", 5400, 600, 5.0)))
KILLS = 3


@pytest.fixture(scope="module")
def stream(kafka):
    # One partition: the arrival order is then the same in every run, as the comparison needs.
    # With several, the actions of a visitor whose anonymous events and login travel on two
    # partitions depend on how those interleave, in two clean runs as well (bench/bench_crash.py
    # --partitions 2 shows it); everything else is the same whatever the interleaving.
    topic = kafka.create_topic("events-crash", partitions=1)
    produce([kafka.bootstrap], topic, ((r.key, r.value, r.sent_ms) for r in generate(SPEC)))
    return topic


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def test_kill_9_at_random_moments_then_restart_equals_one_clean_run(tmp_path, kafka, stream,
                                                                    redis_url, webhook):
    ends = end_offsets(kafka.bootstrap, stream)
    args = (kafka.bootstrap, stream, redis_url, webhook.url)

    clean = Run(write_config(tmp_path, "clean", *args))
    clean.wait(lambda: clean.settled(ends))
    assert clean.stop() < 30  # SIGTERM drains and exits 0 within a bounded time

    crash_config = write_config(tmp_path, "crash", *args)
    rng = random.Random(int(os.environ.get("CRASH_SEED", "41")))  # another seed: other moments
    for i in range(KILLS):
        run = Run(crash_config)
        run.wait(run.running)
        time.sleep(rng.uniform(0.5, 4.0))
        assert not run.read_through(ends), "the input was consumed before kill %d" % i
        run.kill()
    last = Run(crash_config)
    last.wait(lambda: last.settled(ends))
    last.stop()

    assert differences(redis_contents(redis_url, "crash"), redis_contents(redis_url, "clean")) == {}
    tables = clickhouse_tables(tmp_path / "chdb", "clean", "crash")
    assert {t: len(rows) for t, rows in tables["clean"].items() if rows}.keys() >= {
        "events_minute", "events_raw", "actions", "alerts", "user_days"}
    for table, rows in tables["clean"].items():
        got = tables["crash"][table]
        assert got == rows, (table, len(got), len(rows), sorted(set(got) - set(rows))[:3],
                             sorted(set(rows) - set(got))[:3])

    clean_out, crash_out = delivered(kafka.bootstrap, "clean"), delivered(kafka.bootstrap, "crash")
    for kind in ("actions", "alerts", "dead"):
        assert all(len(bodies) == 1 for bodies in crash_out[kind].values()), kind
        assert crash_out[kind] == clean_out[kind], kind
    assert len(clean_out["actions"]) > 100 and len(clean_out["alerts"]) >= 2
    hooks = webhook.by_key("/crash")
    assert all(len(bodies) == 1 for bodies in hooks.values())
    assert hooks == webhook.by_key("/clean")
    assert {json.loads(next(iter(b)))["rule"] for b in hooks.values()} >= {"ip_request_flood"}


def test_sigterm_stops_and_the_next_start_resumes_where_it_stopped(tmp_path, kafka, stream,
                                                                   redis_url):
    ends = end_offsets(kafka.bootstrap, stream)
    config = write_config(tmp_path, "resume", kafka.bootstrap, stream, redis_url, None)
    first = Run(config)
    first.wait(first.running)
    time.sleep(2)
    took = first.stop()
    assert took < 30 and "stopping (SIGTERM): draining the flow" in first.stderr()
    actions_before = delivered(kafka.bootstrap, "resume")["actions"]

    second = Run(config)
    second.wait(lambda: second.read_through(ends))
    m = second.metrics()
    total = sum(ends.values())
    assert 0 < m["surgeflow_events_in_total"] < total  # it went on from the stop, not from zero
    second.stop()
    after = delivered(kafka.bootstrap, "resume")["actions"]
    assert all(len(bodies) == 1 for bodies in after.values())
    assert actions_before.keys() <= after.keys()
