"""Shared fixtures backed by real services (Kafka, Redis, chDB).

Why: tests run against the genuine engines, started here once per session.
If a service cannot start, the test is skipped locally but FAILS in CI
(env CI=true), so CI can never go green by silently skipping.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

# Dead letters keep their bytes only sealed with this key (privacy/pii.py): tests that check the
# exact bytes unseal them (tests/dead_letters.py). Set before anything reads it, for the processes
# the tests start as well.
os.environ.setdefault("SURGEFLOW_DEAD_LETTER_KEY", "tests-only-dead-letter-key-0123456789")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import services  # noqa: E402  (tests/services.py)

KAFKA_FIXTURES = {"kafka", "unique_topic"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: test needs the real Kafka broker (fixture 'kafka')")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tag every test using a Kafka fixture with the 'kafka' marker (for -m selection)."""
    for item in items:
        if KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def kafka():
    """A started single-node Kafka broker (services.KafkaBroker)."""
    broker = services.KafkaBroker()
    try:
        broker.start()
    except Exception as exc:  # noqa: BLE001 - any start problem means "no Kafka"
        services.unavailable("Kafka", exc)
    yield broker
    broker.stop()


@pytest.fixture
def unique_topic(kafka):
    """Factory: ``unique_topic(prefix, partitions=1)`` creates a fresh topic, returns its name."""

    def make(prefix: str = "t", partitions: int = 1) -> str:
        return kafka.create_topic(f"{prefix}-{uuid.uuid4().hex[:12]}", partitions=partitions)

    return make


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The session's EmbeddedRedis (data in a session temp dir)."""
    try:
        server = services.start_redis(tmp_path_factory.mktemp("redis"))
    except Exception as exc:  # noqa: BLE001
        services.unavailable("Redis", exc)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    """URL of the session's real Redis server, e.g. redis://127.0.0.1:PORT/0."""
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    """A redis.Redis (bytes responses) on an empty database: FLUSHALL before each test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory) -> str:
    """The session's one chDB directory (chDB opens ONE data directory per process);
    isolate tests with ``ch_database`` instead. The flow under test uses this same DSN."""
    return "chdb://" + str(tmp_path_factory.mktemp("chdb").resolve())


@pytest.fixture(scope="session")
def chdb_client(chdb_dsn):
    """The process-wide clickhouse_connect client on that directory (shared with the flow)."""
    try:
        from connectors.clickhouse import connect

        client, _lock = connect(chdb_dsn)
        client.query("SELECT 1")
    except Exception as exc:  # noqa: BLE001
        services.unavailable("chDB", exc)
    return client


@pytest.fixture
def ch_database(chdb_client):
    """A fresh database ``t_<hex8>`` on chdb_client, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    chdb_client.command(f"CREATE DATABASE {name}")
    yield name
    chdb_client.command(f"DROP DATABASE IF EXISTS {name}")
