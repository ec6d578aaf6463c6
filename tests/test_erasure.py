"""Right to erasure on real services (issue 14): 100 users erased while the flow follows a Kafka
topic under load; then every store is searched with queries written here (not the product's
``erase --verify``): every Redis key and alias, every String column of every ClickHouse table of
the database, every file the run wrote, the recovery store; a restart from the snapshot and a
replay of the whole topic into the same Redis bring none of them back; their later events follow
the consent policy (opt-in: nothing without a new grant)."""
from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import orjson
import redis

from config.settings import load_settings
from connectors.kafka import produce
from connectors.synthetic import SyntheticSpec, generate
from features.layout import receipt_key, user_key
from flows.runner import run
from privacy.erasure import request_erasure, verify
from surgeflow.shutdown import STOP
from surgeflow.stats import STATS

SPEC = SyntheticSpec(seed=11, users=400, start_ms=int(time.time() * 1000) - 3 * 3_600_000,
                     events_per_s=4.0, duration_s=2 * 3600.0, malformed_share=0.01,
                     duplicate_share=0.01)
KEY = "a-test-pii-key-of-enough-length-000"


def ids_of(records):
    """user id -> the anonymous ids its login, signup and identify events carry (the links the
    default policy makes: not without profiling consent, the flow then keeps no link, so the
    device is not known as theirs; what it left is keyed by the device alone)."""
    users: dict[str, set[str]] = {}
    for r in records:
        if r.kind != "ok":
            continue
        d = orjson.loads(r.value)
        if d.get("user_id"):
            users.setdefault(d["user_id"], set())
            consent = (d.get("context") or {}).get("consent") or {}
            if d.get("anonymous_id") and consent.get("profiling") is not False and (
                    d.get("type") == "identify" or d.get("event") in ("login", "signup")):
                users[d["user_id"]].add(d["anonymous_id"])
    return users


def profiled(records) -> set[str]:
    """The users every one of whose events grants profiling (the others have no features)."""
    denied, seen = set(), set()
    for r in records:
        if r.kind != "ok":
            continue
        d = orjson.loads(r.value)
        if d.get("user_id"):
            seen.add(d["user_id"])
            if not ((d.get("context") or {}).get("consent") or {}).get("profiling", True):
                denied.add(d["user_id"])
    return seen - denied


def trail(records, keys: list[str]) -> str:
    """For a failure's message: the records naming the ids left in these keys, in stream order
    (the position, then the kind, type, event, user, anonymous id, profiling consent)."""
    ids = {k.rsplit(":", 1)[-1] for k in keys}
    lines = []
    for n, r in enumerate(records):
        if any(orjson.dumps(i) in r.value for i in ids):
            try:
                d = orjson.loads(r.value)
            except orjson.JSONDecodeError:
                d = {}
            d = d if isinstance(d, dict) else {}
            lines.append(f"#{n} {r.kind} {d.get('type')} {d.get('event')} {d.get('user_id')} "
                         f"{d.get('anonymous_id')} {((d.get('context') or {}).get('consent') or {})}")
    return "\n".join(lines[:60])


def settings_for(tmp_path: Path, kafka, topic, erasure_topic, redis_url, chdb_dsn, ch_database,
                 prefix, recovery: str, tail: bool):
    return load_settings(
        None, env={}, source__kind="kafka", output__kind="files", output__dir=str(tmp_path / "out"),
        kafka__brokers=[kafka.bootstrap], kafka__events_topic=topic, kafka__tail=tail,
        redis__url=redis_url, redis__key_prefix=prefix, clickhouse__dsn=chdb_dsn,
        clickhouse__database=ch_database, clickhouse__spool_dir=str(tmp_path / "spool"),
        flow__max_lookback_s=None, flow__max_clock_skew_s=None, flow__epoch_interval_s=1.0,
        flow__recovery_dir=str(tmp_path / recovery), privacy__erasure__topic=erasure_topic,
        privacy__erasure__resweep_s=3.0, privacy__erasure__inbox=str(tmp_path / "inbox"))


def where_in_snapshots(recovery: Path | None, subject: str) -> list[tuple]:
    """(file, table, row's text columns, bytes around the id) of every snapshot row naming
    the subject: which step's state kept it, when the product's verify finds it there."""
    import sqlite3

    raw, out = subject.encode(), []
    for f in sorted(Path(recovery).glob("*.sqlite3")) if recovery else []:
        db = sqlite3.connect(f)
        try:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                for row in db.execute(f"SELECT * FROM {table}"):
                    for value in row:
                        if isinstance(value, bytes) and raw in value:
                            i = value.index(raw)
                            out.append((f.name, table, [v for v in row if isinstance(v, (str, int))],
                                        value[max(0, i - 120):i + 60]))
        finally:
            db.close()
    return out


def search_redis(client, prefix: str, ids: set[str]) -> list[str]:
    found = []
    for key in client.scan_iter(match=f"{prefix}:*", count=5000):
        k = key.decode()
        if k.rsplit(":", 1)[-1] in ids or any(k.endswith(f":{i}") for i in ids):
            found.append(k)
        elif client.type(key) == b"string" and client.get(key).decode(errors="replace") in ids:
            found.append(f"{k} -> value")
    return found


def search_clickhouse(client, db: str, ids: set[str]) -> dict[str, int]:
    cols = client.query(f"SELECT table, name, type FROM system.columns WHERE database = '{db}'").result_rows
    engines = dict(client.query(f"SELECT name, engine FROM system.tables WHERE database = '{db}'").result_rows)
    found = {}
    for table, name, typ in cols:
        if engines.get(table) in ("Null", "MaterializedView") or "String" not in typ \
                or "AggregateFunction" in typ:
            continue
        if typ.startswith("Array"):
            cond = f"hasAny({name}, {{ids:Array(String)}})"
        else:  # the id itself, or inside text as a JSON string
            cond = (f"{name} IN {{ids:Array(String)}} OR multiSearchAny({name}, "
                    f"{{quoted:Array(String)}})")
        n = client.command(f"SELECT count() FROM {db}.{table} WHERE {cond}",
                           parameters={"ids": sorted(ids), "quoted": sorted(f'"{i}"' for i in ids)})
        if n:
            found[f"{table}.{name}"] = n
    return found


def search_files(root: Path, ids: set[str], skip: set[Path]) -> list[str]:
    """The lines (with their file) of .json/.jsonl files under root that name one of the ids."""
    needles = [orjson.dumps(i) for i in ids]
    return [f"{p}: {line[:400]!r}" for p in root.rglob("*") if p.is_file() and p not in skip
            and p.suffix in (".jsonl", ".json")
            for line in p.read_bytes().splitlines() if any(n in line for n in needles)]


def test_erasing_100_users_under_a_running_flow(kafka, redis_url, chdb_dsn, chdb_client, ch_database,
                                                tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEFLOW_PII_KEY", KEY)
    run_id = uuid.uuid4().hex[:8]
    records = [r for r in generate(SPEC) if b"\n" not in r.value]
    split = len(records) // 2
    topic = kafka.create_topic(f"er-in-{run_id}", partitions=2)
    erasure_topic = f"er-erasure-{run_id}"
    prefix = f"er{run_id}"
    assert produce([kafka.bootstrap], topic, ((r.key, r.value) for r in records[:split])) == split
    settings = settings_for(tmp_path, kafka, topic, erasure_topic, redis_url, chdb_dsn, ch_database,
                            prefix, "rec", tail=True)
    client = redis.Redis.from_url(redis_url)
    users = ids_of(records)
    victims = sorted(users, key=lambda u: (not users[u], u))[:100]  # those with links first
    erased_ids = set(victims) | {a for u in victims for a in users[u]}
    assert len(victims) == 100 and len(erased_ids) > 100

    STATS.reset()
    flow = threading.Thread(target=run, args=(settings, redis_url), daemon=True)
    timings = {}
    try:
        flow.start()
        deadline = time.monotonic() + 120
        while STATS.get("events_in") < split and time.monotonic() < deadline:
            time.sleep(0.2)
        assert STATS.get("events_in") >= split
        time.sleep(2)  # their features are written
        assert sum(client.exists(user_key(prefix, u)) for u in victims) > 50
        # erase under load: the second half of the stream is produced meanwhile
        loader = threading.Thread(target=produce, args=([kafka.bootstrap], topic,
                                                        ((r.key, r.value) for r in records[split:])))
        loader.start()
        asked = time.monotonic()
        requests = [request_erasure(settings, u, requested_by="test", redis_url=redis_url)
                    for u in victims]
        loader.join()
        pending = {r.request_id for r in requests}
        while pending and time.monotonic() < asked + 90:
            for rid in list(pending):
                raw = client.get(receipt_key(prefix, rid))
                doc = json.loads(raw) if raw else {}
                if doc.get("status") in ("erased", "swept", "done"):
                    timings.setdefault(rid, time.monotonic() - asked)
                if doc.get("status") == "done":
                    pending.discard(rid)
            time.sleep(0.2)
        assert not pending, f"{len(pending)} erasures not done"
        time.sleep(2)  # the flow goes on with the rest of the stream
    finally:
        STOP.set()
        flow.join(120)
        STOP.clear()
    assert not flow.is_alive()
    assert max(timings.values()) < 60, max(timings.values())
    print(f"100 erasures under load: first pass done within {max(timings.values()):.1f} s")

    # every store, searched here
    left = search_redis(client, prefix, erased_ids)
    assert left == [], f"{left}: the records naming them (the split at #{split}):\n" \
                       f"{trail(records, left)}"
    assert search_clickhouse(chdb_client, ch_database, erased_ids) == {}
    assert search_files(tmp_path, erased_ids, skip=set()) == []
    audit = chdb_client.query(f"SELECT request_id, subject, requested_by, pass, store, removed "
                              f"FROM {ch_database}.erasure_audit FINAL").result_rows
    asked_ids = {r.request_id for r in requests}
    assert {r[0] for r in audit if r[2] == "test"} == asked_ids
    # the rest: devices an erased user's own login named after the erasure (erased with them)
    assert all(r[2] == "erasure follow-up" for r in audit if r[0] not in asked_ids)
    assert {r[3] for r in audit} == {1, 2, 3}
    assert not any(v in str(audit) for v in victims)  # the audit keeps no id
    removed = {}
    for r in audit:
        removed[r[4]] = removed.get(r[4], 0) + r[5]
    assert removed["state.user_profiles"] > 50 and removed["clickhouse.events_raw"] > 100
    # the product's own check agrees (and the snapshots are searched too: the id is in no state)
    left = verify(settings, victims[0], redis_url=redis_url, clickhouse_client=chdb_client)
    assert not [k for k, v in left.items() if isinstance(v, int) and v], \
        (left, where_in_snapshots(settings.flow.recovery_dir, victims[0]))

    # a restart from the snapshot, reading the topic to its end: nobody comes back
    restart = settings_for(tmp_path, kafka, topic, erasure_topic, redis_url, chdb_dsn, ch_database,
                           prefix, "rec", tail=False)
    run(restart, redis_url)
    assert search_redis(client, prefix, erased_ids) == []
    # a replay of the whole topic with an empty recovery store: the ledger keeps them out
    replay = settings_for(tmp_path, kafka, topic, erasure_topic, redis_url, chdb_dsn, ch_database,
                          prefix, "rec-replay", tail=False)
    run(replay, redis_url)
    assert search_redis(client, prefix, erased_ids) == []
    assert search_clickhouse(chdb_client, ch_database, erased_ids) == {}
    survivors = sorted(set(users) - set(victims))
    assert sum(client.exists(user_key(prefix, u)) for u in survivors) > 100

    # later events of erased users are new data under the consent policy (opt-in)
    now = int(time.time() * 1000)
    later = [(b"k", orjson.dumps({"event_id": f"late-{i}", "type": "track", "event": "page_view",
                                  "user_id": u, "timestamp": now + i,
                                  "context": {"channel": "web", **consent}}))
             for i, (u, consent) in enumerate([(victims[0], {}),
                                               (victims[1], {"consent": {"profiling": True}})])]
    produce([kafka.bootstrap], topic, later)
    run(replay, redis_url)
    assert not client.exists(user_key(prefix, victims[0]))  # no grant: not profiled
    assert client.hget(user_key(prefix, victims[1]), "views_1h") == b"1"  # granted again: only new


def test_erase_command_in_embedded_mode_then_verify(tmp_path, redis_url, chdb_dsn, chdb_client,
                                                    ch_database, monkeypatch):
    """`surgeflow erase` queues into the embedded inbox; the flow (a file replay) carries it out
    before its end; `surgeflow erase --verify` then finds nothing, and exits 1 for an id that is
    still there."""
    from typer.testing import CliRunner

    from surgeflow.cli import app

    monkeypatch.setenv("SURGEFLOW_PII_KEY", KEY)
    records = [r for r in generate(SyntheticSpec(seed=3, users=60, start_ms=SPEC.start_ms,
                                                 events_per_s=2.0, duration_s=1800.0))]
    links = ids_of(records)
    users = sorted(links, key=lambda u: (not links[u], u))
    # the data depends on the hour it is generated at: the other user must be one with features
    victim, other = users[0], [u for u in users if u in profiled(records)][-1]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(r.value for r in records) + b"\n")
    config = tmp_path / "surgeflow.yaml"
    config.write_text(json.dumps({
        "source": {"kind": "file", "file": {"paths": [str(events)]}},
        "output": {"dir": str(tmp_path / "out")},
        "redis": {"url": redis_url, "key_prefix": "emb"},
        "clickhouse": {"dsn": chdb_dsn, "database": ch_database, "spool_dir": str(tmp_path / "spool")},
        "flow": {"recovery_dir": None, "max_lookback_s": None, "max_clock_skew_s": None},
        "privacy": {"erasure": {"inbox": str(tmp_path / "erasure" / "inbox")}}}))
    cli = CliRunner()
    asked = cli.invoke(app, ["erase", "--user", victim, "--no-wait", "-c", str(config),
                             "--requested-by", "dpo@example"])
    assert asked.exit_code == 0, asked.output
    assert len(list((tmp_path / "erasure" / "inbox").glob("*.json"))) == 1
    run(load_settings(config, env={}), redis_url)
    assert not list((tmp_path / "erasure" / "inbox").glob("*.json"))  # done: the id is not kept
    receipts = [json.loads(p.read_text()) for p in (tmp_path / "erasure" / "receipts").glob("*.json")]
    assert receipts and {r["status"] for r in receipts} == {"done"}  # (and its devices)
    assert victim not in json.dumps(receipts)
    client = redis.Redis.from_url(redis_url)
    assert not client.exists(user_key("emb", victim)) and client.exists(user_key("emb", other))
    clean = cli.invoke(app, ["erase", "--verify", victim, "-c", str(config)])
    assert clean.exit_code == 0, clean.output
    left = cli.invoke(app, ["erase", "--verify", other, "-c", str(config)])
    assert left.exit_code == 1 and "found traces" in left.output
    audit = chdb_client.query(f"SELECT requested_by, pass FROM {ch_database}.erasure_audit").result_rows
    assert {r[0] for r in audit} >= {"dpo@example"} and {r[1] for r in audit} == {1, 2, 3}


def test_erasure_over_http_is_queued_for_the_flow_and_recorded(tmp_path, redis_url, monkeypatch):
    """POST /erasure with a token of scope erasure:write queues the request as `surgeflow erase`
    does (the embedded inbox and the ledger); without the scope it is refused."""
    from config.settings import AccessSettings
    from features.http import create_app
    from features.layout import erased_key
    from privacy.subjects import subject_hash
    from tests.services import serve_app
    from tests.test_access import call

    monkeypatch.setenv("SURGEFLOW_PII_KEY", KEY)
    settings = load_settings(None, env={}, redis__url=redis_url, redis__key_prefix="http-er",
                             privacy__erasure__inbox=str(tmp_path / "inbox"))
    writer, reader = "w" * 32, "r" * 32
    monkeypatch.setenv("SURGEFLOW_API_TOKENS", f"{writer}:erasure:write;{reader}:features:read")

    def erase(user_id, anonymous, requested_by):
        return request_erasure(settings, user_id, anonymous=anonymous, requested_by=requested_by,
                               source="http", redis_url=redis_url).request_id

    app = create_app(redis_url, "http-er", access=AccessSettings(), on_erasure=erase)
    with serve_app(app) as port:
        denied = call(port, "POST", "/erasure", {"user_id": "u-http"}, token=reader)
        assert denied[0] == 403 and not (tmp_path / "inbox").exists()
        status, _, body = call(port, "POST", "/erasure", {"user_id": "u-http"}, token=writer)
    assert status == 202 and body["request_id"]
    queued = [json.loads(p.read_bytes()) for p in (tmp_path / "inbox").glob("*.json")]
    assert [(q["subject"], q["source"]) for q in queued] == [("u-http", "http")]
    assert queued[0]["requested_by"].startswith("token:") and writer not in json.dumps(queued)
    client = redis.Redis.from_url(redis_url)
    assert client.hexists(erased_key("http-er"), subject_hash("u-http", KEY.encode()))
    assert client.get(receipt_key("http-er", body["request_id"]))  # queued


def test_file_retention_of_dead_letters_and_spools(tmp_path):
    from privacy.retention import sweep_dead_letters, sweep_spools

    now = int(time.time() * 1000)
    out, spool = tmp_path / "out", tmp_path / "spool"
    out.mkdir()
    (spool / "webhook").mkdir(parents=True)
    (out / "dead_letters.jsonl").write_bytes(b"".join(
        orjson.dumps({"reason": "x", "at_ms": now - d * 86_400_000}) + b"\n" for d in (20, 16, 1, 0)))
    (out / "actions.jsonl").write_bytes(b'{"at_ms": 0}\n')  # not a dead letter: kept
    old, fresh = spool / "000000000001.pickle", spool / "webhook" / "spool-w0-000000000002.jsonl"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    import os
    os.utime(old, (time.time() - 20 * 86_400,) * 2)
    assert sweep_dead_letters([out, spool], days=15, now_ms=now) == 2
    assert len((out / "dead_letters.jsonl").read_bytes().splitlines()) == 2
    assert (out / "actions.jsonl").read_bytes() == b'{"at_ms": 0}\n'
    assert sweep_spools(spool, days=15) == 1 and not old.exists() and fresh.exists()


def test_recovery_compaction_waits_for_two_closed_epochs_not_only_for_time():
    """Pass 3 (VACUUM of the recovery store) runs once two epochs closed after pass 2, however
    long they take on a loaded machine; without a recovery store only the time counts.
    (A stand-in eraser: the step's own bookkeeping.)"""
    from privacy.erasure import ErasureLogic, ErasureReport, ErasureRequest

    class Eraser:
        key, files = b"k" * 32, []

        def __init__(self, recovery):
            self.recovery, self.passes, self.completed = recovery, [], []

        def run(self, jobs, pass_no):
            self.passes.append(pass_no)
            return [{"removed": 0}]

        def complete(self, requests):
            self.completed += [r.request_id for r in requests]
            return []

    for recovery in (Path("/unused/recovery"), None):
        eraser = Eraser(recovery)
        step = ErasureLogic(eraser, (1, 1), resweep_s=0.0, resume=None)
        request = ErasureRequest("r1", "u1", False, "test", 1)
        step.on_batch([[ErasureReport(request, "ingest-0", [], {})]])
        step.on_notify()  # pass 2, at once (resweep 0)
        assert eraser.passes == [1, 2]
        time.sleep(0.01)
        step.on_notify()
        if recovery is None:
            assert eraser.completed == ["r1"]
            continue
        assert eraser.completed == []  # due by time, but no epoch has closed since
        step.snapshot()
        step.on_notify()
        assert eraser.completed == []
        step.snapshot()
        step.on_notify()
        assert eraser.completed == ["r1"] and not step.closing
