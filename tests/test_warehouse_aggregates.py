"""ClickHouse aggregates equal an independent reference computed here from the raw events.

One file (one source partition) of synthetic traffic crossing midnight in the reporting time
zone (Asia/Shanghai), with producer duplicates, malformed records and events injected hours late,
is run through the whole flow into chDB, then run again (a replay of the same input). The
minute, hour and day tables, the funnel, the active-user days and first-seen days must equal
what this file computes from the JSON lines: each event once, late events not at all, users as
sent (user id, else anonymous id), users without consent not counted as users.
"""
from __future__ import annotations

import datetime as dt
import json
import zoneinfo
from collections import defaultdict

import pytest

from config.settings import load_settings
from connectors.synthetic import SyntheticSpec, generate
from flows.runner import run

TZ = "Asia/Shanghai"
START_MS = 1_795_359_600_000  # 2026-11-22 15:00 UTC = 23:00 in Shanghai: the run crosses midnight
SPEC = SyntheticSpec(seed=11, users=200, start_ms=START_MS, events_per_s=2.0, duration_s=7200.0,
                     malformed_share=0.01, duplicate_share=0.03)
LATENESS_MS = 60_000
FUNNEL = ("product_viewed", "add_to_cart", "checkout_started", "order_completed")


def make_input(path):
    lines = [r.value for r in generate(SPEC) if b"\n" not in r.value]
    from flows.events import Event, decode

    early = [json.loads(v) for v in lines[:400] if isinstance(decode(v), Event)][:25]
    # Late: copies of early events (new ids) placed an hour of stream later.
    for i, doc in enumerate(early):
        doc["event_id"] = f"late-{i}"
        lines.insert(len(lines) - 200 - 7 * i, json.dumps(doc).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def _ts(value) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return int(parsed.timestamp() * 1000)


def reference(lines):
    """(minute rows, accepted events, late events) straight from the JSON documents."""
    from flows.events import DeadLetter, decode  # only to tell malformed records apart

    seen = set()
    running_max = None
    late = 0
    minute = defaultdict(lambda: [0, 0.0, 0.0, 0, set()])
    accepted = []
    for line in lines:
        if isinstance(decode(line), DeadLetter):
            continue
        doc = json.loads(line)
        ts = _ts(doc["timestamp"])
        if running_max is not None:
            lag = running_max - ts
            assert lag < 30_000 or lag > 3_600_000, "an event the test cannot classify"
            if lag > LATENESS_MS:
                late += 1
                continue
        running_max = ts if running_max is None else max(running_max, ts)
        if doc["event_id"] in seen:
            continue
        seen.add(doc["event_id"])
        accepted.append(doc)
        props, ctx = doc.get("properties") or {}, doc.get("context") or {}
        utm = ctx.get("campaign") or {}
        uid, anon = doc.get("user_id"), doc.get("anonymous_id")
        user = uid if uid is not None else anon
        consent = (ctx.get("consent") or {}).get("profiling") is not False
        name = doc.get("event") if doc.get("type", "track") == "track" else (
            "page_view" if doc["type"] == "page" else doc["type"])
        key = (ts // 60_000 * 60, ctx.get("channel") or "unknown",
               props.get("campaign_id") or utm.get("name") or "",
               props.get("creative_id") or utm.get("content") or "", name)
        row = minute[key]
        row[0] += 1
        row[1] += props.get("revenue") or 0.0
        row[2] += props.get("cost") or 0.0
        row[3] += name == "order_completed"
        if consent:
            row[4].add(user)
    return minute, accepted, late


def roll(minute_rows, period):
    """Minute rows -> hour or day rows in the reporting time zone."""
    tz = zoneinfo.ZoneInfo(TZ)
    out = defaultdict(lambda: [0, 0.0, 0.0, 0, set()])
    for (t, *key), (n, revenue, cost, orders, users) in minute_rows.items():
        local = dt.datetime.fromtimestamp(t, tz)
        start = local.replace(minute=0) if period == "hour" else local.replace(hour=0, minute=0)
        row = out[(int(start.timestamp()), *key)]
        row[0] += n
        row[1] += revenue
        row[2] += cost
        row[3] += orders
        row[4] |= users
    return out


def table(client, db, name):
    rows = client.query(
        "SELECT toUnixTimestamp(ts), channel, campaign, creative, event_name, sum(events), "
        "sum(revenue), sum(cost), sum(orders), uniqExactMerge(users) "
        "FROM {db:Identifier}.{t:Identifier} FINAL GROUP BY ALL", parameters={"db": db, "t": name}
    ).result_rows
    return {tuple(r[:5]): (r[5], round(r[6], 6), round(r[7], 6), r[8], r[9]) for r in rows}


def expected(rows):
    return {k: (n, round(rev, 6), round(cost, 6), orders, len(users))
            for k, (n, rev, cost, orders, users) in rows.items()}


@pytest.fixture(scope="module")
def replayed(tmp_path_factory, redis_url, chdb_dsn, chdb_client):
    import uuid

    db = f"t_{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("agg")
    lines = make_input(tmp / "events.jsonl")
    settings = load_settings(
        None, env={}, source__kind="file", source__file={"paths": [str(tmp / "events.jsonl")]},
        output__dir=str(tmp / "out"), redis__url=redis_url, redis__key_prefix="agg",
        clickhouse__dsn=chdb_dsn, clickhouse__database=db, clickhouse__timezone=TZ,
        clickhouse__spool_dir=str(tmp / "spool"), flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None)
    run(settings, redis_url)
    first = {name: table(chdb_client, db, name) for name in ("events_minute", "events_hour", "events_day")}
    run(settings, redis_url)  # the same input again: a replay must not double-count
    yield db, lines, first
    chdb_client.command(f"DROP DATABASE IF EXISTS {db}")


def test_minute_hour_day_equal_the_reference_after_a_replay(replayed, chdb_client):
    db, lines, first = replayed
    minute, accepted, late = reference(lines)
    assert late == 25 and len(accepted) > 10_000
    want = {"events_minute": expected(minute), "events_hour": expected(roll(minute, "hour")),
            "events_day": expected(roll(minute, "day"))}
    assert len(want["events_day"]) > len({k[1:] for k in want["events_day"]})  # two local days
    for name, rows in want.items():
        got = table(chdb_client, db, name)
        assert got == first[name], f"{name} changed when the input was replayed"
        assert got == rows, name


def test_funnel_users_and_raw_events_equal_the_reference(replayed, chdb_client):
    db, lines, _ = replayed
    minute, accepted, _ = reference(lines)
    hours = roll(minute, "hour")
    want = defaultdict(lambda: [set(), set(), set(), set()])
    for (t, channel, campaign, _creative, name), row in hours.items():
        if name in FUNNEL:
            want[(t, channel, campaign)][FUNNEL.index(name)] |= row[4]
    got = chdb_client.query(
        "SELECT toUnixTimestamp(ts), channel, campaign, uniqExactMerge(viewed), uniqExactMerge(carted),"
        " uniqExactMerge(checked_out), uniqExactMerge(ordered) FROM {db:Identifier}.funnel_hour "
        "GROUP BY ALL", parameters={"db": db}).result_rows
    assert {tuple(r[:3]): tuple(r[3:]) for r in got} == {
        k: tuple(len(s) for s in v) for k, v in want.items()}

    tz = zoneinfo.ZoneInfo(TZ)
    days = defaultdict(set)
    first_seen = {}
    for (t, *_), row in minute.items():
        day = dt.datetime.fromtimestamp(t, tz).date()
        days[day] |= row[4]
        for user in row[4]:
            first_seen[user] = min(first_seen.get(user, t), t)
    got_days = chdb_client.query("SELECT day, uniqExact(user_id) FROM {db:Identifier}.user_days "
                                 "FINAL GROUP BY day", parameters={"db": db}).result_rows
    assert dict(got_days) == {d: len(u) for d, u in days.items()}
    got_first = chdb_client.query("SELECT user_id, toUnixTimestamp(min(first_seen)) FROM "
                                  "{db:Identifier}.users_first_seen GROUP BY user_id",
                                  parameters={"db": db}).result_rows
    assert dict(got_first) == first_seen

    raw = chdb_client.query("SELECT event_id, ip_masked, properties FROM {db:Identifier}.events_raw "
                            "FINAL", parameters={"db": db}).result_rows
    assert sorted(r[0] for r in raw) == sorted(d["event_id"] for d in accepted)
    ips = {r[1] for r in raw if r[1]}
    assert ips and all(ip.endswith(".0") or ip.endswith("::") for ip in ips)
