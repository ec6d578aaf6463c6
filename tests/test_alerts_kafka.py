"""Alerts end to end on real Kafka: a seeded synthetic stream with injected incidents goes
through Kafka and the whole dataflow; the alerts topic must hold the expected rules with their
severities, caught soon enough and carrying the offending IP, every alert explained by an
incident; the same stream without the incidents raises nothing."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from config.settings import load_settings
from connectors.kafka import produce
from connectors.synthetic import Anomaly, SyntheticSpec, generate
from flows.runner import run
from tests.test_pipeline_kafka import consume_all



START_MS = 1_795_392_000_000  # 2026-11-23T00:00Z
S = 1000
BASE = dict(seed=23, users=1500, start_ms=START_MS, events_per_s=8.0, duration_s=3 * 3600.0,
            malformed_share=0.005, duplicate_share=0.01, max_disorder_ms=3000)
INCIDENTS = (
    Anomaly("traffic_spike", 5400, 600, 5.0),
    Anomaly("cvr_drop", 6600, 2400),
    Anomaly("click_fraud", 9000, 300),
    Anomaly("request_flood", 9600, 60),
    Anomaly("ingest_delay", 10200, 300),
    Anomaly("tracking_bug", 7800, 1800),
)
# incident -> (rule, severity, longest delay from its start to first_seen, then to the alert)
EXPECTED = {
    "traffic_spike": [("traffic_anomaly", "II", 60, 180), ("channel_traffic_anomaly", "II", 60, 180)],
    "cvr_drop": [("conversion_drop", "II", 1800, 2400)],
    "click_fraud": [("ip_cluster_click_fraud", "III", 60, 60)],
    "request_flood": [("ip_request_flood", "III", 60, 60)],
    "ingest_delay": [("data_delay", "III", 60, 120), ("ingest_latency", "II", 60, 360)],
    "tracking_bug": [("page_bounce_jump", "I", 1500, 1800)],
}


class Receiver(BaseHTTPRequestHandler):
    """The webhook's endpoint: keeps (Idempotency-Key, body) of every POST."""

    received: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 - the http.server name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((self.headers["Idempotency-Key"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def run_stream(kafka, redis_url, chdb_dsn, chdb_client, name: str, spec: SyntheticSpec,
               webhook: str | None = None) -> list[dict]:
    topic = kafka.create_topic(f"alerts-in-{name}", partitions=2)
    produce([kafka.bootstrap], topic, ((r.key, r.value, r.sent_ms) for r in generate(spec)))
    outs = {k: kafka.create_topic(f"{k}-alerts-{name}") for k in ("dead", "actions", "alerts")}
    database = f"alerts_{name}"
    chdb_client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    settings = load_settings(
        None, env={}, source__kind="kafka", output__kind="kafka",
        kafka__brokers=[kafka.bootstrap], kafka__events_topic=topic, kafka__tail=False,
        kafka__dead_letter_topic=outs["dead"], kafka__actions_topic=outs["actions"],
        kafka__alerts_topic=outs["alerts"], redis__url=redis_url, redis__key_prefix=f"al{name}",
        clickhouse__dsn=chdb_dsn, clickhouse__database=database, clickhouse__raw_events=False,
        flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None, alerts__webhook__url=webhook,
        clickhouse__spool_dir=str(Path(chdb_dsn.removeprefix("chdb://")).parent / f"spool-{name}"))
    run(settings, redis_url)
    alerts = [json.loads(m.value()) for m in consume_all(kafka.bootstrap, outs["alerts"])]
    stored = chdb_client.command(f"SELECT count() FROM {database}.alerts FINAL")
    assert stored == len(alerts)  # every message in ClickHouse too, once
    return alerts


@pytest.fixture(scope="module")
def incident_alerts(kafka, redis_url, chdb_dsn, chdb_client):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Receiver.received = []
    try:
        spec = SyntheticSpec(**BASE, anomalies=INCIDENTS)
        alerts = run_stream(kafka, redis_url, chdb_dsn, chdb_client, "incidents", spec,
                            webhook=f"http://127.0.0.1:{server.server_port}/hooks/alerts")
    finally:
        server.shutdown()
    return alerts


def test_the_webhook_got_what_the_topic_got(incident_alerts):
    keys = {f"{a['alert_id']}:{a['status']}:{a['seq']}": a for a in incident_alerts}
    received = dict(Receiver.received)
    assert received.keys() == keys.keys() and len(Receiver.received) == len(keys)
    assert all(received[k] == a for k, a in keys.items())


def test_injected_incidents_fire_the_expected_rules(incident_alerts):
    alerts = incident_alerts
    firing = [a for a in alerts if a["status"] == "firing"]
    print("\n".join(f"{a['rule']} {a['series']} +{(a['first_seen_ms'] - START_MS) / S:.0f}s "
                    f"at +{(a['at_ms'] - START_MS) / S:.0f}s {a['severity']} {a['detail']}"
                    for a in firing))
    for incident in INCIDENTS:
        start = START_MS + incident.start_s * S
        for rule, severity, seen_within, fired_within in EXPECTED[incident.kind]:
            hits = [a for a in firing if a["rule"] == rule and start <= a["first_seen_ms"]
                    <= start + seen_within * S]
            assert hits, f"{incident.kind}: {rule} did not fire within {seen_within} s"
            a = hits[0]
            assert a["severity"] == severity
            assert a["at_ms"] <= start + fired_within * S
            for field in ("rule", "series", "value", "mu", "sigma", "k", "z", "window",
                          "severity", "first_seen_ms", "response", "alert_id"):
                assert field in a
    # The abuse alerts name the offending IP; the flood is seen within its first seconds.
    fraud = next(a for a in firing if a["rule"] == "ip_cluster_click_fraud")
    flood = next(a for a in firing if a["rule"] == "ip_request_flood")
    assert next(a for a in firing if a["rule"] == "page_bounce_jump")["series"] == "page=/deals"
    assert fraud["detail"].startswith("203.0.113.") and fraud["series"] == "ip_cluster=203.0.113.0/24"
    assert flood["series"] == f"ip={flood['detail']}" and flood["detail"].startswith("198.51.100.")
    assert flood["first_seen_ms"] - (START_MS + 9600 * S) < 60 * S
    # Every alert is explained by an incident: it began while one was under way (or just after,
    # as rolling windows take time to forget it).
    for a in firing:
        assert any(START_MS + i.start_s * S <= a["first_seen_ms"]
                   <= START_MS + (i.start_s + i.duration_s + 1800) * S for i in INCIDENTS), a


def test_lifecycle_on_the_topic(incident_alerts):
    """Per alert: one firing first, updates, then one resolved; each (alert_id, status, seq) once."""
    by_id: dict[str, list[dict]] = {}
    for a in incident_alerts:
        by_id.setdefault(a["alert_id"], []).append(a)
    keys = [(a["alert_id"], a["status"], a["seq"]) for a in incident_alerts]
    assert len(keys) == len(set(keys))
    for messages in by_id.values():
        statuses = [m["status"] for m in messages]
        assert statuses[0] == "firing" and statuses.count("firing") == 1
        assert statuses.count("resolved") <= 1 and "resolved" not in statuses[:-1]
        assert [m["seq"] for m in messages] == list(range(len(messages)))
    # The short incidents are over before the stream ends: their alerts resolved. (Click fraud
    # counts over an hour: it is still firing at the end, 25 minutes after the burst.)
    assert not any(a["rule"] == "ip_cluster_click_fraud" and a["status"] == "resolved"
                   for a in incident_alerts)
    for rule in ("ip_request_flood", "data_delay", "traffic_anomaly"):
        assert any(a["rule"] == rule and a["status"] == "resolved" for a in incident_alerts), rule


def test_a_clean_stream_raises_nothing(kafka, redis_url, chdb_dsn, chdb_client):
    alerts = run_stream(kafka, redis_url, chdb_dsn, chdb_client, "clean", SyntheticSpec(**BASE))
    assert alerts == []
