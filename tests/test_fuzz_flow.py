"""Fuzz through the whole flow: hostile records (tests/hostile_records.py) on real Kafka, Redis
and chDB. No record stops the flow; each one ends either stored (its event in events_raw and the
minute aggregates, its user's features in Redis) or as a dead letter that keeps its exact bytes
and names a reason. Only a repeated event_id (dropped as a duplicate) is neither. CI runs 60,000
records; bench/bench_fuzz.py runs a million.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import redis

from config.settings import load_settings
from connectors.kafka import produce
from flows.runner import run
from surgeflow.stats import STATS
from tests.hostile_records import hostile_records
from tests.dead_letters import raw_of

N = 60_000
# Every reason the flow gives; a new one must be added here on purpose.
REASONS = {"invalid_json", "not_utf8", "not_an_object", "missing_event_id", "missing_user",
           "bad_id", "bad_type", "missing_event", "bad_timestamp", "absurd_timestamp",
           "oversized", "bad_field", "too_deep", "too_many_keys", "string_too_long", "bad_number",
           "late_event", "future_event", "empty_message"}


def event_id_of(raw: bytes) -> str | None:
    """The event_id a consumer of the raw record would see (standard-library JSON: an oracle
    independent of the flow's decoder), None when there is none."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return doc.get("event_id") if isinstance(doc, dict) and isinstance(doc.get("event_id"), str) else None


def run_fuzz(tmp: Path, bootstrap: str, topic: str, redis_url: str, chdb_dsn: str, database: str):
    settings = load_settings(
        None, env={}, source__kind="kafka", kafka__brokers=[bootstrap], kafka__events_topic=topic,
        kafka__tail=False, output__kind="files", output__dir=str(tmp / "out"),
        redis__url=redis_url, redis__key_prefix="fz", clickhouse__dsn=chdb_dsn,
        clickhouse__database=database, clickhouse__spool_dir=str(tmp / "spool"),
        flow__recovery_dir=None,
        privacy__consent__profiling="opt_out")  # the fuzz records state no consent: "every valid
        # event's user has features" needs profiling without a grant
    STATS.reset()
    run(settings, redis_url)
    return [json.loads(x) for x in (tmp / "out" / "dead_letters.jsonl").read_text().splitlines()]


def test_hostile_records_through_the_whole_flow(tmp_path, kafka, redis_url, chdb_dsn, chdb_client,
                                                ch_database):
    # event time near the wall clock, so the flow's defaults (clock skew cap, lookback) apply
    records = list(hostile_records(N, seed=12, base_ms=int(time.time() * 1000) - 3_600_000))
    topic = kafka.create_topic("events-fuzz", partitions=2)
    produce([kafka.bootstrap], topic,
            ((f"k{i % 97}".encode(), raw) for i, (_, raw, _) in enumerate(records)))
    dead = run_fuzz(tmp_path, kafka.bootstrap, topic, redis_url, chdb_dsn, ch_database)
    check_outcome(records, dead, chdb_client, ch_database, redis.Redis.from_url(redis_url), "fz")


def check_outcome(records, dead: list[dict], chdb_client, database: str, client, prefix: str) -> dict:
    """The fuzz invariants (shared with bench/bench_fuzz.py); returns the dead letters' reasons."""
    # 1. Every dead letter: a known reason, a detail, the exact bytes of a record sent.
    sent = Counter(raw for _, raw, _ in records)
    dead_raw = Counter(raw_of(d) for d in dead)
    assert not dead_raw - sent
    reasons = Counter(d["reason"] for d in dead)
    assert set(reasons) <= REASONS, reasons
    assert all(d["detail"] and d["step"] for d in dead)
    assert STATS.labeled("dead_letters").get("step_error", 0) == 0  # validation foresaw them all
    assert len(reasons) >= 12 and sum(reasons.values()) > len(records) // 3

    # 2. Every record not dead-lettered was stored (or repeats the id of one that was: ids are
    #    deduplicated per ingest shard, i.e. per visitor, as a producer's retries are).
    rows = chdb_client.query(f"SELECT event_id FROM {database}.events_raw FINAL").result_columns[0]
    kept = sent - dead_raw
    ids = Counter(event_id_of(raw) for raw in kept.elements())
    assert None not in ids
    assert set(ids) == set(rows)
    minute_total = chdb_client.command(f"SELECT sum(events) FROM {database}.events_minute FINAL")
    assert minute_total == len(rows) == STATS.get("events_unique")
    assert STATS.get("duplicates") == sum(ids.values()) - len(rows)

    # 3. Every valid event was stored, and its user has features.
    valid = [doc for kind, _, doc in records if kind == "valid"]
    missing = {d["event_id"] for d in valid} - set(rows)
    why = Counter(d["reason"] for d in dead if event_id_of(raw_of(d)) in missing)
    assert not missing, (len(missing), why)
    users = {d["user_id"] for d in valid if "user_id" in d}
    assert len(users) > min(1000, len(valid) // 10)
    pipe = client.pipeline()
    for u in users:
        pipe.exists(f"{prefix}:v2:user:{u}")
    assert all(pipe.execute())
    return dict(reasons)
