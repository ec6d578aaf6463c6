"""`surgeflow produce` (the load generator) against the real broker, into a topic it creates."""
import os
import subprocess
import sys
import uuid

from confluent_kafka.admin import AdminClient

from connectors.kafka import ensure_topics


def test_ensure_topics_creates_missing_topics(kafka):
    names = [f"new-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    ensure_topics([kafka.bootstrap], names, partitions=3)
    ensure_topics([kafka.bootstrap], names, partitions=3)  # idempotent
    meta = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10)
    assert all(len(meta.topics[n].partitions) == 3 for n in names)


def test_produce_command_writes_synthetic_events(kafka, tmp_path):
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SURGEFLOW__KAFKA__BROKERS": f"[{kafka.bootstrap}]"}
    r = subprocess.run([sys.executable, "-m", "surgeflow", "produce", "--events", "2000",
                        "--topic", topic], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "p"})
    low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    c.close()
    assert high - low == 2000
