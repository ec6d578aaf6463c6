"""Wires a configured run: the source and the outputs from settings, then runs the dataflow."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import orjson
import redis
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import cluster_main, run_main

from config.settings import Settings
from connectors import clickhouse, kafka
from connectors.files import JsonLinesSink, JsonLinesSource
from connectors.stoppable import Stoppable
from config.registry import load_registry
from connectors.model_versions import ModelVersionsSink, ModelVersionsSource
from connectors.model_versions import clear as clear_versions
from connectors.redis_features import RedisFeatureSink, write_registry
from connectors.synthetic import Anomaly, SyntheticSpec
from connectors.synthetic_source import SyntheticSource
from bytewax.inputs import FixedPartitionedSource

from connectors.stoppable import reset_input_done
from features.layout import anon_key, erased_key, user_key_pattern
from privacy.erasure import Eraser, InboxSource
from privacy.pii import warn_if_no_key
from privacy.retention import sweep_dead_letters, sweep_spools
from privacy.subjects import pii_key, subject_hash
from warehouse.migrate import apply_retention
from privacy.secrets import clickhouse_dsn, kafka_client_config
from flows import cluster, gc_pacing
from flows.cluster import OwnerSink, Place, set_place
from flows.events import DeadLetter
from flows.pipeline import Outputs, build_flow, model_specs
from surgeflow.stats import STATS

flow_log = logging.getLogger("surgeflow.flow")


def public(record: dict) -> bytes:
    """JSON of an action or alert without its internal ("_"-prefixed) fields."""
    return orjson.dumps({k: v for k, v in record.items() if not k.startswith("_")})


def synthetic_spec(settings: Settings, now_ms: int | None = None) -> SyntheticSpec:
    s = settings.source.synthetic
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    start = s.start_ms if s.start_ms is not None else now_ms - int(s.backfill_hours * 3_600_000)
    return SyntheticSpec(
        seed=s.seed, users=s.users, start_ms=start, events_per_s=s.events_per_s,
        duration_s=s.duration_s, campaigns=s.campaigns, malformed_share=s.malformed_share,
        duplicate_share=s.duplicate_share, max_disorder_ms=s.max_disorder_ms,
        anomalies=tuple(Anomaly(a.kind, a.start_s, a.duration_s, a.magnitude) for a in s.anomalies),
    )


def make_source(settings: Settings):
    """(source, number of source partitions)."""
    kind = settings.source.kind
    if kind == "synthetic":
        return Stoppable(SyntheticSource(synthetic_spec(settings), settings.source.synthetic.speed)), 1
    if kind == "file":
        paths = settings.source.file.paths
        if not paths:
            raise ValueError("source.file.paths is empty")
        return Stoppable(JsonLinesSource(paths)), len(paths)
    k, config = settings.kafka, kafka_client_config(settings.kafka)
    partitions = kafka.partition_count(k.brokers, k.events_topic, config)
    return Stoppable(kafka.events_source(k.brokers, k.events_topic, tail=k.tail,
                                         from_beginning=k.starting_offset == "beginning",
                                         batch_size=k.batch_size, extra=config)), partitions


def _dead_letter_key(settings: Settings):
    """The dead-letter topic's message key: a subject hash of the record's key (its partition
    follows the record's, and no id travels in clear)."""
    key = pii_key(name=settings.privacy.pii_key_env)
    return lambda d: subject_hash(d.key.decode("utf-8", "replace"), key).encode() if d.key else None


def make_outputs(settings: Settings, redis_url: str) -> Outputs:
    ch, r = settings.clickhouse, settings.redis
    # With a recovery store, rows queued for ClickHouse are written ahead to the spool before
    # the flow moves on: a snapshot then never covers rows that only lived in memory.
    write_ahead = settings.flow.recovery_dir is not None
    reject_dir = ch.spool_dir.resolve()
    # clickhouse.max_buffer_bytes bounds every queue together: each table gets an equal share
    share = ch.max_buffer_bytes // ((5 if ch.raw_events else 4) + settings.model.enabled)

    # In a cluster, what one process owns (embedded chDB, the output files) is written by
    # process 0 only (flows/cluster.py); a ClickHouse server takes every worker's share.
    several = cluster.PLACE.processes > 1
    embedded = clickhouse.chdb_dir(ch.dsn) is not None

    def owned(sink, local: bool):
        return OwnerSink(sink) if several and local else sink

    def table(name: str):
        return owned(clickhouse.ClickHouseSink(
            clickhouse_dsn(ch), ch.database, name, ch.insert_batch_rows, ch.flush_interval_s,
            ch.max_buffer_rows, ch.spool_dir.resolve(), max_buffer_bytes=share,
            max_insert_tries=ch.max_insert_tries, timeout_s=ch.timeout_s,
            write_ahead=write_ahead), embedded)

    out = Outputs(
        features=RedisFeatureSink(redis_url, r.key_prefix, int(r.ttl_days * 86_400),
                                  socket_timeout_s=r.socket_timeout_s,
                                  retry_max_backoff_s=r.retry_max_backoff_s),
        aggregates=table("events_minute_in"),
        raw_events=table("events_raw") if ch.raw_events else None,
        actions=[("clickhouse", table("actions"))],
        audit=table("trigger_audit") if settings.trigger.rules is not None else None,
        alerts=[("clickhouse", table("alerts"))],
    )
    if settings.model.enabled:
        out.model_versions = ModelVersionsSink(redis_url, r.key_prefix, r.socket_timeout_s,
                                               r.retry_max_backoff_s)
        out.model_metrics = table("model_metrics")
    for hook, outputs, spool in ((settings.alerts.webhook, out.alerts, "webhook"),
                                 (settings.trigger.webhook, out.actions, "webhook-actions")):
        if hook.url is not None:
            import os

            from connectors.webhook import WebhookSink

            secret = os.environ.get(hook.secret_env)
            outputs.append(("webhook", WebhookSink(
                hook.url, timeout_s=hook.timeout_s, headers=dict(hook.headers), secret=secret,
                spool_dir=ch.spool_dir.resolve() / spool)))
    encode_dead = DeadLetter.to_json
    if settings.output.kind == "files":
        d = settings.output.dir
        out.actions.append(("file", owned(JsonLinesSink(d / "actions.jsonl", public,
                                                        "action_latency_ms"), True)))
        out.alerts.append(("file", owned(JsonLinesSink(d / "alerts.jsonl", public,
                                                       "alert_latency_ms"), True)))
        out.dead_letters.append(("file", owned(JsonLinesSink(d / "dead_letters.jsonl", encode_dead),
                                               True)))
    else:
        k, config = settings.kafka, kafka_client_config(settings.kafka)
        out.actions.append(("kafka", kafka.KafkaTopicSink(
            k.brokers, k.actions_topic, public, lambda a: a["user_id"].encode(), config,
            observe="action_latency_ms", reject_dir=reject_dir)))
        out.alerts.append(("kafka", kafka.KafkaTopicSink(
            k.brokers, k.alerts_topic, public, lambda a: a["series"].encode(), config,
            observe="alert_latency_ms", reject_dir=reject_dir)))
        out.dead_letters.append(("kafka", kafka.KafkaTopicSink(
            k.brokers, k.dead_letter_topic, encode_dead, _dead_letter_key(settings), config,
            reject_dir=reject_dir)))
    return out


@dataclass
class RunResult:
    seconds: float


def run(settings: Settings, redis_url: str, workers: int | None = None, source=None,
        partitions: int | None = None, addresses: list[str] | None = None,
        process_id: int = 0) -> RunResult:
    """Builds and runs the dataflow in this process (1..n worker threads) until its input ends;
    with ``addresses`` (host:port of every process), as process ``process_id`` of a Bytewax
    cluster (flows/cluster.py). Process 0 migrates ClickHouse and applies retention before it
    joins, and the cluster starts only once every process has joined."""
    ch = settings.clickhouse
    workers = workers or settings.flow.workers
    set_place(Place(process_id, len(addresses) if addresses else 1, workers))
    if process_id == 0:
        clickhouse.ensure_schema(clickhouse_dsn(ch), ch.database, ch.timezone)
    if settings.output.kind == "kafka" or settings.source.kind == "kafka":
        k = settings.kafka
        kafka.check_brokers(k.brokers, kafka_client_config(k))
    if settings.output.kind == "kafka":
        k = settings.kafka
        kafka.ensure_topics(k.brokers, [k.actions_topic, k.alerts_topic, k.dead_letter_topic],
                            extra=kafka_client_config(k))
    if process_id == 0:
        client, lock = clickhouse.connect(clickhouse_dsn(ch))
        with lock:  # privacy.retention: the time to live of every table holding a user id
            apply_retention(client, ch.database, settings.privacy.retention.model_dump())
    registry = load_registry(settings.features.registry)
    write_registry(redis_url, settings.redis.key_prefix, registry.to_dict(),
                   socket_timeout_s=settings.redis.socket_timeout_s,
                   retry_max_backoff_s=settings.redis.retry_max_backoff_s)
    if source is None:
        source, partitions = make_source(settings)
    if isinstance(source, FixedPartitionedSource) and not isinstance(source, Stoppable):
        source = Stoppable(source)  # (its end also ends the erasure inbox)
    resuming = settings.flow.recovery_dir is not None and any(
        settings.flow.recovery_dir.glob("part-*.sqlite3"))
    recovery = recovery_config(settings.flow.recovery_dir)
    versions = None
    if settings.model.enabled:
        names = frozenset(spec.name for spec in model_specs(settings))
        versions = ModelVersionsSource(redis_url, settings.redis.key_prefix, names,
                                       settings.redis.socket_timeout_s)
        if process_id == 0 and not resuming:
            # a fresh run must not read an earlier run's versions; the cluster starts only
            # once process 0 has joined, so no process reads before this
            client = redis.Redis.from_url(redis_url)
            try:
                clear_versions(client, settings.redis.key_prefix)
            finally:
                client.close()
    pv = settings.privacy
    warn_if_no_key(flow_log, name=pv.pii_key_env)
    # files on this machine are swept by one process
    retention = start_file_retention(settings) if process_id == 0 else threading.Event()
    reset_input_done()
    flow = build_flow(settings, source, make_outputs(settings, redis_url), partitions or 1,
                      registry=registry, snapshots=recovery is not None,
                      erasure_source=erasure_source(settings) if isinstance(source, Stoppable) else None,
                      eraser=make_eraser(settings, redis_url),
                      erased=load_erased(redis_url, settings.redis.key_prefix),
                      versions_source=versions)
    epoch = timedelta(seconds=settings.flow.epoch_interval_s)
    started = time.monotonic()
    STATS.set("ready", 1)  # /readyz: the flow runs (and no sink reports an outage)
    try:
        with gc_pacing.paced():  # the cyclic GC between batches, not inside them
            _run(flow, workers, epoch, recovery, addresses, process_id)
    finally:
        retention.set()
        STATS.set("ready", 0)
    return RunResult(time.monotonic() - started)


def start_file_retention(settings: Settings) -> threading.Event:
    """Dead letters and spools past their retention go: spools now (no sink reads them yet),
    dead letters now and every hour. Returns the event that stops the hourly sweep."""
    ch, rt = settings.clickhouse, settings.privacy.retention
    sweep_spools(ch.spool_dir.resolve(), rt.spool_days)
    places = [ch.spool_dir.resolve()] + ([settings.output.dir.resolve()]
                                         if settings.output.kind == "files" else [])
    done = threading.Event()

    def hourly():
        while True:
            sweep_dead_letters(places, rt.dead_letters_days)
            if done.wait(3600):
                return

    threading.Thread(target=hourly, name="retention", daemon=True).start()
    return done


def erasure_source(settings: Settings):
    """Where erasure requests come from: the erasure topic (Kafka sources), else the inbox."""
    if settings.source.kind == "kafka":
        from bytewax.connectors.kafka import KafkaSource

        k, config = settings.kafka, kafka_client_config(settings.kafka)
        kafka.ensure_topics(k.brokers, [settings.privacy.erasure.topic], extra=config)
        return Stoppable(KafkaSource(k.brokers, [settings.privacy.erasure.topic], tail=k.tail,
                                     add_config=config, raise_on_errors=False), side=True)
    return InboxSource(settings.privacy.erasure.inbox.resolve())


def make_eraser(settings: Settings, redis_url: str) -> Eraser:
    ch, pv = settings.clickhouse, settings.privacy
    files = [ch.spool_dir.resolve()]
    if settings.output.kind == "files":
        files.append(settings.output.dir.resolve())
    inbox = pv.erasure.inbox.resolve()
    return Eraser(clickhouse_dsn=clickhouse_dsn(ch), database=ch.database, redis_url=redis_url,
                  prefix=settings.redis.key_prefix, key=pii_key(name=pv.pii_key_env), files=files,
                  receipts=inbox.parent / "receipts", inbox=inbox,
                  recovery=settings.flow.recovery_dir.resolve() if settings.flow.recovery_dir else None)


def load_erased(redis_url: str, prefix: str) -> dict[str, int]:
    """The erasure ledger (subject hash -> erasure time), so that a fresh start or a replay
    keeps erased people out."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {k.decode(): int(v) for k, v in client.hgetall(erased_key(prefix)).items()}
    finally:
        client.close()


def recovery_config(db_dir: Path | None) -> RecoveryConfig | None:
    """The recovery store in ``db_dir``, created (one SQLite partition) on first use."""
    if db_dir is None:
        return None
    db_dir.mkdir(parents=True, exist_ok=True)
    if not any(db_dir.glob("part-*.sqlite3")):
        init_db_dir(db_dir, 1)
    return RecoveryConfig(db_dir)


def _run(flow, workers: int, epoch: timedelta, recovery: RecoveryConfig | None,
         addresses: list[str] | None = None, process_id: int = 0) -> None:
    if addresses and len(addresses) > 1:
        cluster_main(flow, addresses, process_id, epoch_interval=epoch, recovery_config=recovery,
                     worker_count_per_proc=workers)
    elif workers == 1:
        run_main(flow, epoch_interval=epoch, recovery_config=recovery)
    else:
        cluster_main(flow, [], 0, epoch_interval=epoch, recovery_config=recovery,
                     worker_count_per_proc=workers)


def count_feature_users(redis_url: str, prefix: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for pattern in (user_key_pattern(prefix), anon_key(prefix, "*"))
                   for _ in client.scan_iter(match=pattern, count=5000))
    finally:
        client.close()


def count_aggregate_rows(settings: Settings) -> int | None:
    """Rows of the minute aggregate (None in a process of a cluster that does not own the
    embedded ClickHouse)."""
    if cluster.PLACE.process_id != 0 and clickhouse.chdb_dir(settings.clickhouse.dsn) is not None:
        return None
    client, lock = clickhouse.connect(clickhouse_dsn(settings.clickhouse))
    with lock:
        return int(client.command(
            f"SELECT count() FROM {settings.clickhouse.database}.events_minute FINAL"))
