"""Smoke tests proving the real services used by the suite actually work."""

from __future__ import annotations

import time
import uuid

import pytest

from connectors.embedded_redis import EmbeddedRedis, find_redis_server, redis_server_version


@pytest.mark.kafka
def test_kafka_roundtrip_keeps_values_and_partition_order(kafka, unique_topic):
    from confluent_kafka import Consumer, Producer

    topic = unique_topic("roundtrip", partitions=3)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "enable.idempotence": True})
    sent: dict[int, list[bytes]] = {}
    errors = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(err)
        else:
            sent.setdefault(msg.partition(), []).append(msg.value())

    for i in range(100):
        producer.produce(topic, key=f"k{i % 7}".encode(), value=f"v{i:03d}".encode(),
                         on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert not errors
    assert sorted(v for vs in sent.values() for v in vs) == [f"v{i:03d}".encode() for i in range(100)]

    consumer = Consumer({
        "bootstrap.servers": kafka.bootstrap,
        "group.id": f"g-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    received: dict[int, list[bytes]] = {}
    deadline = time.monotonic() + 60
    try:
        while sum(map(len, received.values())) < 100 and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received.setdefault(msg.partition(), []).append(msg.value())
    finally:
        consumer.close()
    assert received == sent  # same values, same order within each partition


def test_redis_is_version_7_or_newer(redis_client):
    version = redis_client.info("server")["redis_version"]
    assert int(str(version).split(".")[0]) >= 7
    assert redis_server_version(find_redis_server()) == str(version)


def test_redis_hash_roundtrip(redis_client):
    redis_client.hset("campaign:42", mapping={"clicks": 7, "name": "spring"})
    assert redis_client.hgetall("campaign:42") == {b"clicks": b"7", b"name": b"spring"}


def test_embedded_redis_persists_across_restart(tmp_path):
    import redis

    with EmbeddedRedis(tmp_path) as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("survives", "restart")
    assert (tmp_path / "dump.rdb").is_file()
    with EmbeddedRedis(tmp_path) as server:
        with redis.Redis.from_url(server.url) as client:
            assert client.get("survives") == b"restart"


def test_chdb_version_and_table_roundtrip(chdb_client, ch_database):
    version = chdb_client.query("SELECT version()").result_rows[0][0]
    assert int(version.split(".")[0]) >= 24
    chdb_client.command(
        f"CREATE TABLE {ch_database}.events (id UInt32, channel String) ENGINE = MergeTree ORDER BY id")
    chdb_client.insert("events", [[2, "email"], [1, "search"]], column_names=["id", "channel"],
                       database=ch_database)
    rows = chdb_client.query(f"SELECT id, channel FROM {ch_database}.events ORDER BY id").result_rows
    assert rows == [(1, "search"), (2, "email")]
