"""The operations surface (surgeflow/metrics.py): /metrics, /healthz and /readyz over real HTTP,
the exposition read back with prometheus-client's own parser, and consumer lag against the real
Kafka broker and against a closed port."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from surgeflow import metrics
from surgeflow.stats import Stats


def get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}, from the text exposition."""
    status, _, text = get(port, "/metrics")
    assert status == 200
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def served():
    """Factory: a server on any free port over a fresh Stats; stopped after the test."""
    servers = []

    def start(stats: Stats, **kw):
        srv, port = metrics.start_server("127.0.0.1", 0, stats=stats, **kw)
        servers.append(srv)
        return port

    yield start
    for srv in servers:
        srv.stop()


def test_metrics_expose_counters_gauges_values_quantiles_and_outages(served):
    stats = Stats()
    stats.add("events_in", 120)
    stats.add("redis_retries", 2)
    stats.add_labeled("dead_letters", "invalid_json", 3)
    stats.add_labeled("dead_letters", "late_event")
    stats.add_labeled("evictions", "anonymous_profile", 5)
    stats.add_labeled("brand_new_family", "x", 7)
    stats.gauge("sink_queue_rows", lambda: {"events_raw": 40, "events_minute": 2})
    stats.gauge("webhook_queue", lambda: 9)
    stats.gauge("broken", lambda: 1 / 0)  # left out, the scrape still answers
    now_ms = time.time() * 1000
    stats.set("watermark_ms", now_ms - 90_000)
    stats.set("state_profiles", 1234)
    stats.set_labeled("source_offset", "0", 41)
    stats.set_labeled("source_offset", "1", 7)
    stats.observe_since("feature_latency_ms", [int(now_ms) - d for d in range(1, 101)])
    stats.outage("redis", "connection refused")
    port = served(stats)

    m = scrape(port)
    assert m["surgeflow_events_in_total"] == {(): 120}
    assert m["surgeflow_redis_retries_total"] == {(): 2}
    assert m["surgeflow_dead_letters_total"] == {(("reason", "invalid_json"),): 3,
                                                 (("reason", "late_event"),): 1}
    assert m["surgeflow_evictions_total"] == {(("kind", "anonymous_profile"),): 5}
    assert m["surgeflow_brand_new_family_total"] == {(("label", "x"),): 7}
    assert m["surgeflow_sink_queue_rows"] == {(("sink", "events_minute"),): 2,
                                              (("sink", "events_raw"),): 40}
    assert m["surgeflow_webhook_queue"] == {(): 9}
    assert "surgeflow_broken" not in m
    assert m["surgeflow_state_profiles"] == {(): 1234}
    assert m["surgeflow_source_offset"] == {(("partition", "0"),): 41, (("partition", "1"),): 7}
    assert 89 < m["surgeflow_watermark_delay_seconds"][()] < 95
    lat = m["surgeflow_feature_latency_ms"]
    assert lat.keys() == {(("quantile", "0.5"),), (("quantile", "0.99"),)}
    # the same figures as Stats.percentile: samples of 1..100 ms
    assert lat[(("quantile", "0.5"),)] == stats.percentile("feature_latency_ms", 0.5)
    assert lat[(("quantile", "0.99"),)] == stats.percentile("feature_latency_ms", 0.99)
    assert 50 <= lat[(("quantile", "0.5"),)] < 60 and 99 <= lat[(("quantile", "0.99"),)] < 110
    assert m["surgeflow_feature_latency_ms_samples_total"] == {(): 100}
    assert m["surgeflow_outage"] == {(("component", "redis"),): 1}
    assert m["surgeflow_outage_seconds"][(("component", "redis"),)] >= 0
    assert m["process_resident_memory_bytes"][()] > 0

    # counters move between scrapes; a cleared outage disappears
    stats.add("events_in", 5)
    stats.outage("redis", None)
    m = scrape(port)
    assert m["surgeflow_events_in_total"] == {(): 125}
    assert "surgeflow_outage" not in m


def test_openmetrics_negotiation(served):
    stats = Stats()
    stats.add_labeled("kafka_rejected", "actions", 2)
    port = served(stats)
    status, ctype, text = get(port, "/metrics", accept="application/openmetrics-text")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in parse_om(text)}
    assert fams["surgeflow_kafka_rejected"].type == "counter"
    assert [(s.labels, s.value) for s in fams["surgeflow_kafka_rejected"].samples
            if s.name.endswith("_total")] == [({"topic": "actions"}, 2.0)]


def test_readyz_waits_for_the_start_and_for_outages_to_clear(served):
    stats = Stats()
    port = served(stats)
    status, ctype, body = get(port, "/readyz")
    assert (status, ctype) == (503, "application/json")
    assert json.loads(body)["reason"] == "the run has not started"

    stats.set("ready", 1)
    status, _, body = get(port, "/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready", "reason": "ok", "outages": {}}

    stats.outage("clickhouse", "insert failed: connection reset")
    stats.outage("redis", "timeout")
    status, _, body = get(port, "/readyz")
    doc = json.loads(body)
    assert status == 503 and doc["status"] == "not ready"
    assert set(doc["outages"]) == {"clickhouse", "redis"}
    assert doc["outages"]["redis"]["detail"] == "timeout"
    assert "clickhouse (insert failed: connection reset)" in doc["reason"]

    stats.outage("clickhouse", None)
    assert get(port, "/readyz")[0] == 503  # redis still out
    stats.outage("redis", None)
    assert get(port, "/readyz")[0] == 200


def test_healthz_follows_the_flow_heartbeat(served):
    stats = Stats()
    port = served(stats)
    status, _, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"  # before the first heartbeat

    stats.set("heartbeat_ms", time.time() * 1000 - 5_000)
    assert get(port, "/healthz")[0] == 200
    assert 4 < scrape(port)["surgeflow_heartbeat_age_seconds"][()] < 10

    stats.set("heartbeat_ms", time.time() * 1000 - 75_000)
    status, _, body = get(port, "/healthz")
    doc = json.loads(body)
    assert status == 503 and doc["status"] == "unhealthy"
    assert doc["reason"].startswith("no heartbeat from the flow for 75 s")

    stats.set("heartbeat_ms", time.time() * 1000)
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/nope")[0] == 404


def test_serve_without_kafka_and_when_disabled():
    stats = Stats()
    stats.add("events_in", 3)
    address, stop = metrics.serve(Settings(metrics={"port": 0}), stats=stats)
    try:
        assert address.startswith("http://127.0.0.1:")
        port = int(address.rsplit(":", 1)[1])
        m = scrape(port)
        assert m["surgeflow_events_in_total"] == {(): 3}
        assert "surgeflow_consumer_lag" not in m
        # the port is now taken: a clear error, or any free port for the demo
        busy = Settings(metrics={"port": port})
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            metrics.serve(busy, stats=stats)
        other, stop_other = metrics.serve(busy, stats=stats, any_port_if_busy=True)
        assert other != address and get(int(other.rsplit(":", 1)[1]), "/healthz")[0] == 200
        stop_other()
    finally:
        stop()
    assert metrics.serve(Settings(metrics={"enabled": False}))[0] is None


def test_consumer_lag_against_the_real_broker(kafka, unique_topic):
    from confluent_kafka import Producer

    topic = unique_topic("lag", partitions=2)
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for i in range(10):
        producer.produce(topic, b"x%d" % i, partition=0)
    for i in range(4):
        producer.produce(topic, b"y%d" % i, partition=1)
    assert producer.flush(30) == 0

    stats = Stats()
    # the flow processed offsets 0..3 of partition 0 (last offset 3), nothing of partition 1
    stats.set_labeled("source_offset", "0", 3)
    settings = Settings(metrics={"port": 0}, source={"kind": "kafka"},
                        kafka={"brokers": [kafka.bootstrap], "events_topic": topic})
    address, stop = metrics.serve(settings, stats=stats)
    try:
        port = int(address.rsplit(":", 1)[1])
        m = scrape(port)
        # lag = end offset (10) - (last processed offset 3 + 1) = 6; partition 1 has no
        # position yet, so no lag for it, but its end offset is shown
        assert m["surgeflow_consumer_lag"] == {(("partition", "0"),): 6}
        assert m["surgeflow_source_end_offset"] == {(("partition", "0"),): 10,
                                                    (("partition", "1"),): 4}
        stats.set_labeled("source_offset", "0", 9)
        stats.set_labeled("source_offset", "1", 1)
        m = scrape(port)  # positions are read at each scrape; end offsets cached ~2 s
        assert m["surgeflow_consumer_lag"] == {(("partition", "0"),): 0,
                                               (("partition", "1"),): 2}
    finally:
        stop()

    # a consumer that never subscribes or commits: the lag client's group has no offsets
    lag = metrics.KafkaLag([kafka.bootstrap], topic, stats=stats, cache_s=0)
    try:
        assert lag.end_offsets() == {0: 10, 1: 4}
        from confluent_kafka.admin import AdminClient
        groups = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_consumer_groups(
            request_timeout=10).result()
        assert "surgeflow-metrics-lag" not in {g.group_id for g in groups.valid}
    finally:
        lag.close()


def test_consumer_lag_with_an_unreachable_broker_keeps_the_scrape_short(served):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    stats = Stats()
    stats.set_labeled("source_offset", "0", 3)
    stats.add("events_in", 1)
    lag = metrics.KafkaLag([f"127.0.0.1:{closed}"], "events", stats=stats)
    try:
        port = served(stats, registry=metrics.make_registry(
            stats, {"consumer_lag": lag, "source_end_offset": lag.end_offsets}))
        for _ in range(2):  # the first waits for the broker (<= 2 s), the second backs off
            t0 = time.monotonic()
            m = scrape(port)
            took = time.monotonic() - t0
            assert took < 3.0, took
            assert m["surgeflow_events_in_total"] == {(): 1}
            assert "surgeflow_consumer_lag" not in m and "surgeflow_source_end_offset" not in m
        assert took < 0.5, took
    finally:
        lag.close()


def test_an_outage_seen_by_several_users_starts_once_and_ends_with_the_last():
    from surgeflow.stats import Stats

    stats = Stats()
    assert stats.outage("clickhouse", "events_raw: detached", member="raw")
    assert not stats.outage("clickhouse", "actions: detached", member="actions")
    assert not stats.outage("clickhouse", None, member="raw")  # actions still fails
    assert "clickhouse" in stats.outages
    assert not stats.outage("clickhouse", "events_raw: detached", member="raw")  # same outage
    assert not stats.outage("clickhouse", None, member="raw")
    assert stats.outage("clickhouse", None, member="actions")
    assert "clickhouse" not in stats.outages
    assert not stats.outage("clickhouse", None, member="actions")  # already over


def test_a_source_outage_reported_late_and_already_over_is_not_a_new_one():
    """librdkafka reports "all brokers down" at the consumer's next poll; when the flow was
    waiting on a sink meanwhile, that comes after the outage, just before records flow again."""
    import time

    from connectors.kafka import SourceOutage
    from surgeflow.stats import STATS

    late = SourceOutage(confirm_s=0.3)
    late.down("1/1 brokers are down")
    late.reading()  # records right after: it was over
    time.sleep(0.5)
    assert "kafka" not in STATS.outages

    real = SourceOutage(confirm_s=0.1)
    real.down("1/1 brokers are down")
    time.sleep(0.4)
    assert STATS.outages["kafka"][0] == "source: 1/1 brokers are down"
    real.down("1/1 brokers are down")  # reported again: the same outage
    real.reading()
    assert "kafka" not in STATS.outages
