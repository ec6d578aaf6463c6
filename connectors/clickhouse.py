"""ClickHouse: the shared client (chDB in process, or a server) and the buffered insert sinks.

The schema is owned by ``warehouse/migrations`` (applied by :func:`ensure_schema`). The same SQL
runs on chDB and on a ClickHouse server. chDB opens one data directory per process, so clients are
shared per DSN within a process; a lock serialises their use across workers. A request to a
server gives up after ``timeout_s`` (clients are shared per DSN and timeout).

Inserts never block the flow: ``write_batch`` only queues rows; a thread per sink inserts them,
oldest first, when ``max_rows`` are waiting or the oldest has waited ``max_delay_s``.

What each table gets:

- ``events_minute_in`` (and every table its views feed): exactly once. Each complete minute is
  one block whose ``insert_deduplication_token`` is the minute, so a block sent twice (a replay,
  a retry after a half-done insert, a spool file sent again after a crash) counts once, in the
  minute table and in every rollup.
- ``events_raw``, ``alerts``, ``actions``: at least once, collapsed by key. Their blocks carry no
  token (rows are batched freely), so a retry after a half-done insert or a spool file resent
  after a crash can store a row twice; these tables are ReplacingMergeTree on the row's id
  (``event_id``, ``(alert_id, status, seq)``, ``action_id``), so duplicates collapse in merges
  and ``FINAL`` reads count each row once.

Outages and bad blocks: an insert that fails with a connection problem or with one of
:data:`WAIT_CODES` (ClickHouse saying "not now": a table detached, too many parts, memory,
timeouts, credentials or quotas) is retried with exponential backoff (up to 30 s) for as long as
it takes; the outage is logged once, and its end. Any other failure belongs to the block (a
value of the wrong type, say): the block is tried ``max_insert_tries`` times, then written to
``<spool_dir>/rejected-<table>.jsonl`` (error, table, token, columns, rows as JSON) and counted
(``clickhouse_rejected_blocks{table}``), and later blocks go on.

Memory: the queue holds at most ``max_buffer_rows`` rows and ``max_buffer_bytes`` (an estimate of
the rows' Python objects, :func:`row_bytes`; a sink's bound, split evenly over its workers'
partitions) after each ``write_batch``; beyond either, the oldest
blocks are spilled to ``spool_dir`` (written to a temporary file, fsynced, renamed: on disk
before they leave memory) and sent first when ClickHouse is back, also by the next run. Besides
the queue, the insert thread holds the one block it is inserting; spool files are read back one
block at a time. A spool file is deleted once each of its blocks is inserted or set aside.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import pickle
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import clickhouse_connect
import orjson
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from clickhouse_connect.driver.exceptions import DatabaseError, DataError

from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.clickhouse")
_CLIENTS: dict[str, tuple[object, threading.Lock]] = {}
_CLIENTS_LOCK = threading.Lock()
DEFAULT_TIMEOUT_S = 30.0

# ClickHouse error codes that say "not now" rather than "not this block": the insert is retried
# for as long as it takes. Setting such a block aside would not fix anything, and every later
# block would follow it into the dead-letter file. (Names as errorCodeToName gives them.)
WAIT_CODES = {
    60: "UNKNOWN_TABLE",  # a table detached, or re-created by a migration
    81: "UNKNOWN_DATABASE",
    159: "TIMEOUT_EXCEEDED",
    160: "TOO_SLOW",
    164: "READONLY",
    192: "UNKNOWN_USER",  # credentials: the operator fixes them, the rows wait
    193: "WRONG_PASSWORD",
    194: "REQUIRED_PASSWORD",
    201: "QUOTA_EXCEEDED",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    225: "NO_ZOOKEEPER",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    243: "NOT_ENOUGH_SPACE",
    252: "TOO_MANY_PARTS",
    285: "TOO_FEW_LIVE_REPLICAS",
    319: "UNKNOWN_STATUS_OF_INSERT",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    473: "DEADLOCK_AVOIDED",
    497: "ACCESS_DENIED",
    516: "AUTHENTICATION_FAILED",
    999: "KEEPER_EXCEPTION",
}


def is_transient(exc: BaseException) -> bool:
    """True when an insert failed for a reason that waiting can fix (see :data:`WAIT_CODES`).

    >>> is_transient(DatabaseError("Code: 252. Too many parts", code=252))
    True
    >>> is_transient(DatabaseError("Code: 53. Type mismatch", code=53))
    False
    >>> from clickhouse_connect.driver.exceptions import OperationalError
    >>> is_transient(OperationalError("Error executing HTTP request")), is_transient(OSError())
    (True, True)
    >>> is_transient(ValueError("could not convert string to float: 'abc'"))
    False
    """
    code = getattr(exc, "code", None)
    if code is not None:
        return code in WAIT_CODES
    if isinstance(exc, DataError):
        return False  # the client could not serialise the block: its own fault
    # no code: the network, or a gateway answering in ClickHouse's place (HTTP 502, 503)
    return isinstance(exc, (DatabaseError, OSError))


def row_bytes(row) -> int:
    """Estimated memory of one queued row: CPython object sizes, a tuple of pointers plus each
    string (49 bytes + 1 a character, ASCII), 32 for a number or a datetime, lists recursively.
    Cheap (no ``sys.getsizeof`` walk); strings shared between rows are counted for each.

    >>> row_bytes(("web", 3, 1.5))
    196
    >>> row_bytes((["u1", "u2"],))
    238
    """
    n = 56 + 8 * len(row)
    for v in row:
        if isinstance(v, str):
            n += 49 + len(v)
        elif isinstance(v, (list, tuple)):
            n += row_bytes(v)
        elif isinstance(v, bytes):
            n += 33 + len(v)
        else:
            n += 32
    return n


def rows_bytes(rows: list) -> int:
    return sum(map(row_bytes, rows))


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


def _client(dsn: str, timeout_s: float):
    if dsn.startswith("chdb://"):
        return clickhouse_connect.get_client(dsn=dsn)  # in process: no network to time out
    seconds = max(1, math.ceil(timeout_s))  # clickhouse-connect takes whole seconds
    # clickhouse-connect takes TLS from `secure` (or a 443 / 8443 port), not from the scheme: an
    # https:// DSN on port 8123 would otherwise send the password in clear text.
    return clickhouse_connect.get_client(dsn=dsn, secure=dsn.startswith("https://"),
                                         connect_timeout=min(seconds, 10),
                                         send_receive_timeout=seconds)


def connect(dsn: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A shared client and its lock for this DSN. chDB: one per process, whatever the timeout
    (it runs in process); a server: one per timeout, each request giving up after it."""
    dsn = normalize_dsn(dsn)
    key = dsn if dsn.startswith("chdb://") else f"{dsn}#{max(1, math.ceil(timeout_s))}"
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = (_client(dsn, timeout_s), threading.Lock())
        return _CLIENTS[key]


def ensure_schema(dsn: str, db: str, tz: str = "UTC") -> list[int]:
    """Apply the missing migrations; returns the versions applied now."""
    from warehouse.migrate import migrate

    client, lock = connect(dsn)
    with lock:
        return migrate(client, db, tz)


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)


def minute_blocks(items):
    """The insert blocks of a batch of minute blocks (flows/minutes.MinuteBlock: several complete
    minutes, one token) or of complete minutes (one block each, token ``minute-<m>``). Every row
    names its block, for the ledger; blocks without rows are not inserted."""
    for item in items:
        minutes = getattr(item, "minutes", None)
        if minutes is None:  # a CompleteMinute
            minutes, token = [item], f"minute-{item.minute}"
        else:
            token = item.token
        rows = [(_utc(m.minute_ms), *row, token) for m in minutes for row in m.rows]
        if rows:
            yield token, rows, max(m.closed_at_ms for m in minutes) or None


def raw_rows(batch):
    """events_raw rows as the shards made them: event_time stays epoch milliseconds, which is
    what DateTime64(3) stores (the client writes ints as they are; a datetime per row cost
    ~2 us to build and as much to convert back). Spool files of earlier versions hold datetimes:
    their blocks are inserted on their own, and the client converts those."""
    return batch


def alert_rows(batch):
    nan = float("nan")
    for a in batch:
        yield (a["alert_id"], a["rule"], a["series"], a["status"], a["seq"], _utc(a["at_ms"]),
               a["value"] if a["value"] is not None else nan,
               *(a[f] if a[f] is not None else nan for f in ("mu", "sigma", "k", "z")),
               a["window"], a["severity"], _utc(a["first_seen_ms"]), a["response"], a["area"],
               a["direction"], a["score"] or 0.0, a["n"], a["detail"],
               a.get("baseline", ""))  # spooled by a version before the column: ""


def action_rows(batch):
    for a in batch:
        yield (a["action_id"], a["rule"], a["user_id"], a["channel"], a["campaign"],
               a["session_id"], _utc(a["event_ts_ms"]), a.get("message", ""),
               a.get("rule_version", 0), a.get("step", 0), a.get("trigger", ""),
               a.get("tags", []), orjson.dumps(a.get("properties") or {}).decode())


def audit_rows(batch):
    for a in batch:
        yield (_utc(a["time_ms"]), a["rule"], a["rule_version"], a["mode"], a["user_id"],
               a["action_id"], a["step"], a["channel"], a["message"], a["decision"], a["reason"])


def model_metric_rows(batch):
    """models/quality.py rows: (minute ms, model, metric, value, labels); one learner per model,
    so the shard column is 0 (it counted the per-shard models of earlier versions)."""
    for minute_ms, model, metric, value, labels in batch:
        yield (_utc(minute_ms), model, 0, metric, value, labels)


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: Callable | None = None  # item -> rows, batched freely (tables that collapse duplicates)
    blocks: Callable | None = None  # item -> (token, rows) blocks, each inserted on its own


TABLES = {
    "events_minute_in": Table(["ts", "channel", "campaign", "creative", "event_name", "events",
                               "revenue", "cost", "orders", "users", "block"],
                               blocks=minute_blocks),
    "events_raw": Table(["event_time", "event_id", "type", "event_name", "user_id", "anonymous_id",
                         "channel", "campaign", "creative", "revenue", "cost", "ip_masked",
                         "country", "properties"], rows=raw_rows),
    "alerts": Table(["alert_id", "rule", "series", "status", "seq", "minute", "value", "mu", "sigma",
                     "k", "z", "window", "severity", "first_seen", "response", "area", "direction",
                     "score", "n", "detail", "baseline"], rows=alert_rows),
    "actions": Table(["action_id", "rule", "user_id", "channel", "campaign", "session_id",
                      "event_time", "message", "rule_version", "step", "trigger", "tags",
                      "properties"], rows=action_rows),
    "trigger_audit": Table(["time", "rule", "rule_version", "mode", "user_id", "action_id", "step",
                            "channel", "message", "decision", "reason"], rows=audit_rows),
    "model_metrics": Table(["ts", "model", "shard", "metric", "value", "examples"],
                           rows=model_metric_rows),
}
DEDUPE = {"deduplicate_blocks_in_dependent_materialized_views": 1}
BACKOFF_MAX_S = 30.0
_REJECT_LOCKS: dict[Path, threading.Lock] = {}  # a rejected file is shared by the workers
_PARTITIONS: "weakref.WeakSet[_InsertPartition]" = weakref.WeakSet()


def queue_rows() -> dict[str, int]:
    """Rows queued in memory per table, over the live sinks (the ``sink_queue_rows`` gauge)."""
    out: dict[str, int] = {}
    for p in list(_PARTITIONS):
        out[p.stat] = out.get(p.stat, 0) + p.rows
    return out


def queue_bytes() -> dict[str, int]:
    """Estimated bytes queued in memory per table (``sink_queue_bytes``): at most the sink's
    ``max_buffer_bytes`` after each write, the rest is spilled to the spool."""
    out: dict[str, int] = {}
    for p in list(_PARTITIONS):
        with p.cond:  # not halfway through a write that is about to spill
            out[p.stat] = out.get(p.stat, 0) + p.bytes
    return out


def rows_in_flight() -> int:
    """Rows not yet in ClickHouse, over the live sinks: queued, being inserted, or spooled
    (files counted as one). An erasure sweeps again once this is 0 (privacy/erasure.py)."""
    n = 0
    for p in list(_PARTITIONS):
        with p.cond:
            current = p.current
            n += p.rows + len(p.front) + len(p.spooled) + (len(current.rows) if current else 0)
    return n


def spool_files() -> dict[str, int]:
    """Spool files waiting per table (the ``sink_spool_files`` gauge)."""
    out: dict[str, int] = {}
    for p in list(_PARTITIONS):
        out[p.stat] = out.get(p.stat, 0) + len(p.spooled)
    return out


@dataclass(slots=True, eq=False)
class _Block:
    token: str | None
    rows: list
    closed_at_ms: int | None = None
    nbytes: int = 0
    spooled: bool = False  # read back from a spool file (which stays until the file is done)
    tries: int = 0  # failures that were the block's own (not an outage)
    path: Path | None = None  # write-ahead: the file holding this block's rows until inserted

    def saved(self) -> tuple:
        return self.token, self.rows, self.closed_at_ms


def _read_spool(path: Path) -> Iterator[tuple]:
    """The blocks of a spool file, one at a time."""
    with path.open("rb") as f:
        while True:
            try:
                obj = pickle.load(f)
            except EOFError:
                return
            if isinstance(obj, list):  # a file of an earlier version: one list of blocks
                yield from obj
            else:
                yield obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _InsertPartition(StatelessSinkPartition):
    close_wait_s = 30.0  # at close, how long to keep retrying before spooling the rest to disk
    backoff_initial_s = 0.5

    def __init__(self, dsn: str, db: str, table: str, max_rows: int, max_delay_s: float,
                 max_buffer_rows: int, spool: Path | None, max_buffer_bytes: int = 64 * 2**20,
                 max_insert_tries: int = 5, reject_path: Path | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, write_ahead: bool = False,
                 adopt: tuple[Path, ...] = ()):
        self.client, self.lock = connect(dsn, timeout_s)
        # Write-ahead: every row is in a spool file (fsynced) before write_batch returns, so a
        # kill -9 after Bytewax snapshotted the epoch cannot lose rows still queued here.
        self.write_ahead = write_ahead and spool is not None
        self.table = f"{db}.{table}"
        self.stat = table
        self.component = "clickhouse"  # one outage, one log line, whatever the tables
        self.spec = TABLES[table]
        self.ledger = f"{db}.minute_blocks"  # events_minute_in: the minute -> block ledger
        self.ledger_max: int | None = None  # its newest minute when this partition started
        self.max_rows, self.max_delay_s = max_rows, max_delay_s
        self.max_buffer_rows, self.max_buffer_bytes = max_buffer_rows, max_buffer_bytes
        self.max_insert_tries = max(1, max_insert_tries)
        self.reject_path = reject_path or Path.cwd() / f"rejected-{table}.jsonl"
        self.reject_lock = _REJECT_LOCKS.setdefault(self.reject_path, threading.Lock())
        self.blocks: deque[_Block] = deque()  # oldest first
        self.rows = 0  # rows in self.blocks
        self.bytes = 0  # their estimated memory (row_bytes)
        self.first_at = 0.0
        self.current: _Block | None = None  # being inserted: retried until inserted or set aside
        self.front: deque[_Block] = deque()  # the rest of a block split around a bad row: next
        self.spool = spool
        self.adopt = adopt
        self.spooled: deque[Path] = deque(self._adopt_spool())
        self.reader: Iterator[tuple] | None = None  # the blocks of spooled[0], as it is sent
        self.spill_failing = False
        self.cond = threading.Condition()
        self.closing = False
        self.close_deadline = math.inf
        self.down_since: float | None = None
        self.failed_tries = 0
        _PARTITIONS.add(self)
        STATS.gauge("sink_queue_rows", queue_rows)
        STATS.gauge("sink_queue_bytes", queue_bytes)
        STATS.gauge("sink_spool_files", spool_files)
        self.thread = threading.Thread(target=self._run, name=f"insert-{table}", daemon=True)
        self.thread.start()

    def _adopt_spool(self) -> list[Path]:
        """The spool files of earlier runs, oldest first: those of workers that are gone (a
        run with fewer workers now), then this worker's own; a ``.tmp`` is a spill cut short by
        a crash (its blocks never left memory then), so it is dropped."""
        found = []
        for d in (*self.adopt, self.spool):
            if d is None or not d.is_dir():
                continue
            for tmp in d.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            found += sorted(d.glob("*.pickle"))
        self.spool_seq = 1 + max((int(p.stem) for p in found if p.parent == self.spool), default=-1)
        return found

    # -- the flow's side: queue, never wait for ClickHouse -------------------------------
    def write_batch(self, items: list) -> None:
        spec = self.spec
        with self.cond:
            was_empty = self.rows == 0
            journal: dict[int, tuple[_Block, list]] = {}  # write-ahead: new rows per block
            for item in items:
                if spec.blocks is not None:
                    for token, rows, closed_at_ms in spec.blocks(item):
                        block = _Block(token, rows, closed_at_ms, rows_bytes(rows))
                        self._queue(block)
                        journal[id(block)] = (block, rows)
                else:
                    rows = list(spec.rows(item))
                    if not rows:
                        continue
                    last = self.blocks[-1] if self.blocks else None
                    if last is not None and last.token is None and len(last.rows) < self.max_rows:
                        nbytes = rows_bytes(rows)
                        last.rows.extend(rows)
                        last.nbytes += nbytes
                        self.rows += len(rows)
                        self.bytes += nbytes
                    else:
                        last = _Block(None, rows, None, rows_bytes(rows))
                        self._queue(last)
                    journal.setdefault(id(last), (last, []))[1].extend(rows)
            if self.write_ahead and journal:
                self._write_ahead(journal.values())
            if was_empty and self.rows:
                self.first_at = time.monotonic()
            if self.rows > self.max_buffer_rows or self.bytes > self.max_buffer_bytes:
                # spill to half, so a long outage writes few big files, not one per batch
                self._spill(self.max_buffer_rows // 2, self.max_buffer_bytes // 2)
            if self.rows >= self.max_rows or spec.blocks is not None:
                self.cond.notify()

    def _write_ahead(self, chunks) -> None:
        """Append each block's new rows to its file (a new block: a new file), fsync. The files
        use the spool's format: a run that dies leaves them to the next, which sends them first
        (a block inserted just before the kill is sent again: tokens or keys collapse it)."""
        self.spool.mkdir(parents=True, exist_ok=True)
        created = False
        for block, rows in chunks:
            if block.path is None:
                block.path = self.spool / f"{self.spool_seq:012d}.pickle"
                self.spool_seq += 1
                created = True
            with block.path.open("ab") as f:
                pickle.dump((block.token, rows, block.closed_at_ms), f,
                            protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
        if created:
            _fsync_dir(self.spool)

    def _queue(self, block: _Block) -> None:
        self.blocks.append(block)
        self.rows += len(block.rows)
        self.bytes += block.nbytes

    def _spill(self, keep_rows: int, keep_bytes: int) -> None:
        """Move the oldest blocks to disk until at most ``keep_rows`` rows and ``keep_bytes``
        stay in memory. The blocks leave memory only once their file is durably on disk."""
        if self.spool is None or not self.blocks:
            return
        taken, rows, nbytes = [], self.rows, self.bytes
        for block in self.blocks:
            if rows <= keep_rows and nbytes <= keep_bytes:
                break
            taken.append(block)
            rows -= len(block.rows)
            nbytes -= block.nbytes
        if taken and all(b.path is not None for b in taken):  # written ahead: on disk already
            for _ in taken:
                self.spooled.append(self.blocks.popleft().path)
            self.rows, self.bytes = rows, nbytes
            STATS.add("clickhouse_rows_spilled", sum(len(b.rows) for b in taken))
            return
        try:
            path = self._write_spool([b for b in taken if b.path is None])
        except OSError as exc:  # a full or broken disk: the rows stay in memory, nothing lost
            if not self.spill_failing:
                log.error("%s: cannot spill to %s (%s); rows stay in memory", self.table,
                          self.spool, exc)
            self.spill_failing = True
            return
        self.spill_failing = False
        for block in taken:
            self.blocks.popleft()
            if block.path is not None:
                self.spooled.append(block.path)
        self.rows, self.bytes = rows, nbytes
        self.spooled.append(path)
        n = sum(len(block.rows) for block in taken)
        STATS.add("clickhouse_rows_spilled", n)
        log.warning("%s: ClickHouse is behind; %d rows spilled to %s", self.table, n, path)

    def _write_spool(self, blocks: list[_Block]) -> Path:
        """Write to a temporary file, fsync, rename, fsync the directory: the file is whole on
        disk, or absent, whenever the program dies."""
        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / f"{self.spool_seq:012d}.pickle"
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as f:
                for block in blocks:  # one pickle per block: read back one at a time
                    pickle.dump(block.saved(), f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.spool)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.spool_seq += 1
        return path

    # -- the insert thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._insert_loop()
        except Exception:  # a bug or a broken disk: say so; close() still spills what is left
            log.exception("%s: the insert thread stopped; rows wait for close()", self.table)

    def _insert_loop(self) -> None:
        backoff = 0.0  # the next pause after a failure; 0: backoff_initial_s
        while True:
            with self.cond:
                while self.current is None:
                    if self._due():
                        self.current = self._take()
                        if self.current is not None:
                            break
                    if self.closing and not self._pending():
                        return
                    self.cond.wait(self.max_delay_s / 4)
                block = self.current
            exc = self._insert(block)
            if exc is None:
                self._recovered()
                self._finish(block)
                backoff = 0.0
                continue
            STATS.add("clickhouse_insert_errors")
            if is_transient(exc):
                self._failed(exc)
            else:
                self._recovered()  # ClickHouse answered: the fault is the block's
                if self._block_failed(block, exc):
                    backoff = 0.0
                    continue
            with self.cond:
                if self.closing and time.monotonic() >= self.close_deadline:
                    self._spill_at_close()
                    return
            delay = backoff or self.backoff_initial_s
            self._pause(delay)
            backoff = min(delay * 2, BACKOFF_MAX_S)

    def _due(self) -> bool:
        if self.front or self.spooled:
            return True
        if not self.rows:
            return False
        if self.blocks[0].token is not None:
            return True  # a complete minute is one insert anyway: waiting would only delay it
        return (self.closing or self.rows >= self.max_rows
                or time.monotonic() - self.first_at >= self.max_delay_s)

    def _pending(self) -> bool:
        return bool(self.current or self.front or self.spooled or self.blocks)

    def _take(self) -> _Block | None:
        """The oldest block: from the spool files first (older than anything in memory)."""
        if self.front:
            return self.front.popleft()
        while self.spooled:
            path = self.spooled[0]
            if self.reader is None:
                self.reader = _read_spool(path)
            try:
                token, rows, closed_at_ms = next(self.reader)
                return _Block(token, rows, closed_at_ms, spooled=True)
            except StopIteration:  # every block of the file is in, or set aside
                path.unlink(missing_ok=True)
            except Exception as exc:  # noqa: BLE001 - unreadable: keep it aside for a human
                STATS.add("clickhouse_spool_unreadable")
                log.error("%s: spool file %s is unreadable (%s); renamed to .bad", self.table,
                          path, exc)
                path.rename(path.with_suffix(".bad"))
            self.reader = None
            self.spooled.popleft()
        if not self.blocks:
            return None
        block = self.blocks.popleft()  # new rows meanwhile start a new block
        self.rows -= len(block.rows)
        self.bytes -= block.nbytes
        return block

    def _insert(self, block: _Block) -> Exception | None:
        try:
            parts = [(block.token, block.rows)]
            if block.token and self.stat == "events_minute_in":
                if len(block.rows[0]) < len(self.spec.columns):  # spooled before rows named it
                    block.rows = [(*r, block.token) for r in block.rows]
                parts = self._reconciled(block)
            for token, rows in parts:
                settings = DEDUPE | {"insert_deduplication_token": token} if token else {}
                with self.lock:
                    self.client.insert(self.table, rows, column_names=self.spec.columns,
                                       settings=settings)
        except Exception as exc:  # noqa: BLE001 - classified by the caller
            return exc
        STATS.add(f"rows_{self.stat}", len(block.rows))
        if block.closed_at_ms:  # queryable now: the delay since the minute closed, for the figures
            STATS.observe_since("minute_queryable_ms", [block.closed_at_ms])
        return None

    def _reconciled(self, block: _Block) -> list[tuple[str, list]]:
        """A minute block split by the ledger (``minute_blocks``): minutes some earlier insert
        brought go again under that insert's token (ClickHouse drops them as duplicates, in
        every view too); the others keep the block's token. Another run may have grouped the
        same minutes differently (live one by one, then a replay by the hour), and a token
        only deduplicates an identical grouping. Only minutes up to the ledger's newest at
        start are looked up: what this run adds is grouped once."""
        if self.ledger_max is None:
            with self.lock:
                self.ledger_max = int(self.client.command(
                    f"SELECT toUnixTimestamp(max(minute)) FROM {self.ledger}") or 0)
        first = min(int(r[0].timestamp()) for r in block.rows)
        if first > self.ledger_max:
            return [(block.token, block.rows)]
        last = max(int(r[0].timestamp()) for r in block.rows)
        with self.lock:
            found = self.client.query(
                f"SELECT toUnixTimestamp(minute), any(block) FROM {self.ledger} "
                f"WHERE minute >= toDateTime({first}) AND minute <= toDateTime({last}) "
                "GROUP BY minute").result_rows
        recorded = {int(m): b for m, b in found}
        if not recorded:
            return [(block.token, block.rows)]
        rest = block.token
        if rest in recorded.values():  # (rows of minutes the earlier block did not have)
            rest = f"{block.token}+{first // 60}-{last // 60}"
        parts: dict[str, list] = {}
        for r in block.rows:
            token = recorded.get(int(r[0].timestamp()), rest)
            parts.setdefault(token, []).append(r[:-1] + (token,))
        STATS.add("clickhouse_minutes_reconciled", sum(len(v) for k, v in parts.items()
                                                        if k != rest))
        return list(parts.items())

    def _finish(self, block: _Block) -> None:
        if block.path is not None:  # inserted (or set aside): its write-ahead file is done
            block.path.unlink(missing_ok=True)
        with self.cond:
            self.current = None
            if not block.spooled:
                self.first_at = time.monotonic()
            self.cond.notify_all()

    def _block_failed(self, block: _Block, exc: Exception) -> bool:
        """Counts a failure of the block's own; True once it is dealt with (set aside, or split)
        and the next try needs no pause."""
        block.tries += 1
        if block.tries < self.max_insert_tries:
            if block.tries == 1:
                log.warning("insert into %s failed (%s); trying the block %d times before "
                            "setting it aside", self.table, _describe(exc), self.max_insert_tries)
            return False
        if block.token is None and len(block.rows) > 1 and getattr(exc, "code", None) is None:
            self._split(block)
            return True
        self._reject(block, exc)
        self._finish(block)
        return True

    def _split(self, block: _Block) -> None:
        """The client could not serialise a freely batched block: some row holds a bad value.
        Its halves are tried once each, down to the bad rows, so the good rows still go in (a
        block with a token stays whole: the token names exactly its rows). Serialising fails
        before anything is sent, so this costs no round trips."""
        half = len(block.rows) // 2
        first, second = ([_Block(None, rows, None, rows_bytes(rows), block.spooled,
                                 tries=self.max_insert_tries - 1)
                          for rows in (block.rows[:half], block.rows[half:])])
        second.path = block.path  # the file holds both halves: it goes when the last is done
        with self.cond:
            self.current = first
            self.front.appendleft(second)

    def _reject(self, block: _Block, exc: Exception) -> None:
        record = {"at_ms": int(time.time() * 1000), "table": self.table, "token": block.token,
                  "tries": block.tries, "error": _describe(exc), "columns": self.spec.columns,
                  "rows": block.rows}
        line = orjson.dumps(record, default=repr) + b"\n"
        self.reject_path.parent.mkdir(parents=True, exist_ok=True)
        with self.reject_lock, self.reject_path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        STATS.add_labeled("clickhouse_rejected_blocks", self.stat)
        log.error("%s rejected a block of %d rows %d times (%s); kept in %s, later blocks go on",
                  self.table, len(block.rows), block.tries, _describe(exc), self.reject_path)

    def _failed(self, exc: Exception) -> None:
        self.failed_tries += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
        # marked at every failure: another worker's recovery may have cleared it meanwhile
        if STATS.outage(self.component, f"{self.table}: {_describe(exc)}", member=str(id(self))):
            log.error("ClickHouse unavailable (insert into %s failed: %s); retrying with backoff, "
                      "rows kept", self.table, _describe(exc))

    def _recovered(self) -> None:
        if self.down_since is None:
            return
        if STATS.outage(self.component, None, member=str(id(self))):
            log.warning("ClickHouse is back after %.1f s (%s: %d tries failed)",
                        time.monotonic() - self.down_since, self.table, self.failed_tries)
        self.down_since, self.failed_tries = None, 0

    def _pause(self, delay: float) -> None:
        """Waits ``delay`` (new rows do not cut it short; close() does, at its deadline)."""
        until = time.monotonic() + delay
        with self.cond:
            while True:
                end = min(until, self.close_deadline) if self.closing else until
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    def _spill_at_close(self) -> None:
        """ClickHouse still failing at shutdown: what is left goes to disk for the next run."""
        unsent = [b for b in (self.current, *self.front) if b is not None and not b.spooled]
        self.current = None
        self.front.clear()
        for block in reversed(unsent):  # they came from memory: they go first, in order
            self.blocks.appendleft(block)
            self.rows += len(block.rows)
            self.bytes += block.nbytes
        self.reader = None  # a spool file being sent stays whole on disk, sent again next run
        self._spill(0, 0)
        if self.blocks:
            log.error("%s: ClickHouse unavailable at shutdown and %s; %d rows lost", self.table,
                      "no spool directory" if self.spool is None else "spilling failed",
                      self.rows)
        elif self.spooled:
            log.error("%s: ClickHouse unavailable at shutdown; rows left in %s for the next run",
                      self.table, self.spool)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.close_deadline = time.monotonic() + self.close_wait_s
            self.cond.notify_all()
        self.thread.join()
        with self.cond:
            if self.blocks or any(not b.spooled for b in (self.current, *self.front) if b):
                self._spill_at_close()  # the insert thread died on a bug: keep its rows
        if self.down_since is not None:  # a sink that is gone reports no outage
            STATS.outage(self.component, None, member=str(id(self)))
        _PARTITIONS.discard(self)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


class ClickHouseSink(DynamicSink):
    """Inserts each item's rows into one table (see :data:`TABLES` for what an item is, and the
    module doc for what each table is guaranteed)."""

    def __init__(self, dsn: str, db: str, table: str, max_rows: int = 5000,
                 max_delay_s: float = 1.0, max_buffer_rows: int = 1_000_000,
                 spool_dir: Path | None = None, *, max_buffer_bytes: int = 64 * 2**20,
                 max_insert_tries: int = 5, timeout_s: float = DEFAULT_TIMEOUT_S,
                 write_ahead: bool = False):
        if table not in TABLES:
            raise ValueError(f"unknown table {table}")
        self.dsn, self.db, self.table = dsn, db, table
        self.max_rows, self.max_delay_s = max_rows, max_delay_s
        self.max_buffer_rows, self.spool_dir = max_buffer_rows, spool_dir
        self.max_buffer_bytes, self.max_insert_tries = max_buffer_bytes, max_insert_tries
        self.timeout_s = timeout_s
        self.write_ahead = write_ahead
        base = Path(spool_dir) if spool_dir is not None else Path.cwd()
        self.reject_path = base.resolve() / f"rejected-{table}.jsonl"

    def build(self, step_id: str, worker_index: int, worker_count: int):
        spool, adopt = None, ()
        if self.spool_dir is not None:
            base = self.spool_dir / f"{self.db}.{self.table}"
            spool = base / f"worker-{worker_index}"
            # spool files of workers an earlier run had and this one has not
            adopt = tuple(sorted(
                (d for d in base.glob("worker-*") if d.is_dir() and d.name[7:].isdigit()
                 and int(d.name[7:]) >= worker_count and int(d.name[7:]) % worker_count == worker_index),
                key=lambda d: int(d.name[7:]))) if base.is_dir() else ()
        # the byte bound is this table's share: each worker's partition holds its part of it
        return _InsertPartition(self.dsn, self.db, self.table, self.max_rows, self.max_delay_s,
                                self.max_buffer_rows, spool, self.max_buffer_bytes // worker_count,
                                self.max_insert_tries, self.reject_path, self.timeout_s,
                                self.write_ahead, adopt)
