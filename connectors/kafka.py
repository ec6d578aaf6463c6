"""Kafka: the events source (Bytewax's connector over confluent-kafka), topic sinks for dead
letters, actions and alerts, broker checks, and the producer behind ``surgeflow produce``."""
from __future__ import annotations

from typing import Callable, Iterable

from bytewax.connectors.kafka import KafkaSource
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.files import arrivals
from surgeflow.stats import STATS


class KafkaUnavailable(Exception):
    """The brokers cannot be reached, or a topic is missing; the message says which."""


def _base(brokers: list[str], extra: dict[str, str] | None) -> dict[str, str]:
    return {"bootstrap.servers": ",".join(brokers), **(extra or {})}


def check_brokers(brokers: list[str], extra: dict[str, str] | None = None,
                  timeout_s: float = 10.0) -> set[str]:
    """The topics on the cluster; raises KafkaUnavailable naming the brokers when unreachable."""
    admin = AdminClient(_base(brokers, extra))
    try:
        meta = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(f"cannot reach Kafka brokers {','.join(brokers)}: {exc}") from None
    return set(meta.topics)


def partition_count(brokers: list[str], topic: str, extra: dict[str, str] | None = None,
                    timeout_s: float = 10.0) -> int:
    admin = AdminClient(_base(brokers, extra))
    try:
        meta = admin.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(f"cannot reach Kafka brokers {','.join(brokers)}: {exc}") from None
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise KafkaUnavailable(f"topic {topic!r} not found on {','.join(brokers)}")
    return len(info.partitions)


def ensure_topics(brokers: list[str], topics: Iterable[str], partitions: int = 1,
                  extra: dict[str, str] | None = None) -> None:
    existing = check_brokers(brokers, extra)
    wanted = [NewTopic(t, num_partitions=partitions, replication_factor=1)
              for t in topics if t not in existing]
    if wanted:
        admin = AdminClient(_base(brokers, extra))  # kept alive until the futures resolve
        for future in admin.create_topics(wanted).values():
            try:
                future.result(timeout=30)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise


def events_source(brokers: list[str], topic: str, *, tail: bool, from_beginning: bool,
                  batch_size: int, extra: dict[str, str] | None = None) -> KafkaSource:
    # Errors are data: raise_on_errors=False turns consumer errors into KafkaError items.
    return KafkaSource(brokers, [topic], tail=tail,
                       starting_offset=OFFSET_BEGINNING if from_beginning else OFFSET_END,
                       add_config=extra, batch_size=batch_size, raise_on_errors=False)


class _TopicPartition(StatelessSinkPartition):
    def __init__(self, config: dict[str, str], topic: str, encode, key_of, observe):
        self.producer = Producer({"linger.ms": "5", "enable.idempotence": "true", **config})
        self.topic, self.encode, self.key_of, self.observe = topic, encode, key_of, observe
        self.failures: list[str] = []

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failures.append(str(err))

    def write_batch(self, items: list) -> None:
        for batch in items:
            for record in batch:
                while True:
                    try:
                        self.producer.produce(self.topic, self.encode(record), self.key_of(record),
                                              on_delivery=self._delivered)
                        break
                    except BufferError:
                        self.producer.poll(0.1)  # local queue full: wait for deliveries
            self.producer.poll(0)
        # At-least-once: the batch is on the broker before the flow moves on.
        self.producer.flush(30)
        if self.failures:
            failures, self.failures = self.failures, []
            raise KafkaUnavailable(f"{len(failures)} messages to {self.topic} failed: {failures[0]}")
        if self.observe:
            STATS.observe_since(self.observe, arrivals(items))

    def close(self) -> None:
        self.producer.flush(30)


class KafkaTopicSink(DynamicSink):
    """Produces each record of each item (items are lists) to one topic."""

    def __init__(self, brokers: list[str], topic: str, encode: Callable[[object], bytes],
                 key_of: Callable[[object], bytes | None], extra: dict[str, str] | None = None,
                 observe: str | None = None):
        self.config = _base(brokers, extra)
        self.topic, self.encode, self.key_of, self.observe = topic, encode, key_of, observe

    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _TopicPartition(self.config, self.topic, self.encode, self.key_of, self.observe)


def produce(brokers: list[str], topic: str, records: Iterable[tuple],
            extra: dict[str, str] | None = None, progress: Callable[[int], None] | None = None) -> int:
    """Writes (key, value) or (key, value, record time ms) tuples to a topic; returns how many
    were delivered. Without a time (or 0) the producer stamps the send time."""
    producer = Producer({**_base(brokers, extra), "linger.ms": "20", "batch.num.messages": "10000",
                         "compression.type": "lz4", "queue.buffering.max.messages": "500000"})
    failures: list[str] = []
    sent = 0

    def delivered(err, msg):
        if err is not None:
            failures.append(str(err))

    for record in records:
        key, value = record[0], record[1]
        stamp = record[2] if len(record) > 2 else 0
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered, timestamp=stamp)
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
        if sent % 10000 == 0:
            producer.poll(0)
            if progress:
                progress(sent)
    producer.flush(120)
    if failures:
        raise KafkaUnavailable(f"{len(failures)} of {sent} events not delivered: {failures[0]}")
    return sent
