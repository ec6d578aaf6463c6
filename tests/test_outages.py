"""Outages of every service while the flow runs on a live topic, compared with a calm run of
the same input (tests/outage_harness.py describes the scenario; bench/bench_outages.py is the
long version, a minute per outage).

The run waits out each outage with backoff and logs one line when it starts and one when it
ends; the ClickHouse queues stay under their byte bound (the rest waits on disk); afterwards
Redis, every ClickHouse table, the Kafka topics and the webhook hold what the calm run holds,
each idempotency key with one body."""
from __future__ import annotations

import pytest

from tests import services
from tests.outage_harness import ServiceStartError, scenario

OUTAGE_S = 3.0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    try:
        return scenario(tmp_path_factory.mktemp("outages"), OUTAGE_S, events_per_s=300.0)
    except ServiceStartError as exc:
        services.unavailable("Kafka or Redis", exc)


def test_every_effect_is_there_once_after_the_outages(result):
    assert result["redis_differences"] == {} and result["redis_keys"] > 500
    assert result["table_differences"] == {}
    assert all(result["table_rows"][t] for t in ("events_minute", "events_raw", "actions",
                                                 "user_days"))
    assert result["kafka_equal"] == {"actions": True, "alerts": True, "dead": True}
    assert result["kafka_counts"]["actions"] > 100 and result["kafka_counts"]["dead"] > 10
    assert result["webhook_equal"] and result["webhook_alerts"] >= 1


def test_one_log_line_when_an_outage_starts_and_one_when_it_ends(result):
    # Redis is lost twice (hung, then killed), ClickHouse and the broker once each
    assert result["outage_lines"] == {"Redis": {"start": 2, "end": 2},
                                      "ClickHouse": {"start": 1, "end": 1},
                                      "Kafka": {"start": 1, "end": 1}}, "".join(result["log"])


def test_the_clickhouse_queues_stay_within_their_byte_bound(result):
    assert 0 < result["queue_bytes_peak"] <= result["queue_bytes_bound"]
