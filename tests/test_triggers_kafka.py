"""Trigger rules end to end on real services: a hand-written stream of a few users goes through a
real Kafka topic and the live dataflow (trigger engine, Redis profiles, chDB), with the actions
webhook pointed at a local HTTP server. The expected actions and decisions come from an oracle
written here (plain dicts and datetime, not the product's engine), and the simulated clock of
`surgeflow triggers test` (triggers.simulate.replay) must agree with the flow.

The flow follows the topic (``kafka.tail``) and is stopped gracefully once the actions have come:
a stop is not the end of the input (the watermark is not moved to the clock), so every timer
action here was fired by the watermark as other users' events moved stream time on."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time
import uuid
from collections import defaultdict
from http.server import ThreadingHTTPServer
from zoneinfo import ZoneInfo

import orjson
import yaml
from confluent_kafka import Consumer, TopicPartition

from config.settings import load_settings
from connectors.kafka import produce
from flows.runner import run
from surgeflow.shutdown import STOP
from tests.test_alerts_kafka import Receiver
from tests.test_pipeline_kafka import consume_all
from triggers.simulate import replay

MIN, HOUR = 60_000, 3_600_000
T0 = 1_795_428_000_000  # 2026-11-23 10:00:00 UTC (a Monday), in the past: flow.max_lookback_s=None
END = T0 + 30 * HOUR  # the last event of the stream (the ticker's)
LATENESS_MS = 60_000  # flow.allowed_lateness_s: the live watermark is the clock minus this

RULES = {
    "guards": {
        "consent": "opt_in",
        "default_timezone": "UTC",
        "quiet_hours": {"start": "22:00", "end": "07:00", "channels": ["push"], "policy": "defer"},
        "caps": [{"name": "push_per_day", "channel": "push", "max": 3, "window": "calendar_day",
                  "over_cap": "drop"}],
        "max_actions_per_event": 1,
    },
    "rules": [
        {"name": "abandoned_cart", "kind": "absence", "start": {"events": ["add_to_cart"]},
         "stop": {"events": ["checkout_started"]}, "timeout": "30m",
         "action": {"channel": "push", "message": "cart_coupon", "tags": ["coupon"]}},
        {"name": "session_views", "kind": "count", "events": ["page_view"], "count": 3,
         "within": "session", "action": {"channel": "push", "message": "related_campaign"}},
        {"name": "order_cross_sell", "kind": "schedule", "start": {"events": ["order_completed"]},
         "steps": [{"after": "24h"}], "action": {"channel": "push", "message": "cross_sell"}},
    ],
}
QUIET = (22 * 60, 7 * 60)  # the oracle's copy of the quiet hours, user-local minutes of the day
CAP = 3  # pushes per user-local calendar day


# -- the stream ------------------------------------------------------------------------------------
def stream() -> list[dict]:
    """The events in stream (= event time) order, as plain dicts the oracle reads."""
    events: list[dict] = []

    def add(user, name, at, *, marketing=True, tz="UTC"):
        events.append({"id": f"{user}-{len(events):03d}", "user": user, "name": name, "ts": at,
                       "marketing": marketing, "tz": tz})

    def views(user, start, n=3, **kw):
        for i in range(n):
            add(user, "page_view", start + i * MIN, **kw)

    # The ticker does something no rule reads every 30 minutes: stream time moves on.
    for i in range(0, 30 * 2 + 1):
        add("ticker", "search", T0 + i * 30 * MIN)
    add("u_checkout", "add_to_cart", T0 + 5 * MIN)
    add("u_checkout", "checkout_started", T0 + 34 * MIN)  # +29 min: no coupon
    add("u_abandon", "add_to_cart", T0 + 10 * MIN)  # then silent: coupon at +30 min
    views("u_refused", T0 + 1 * MIN, marketing=False)  # marketing refused
    add("u_refused", "add_to_cart", T0 + 6 * MIN, marketing=False)
    views("u_unasked", T0 + 2 * MIN, marketing=None)  # no consent given (opt-in)
    views("u_browse", T0 + 20 * MIN, n=4)  # the third view of the session fires, once
    for s in range(4):  # four sessions in a day: the fourth push is over the cap
        views("u_capped", T0 + (1 + s) * HOUR)
    views("u_capped", T0 + 24 * HOUR)  # the next calendar day: pushes again
    add("u_order", "order_completed", T0 + 30 * MIN)  # cross-sell 24 h later
    # 11:00 UTC is 03:00 in Los Angeles: the cross-sell 24 h later waits for 07:00 local
    add("u_order_la", "order_completed", T0 + 1 * HOUR, tz="America/Los_Angeles")
    add("u_pending", "add_to_cart", END - 10 * MIN)  # its timer is still pending at the end
    events.sort(key=lambda e: e["ts"])  # stable: the order above within one instant
    return events


def record(e: dict, n: int) -> bytes:
    """Segment-style JSON: pages as type page, the rest as track; ISO and epoch-ms times."""
    # every user here agreed to profiling (opt-in by default); marketing is the scenario's
    ctx: dict = {"timezone": e["tz"], "channel": "app", "consent": {"profiling": True}}
    if e["marketing"] is not None:
        ctx["consent"]["marketing"] = e["marketing"]
    doc = {"event_id": e["id"], "user_id": e["user"], "context": ctx}
    if e["name"] == "page_view":
        doc.update(type="page", properties={"page": f"/p/{n % 5}"})
    else:
        doc.update(type="track", event=e["name"], properties={"sku": "sku-1"})
    doc["timestamp"] = (e["ts"] if n % 2 else
                        dt.datetime.fromtimestamp(e["ts"] / 1000, dt.timezone.utc).isoformat())
    return orjson.dumps(doc)


# -- the oracle ------------------------------------------------------------------------------------
def action_id(rule: str, user: str, trigger: str, step: int = 0) -> str:
    """The documented idempotency key: blake2b-96 of (rule, user, trigger, step)."""
    return hashlib.blake2b("\x1f".join((rule, user, trigger, str(step))).encode(),
                           digest_size=12).hexdigest()


def oracle(events: list[dict], now: int):
    """(actions {action_id: (rule, user, ts)}, audit {(rule, user, action_id, decision, ts)})
    for these rules, up to stream time ``now``. Written for this stream: one cart per user."""
    by_user: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_user[e["user"]].append(e)
    fires = []  # (due, rule, user, trigger)
    for user, evs in by_user.items():
        for e in evs:
            if e["name"] == "add_to_cart":
                due = e["ts"] + 30 * MIN
                if not any(x["name"] == "checkout_started" and e["ts"] <= x["ts"] < due
                           for x in evs):
                    fires.append((due, "abandoned_cart", user, f"t{due}"))
            if e["name"] == "order_completed":
                due = e["ts"] + 24 * HOUR
                fires.append((due, "order_cross_sell", user, f"t{due}"))
        last, views = None, 0
        for e in evs:  # sessions: a gap over 30 min starts a new one
            if last is not None and e["ts"] - last > 30 * MIN:
                views = 0
            last = e["ts"]
            if e["name"] == "page_view":
                views += 1
                if views == 3:
                    fires.append((e["ts"], "session_views", user, e["id"]))
    actions, audit = {}, set()
    sent_days: dict[str, list] = defaultdict(list)
    queue = sorted(f for f in fires if f[0] <= now)
    while queue:
        ts, rule, user, trigger = queue.pop(0)
        aid = action_id(rule, user, trigger)
        who = by_user[user]
        if who[-1]["marketing"] is not True:
            audit.add((rule, user, aid, "no_consent", ts))
            continue
        local = dt.datetime.fromtimestamp(ts / 1000, ZoneInfo(who[-1]["tz"]))
        minute = local.hour * 60 + local.minute
        if minute >= QUIET[0] or minute < QUIET[1]:
            day = local.date() + dt.timedelta(days=minute >= QUIET[0])
            release = dt.datetime(day.year, day.month, day.day, QUIET[1] // 60, QUIET[1] % 60,
                                  tzinfo=local.tzinfo)
            audit.add((rule, user, aid, "deferred", ts))
            queue.append((int(release.timestamp() * 1000), rule, user, trigger))
            queue.sort()
            continue
        if sent_days[user].count(local.date()) >= CAP:
            audit.add((rule, user, aid, "capped", ts))
            continue
        sent_days[user].append(local.date())
        actions[aid] = (rule, user, ts)
        audit.add((rule, user, aid, "sent", ts))
    return actions, audit


# The scenario, by hand: what the oracle must find in this stream.
EXPECTED = {
    ("abandoned_cart", "u_abandon", T0 + 40 * MIN),
    ("session_views", "u_browse", T0 + 22 * MIN),
    ("session_views", "u_capped", T0 + 1 * HOUR + 2 * MIN),
    ("session_views", "u_capped", T0 + 2 * HOUR + 2 * MIN),
    ("session_views", "u_capped", T0 + 3 * HOUR + 2 * MIN),
    ("session_views", "u_capped", T0 + 24 * HOUR + 2 * MIN),
    ("order_cross_sell", "u_order", T0 + 24 * HOUR + 30 * MIN),
    ("order_cross_sell", "u_order_la", T0 + 29 * HOUR),  # 07:00 in Los Angeles
}
NOT_SENT = {  # (rule, user, decision)
    ("session_views", "u_refused", "no_consent"),
    ("abandoned_cart", "u_refused", "no_consent"),
    ("session_views", "u_unasked", "no_consent"),
    ("session_views", "u_capped", "capped"),
    ("order_cross_sell", "u_order_la", "deferred"),
}


# -- running the flow ------------------------------------------------------------------------------
def stop_when_delivered(bootstrap: str, topic: str, want: int, done: threading.Event,
                        deadline_s: float = 60.0, settle_s: float = 1.5) -> None:
    """Watches the actions topic and the webhook; once ``want`` actions reached both (and a
    moment passed for any extra to show), or at the deadline, stops the live flow gracefully."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"watch-{topic}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    seen, start, reached = 0, time.monotonic(), None
    try:
        while not done.is_set() and time.monotonic() - start < deadline_s:
            seen += sum(m.error() is None for m in c.consume(100, timeout=0.2))
            if reached is None and seen >= want and len(Receiver.received) >= want:
                reached = time.monotonic()
            if reached is not None and time.monotonic() - reached >= settle_s:
                break
    finally:
        c.close()
        STOP.set()


def test_trigger_rules_on_kafka_live_flow(kafka, redis_url, chdb_dsn, chdb_client, ch_database,
                                         tmp_path):
    events = stream()
    records = [record(e, n) for n, e in enumerate(events)]
    assert max(e["ts"] for e in events) == END

    # The oracle, checked against the scenario written by hand.
    watermark = END - LATENESS_MS  # the live flow's "now" once it read everything
    want_actions, want_audit = oracle(events, watermark)
    assert set(want_actions.values()) == EXPECTED
    assert {(r, u, d) for r, u, _, d, _ in want_audit if d != "sent"} == NOT_SENT
    assert {(r, u, ts) for r, u, _, d, ts in want_audit if d == "sent"} == EXPECTED

    rules = tmp_path / "trigger_rules.yaml"
    rules.write_text(yaml.safe_dump(RULES, sort_keys=False))
    run_id = uuid.uuid4().hex[:8]
    topic = kafka.create_topic(f"trig-in-{run_id}")
    outs = {k: kafka.create_topic(f"trig-{k}-{run_id}") for k in ("dead", "actions", "alerts")}
    assert produce([kafka.bootstrap], topic, ((e["user"].encode(), r)
                                              for e, r in zip(events, records))) == len(records)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Receiver.received = []
    settings = load_settings(
        None, env={}, source__kind="kafka", output__kind="kafka",
        kafka__brokers=[kafka.bootstrap], kafka__events_topic=topic, kafka__tail=True,
        kafka__dead_letter_topic=outs["dead"], kafka__actions_topic=outs["actions"],
        kafka__alerts_topic=outs["alerts"], redis__url=redis_url, redis__key_prefix=f"tk{run_id}",
        clickhouse__dsn=chdb_dsn, clickhouse__database=ch_database, clickhouse__raw_events=False,
        clickhouse__spool_dir=str(tmp_path / "spool"), flow__max_lookback_s=None,
        flow__recovery_dir=None, flow__allowed_lateness_s=LATENESS_MS / 1000,
        trigger__rules=str(rules),
        trigger__webhook__url=f"http://127.0.0.1:{server.server_port}/hooks/actions")
    done = threading.Event()
    watcher = threading.Thread(target=stop_when_delivered, daemon=True,
                               args=(kafka.bootstrap, outs["actions"], len(want_actions), done))
    started = time.monotonic()
    try:
        watcher.start()
        run(settings, redis_url)
    finally:
        done.set()
        watcher.join(10)
        STOP.clear()
        server.shutdown()
    took = time.monotonic() - started

    # Nothing was dead-lettered: no event was late or malformed.
    assert consume_all(kafka.bootstrap, outs["dead"]) == []

    # The actions topic: exactly the expected actions, each once, with the expected ids.
    actions = [json.loads(m.value()) for m in consume_all(kafka.bootstrap, outs["actions"])]
    got = {a["action_id"]: (a["rule"], a["user_id"], a["event_ts_ms"]) for a in actions}
    assert len(got) == len(actions), "an action id appears twice on the topic"
    assert got == want_actions, (sorted(got.values()), sorted(want_actions.values()))
    assert all(a["channel"] == "push" and a["step"] == 0 for a in actions)
    print(f"live flow: {len(actions)} actions in {took:.1f} s")

    # The webhook got the same actions, once each, keyed by their action id.
    keys = [k for k, _ in Receiver.received]
    assert sorted(keys) == sorted(got) and len(set(keys)) == len(keys)
    assert all(k == body["action_id"] for k, body in Receiver.received)
    by_id = {a["action_id"]: a for a in actions}
    assert all(body == by_id[k] for k, body in Receiver.received)

    # ClickHouse: the same actions, and every decision with its reason.
    stored = chdb_client.query(
        f"SELECT action_id, rule, user_id, toUnixTimestamp64Milli(event_time) "
        f"FROM {ch_database}.actions FINAL").result_rows
    assert {r[0]: (r[1], r[2], r[3]) for r in stored} == want_actions and len(stored) == len(got)
    audit = {tuple(r) for r in chdb_client.query(
        f"SELECT rule, user_id, action_id, toString(decision), toUnixTimestamp64Milli(time) "
        f"FROM {ch_database}.trigger_audit FINAL").result_rows}
    assert audit == want_audit, (sorted(audit - want_audit), sorted(want_audit - audit))

    # The simulated clock of `surgeflow triggers test` agrees with the live flow.
    sim = replay(records, rules, until_ms=watermark)
    assert not sim.dead
    assert {a["action_id"]: (a["rule"], a["user_id"], a["event_ts_ms"])
            for a in sim.actions} == got
    assert {(a["rule"], a["user_id"], a["action_id"], a["decision"], a["time_ms"])
            for a in sim.audit} == audit
    assert took < 60
