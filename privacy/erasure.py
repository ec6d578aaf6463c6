"""Right to erasure: requests, the in-stream erase, and the ledger that keeps erased people out.

A request names a subject (a user id, or an anonymous id) and arrives on the ``erasure`` Kafka
topic, in the embedded inbox (``privacy.erasure.inbox``: one JSON file per request), from
``surgeflow erase`` or from ``POST /erasure`` of the feature API. The flow routes it to every
ingest shard: each removes the anonymous profiles and identity links of the subject (every
anonymous id linked to the user), the subject's place in open minutes and bounce state, and hands
an ``erase`` to the user's profile shard, which removes the profile, its model examples, trigger
state and consent, and drops its pending operations. Their Redis hashes and aliases are deleted
through the feature sink (in order with earlier writes). The shards' reports meet in the
``erasures`` step (:class:`ErasureLogic`), which deletes the subject's rows from every ClickHouse
table, purges the output, dead-letter and spool files, writes the ledger to Redis and the audit
row (``erasure_audit``: subject hash, who asked, when, counts; never the id), and sweeps
ClickHouse once more ``resweep_s`` later for rows that were in flight.

The ledger (:class:`ErasedLedger`) maps subject hashes to the erasure time; every shard keeps it
in its state and the flow loads it from Redis at start-up, so an event of an erased subject whose
event time is not after the erasure is dropped: a restart from a snapshot, or a replay of the
topic, does not bring the person back. Later events are new data, handled by the consent policy
(under opt-in: nothing until the person grants again).

>>> led = ErasedLedger(b"k")
>>> _ = led.add("u1", 1_000); led.covers("u1", 999), led.covers("u1", 1_001), led.covers("u2", 5)
(True, False, False)
>>> "u1" in str(led.hashes)
False
>>> r = parse_request(b'{"subject": "u1", "requested_by": "ops", "requested_at_ms": 5}')
>>> (r.subject, r.anonymous, r.requested_by, r.requested_at_ms, len(r.request_id))
('u1', False, 'ops', 5, 32)
>>> parse_request(b'{"subject": ""}')
Traceback (most recent call last):
...
ValueError: erasure request without a valid subject
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic

from connectors.files import drop_lines
from connectors.stoppable import INPUT_DONE
from features.layout import erased_key, is_valid_id, receipt_key
from privacy.subjects import subject_hash
from surgeflow.shutdown import STOP
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.erasure")
POLL = timedelta(milliseconds=500)
RECEIPT_TTL_S = 30 * 86_400


@dataclass(frozen=True, slots=True)
class ErasureRequest:
    request_id: str
    subject: str
    anonymous: bool = False
    requested_by: str = "unknown"
    requested_at_ms: int = 0
    source: str = "cli"
    hashed: bool = False  # ``subject`` is already the subject hash (state kept after the erase)

    def to_json(self) -> bytes:
        return orjson.dumps({"request_id": self.request_id, "subject": self.subject,
                             "anonymous": self.anonymous, "requested_by": self.requested_by,
                             "requested_at_ms": self.requested_at_ms, "source": self.source})


def new_request(subject: str, anonymous: bool = False, requested_by: str = "unknown",
                source: str = "cli", now_ms: int | None = None) -> ErasureRequest:
    if not is_valid_id(subject):
        raise ValueError("erasure request without a valid subject")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    # sortable by time (the inbox is read in name order), unique
    rid = f"{now_ms:013d}{uuid.uuid4().hex[:19]}"
    return ErasureRequest(rid, subject, anonymous, requested_by[:200], now_ms, source)


def parse_request(raw: bytes, source: str = "kafka") -> ErasureRequest:
    """An erasure message (JSON: subject, anonymous, requested_by, requested_at_ms, request_id)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("erasure request is not JSON") from None
    if not isinstance(doc, dict) or not is_valid_id(doc.get("subject")):
        raise ValueError("erasure request without a valid subject")
    at = doc.get("requested_at_ms")
    at = at if type(at) is int and at > 0 else int(time.time() * 1000)
    rid = doc.get("request_id")
    if not (isinstance(rid, str) and 0 < len(rid) <= 64 and rid.isalnum()):
        # a message without an id gets a stable one: the same message, the same request
        rid = hashlib.sha256(raw).hexdigest()[:32]
    by = doc.get("requested_by")
    return ErasureRequest(rid, doc["subject"], doc.get("anonymous") is True,
                          by[:200] if isinstance(by, str) else "unknown", at,
                          doc.get("source") if isinstance(doc.get("source"), str) else source)


class ErasedLedger:
    """Subject hash -> erasure time (epoch ms). Never holds an id in clear."""

    __slots__ = ("key", "hashes")

    def __init__(self, key: bytes | None, hashes: dict[str, int] | None = None):
        self.key = key
        self.hashes: dict[str, int] = dict(hashes or {})

    def add(self, ident: str, at_ms: int) -> str:
        h = subject_hash(ident, self.key)
        if at_ms > self.hashes.get(h, -1):
            self.hashes[h] = at_ms
        return h

    def erased_at(self, ident: str) -> int | None:
        return self.hashes.get(subject_hash(ident, self.key)) if self.hashes else None

    def covers(self, ident: str, ts: int) -> bool:
        """Was this identity erased at or after event time ``ts``?"""
        if not self.hashes:
            return False
        at = self.hashes.get(subject_hash(ident, self.key))
        return at is not None and ts <= at

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def __len__(self) -> int:
        return len(self.hashes)


# The ledger as this process knows it (start-up ledger, plus what its shards erased): for the
# stateless steps, so that a dead letter of an erased person is not written after the erasure.
PROCESS_LEDGER = ErasedLedger(None)


def reset_process_ledger(key: bytes | None, hashes: dict[str, int]) -> None:
    PROCESS_LEDGER.key, PROCESS_LEDGER.hashes = key, dict(hashes)


def names_erased(raw: bytes, key: bytes | None, ts_ms: int | None) -> bool:
    """Does a record (a dead letter's bytes and key) name an erased subject, from before the
    erasure? (A record without a usable time counts as before.)

    >>> reset_process_ledger(b"k", {}); names_erased(b'{"user_id":"u1"}', None, None)
    False
    >>> _ = PROCESS_LEDGER.add("u1", 10); names_erased(b'{"user_id":"u1"}', None, None)
    True
    >>> names_erased(b'{"user_id":"u1"}', None, 11), names_erased(b'not json', b"u1", 5)
    (False, True)
    >>> names_erased(b'{"event_id":"e1","user_id":"u1","timest', None, None)  # truncated
    True
    >>> reset_process_ledger(None, {})
    """
    if not PROCESS_LEDGER:
        return False
    ids = [key.decode("utf-8", "replace")] if key else []
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        ids += [v for v in (doc.get("user_id"), doc.get("anonymous_id")) if isinstance(v, str)]
    else:  # broken JSON (truncated...): the ids it still shows
        ids += [m.decode("utf-8", "replace") for m in _ID_FIELD.findall(raw[:65_536])]
    return any(PROCESS_LEDGER.covers(i, ts_ms or 0) for i in ids)


_ID_FIELD = re.compile(rb'"(?:user_id|anonymous_id)"\s*:\s*"([^"\\]{1,128})"')


@dataclass(slots=True)
class ErasureReport:
    """One shard's part of an erasure: what it removed (the ids stay in memory, for the deletes
    downstream; nothing here is written as is)."""

    request: ErasureRequest
    shard: str  # "ingest-3", "profile-7"
    anonymous_ids: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    expected: int = 0  # reports that make the request whole (0: one per shard concerned)


# -- the embedded inbox and the requests' way in ---------------------------------------------

def enqueue(request: ErasureRequest, *, inbox: Path | None = None, kafka_producer=None,
            topic: str = "erasure") -> None:
    """Hand a request to the flow: a message on the erasure topic, or a file in the inbox (written
    whole, then renamed: the flow never reads half a request)."""
    if kafka_producer is not None:
        kafka_producer.produce(topic, request.to_json(), key=request.request_id.encode())
        if kafka_producer.flush(30) != 0:
            raise RuntimeError("the erasure request could not be delivered to Kafka")
        return
    if inbox is None:
        raise ValueError("no inbox and no Kafka producer for the erasure request")
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{request.request_id}.tmp"
    tmp.write_bytes(request.to_json())
    tmp.rename(inbox / f"{request.request_id}.json")


class _InboxPartition(StatefulSourcePartition):
    """Requests as files ``<request id>.json``, read in name (= time) order; ends with the main
    input (a bounded run) or at a stop."""

    def __init__(self, directory: Path, last: str | None):
        self.dir, self.last = directory, last or ""
        self.awake: datetime | None = None

    def next_batch(self) -> list[bytes]:
        done = INPUT_DONE.is_set() or STOP.is_set()
        names = sorted(p.name for p in self.dir.glob("*.json")) if self.dir.is_dir() else []
        fresh = [n for n in names if n > self.last][:100]
        if not fresh:
            if done:
                raise StopIteration()
            self.awake = datetime.now(timezone.utc) + POLL
            return []
        self.awake = None
        out = []
        for name in fresh:
            try:
                out.append((self.dir / name).read_bytes())
            except FileNotFoundError:  # done and removed meanwhile
                pass
            self.last = name
        return out

    def next_awake(self):
        return self.awake

    def snapshot(self) -> str:
        return self.last


class InboxSource(FixedPartitionedSource):
    def __init__(self, directory: Path):
        self.dir = directory

    def list_parts(self) -> list[str]:
        return ["erasure-inbox"]

    def build_part(self, step_id: str, for_part: str, resume_state):
        return _InboxPartition(self.dir, resume_state)


def request_of(item) -> ErasureRequest | None:
    """A request from a source item (inbox bytes or a Kafka message); a bad one is logged and
    counted, never stops the flow."""
    raw = item if isinstance(item, bytes) else getattr(item, "value", None)
    try:
        return parse_request(raw or b"", "kafka" if not isinstance(item, bytes) else "inbox")
    except ValueError as exc:
        STATS.add_labeled("erasure_requests_rejected", "invalid")
        log.error("erasure request refused: %s", exc)
        return None


# -- what the reports set off: every store, then the audit --------------------------------------

@dataclass
class _Pending:
    request: ErasureRequest
    expected: int
    reports: list = field(default_factory=list)


class Eraser:
    """Deletes a batch of subjects from ClickHouse, the files and Redis' ledger; writes receipts
    and audit rows. Every step is idempotent: a replay after a crash runs it again harmlessly."""

    def __init__(self, *, clickhouse_dsn: str | None, database: str, redis_url: str | None,
                 prefix: str, key: bytes | None, files: list[Path], receipts: Path | None,
                 inbox: Path | None, recovery: Path | None = None):
        self.dsn, self.db, self.redis_url, self.prefix = clickhouse_dsn, database, redis_url, prefix
        self.key, self.files, self.receipts, self.inbox = key, files, receipts, inbox
        self.recovery = recovery

    def run(self, jobs: list[tuple[ErasureRequest, set[str], dict[str, int]]], pass_no: int) -> list[dict]:
        """jobs: (request, ids to erase, counts from the flow's state). One delete per table for
        the whole batch (a delete is costly, a batch of requests costs about one). Returns the
        audit rows."""
        now = int(time.time() * 1000)
        every = set().union(*(ids for _, ids, _ in jobs))
        refs = {i: subject_hash(i, self.key) for i in every}
        per_id = self._clickhouse(every, refs)  # (store, id) -> rows
        rows = []
        for request, ids, counts in jobs:
            removed = dict(counts) if pass_no == 1 else {}
            for (store, ident), n in per_id.items():
                if ident in ids:
                    removed[store] = removed.get(store, 0) + n
            removed["files"] = purge_files(self.files, ids, {refs[i] for i in ids})
            rows += [self._audit(request, pass_no, store, n, now) for store, n in sorted(removed.items())]
            self._ledger(request, ids, removed, pass_no, now)
            if pass_no == 1 and self.inbox is not None:
                (self.inbox / f"{request.request_id}.json").unlink(missing_ok=True)
        self._insert_audit(rows)
        return rows

    def complete(self, requests: list[ErasureRequest]) -> list[dict]:
        """Pass 3, two epochs after the sweep: no snapshot holds the subjects any more, so the
        recovery store is compacted (its free pages still held the old snapshots' bytes)."""
        now = int(time.time() * 1000)
        files = compact_recovery(self.recovery) if self.recovery is not None else 0
        rows = [self._audit(r, 3, "recovery_store", files, now) for r in requests]
        for r in requests:
            self._ledger(r, set(), {"recovery_store": files}, 3, now)
        self._insert_audit(rows)
        return rows

    def _insert_audit(self, rows: list[dict]) -> None:
        if rows and self.dsn is not None:
            from connectors.clickhouse import connect

            client, lock = connect(self.dsn)
            with lock:
                client.insert(f"{self.db}.erasure_audit", [list(r.values()) for r in rows],
                              column_names=list(rows[0]))

    def _ref(self, request: ErasureRequest) -> str:
        return request.subject if request.hashed else subject_hash(request.subject, self.key)

    def _audit(self, request, pass_no, store, n, now) -> dict:
        return {"request_id": request.request_id, "subject": self._ref(request),
                "kind": "anonymous" if request.anonymous else "user",
                "requested_by": request.requested_by, "source": request.source,
                "requested_at": _dt(request.requested_at_ms), "completed_at": _dt(now),
                "pass": pass_no, "store": store, "removed": int(n)}

    def _clickhouse(self, ids: set[str], refs: dict[str, str]) -> dict[tuple[str, str], int]:
        """Rows removed per (store, id), from every table holding a user id."""
        if self.dsn is None or not ids:
            return {}
        from connectors.clickhouse import connect
        from warehouse.migrate import RETENTION

        # the forms an id takes in each column, mapped back to the id
        forms = {i: i for i in ids} | {r: i for i, r in refs.items()}
        series = {f"{kind}={x}": i for x, i in forms.items() for kind in ("user", "ip")}
        client, lock = connect(self.dsn)
        found: dict[tuple[str, str], int] = {}
        with lock:
            tables = {r[0] for r in client.query(
                "SELECT name FROM system.tables WHERE database = {db:String}",
                parameters={"db": self.db}).result_rows}
            for table in RETENTION:
                if table not in tables:
                    continue
                columns = COLUMNS.get(table, (("user_id", "ids"),))
                params = {"ids": sorted(ids), "refs": sorted(forms), "series": sorted(series)}
                back = {"ids": forms, "refs": forms, "series": series}
                hit = False
                for column, values in columns:
                    for value, n in client.query(
                            f"SELECT {column}, count() FROM {self.db}.{table} "
                            f"WHERE {column} IN {{{values}:Array(String)}} GROUP BY {column}",
                            parameters=params).result_rows:
                        key = (f"clickhouse.{table}", back[values][value])
                        found[key] = found.get(key, 0) + n
                        hit = True
                if hit:
                    where = " OR ".join(f"{c} IN {{{v}:Array(String)}}" for c, v in columns)
                    client.command(f"DELETE FROM {self.db}.{table} WHERE {where}", parameters=params)
        return found

    def _ledger(self, request, ids, removed, pass_no, now) -> None:
        receipt = orjson.dumps({"request_id": request.request_id,
                                "status": ("erased", "swept", "done")[pass_no - 1], "pass": pass_no,
                                "subject": self._ref(request),
                                "requested_at_ms": request.requested_at_ms, "completed_at_ms": now,
                                "removed": removed})
        if self.redis_url is not None:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            try:
                pipe = client.pipeline()
                for ident in ids:
                    pipe.hset(erased_key(self.prefix), subject_hash(ident, self.key),
                              request.requested_at_ms)
                pipe.set(receipt_key(self.prefix, request.request_id), receipt, ex=RECEIPT_TTL_S)
                pipe.execute()
            finally:
                client.close()
        if self.receipts is not None:
            self.receipts.mkdir(parents=True, exist_ok=True)
            (self.receipts / f"{request.request_id}.json").write_bytes(receipt)


# The columns of a table that may hold the subject, and in which form (default: user_id, the id).
COLUMNS = {
    "events_raw": (("user_id", "ids"), ("anonymous_id", "ids")),
    "alerts": (("series", "series"), ("detail", "refs")),
}


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


# Run in a child process: the flow's recovery store is written by the SQLite that Bytewax bundles,
# and two copies of SQLite in one process do not see each other's POSIX locks (closing one
# copy's descriptor drops the other's locks), which corrupts the file under a concurrent write.
# In a separate process the locks hold; Bytewax's own connection waits out the VACUUM (its
# busy timeout is 5 s).
_COMPACT = """
import sqlite3, sys
for name in sys.argv[1:]:
    try:
        con = sqlite3.connect(name, timeout=10)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.execute("VACUUM")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
        print("ok", name, sep="\\t", flush=True)
    except sqlite3.Error as exc:
        print("error", name, exc, sep="\\t", flush=True)
"""


def compact_recovery(directory: Path) -> int:
    """The recovery store's snapshots were rewritten without the erased (the in-stream erase,
    then an epoch): SQLite still holds the old rows' bytes in free pages and its write-ahead
    log until it is compacted. VACUUM rewrites each file without them, in a child process (see
    above); a file busy longer than 10 s is skipped, to be done at the next sweep."""
    import subprocess
    import sys

    files = [str(f) for f in sorted(directory.glob("part-*.sqlite3"))]
    if not files:
        return 0
    try:
        out = subprocess.run([sys.executable, "-c", _COMPACT, *files], capture_output=True,
                             text=True, timeout=60 + 15 * len(files)).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        out = "\n".join(f"error\t{f}\t{exc}" for f in files)
    done = 0
    for line in out.splitlines():
        status, name, why = (line.split("\t", 2) + ["", ""])[:3]
        if status == "ok":
            done += 1
        elif status == "error":
            STATS.add_labeled("erasure_errors", "recovery_compaction")
            log.warning("recovery store %s not compacted (%s): it is tried at the next erasure",
                        Path(name).name, why)
    return done


def purge_files(paths: list[Path], ids: set[str], hashes: set[str]) -> int:
    """Remove every JSON line naming one of the ids (as a whole JSON string) or a hash from the
    given files (and the JSON-lines files of given directories), rewriting them in place under
    the writers' lock. Returns the number of lines removed."""
    needles = [orjson.dumps(i) for i in ids] + [h.encode() for h in hashes]
    return sum(drop_lines(path, lambda line: any(n in line for n in needles))
               for path in _jsonl_files(paths))


def _jsonl_files(paths: list[Path]):
    for p in paths:
        if p.is_dir():
            yield from sorted(p.rglob("*.jsonl"))
        elif p.is_file():
            yield p


class ErasureLogic(StatefulBatchLogic):
    """Single-key step: gathers the shards' reports of each request; once all are in, the stores
    are erased (pass 1), and again ``resweep_s`` later (pass 2) for rows that were in flight
    (queued or spooled for ClickHouse: while any are, the sweep waits)."""

    def __init__(self, eraser: Eraser, expected: tuple[int, int], resweep_s: float, resume):
        self.eraser, self.expected, self.resweep_ms = eraser, expected, int(resweep_s * 1000)
        state = pickle.loads(resume) if resume is not None else ({}, [], [])
        self.open: dict[str, _Pending] = state[0]
        self.sweeps: list[tuple[int, ErasureRequest, set[str]]] = state[1]  # pass 2 (with ids)
        self.closing: list[tuple[int, ErasureRequest]] = state[2] if len(state) > 2 else []
        # Pass 3 compacts the recovery store once no snapshot holds the subjects: two epochs
        # must have closed since pass 2, which a loaded machine may take longer than resweep_s
        # to do. Epochs are counted here (snapshot() is called at each one's end).
        self.epochs = 0
        self.closing_epoch: dict[str, int] = {}  # request id -> epoch count at pass 2

    def on_batch(self, batches: list[list[ErasureReport]]):
        done = []
        for reports in batches:
            for r in reports:
                rid = r.request.request_id
                p = self.open.get(rid)
                if p is None:
                    p = self.open[rid] = _Pending(r.request, r.expected
                                                  or self.expected[r.request.anonymous])
                p.reports.append(r)
                if len(p.reports) >= p.expected:
                    done.append(self.open.pop(rid))
        if done:
            jobs = []
            for p in done:
                ids = {p.request.subject} | {a for r in p.reports for a in r.anonymous_ids}
                counts: dict[str, int] = {}
                for r in p.reports:
                    for k, v in r.counts.items():
                        counts[f"state.{k}"] = counts.get(f"state.{k}", 0) + v
                jobs.append((p.request, ids, counts))
                self.sweeps.append((int(time.time() * 1000) + self.resweep_ms, p.request, ids))
            self._run(jobs, 1)
        return [], False

    def notify_at(self):
        now = int(time.time() * 1000)
        due = [s[0] for s in self.sweeps] + [
            c[0] if self._epochs_passed(c[1]) else max(c[0], now + 500) for c in self.closing]
        return _dt(min(due)) if due else None

    def _epochs_passed(self, request: ErasureRequest) -> bool:
        if self.eraser.recovery is None:
            return True
        return self.epochs >= self.closing_epoch.get(request.request_id, 0) + 2

    def on_notify(self):
        now = int(time.time() * 1000)
        closing = [r for t, r in self.closing if t <= now and self._epochs_passed(r)]
        if closing:
            done = {id(r) for r in closing}
            self.closing = [c for c in self.closing if id(c[1]) not in done]
            for r in closing:
                self.closing_epoch.pop(r.request_id, None)
            self.eraser.complete(closing)
        due = [s for s in self.sweeps if s[0] <= now]
        if due and _in_flight():
            self.sweeps = [(now + self.resweep_ms, r, i) if s[0] <= now else s
                           for s in self.sweeps for (_, r, i) in [s]]
            return [], False
        self.sweeps = [s for s in self.sweeps if s[0] > now]
        if due:
            if self._run([(r, ids, {}) for _, r, ids in due], 2):  # then no id is kept here
                self.closing += [(now + self.resweep_ms, replace(
                    r, subject=subject_hash(r.subject, self.eraser.key), hashed=True))
                    for _, r, _ in due]
                for _, r, _ in due:
                    self.closing_epoch[r.request_id] = self.epochs
        return [], False

    def on_eof(self):
        """The end of the input (or a stop): the sweeps that wait are done now, so a bounded run
        ends with every erasure complete."""
        if self.sweeps:
            due, self.sweeps = self.sweeps, []
            if self._run([(r, ids, {}) for _, r, ids in due], 2):
                self.closing += [(0, replace(r, subject=subject_hash(r.subject, self.eraser.key),
                                             hashed=True)) for _, r, _ in due]
        if self.closing:
            closing, self.closing = [r for _, r in self.closing], []
            self.eraser.complete(closing)
        return [], False

    def _run(self, jobs, pass_no: int) -> None:
        try:
            rows = self.eraser.run(jobs, pass_no)
        except Exception as exc:  # noqa: BLE001 - an outage: try again at the next sweep
            STATS.add_labeled("erasure_errors", type(exc).__name__)
            log.error("erasure pass %d failed (%s); it is tried again in %.0f s", pass_no,
                      type(exc).__name__, self.resweep_ms / 1000)
            now = int(time.time() * 1000)
            self.sweeps += [(now + self.resweep_ms, r, ids) for r, ids, _ in jobs]
            return False
        STATS.add("erasures_done" if pass_no == 1 else "erasure_sweeps", len(jobs))
        log.warning("erasure pass %d: %d request(s), %d store rows removed", pass_no, len(jobs),
                    sum(r["removed"] for r in rows))
        return True

    def snapshot(self) -> bytes:
        self.epochs += 1  # an epoch ends
        return pickle.dumps((self.open, self.sweeps, self.closing), protocol=pickle.HIGHEST_PROTOCOL)


def _in_flight() -> bool:
    """Rows still queued in memory or spooled on disk for ClickHouse."""
    from connectors.clickhouse import rows_in_flight

    return rows_in_flight() > 0


# -- asking, and checking ------------------------------------------------------------------------

def request_erasure(settings, subject: str, *, anonymous: bool = False, requested_by: str,
                    source: str = "cli", redis_url: str | None = None) -> ErasureRequest:
    """Queue an erasure for the flow (the erasure topic with a Kafka source, else the inbox) and
    record it in the ledger at once, so that a flow started later keeps the subject out too."""
    request = new_request(subject, anonymous, requested_by, source)
    if settings.source.kind == "kafka":
        from confluent_kafka import Producer

        from privacy.secrets import kafka_client_config

        producer = Producer({"bootstrap.servers": ",".join(settings.kafka.brokers),
                             **kafka_client_config(settings.kafka)})
        enqueue(request, kafka_producer=producer, topic=settings.privacy.erasure.topic)
    else:
        enqueue(request, inbox=settings.privacy.erasure.inbox.resolve())
    if redis_url is not None:
        import redis

        from privacy.subjects import pii_key

        client = redis.Redis.from_url(redis_url)
        try:
            client.hset(erased_key(settings.redis.key_prefix),
                        subject_hash(subject, pii_key(name=settings.privacy.pii_key_env)),
                        request.requested_at_ms)
            client.set(receipt_key(settings.redis.key_prefix, request.request_id),
                       orjson.dumps({"request_id": request.request_id, "status": "queued"}),
                       ex=RECEIPT_TTL_S)
        finally:
            client.close()
    return request


def receipt(settings, request_id: str, redis_url: str | None = None) -> dict | None:
    """The receipt of a request (Redis, else the receipts folder), None while queued."""
    if redis_url is not None:
        import redis

        client = redis.Redis.from_url(redis_url)
        try:
            raw = client.get(receipt_key(settings.redis.key_prefix, request_id))
        finally:
            client.close()
        doc = orjson.loads(raw) if raw else None
        if doc and doc.get("status") != "queued":
            return doc
    path = settings.privacy.erasure.inbox.resolve().parent / "receipts" / f"{request_id}.json"
    return orjson.loads(path.read_bytes()) if path.exists() else None


def verify(settings, subject: str, *, redis_url: str | None, clickhouse_client=None,
           progress=lambda text: None) -> dict[str, object]:
    """Search every store for the subject: Redis keys and alias values, every column of every
    ClickHouse table of the database, the output, spool, dead-letter and inbox files, and the
    recovery store's snapshots. Returns store -> number of findings (or a reason it was not
    searched)."""
    from privacy.subjects import pii_key

    key = pii_key(name=settings.privacy.pii_key_env)
    ref = subject_hash(subject, key)
    found: dict[str, object] = {}
    if redis_url is not None:
        progress("redis")
        found["redis"] = _verify_redis(redis_url, settings.redis.key_prefix, subject)
    if clickhouse_client is not None:
        progress("clickhouse")
        found.update(_verify_clickhouse(clickhouse_client, settings.clickhouse.database, subject))
    else:
        found["clickhouse"] = "not searched (no client: the embedded ClickHouse is in use?)"
    progress("files")
    needles = [orjson.dumps(subject), ref.encode()]
    dirs = [settings.clickhouse.spool_dir, settings.output.dir, settings.privacy.erasure.inbox]
    found["files"] = sum(sum(line.count(n) for n in needles)
                         for f in _jsonl_files([d.resolve() for d in dirs])
                         for line in _lines(f)) + sum(
        1 for d in dirs if d.resolve().is_dir() for f in d.resolve().rglob("*.json")
        if any(n in f.read_bytes() for n in needles))
    rec = settings.flow.recovery_dir
    if rec is not None and rec.resolve().is_dir():
        progress("snapshots")
        # a pickled state holds its strings as UTF-8: an id shorter than 4 characters would
        # match by chance, so those are not searched this way
        raw = subject.encode()
        found["snapshots"] = sum(f.read_bytes().count(raw) for f in rec.resolve().glob("*.sqlite3*")) \
            if len(raw) >= 4 else "not searched (id shorter than 4 characters)"
    return found


def _lines(path: Path):
    try:
        with open(path, "rb") as f:
            yield from f
    except FileNotFoundError:
        return


def _verify_redis(url: str, prefix: str, subject: str) -> int:
    import redis

    from features.layout import alias_key, anon_key, user_key

    client = redis.Redis.from_url(url)
    try:
        n = client.exists(user_key(prefix, subject), anon_key(prefix, subject), alias_key(prefix, subject))
        batch = []
        for k in client.scan_iter(match=alias_key(prefix, "*"), count=5000):
            batch.append(k)
            if len(batch) >= 1000:
                n += sum(v == subject.encode() for v in client.mget(batch))
                batch = []
        if batch:
            n += sum(v == subject.encode() for v in client.mget(batch))
        return int(n)
    finally:
        client.close()


def _verify_clickhouse(client, db: str, subject: str) -> dict[str, int]:
    """Every String-like column of every table (aggregate states excepted: uniqExact keeps 128-bit
    hashes of the ids, not the ids)."""
    cols = client.query(
        "SELECT table, name, type FROM system.columns WHERE database = {db:String} "
        "AND table IN (SELECT name FROM system.tables WHERE database = {db:String} "
        "AND engine NOT IN ('Null', 'MaterializedView', 'View'))", parameters={"db": db}).result_rows
    by_table: dict[str, list[str]] = {}
    for table, name, typ in cols:
        if "String" in typ and not typ.startswith(("AggregateFunction", "SimpleAggregateFunction")):
            # the id itself, as a JSON string inside text, or at the end of a series ("user=<id>")
            c = f"toString({name})"
            test = f"has({name}, {{s:String}})" if typ.startswith("Array") else (
                f"({c} = {{s:String}} OR position({c}, concat('\"', {{s:String}}, '\"')) > 0 "
                f"OR endsWith({c}, concat('=', {{s:String}})))")
            by_table.setdefault(table, []).append(test)
    out = {}
    for table, tests in sorted(by_table.items()):
        n = int(client.command(f"SELECT count() FROM {db}.{table} WHERE " + " OR ".join(tests),
                               parameters={"s": subject}))
        out[f"clickhouse.{table}"] = n
    return out
