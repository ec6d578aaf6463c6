"""End to end: a corpus of events with e-mails and phones hidden at every depth, under key names
and in free text, and IPs in context, replayed through the whole flow (``flows.runner.run``) into
real Redis and chDB. Then everything the engine wrote is searched: every Redis key and value,
every ClickHouse table of the run's database, every file under the output, spool and erasure
directories, the captured logs and stderr. No planted e-mail, phone or full IP may be found in
clear, with the PII key set or not (then a start-up warning says so); the dead letters unseal to
the exact bytes read.
"""
from __future__ import annotations

import logging
import uuid

import orjson
import pytest
import redis

from alerts.entities import reset_key
from config.settings import load_settings
from connectors.files import JsonLinesSource
from flows.events import reset_dead_letter_keys
from flows.runner import run
from privacy.pii import mask_ip, unseal

T0 = 1_795_428_000_000  # 10:00 UTC: outside the quiet hours, so trigger actions are sent
S = 1000

EMAILS = [f"{name}{i}@{domain}" for i, (name, domain) in enumerate(
    [("ann.lee+shop", "example.com"), ("zhang_wei", "qq.com"), ("j-doe", "mail.example.org"),
     ("Marie.Curie", "Example.FR"), ("o.neil", "sub.domain.co.uk"), ("li-na", "163.com")] * 4)]
PHONES = [
    *[f"+86 138 0013 {8000 + i}" for i in range(4)],
    *[f"(555) 2{i}{i}-45{i}7" for i in range(4)],
    *[f"0049-30-12345{i:02d}" for i in range(4)],
    *[f"1390013{i:04d}" for i in range(4)],
    *[f"+44 20 7946 0{i:03d}" for i in range(4)],
    *[f"06 12 34 5{i} 78" for i in range(4)],
]
IPS = [*[f"203.0.113.{17 + i}" for i in range(6)], *[f"198.51.100.{101 + i}" for i in range(6)],
       "2001:db8:abcd:12::7", "2001:db8:beef:1:2:3:4:5"]
FLOOD_IP = "198.51.100.77"  # sends 130 events in a second: an ip_request_flood alert
PLANTED = [*EMAILS, *PHONES, *IPS, FLOOD_IP]
NAMES = ["page_view", "product_viewed", "add_to_cart", "checkout_started", "order_completed",
         "search", "login", "signup", "ad_click", "login_failed"]


def nest(depth: int, leaf: dict) -> dict:
    """``leaf`` under ``depth`` levels of dicts and lists (the decoder takes 16 in all)."""
    node: dict | list = leaf
    for level in range(depth):
        node = {f"level{level}": node} if level % 3 else {"items": [{"n": level}, node]}
    return node


def pii_properties(i: int) -> dict:
    e, p, e2, p2 = EMAILS[i % 24], PHONES[i % 24], EMAILS[(i + 7) % 24], PHONES[(i + 5) % 24]
    ip = IPS[i % len(IPS)]
    leaf = {"contact_email": e, "Mobile-Number": p, "note": f"call me at {p} or write to {e2}",
            "tags": ["vip", e, p2], e2: "keyed by an address", "seen_from": f"login from {ip}",
            "billing": {"tel": [p2, p], "E_Mail": e, "phone": int("".join(filter(str.isdigit, p)))}}
    props = {"product_id": f"p{i % 7}", "sku": f"SKU-{10_000_000 + i}", "price": 19.99,
             "order_ref": f"o-{1000 + i}", "page": f"/deals/{i % 3}?email={e}&phone={p}",
             "referrer": f"https://ref.example/?ip={ip}&m={e2}", "comment": f"{e} / {p} / {ip}",
             "deep": nest(i % 7 + 1, leaf)}  # 16 levels at most in all
    return props


def event(i: int, ts: int, *, name: str | None = None, ip: str | None = None, user: str | None = None) -> dict:
    e, p = EMAILS[(i + 3) % 24], PHONES[(i + 11) % 24]
    name = name or NAMES[i % len(NAMES)]
    doc = {"event_id": f"e{i}", "type": "track", "event": name, "timestamp": ts,
           "anonymous_id": f"anon-{i % 30}", "properties": pii_properties(i),
           "context": {"ip": ip or IPS[i % len(IPS)], "channel": "web",
                       "user_agent": f"Mozilla/5.0 (X11; Linux) via {IPS[(i + 1) % len(IPS)]}",
                       "traits": {"email": e, "phone": p, "notes": [f"alt {p}", {"mail": e}]},
                       "consent": {"profiling": i % 9 != 4, "marketing": True},
                       "geo": {"country": ["NL", "CN", "US"][i % 3]}}}
    if user is not None or i % 4:
        doc["user_id"] = user or f"u{i % 20}"
    if name == "order_completed":
        doc["properties"]["revenue"] = 59.9
    return doc


def malformed(i: int) -> list[bytes]:
    """Records that become dead letters, each with PII in it."""
    e, p, ip = EMAILS[i % 24], PHONES[i % 24], IPS[i % len(IPS)]
    good = orjson.dumps(event(900 + i, T0 + 60 * S))
    deep = event(950 + i, T0 + 60 * S)
    deep["properties"] = nest(20, {"email": e, "note": f"tel {p}"})
    missing = event(960 + i, T0 + 60 * S)
    missing.pop("anonymous_id")
    missing.pop("user_id", None)
    return [
        good[:-9],  # invalid JSON
        orjson.dumps({**event(910 + i, 0), "timestamp": f"{e} {p}"}),  # bad_timestamp, echoed
        orjson.dumps({**event(920 + i, T0), "properties": f"call {p} or {e} from {ip}"}),
        orjson.dumps(deep),  # too_deep
        orjson.dumps(missing),  # missing_user
        b'{"note": "' + e.encode() + b" " + p.encode() + b" " + ip.encode() + b'\xff"}',  # not_utf8
        orjson.dumps([e, p, ip]),  # not_an_object
        good.replace(b"@", b"\\u0040")[:-9],  # invalid JSON, the @ escaped
    ]


def corpus() -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(every line, the malformed lines, the late lines)."""
    lines, bad, late = [], [], []
    for i in range(240):
        lines.append(orjson.dumps(event(i, T0 + i * 5 * S)))
        if i % 30 == 29:
            bad += malformed(i)
            lines += malformed(i)
        if i == 150:  # a flood: 130 events from one IP within one second
            lines += [orjson.dumps(event(1000 + k, T0 + i * 5 * S + k * 7, name="page_view",
                                         ip=FLOOD_IP, user=f"bot{k % 5}")) for k in range(130)]
        if i in (120, 180, 220):  # ten minutes late: dead letters, after the watermark moved on
            late.append(orjson.dumps(event(2000 + i, T0 + (i - 120) * 5 * S - 600 * S)))
            lines.append(late[-1])
    return lines, bad, late


def search(blob: bytes, where: str) -> list[str]:
    """The planted values found in clear in ``blob`` (phones also as their bare digits)."""
    found = []
    for value in PLANTED:
        if value.encode() in blob or value.lower().encode() in blob:
            found.append(f"{value!r} in {where}")
    for p in PHONES:
        digits = "".join(filter(str.isdigit, p))
        if len(digits) >= 10 and digits.encode() in blob:
            found.append(f"{p!r} (digits) in {where}")
    return found


def redis_dump(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key with everything it holds, as bytes (by type, then DUMP for anything else)."""
    out = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key) or b""
        elif kind == "hash":
            value = b"\n".join(k + b"=" + v for k, v in client.hgetall(key).items())
        elif kind == "list":
            value = b"\n".join(client.lrange(key, 0, -1))
        elif kind == "set":
            value = b"\n".join(client.smembers(key))
        elif kind == "zset":
            value = b"\n".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            value = repr(client.xrange(key)).encode()
        else:
            value = b""
        out[key] = value + b"\n" + (client.dump(key) or b"")
    return out


def clickhouse_dump(client, database: str) -> dict[str, bytes]:
    tables = client.query("SELECT name FROM system.tables WHERE database = {db:String} "
                          "AND engine NOT IN ('View', 'MaterializedView')",
                          parameters={"db": database}).result_rows
    out = {}
    for (table,) in tables:
        out[table] = client.raw_query(f"SELECT * FROM `{database}`.`{table}` FORMAT TSVRaw")
    return out


def replay(tmp_path, name: str, redis_url: str, chdb_dsn: str, database: str):
    lines, bad, late = corpus()
    source = tmp_path / f"{name}.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    assert all(v.encode() in source.read_bytes() for v in PLANTED)  # every one is planted
    base = tmp_path / name
    settings = load_settings(
        None, env={}, source__kind="file", source__file={"paths": [str(source)]},
        output__dir=str(base / "out"), redis__url=redis_url, redis__key_prefix=f"pii{name}",
        clickhouse__dsn=chdb_dsn, clickhouse__database=database, clickhouse__spool_dir=str(base / "spool"),
        privacy__erasure__inbox=str(base / "erasure" / "inbox.jsonl"),
        flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None)
    # small batches: the watermark moves within the file, so the late events are late
    run(settings, redis_url, source=JsonLinesSource([source], batch_size=40), partitions=1)
    return base, bad, late


@pytest.fixture
def fresh_keys():
    """The PII keys are read once per process: forget them around each run."""
    reset_dead_letter_keys()
    reset_key()
    yield
    reset_dead_letter_keys()
    reset_key()


@pytest.mark.parametrize("keyed", [True, False], ids=["with_pii_key", "without_pii_key"])
def test_no_planted_pii_in_clear_anywhere_the_engine_writes(
        keyed, tmp_path, monkeypatch, fresh_keys, caplog, capfd, redis_client, redis_url, chdb_dsn,
        chdb_client, ch_database):
    if keyed:
        monkeypatch.setenv("SURGEFLOW_PII_KEY", "a-test-secret-of-32-bytes-or-more!!")
        monkeypatch.setenv("SURGEFLOW_DEAD_LETTER_KEY", "dead-letter-secret")
    else:
        monkeypatch.delenv("SURGEFLOW_PII_KEY", raising=False)
        monkeypatch.delenv("SURGEFLOW_DEAD_LETTER_KEY", raising=False)
    caplog.set_level(logging.DEBUG)
    name = f"{'k' if keyed else 'n'}{uuid.uuid4().hex[:6]}"
    base, bad, late = replay(tmp_path, name, redis_url, chdb_dsn, ch_database)

    leaks: list[str] = []
    # Redis: every key and value (the database was emptied before the run)
    contents = redis_dump(redis_client)
    assert any(k.startswith(f"pii{name}:".encode()) for k in contents)
    for key, value in contents.items():
        leaks += search(key, f"redis key {key[:60]!r}") + search(value, f"redis {key[:60]!r}")
    # ClickHouse: every table of the run's database
    tables = clickhouse_dump(chdb_client, ch_database)
    assert tables.get("events_raw") and tables.get("alerts") and tables.get("actions")
    for table, blob in tables.items():
        leaks += search(blob, f"clickhouse {table}")
    # files: outputs, spool, erasure
    files = [f for f in base.rglob("*") if f.is_file()]
    assert any(f.name == "dead_letters.jsonl" for f in files)
    for f in files:
        leaks += search(f.read_bytes(), f"file {f.relative_to(base)}")
    # logs and what went to the terminal
    for r in caplog.records:
        leaks += search((r.getMessage() + (caplog.text if r.exc_info else "")).encode(),
                        f"log {r.name}")
    out, err = capfd.readouterr()
    leaks += search(out.encode() + err.encode(), "stdout/stderr")
    assert not leaks, "\n".join(sorted(set(leaks))[:40])

    # what was written is still useful: masked IPs, hashed or removed PII, alerts, dead letters
    raw_rows = tables["events_raw"].decode()
    assert "203.0.113.0" in raw_rows and "2001:db8:abcd::" in raw_rows
    if keyed:  # e-mails and phones hashed (they still join), else replaced or removed
        assert "hmac:" in raw_rows and "[phone]" not in raw_rows
    else:
        assert "hmac:" not in raw_rows and "[phone]" in raw_rows and "[email]" in raw_rows
    alerts = [orjson.loads(x) for x in (base / "out" / "alerts.jsonl").read_bytes().splitlines()]
    flood = [a for a in alerts if a["rule"] == "ip_request_flood"]
    assert flood and flood[0]["series"].startswith(f"ip={mask_ip(FLOOD_IP)}#")
    dead = [orjson.loads(x) for x in (base / "out" / "dead_letters.jsonl").read_bytes().splitlines()]
    reasons = {d["reason"] for d in dead}
    assert {"invalid_json", "bad_timestamp", "bad_field", "too_deep", "missing_user", "not_utf8",
            "not_an_object", "late_event"} <= reasons, reasons
    assert len(dead) == len(bad) + len(late)
    assert all("raw_b64" not in d and "raw_text" not in d and d["at_ms"] > 0 for d in dead)
    if keyed:
        assert sorted(unseal(d["raw_sealed"], b"dead-letter-secret") for d in dead) == sorted(bad + late)
        assert all(d["subjects"] for d in dead if d["reason"] == "late_event")
    else:
        assert all("raw_sealed" not in d for d in dead)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("SURGEFLOW_PII_KEY is not set" in m for m in warnings), warnings
