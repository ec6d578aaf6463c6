"""ClickHouse: the client (chDB in process, or a server), the schema, and batched inserts.

The same SQL runs on chDB and on a ClickHouse server. chDB opens one data directory per process,
so clients are shared per DSN within a process; a lock serialises their use across workers.

Idempotency: a shard closes each minute once, so its partial row for (minute, channel, campaign,
event name, shard) is final. The table is a ReplacingMergeTree on that key: a replay inserts the
same row again and FINAL (or a merge) collapses it. Unique users are kept as a mergeable
``uniqExact`` state, combined across shards at query time.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from pathlib import Path

import clickhouse_connect
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.clickhouse")
_CLIENTS: dict[str, tuple[object, threading.Lock]] = {}
_CLIENTS_LOCK = threading.Lock()


def normalize_dsn(dsn: str) -> str:
    """``chdb://relative/dir`` becomes ``chdb:///absolute/dir`` (the program may change directory).

    >>> normalize_dsn("chdb:///data/ch"), normalize_dsn("http://ch:8123")
    ('chdb:///data/ch', 'http://ch:8123')
    """
    if dsn.startswith("chdb://") and not dsn.startswith("chdb:///"):
        return "chdb://" + str(Path(dsn[len("chdb://"):]).resolve())
    return dsn


def chdb_dir(dsn: str) -> Path | None:
    """The data directory of a chDB DSN, else None."""
    dsn = normalize_dsn(dsn)
    return Path(dsn[len("chdb://"):]) if dsn.startswith("chdb://") else None


def connect(dsn: str):
    """A shared client and its lock for this DSN."""
    dsn = normalize_dsn(dsn)
    with _CLIENTS_LOCK:
        if dsn not in _CLIENTS:
            _CLIENTS[dsn] = (clickhouse_connect.get_client(dsn=dsn), threading.Lock())
        return _CLIENTS[dsn]


def schema(db: str) -> list[str]:
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        # Landing table: shard partial rows with the raw user ids; the view turns ids into state.
        f"""CREATE TABLE IF NOT EXISTS {db}.events_minute_in (
            minute DateTime('UTC'), channel LowCardinality(String), campaign String,
            event_name LowCardinality(String), shard UInt16, events UInt64, revenue Float64,
            cost Float64, users Array(String)) ENGINE = Null""",
        f"""CREATE TABLE IF NOT EXISTS {db}.events_minute (
            minute DateTime('UTC'), channel LowCardinality(String), campaign String,
            event_name LowCardinality(String), shard UInt16, events UInt64, revenue Float64,
            cost Float64, users AggregateFunction(uniqExact, String))
            ENGINE = ReplacingMergeTree ORDER BY (minute, channel, campaign, event_name, shard)""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_minute_mv TO {db}.events_minute AS
            SELECT minute, channel, campaign, event_name, shard, events, revenue, cost,
                   arrayReduce('uniqExactState', users) AS users
            FROM {db}.events_minute_in""",
        f"""CREATE TABLE IF NOT EXISTS {db}.alerts (
            alert_id String, rule LowCardinality(String), series String,
            status LowCardinality(String), minute DateTime('UTC'), value Float64, mu Float64,
            sigma Float64, k Float64, z Float64, window UInt32, severity LowCardinality(String),
            first_seen DateTime('UTC'), response String)
            ENGINE = ReplacingMergeTree ORDER BY (alert_id, status)""",
        f"""CREATE TABLE IF NOT EXISTS {db}.actions (
            action_id String, rule LowCardinality(String), user_id String,
            channel LowCardinality(String), campaign String, session_id String,
            event_time DateTime64(3, 'UTC'))
            ENGINE = ReplacingMergeTree ORDER BY action_id""",
    ]


def ensure_schema(dsn: str, db: str) -> None:
    client, lock = connect(dsn)
    with lock:
        for statement in schema(db):
            client.command(statement)


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)


def aggregate_rows(batch):
    for minute_ms, channel, campaign, name, shard, n, revenue, cost, users in batch:
        yield (_utc(minute_ms), channel, campaign, name, shard, n, revenue, cost, users)


def alert_rows(batch):
    for a in batch:
        yield (a["alert_id"], a["rule"], a["series"], a["status"], _utc(a["minute_ms"]), a["value"],
               a["mu"], a["sigma"], a["k"], a["z"], a["window"], a["severity"],
               _utc(a["first_seen_ms"]), a["response"])


def action_rows(batch):
    for a in batch:
        yield (a["action_id"], a["rule"], a["user_id"], a["channel"], a["campaign"],
               a["session_id"], _utc(a["event_ts_ms"]))


TABLES = {
    "events_minute_in": (["minute", "channel", "campaign", "event_name", "shard", "events",
                          "revenue", "cost", "users"], aggregate_rows),
    "alerts": (["alert_id", "rule", "series", "status", "minute", "value", "mu", "sigma", "k", "z",
                "window", "severity", "first_seen", "response"], alert_rows),
    "actions": (["action_id", "rule", "user_id", "channel", "campaign", "session_id",
                 "event_time"], action_rows),
}


class _InsertPartition(StatelessSinkPartition):
    """Buffers rows and inserts them when ``max_rows`` are waiting or the oldest has waited
    ``max_delay_s`` (a timer thread, so a quiet stream still sees its last minute within about a
    second). A failed insert keeps its rows for the next attempt; close() flushes."""

    def __init__(self, dsn: str, db: str, table: str, max_rows: int, max_delay_s: float):
        self.client, self.lock = connect(dsn)
        self.table = f"{db}.{table}"
        self.stat = table
        self.columns, self.to_rows = TABLES[table]
        self.max_rows, self.max_delay_s = max_rows, max_delay_s
        self.buffer: list[tuple] = []
        self.first_at = 0.0
        self.buffer_lock = threading.Lock()
        self.done = threading.Event()
        self.timer = threading.Thread(target=self._flush_when_old, daemon=True)
        self.timer.start()

    def write_batch(self, items: list) -> None:
        rows = [row for batch in items for row in self.to_rows(batch)]
        if not rows:
            return
        with self.buffer_lock:
            if not self.buffer:
                self.first_at = time.monotonic()
            self.buffer.extend(rows)
            if len(self.buffer) >= self.max_rows:
                self._flush()

    def _flush_when_old(self) -> None:
        while not self.done.wait(self.max_delay_s / 4):
            with self.buffer_lock:
                if self.buffer and time.monotonic() - self.first_at >= self.max_delay_s:
                    try:
                        self._flush()
                    except Exception:  # noqa: BLE001 - kept for the next attempt, reported
                        STATS.add("clickhouse_insert_errors")
                        log.exception("insert into %s failed; %d rows kept for retry",
                                      self.table, len(self.buffer))

    def _flush(self) -> None:
        rows, self.buffer = self.buffer, []
        try:
            with self.lock:
                self.client.insert(self.table, rows, column_names=self.columns)
        except Exception:
            self.buffer = rows + self.buffer
            raise
        STATS.add(f"rows_{self.stat}", len(rows))

    def close(self) -> None:
        self.done.set()
        self.timer.join()
        with self.buffer_lock:
            if self.buffer:
                self._flush()


class ClickHouseSink(DynamicSink):
    """Inserts each batch of records into one table (items are lists of records)."""

    def __init__(self, dsn: str, db: str, table: str, max_rows: int = 5000,
                 max_delay_s: float = 1.0):
        if table not in TABLES:
            raise ValueError(f"unknown table {table}")
        self.dsn, self.db, self.table = dsn, db, table
        self.max_rows, self.max_delay_s = max_rows, max_delay_s

    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _InsertPartition(self.dsn, self.db, self.table, self.max_rows, self.max_delay_s)
