"""ClickHouse: the shared client (chDB in process, or a server) and the buffered insert sinks.

The schema is owned by ``warehouse/migrations`` (applied by :func:`ensure_schema`). The same SQL
runs on chDB and on a ClickHouse server. chDB opens one data directory per process, so clients are
shared per DSN within a process; a lock serialises their use across workers.

Inserts never block the flow: ``write_batch`` only queues rows; a thread per sink inserts them
when ``max_rows`` are waiting or the oldest has waited ``max_delay_s``. Each complete minute of
aggregates is one block with the minute as its ``insert_deduplication_token``, so a block sent
twice (a replay, or a retry after a half-done insert) counts once, in the minute table and in
every rollup fed from it. When ClickHouse fails, the sink retries with exponential backoff (up
to 30 s between attempts), logs the outage once and its end, and keeps at most
``max_buffer_rows`` rows in memory: older blocks are spilled to ``spool_dir`` and sent first when
ClickHouse is back, also after a restart of the program.
"""
from __future__ import annotations

import datetime as dt
import logging
import pickle
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def ensure_schema(dsn: str, db: str, tz: str = "UTC") -> list[int]:
    """Apply the missing migrations; returns the versions applied now."""
    from warehouse.migrate import migrate

    client, lock = connect(dsn)
    with lock:
        return migrate(client, db, tz)


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)


def minute_blocks(minutes):
    """One block per complete minute, its token the minute (empty minutes are not inserted)."""
    for m in minutes:
        if m.rows:
            ts = _utc(m.minute_ms)
            yield f"minute-{m.minute}", [(ts, *row) for row in m.rows], m.closed_at_ms


def raw_rows(batch):
    for ts_ms, *rest in batch:
        yield (_utc(ts_ms), *rest)


def alert_rows(batch):
    nan = float("nan")
    for a in batch:
        yield (a["alert_id"], a["rule"], a["series"], a["status"], a["seq"], _utc(a["at_ms"]),
               a["value"] if a["value"] is not None else nan,
               *(a[f] if a[f] is not None else nan for f in ("mu", "sigma", "k", "z")),
               a["window"], a["severity"], _utc(a["first_seen_ms"]), a["response"], a["area"],
               a["direction"], a["score"] or 0.0, a["n"], a["detail"])


def action_rows(batch):
    for a in batch:
        yield (a["action_id"], a["rule"], a["user_id"], a["channel"], a["campaign"],
               a["session_id"], _utc(a["event_ts_ms"]))


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: Callable | None = None  # item -> rows, batched freely (tables that collapse duplicates)
    blocks: Callable | None = None  # item -> (token, rows) blocks, each inserted on its own


TABLES = {
    "events_minute_in": Table(["ts", "channel", "campaign", "creative", "event_name", "events",
                               "revenue", "cost", "orders", "users"], blocks=minute_blocks),
    "events_raw": Table(["event_time", "event_id", "type", "event_name", "user_id", "anonymous_id",
                         "channel", "campaign", "creative", "revenue", "cost", "ip_masked",
                         "country", "properties"], rows=raw_rows),
    "alerts": Table(["alert_id", "rule", "series", "status", "seq", "minute", "value", "mu", "sigma",
                     "k", "z", "window", "severity", "first_seen", "response", "area", "direction",
                     "score", "n", "detail"], rows=alert_rows),
    "actions": Table(["action_id", "rule", "user_id", "channel", "campaign", "session_id",
                      "event_time"], rows=action_rows),
}
DEDUPE = {"deduplicate_blocks_in_dependent_materialized_views": 1}
BACKOFF_MAX_S = 30.0


class _InsertPartition(StatelessSinkPartition):
    def __init__(self, dsn: str, db: str, table: str, max_rows: int, max_delay_s: float,
                 max_buffer_rows: int, spool: Path | None):
        self.client, self.lock = connect(dsn)
        self.table = f"{db}.{table}"
        self.stat = table
        self.spec = TABLES[table]
        self.max_rows, self.max_delay_s = max_rows, max_delay_s
        self.max_buffer_rows = max_buffer_rows
        self.blocks: deque[tuple[str | None, list, int | None]] = deque()  # oldest first
        self.rows = 0  # rows in self.blocks
        self.first_at = 0.0
        self.spool = spool
        self.spooled: deque[Path] = deque(sorted(spool.glob("*.pickle"))) if spool else deque()
        self.spool_seq = int(self.spooled[-1].stem) + 1 if self.spooled else 0
        self.cond = threading.Condition()
        self.closing = False
        self.down_since: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"insert-{table}", daemon=True)
        self.thread.start()

    # -- the flow's side: queue, never wait for ClickHouse -------------------------------
    def write_batch(self, items: list) -> None:
        spec = self.spec
        with self.cond:
            was_empty = self.rows == 0
            for item in items:
                if spec.blocks is not None:
                    for token, rows, closed_at_ms in spec.blocks(item):
                        self.blocks.append((token, rows, closed_at_ms))
                        self.rows += len(rows)
                else:
                    rows = list(spec.rows(item))
                    if not rows:
                        continue
                    last = self.blocks[-1] if self.blocks else None
                    if last is not None and last[0] is None and len(last[1]) < self.max_rows:
                        last[1].extend(rows)
                    else:
                        self.blocks.append((None, rows, None))
                    self.rows += len(rows)
            if was_empty and self.rows:
                self.first_at = time.monotonic()
            if self.rows > self.max_buffer_rows:
                self._spill(self.max_buffer_rows // 2)
            if self.rows >= self.max_rows or spec.blocks is not None:
                self.cond.notify()

    def _spill(self, keep_rows: int) -> None:
        """Move the oldest blocks to disk until at most ``keep_rows`` rows stay in memory."""
        if self.spool is None or not self.blocks:
            return
        self.spool.mkdir(parents=True, exist_ok=True)
        spilled = []
        while self.blocks and self.rows > keep_rows:
            block = self.blocks.popleft()
            self.rows -= len(block[1])
            spilled.append(block)
        path = self.spool / f"{self.spool_seq:012d}.pickle"
        self.spool_seq += 1
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(spilled, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.rename(path)
        self.spooled.append(path)
        n = sum(len(block[1]) for block in spilled)
        STATS.add("clickhouse_rows_spilled", n)
        log.warning("%s: ClickHouse is behind; %d rows spilled to %s", self.table, n, path)

    # -- the insert thread ---------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self.cond:
                while not self._due():
                    if self.closing:
                        return
                    self.cond.wait(self.max_delay_s / 4)
            try:
                self._send_all()
            except Exception as exc:  # noqa: BLE001 - kept, retried, reported
                STATS.add("clickhouse_insert_errors")
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.error("insert into %s failed (%s); retrying with backoff, rows kept",
                              self.table, str(exc).splitlines()[0][:200])
                with self.cond:
                    if self.closing and time.monotonic() - self.down_since > self.close_wait_s:
                        self._spill(0)
                        log.error("%s: ClickHouse unreachable at shutdown; rows left in %s",
                                  self.table, self.spool)
                        return
                    self.cond.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if self.down_since is not None:
                log.warning("ClickHouse is back for %s after %.1f s", self.table,
                            time.monotonic() - self.down_since)
                self.down_since = None
            backoff = 0.5

    close_wait_s = 30.0  # at close, how long to keep retrying before spooling the rest to disk

    def _due(self) -> bool:
        if self.spooled:
            return True
        if not self.rows:
            return False
        if self.blocks[0][0] is not None:
            return True  # a complete minute is one insert anyway: waiting would only delay it
        return (self.closing or self.rows >= self.max_rows
                or time.monotonic() - self.first_at >= self.max_delay_s)

    def _send_all(self) -> None:
        while self.spooled:
            path = self.spooled[0]
            for block in pickle.loads(path.read_bytes()):
                self._insert(*block)
            path.unlink()
            self.spooled.popleft()
        while True:
            with self.cond:
                if not self.blocks:
                    return
                block = self.blocks.popleft()  # new rows meanwhile start a new block
                self.rows -= len(block[1])
            try:
                self._insert(*block)
            except Exception:
                with self.cond:
                    self.blocks.appendleft(block)
                    self.rows += len(block[1])
                raise
            with self.cond:
                self.first_at = time.monotonic()

    def _insert(self, token: str | None, rows: list, closed_at_ms: int | None) -> None:
        settings = DEDUPE | {"insert_deduplication_token": token} if token else {}
        with self.lock:
            self.client.insert(self.table, rows, column_names=self.spec.columns, settings=settings)
        STATS.add(f"rows_{self.stat}", len(rows))
        if closed_at_ms:  # queryable now: the delay since the minute closed, for the figures
            STATS.observe_since("minute_queryable_ms", [closed_at_ms])

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()


class ClickHouseSink(DynamicSink):
    """Inserts each item's rows into one table (see :data:`TABLES` for what an item is)."""

    def __init__(self, dsn: str, db: str, table: str, max_rows: int = 5000,
                 max_delay_s: float = 1.0, max_buffer_rows: int = 1_000_000,
                 spool_dir: Path | None = None):
        if table not in TABLES:
            raise ValueError(f"unknown table {table}")
        self.dsn, self.db, self.table = dsn, db, table
        self.max_rows, self.max_delay_s = max_rows, max_delay_s
        self.max_buffer_rows, self.spool_dir = max_buffer_rows, spool_dir

    def build(self, step_id: str, worker_index: int, worker_count: int):
        spool = (self.spool_dir / f"{self.db}.{self.table}" / f"worker-{worker_index}"
                 if self.spool_dir is not None else None)
        return _InsertPartition(self.dsn, self.db, self.table, self.max_rows, self.max_delay_s,
                                self.max_buffer_rows, spool)
