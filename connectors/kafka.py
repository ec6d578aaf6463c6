"""Kafka: the events source (Bytewax's connector over confluent-kafka), topic sinks for dead
letters, actions and alerts, broker checks, and the producer behind ``surgeflow produce``.

Every client has socket and connection-setup timeouts (``TIMEOUTS``; ``client_config`` may
override them). The topic sinks are at-least-once, keyed: ``write_batch`` returns only once
every record of the batch is on the broker, so a crash replays at most the records after the
last snapshot, and a delivery that failed (a broker killed, a timeout) is produced again rather
than dropped. A record may therefore land twice, always with the same bytes and the same stable
id, the consumer's dedupe key: ``action_id`` for actions, ``<alert_id>:<status>:<seq>`` for
alerts, the source position (``source``) for dead letters. A record retried after a failure
may follow later records of its batch. While the brokers are away the flow waits
(backpressure), logging one line when the outage starts and one when it ends. A record the
broker refuses for good (larger than the topic allows) goes to
``<reject_dir>/rejected-<topic>.jsonl`` instead of blocking the topic, and is counted
(``kafka_rejected{topic}``).
"""
from __future__ import annotations

import base64
import logging
import random
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import orjson
from bytewax.connectors.kafka import KafkaSource
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import (OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException,
                             Producer, TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.files import observe_outputs
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.kafka")
# A network call gives up after this long (librdkafka's defaults: 60 s and 30 s).
TIMEOUTS = {"socket.timeout.ms": "10000", "socket.connection.setup.timeout.ms": "10000"}


class KafkaUnavailable(Exception):
    """The brokers cannot be reached, or a topic is missing; the message says which."""


def _base(brokers: list[str], extra: dict[str, str] | None) -> dict[str, str]:
    return {"bootstrap.servers": ",".join(brokers), **TIMEOUTS, **(extra or {})}


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


def end_offsets(brokers: list[str], topic: str, extra: dict[str, str] | None = None,
                timeout_s: float = 10.0) -> dict[int, int]:
    """The offset after the last record of each partition of ``topic``: a replay has read
    everything once every partition's read offset reached it minus one."""
    consumer = Consumer({**_base(brokers, extra), "group.id": "surgeflow-end-offsets",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
                for p in meta.partitions}
    finally:
        consumer.close()


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
    # Losing every broker is reported through the error callback only (the consumer
    # reconnects by itself): SOURCE_OUTAGE turns it into one log line and an outage.
    return KafkaSource(brokers, [topic], tail=tail,
                       starting_offset=OFFSET_BEGINNING if from_beginning else OFFSET_END,
                       add_config={**TIMEOUTS, "error_cb": _source_error, **(extra or {})},
                       batch_size=batch_size, raise_on_errors=False)


class SourceOutage:
    """The source's side of a broker outage: the consumer lost every broker (or reported an
    error item without a record); over when records are read again. Marked (``kafka`` in
    /readyz, shared with the sinks: one log line each way) once it has lasted ``confirm_s``:
    librdkafka reports through the consumer's next poll, which comes late when the flow was
    waiting on a sink, so a report of an outage that is already over must not start a new one.
    """

    def __init__(self, confirm_s: float = 2.0) -> None:
        self.confirm_s = confirm_s
        self.since = 0.0  # monotonic time the outage was reported, 0: none
        self.detail = ""
        self.marked = False
        self.lock = threading.Lock()

    def down(self, detail: str) -> None:
        with self.lock:
            if self.since:
                return
            self.since, self.detail = time.monotonic(), detail
        timer = threading.Timer(self.confirm_s, self._confirm, (self.since,))
        timer.daemon = True
        timer.start()

    def _confirm(self, since: float) -> None:
        with self.lock:
            if self.since != since:  # records came meanwhile: it was over
                return
            self.marked = True
        if STATS.outage("kafka", f"source: {self.detail}", member="source"):
            log.warning("Kafka unavailable (source: %s); the consumer keeps retrying", self.detail)

    def reading(self) -> None:
        """Records arrived: over, if it was down (a cheap check, called for every batch)."""
        if not self.since:
            return
        with self.lock:
            since, marked = self.since, self.marked
            self.since, self.marked = 0.0, False
        if marked and STATS.outage("kafka", None, member="source"):
            log.warning("Kafka is back after %.0f s (the source reads again)",
                        time.monotonic() - since)


SOURCE_OUTAGE = SourceOutage()


def _source_error(err: KafkaError) -> None:
    """librdkafka's error callback for the source's consumers."""
    STATS.add_labeled("kafka_source_errors", err.name())
    if err.code() == KafkaError._ALL_BROKERS_DOWN:
        SOURCE_OUTAGE.down(err.str())


# Record-level refusals: waiting cannot help, so such a record is set aside (after one try on
# its own: a batch of small records can exceed a topic's limit where each record would not).
REFUSED = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE,
                     KafkaError.INVALID_RECORD})
SINK_DEFAULTS = {
    "linger.ms": "5",
    "enable.idempotence": "true",
    # librdkafka retries a message this long, then reports it failed and the sink produces it
    # again itself: the outage is seen, logged and counted instead of hidden for 5 minutes.
    "message.timeout.ms": "60000",
}
FLUSH_STEP_S = 1.0
OUTAGE_AFTER_S = 5.0  # messages still queued this long: the brokers are away (logged once)
BACKOFF_INITIAL_S, BACKOFF_MAX_S = 0.2, 30.0
_REJECT_LOCKS: dict[Path, threading.Lock] = {}
_REJECT_LOCKS_LOCK = threading.Lock()


class _QuietClientLog(logging.LoggerAdapter):
    """librdkafka logs every failed reconnect; the sink logs each outage once (with the last
    client error), so the client's own lines go to ``surgeflow.kafka.client`` at DEBUG."""

    def log(self, level, msg, *args, **kwargs):
        self.logger.log(logging.DEBUG, msg, *args, **kwargs)


_CLIENT_LOG = _QuietClientLog(logging.getLogger("surgeflow.kafka.client"), {})


@dataclass(slots=True, eq=False)
class _Record:
    key: bytes | None
    value: bytes
    alone: bool = False  # refused inside a batch once: tried on its own before it is rejected


class _TopicPartition(StatelessSinkPartition):
    def __init__(self, config: dict[str, str], topic: str, encode, key_of, observe,
                 reject_dir: Path):
        self.config = {**SINK_DEFAULTS, **config}
        self.topic, self.encode, self.key_of, self.observe = topic, encode, key_of, observe
        self.component = "kafka"  # the source and every topic's sink: one outage, one line
        self.reject_path = reject_dir / f"rejected-{topic}.jsonl"
        with _REJECT_LOCKS_LOCK:  # the file is shared by the workers
            self.reject_lock = _REJECT_LOCKS.setdefault(self.reject_path, threading.Lock())
        self.failures: list[tuple[_Record, KafkaError]] = []  # delivery reports, until handled
        self.last_error: KafkaError | None = None
        self.fatal: KafkaError | None = None
        self.down_since: float | None = None
        self.tries = 0
        self.backoff_s = BACKOFF_INITIAL_S
        self.producer = self._new_producer()

    def _new_producer(self) -> Producer:
        return Producer({**self.config, "error_cb": self._on_error, "logger": _CLIENT_LOG})

    def _on_error(self, err: KafkaError) -> None:
        self.last_error = err  # client-level errors are informational unless fatal
        if err.fatal():
            self.fatal = err

    def _delivered(self, record: _Record, err, msg) -> None:
        if err is not None:
            self.failures.append((record, err))

    def write_batch(self, items: list) -> None:
        todo = [_Record(self.key_of(r), self.encode(r)) for batch in items for r in batch]
        while todo:
            todo = self._deliver(todo)
        self._recovered()
        if self.observe:
            observe_outputs(self.observe, items)

    def _deliver(self, records: list[_Record]) -> list[_Record]:
        """Produces the records and waits for every delivery report; returns the records to
        produce again (after a backoff when the failure was not the record's own)."""
        self._produce([r for r in records if not r.alone])
        for r in records:
            if r.alone:  # a batch of its own
                self._produce([r])
        failures, self.failures = self.failures, []
        again, outage = [], None
        for record, err in failures:
            if err.code() in REFUSED:
                if record.alone:
                    self._reject(record, err)
                    continue
                record.alone = True
            else:
                outage = err
            again.append(record)
        if outage is not None:
            STATS.add("kafka_retries", len(again))
            self._failed(f"delivery failed: {outage.str()}")
            time.sleep(random.uniform(self.backoff_s / 2, self.backoff_s))
            self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)
        return again

    def _produce(self, records: list[_Record]) -> None:
        for record in records:
            while True:
                try:
                    self.producer.produce(self.topic, record.value, record.key,
                                          on_delivery=partial(self._delivered, record))
                    break
                except BufferError:  # local queue full: wait for deliveries
                    self._drain()
                except KafkaException as exc:  # known at once (e.g. over message.max.bytes)
                    err = exc.args[0]
                    if err.code() in REFUSED:
                        self._reject(record, err)
                    else:
                        self.failures.append((record, err))
                    break
            self.producer.poll(0)
        self._drain()

    def _drain(self) -> None:
        """Waits until nothing is queued: every message delivered, or failed back to us."""
        started = time.monotonic()
        while True:
            if self.fatal is not None:
                self._replace_producer()
            left = self.producer.flush(FLUSH_STEP_S)
            if left == 0:
                return
            if time.monotonic() - started >= OUTAGE_AFTER_S:
                last = self.last_error.str() if self.last_error is not None else "none"
                self._failed(f"{left} messages not delivered after {OUTAGE_AFTER_S:.0f} s "
                             f"(last client error: {last})")

    def _replace_producer(self) -> None:
        """A fatal error leaves the producer unusable: its messages come back as failures
        (purged) and go again through a new one (at worst a keyed duplicate)."""
        log.error("Kafka %s: producer failed (%s); starting a new one", self.topic,
                  self.fatal.str())
        old, self.fatal = self.producer, None
        old.purge(in_queue=True, in_flight=True)
        old.poll(0)  # the purged messages' delivery reports land in self.failures
        self.producer = self._new_producer()

    def _failed(self, detail: str) -> None:
        self.tries += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
        # marked at every failure: another worker's recovery may have cleared it meanwhile
        if STATS.outage(self.component, f"{self.topic}: {detail}", member=str(id(self))):
            log.warning("Kafka unavailable (topic %s: %s); the flow waits, retrying",
                        self.topic, detail)

    def _recovered(self) -> None:
        self.backoff_s = BACKOFF_INITIAL_S
        if self.down_since is None:
            return
        if STATS.outage(self.component, None, member=str(id(self))):
            log.warning("Kafka is back after %.1f s (topic %s delivers again)",
                        time.monotonic() - self.down_since, self.topic)
        self.down_since, self.tries = None, 0

    def _reject(self, record: _Record, err: KafkaError) -> None:
        try:
            value = {"value": record.value.decode("utf-8")}
        except UnicodeDecodeError:
            value = {"value_b64": base64.b64encode(record.value).decode()}
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        line = orjson.dumps({"at_ms": int(time.time() * 1000), "topic": self.topic,
                             "error": err.str(), "code": err.name(), "key": key,
                             "bytes": len(record.value), **value})
        self.reject_path.parent.mkdir(parents=True, exist_ok=True)
        with self.reject_lock, self.reject_path.open("ab") as f:
            f.write(line + b"\n")
        STATS.add_labeled("kafka_rejected", self.topic)
        log.error("Kafka %s refused a record of %d bytes (%s); kept in %s", self.topic,
                  len(record.value), err.str(), self.reject_path)

    def close(self) -> None:
        self.producer.flush(FLUSH_STEP_S * 10)  # write_batch drained already: nothing left


class KafkaTopicSink(DynamicSink):
    """Produces each record of each item (items are lists) to one topic; see the module doc.
    Records the broker refuses for good go to ``<reject_dir or cwd>/rejected-<topic>.jsonl``."""

    def __init__(self, brokers: list[str], topic: str, encode: Callable[[object], bytes],
                 key_of: Callable[[object], bytes | None], extra: dict[str, str] | None = None,
                 observe: str | None = None, reject_dir: Path | None = None):
        self.config = _base(brokers, extra)
        self.topic, self.encode, self.key_of, self.observe = topic, encode, key_of, observe
        self.reject_dir = Path(reject_dir if reject_dir is not None else Path.cwd()).resolve()

    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _TopicPartition(self.config, self.topic, self.encode, self.key_of, self.observe,
                               self.reject_dir)


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
