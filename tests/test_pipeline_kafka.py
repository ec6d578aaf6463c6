"""End to end on real services: a seeded synthetic stream (with malformed, duplicate and
out-of-order records and a traffic spike) goes through Kafka, the dataflow, Redis, ClickHouse and
the output topics; everything is checked against a reference computed here from the same
records with plain json, not with the project's decoder or state classes."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from config.registry import load_registry
from config.settings import load_settings
from connectors.kafka import produce
from connectors.synthetic import Anomaly, SyntheticSpec, generate
from flows.runner import run
from surgeflow.stats import STATS
from tests.engine_harness import PAGES_ONLY
from tests.reference_profiles import expected_profiles
from tests.dead_letters import raw_of

START_MS = 1_795_392_000_000  # 2026-11-23T00:00Z
SPEC = SyntheticSpec(
    seed=11, users=400, start_ms=START_MS, events_per_s=4.0, duration_s=5400.0,
    malformed_share=0.01, duplicate_share=0.02, max_disorder_ms=3000,
    anomalies=(Anomaly("traffic_spike", 3600, 600, 8.0),),
)
SESSION_VIEWS = {"page_view", "product_viewed", "screen"}
VOLATILE = {"updated_at"}  # the wall-clock write time
# The online models' scores and versions: not in the reference computed from the raw records (the
# models are checked on their own, tests/test_model_*.py); they must still be the same with 1 and
# 2 workers (below).
MODEL_FIELDS = {"p_purchase_24h", "p_purchase_24h_version", "p_click_30m", "p_click_30m_version",
                "p_churn_30d", "p_churn_30d_version"}


def consume_all(bootstrap: str, topic: str) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{topic}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    meta = c.list_topics(topic, timeout=10).topics[topic]
    parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
    ends = {p.partition: c.get_watermark_offsets(p, timeout=10)[1] for p in parts}
    c.assign(parts)
    out, seen = [], Counter()
    while sum(seen.values()) < sum(ends.values()):
        for m in c.consume(1000, timeout=2):
            assert m.error() is None, m.error()
            out.append(m)
            seen[m.partition()] += 1
    c.close()
    return out


def reference(messages) -> dict:
    """Expected results from the raw messages as read back from Kafka (partition, key, value)."""
    kinds = {r.value: r.kind for r in generate(SPEC)}
    dead, seen_ids = Counter(), set()
    events_by_user = defaultdict(list)
    part_max: dict[int, int] = {}
    for m in messages:
        kind = kinds[m.value()]
        if kind.startswith("malformed:"):
            dead[kind.split(":", 1)[1]] += 1
            continue
        doc = json.loads(m.value())
        ts = doc["timestamp"]
        if isinstance(ts, str):
            import datetime as dt
            ts = int(dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
        part_max[m.partition()] = max(part_max.get(m.partition(), 0), ts)
        if doc["event_id"] in seen_ids:
            continue
        seen_ids.add(doc["event_id"])
        name = doc["event"] if doc.get("type", "track") == "track" else (
            "page_view" if doc["type"] == "page" else doc["type"])
        props, ctx = doc.get("properties") or {}, doc.get("context") or {}
        events_by_user[doc.get("user_id") or doc["anonymous_id"]].append({
            "ts": ts, "name": name, "revenue": float(props.get("revenue") or 0),
            "channel": ctx.get("channel") or "unknown",
            "campaign": props.get("campaign_id") or (ctx.get("campaign") or {}).get("name") or "",
            "profiling": (ctx.get("consent") or {}).get("profiling") is not False,
            "marketing": (ctx.get("consent") or {}).get("marketing"),
        })
    end = min(part_max.values())  # the stream clock at the end of the input
    # Features: the independent brute-force reference (tests/reference_profiles.py).
    features, aliases = expected_profiles(  # under the privacy defaults (settings)
        ((m.partition(), m.value()) for m in messages), load_registry(),
        link_events={"login", "signup", "identify"}, profiling="opt_in", max_users_per_anonymous=3)
    linked = set(aliases.values()) | set(aliases)
    actions, minutes = set(), defaultdict(lambda: [0, set(), 0.0])
    for user, evs in events_by_user.items():
        times = []  # the third view of an event-time session (30-min gap), as events arrive
        marketing = None  # the rule file is opt-out: only a refusal stops the action
        for e in evs:
            key = (e["ts"] // 60000 * 60000, e["channel"], e["campaign"], e["name"])
            minutes[key][0] += 1
            if e["profiling"]:
                minutes[key][1].add(user)
            minutes[key][2] += e["revenue"]
            if not e["profiling"]:
                continue  # no profile, no session, no action without profiling consent
            if e["marketing"] is not None:
                marketing = e["marketing"]  # (a synthetic user's consent never changes)
            times.append((e["ts"], e["name"] in SESSION_VIEWS))
            times.sort()
            i = len(times) - 1
            while i > 0 and times[i][0] - times[i - 1][0] <= 30 * 60_000:
                i -= 1
            session = times[i:]
            if (e["name"] in SESSION_VIEWS and session[0][0] <= e["ts"]
                    and sum(v for _, v in session) == 3 and user not in linked
                    and marketing is not False):
                actions.add((user, e["ts"]))
    return {"dead": dead, "features": features, "aliases": aliases, "actions": actions,
            "linked": linked, "end": end,
            "minutes": {k: (n, len(u), round(r, 2)) for k, (n, u, r) in minutes.items()}}


@pytest.fixture(scope="module")
def stream(kafka):
    topic = kafka.create_topic("events-e2e", partitions=2)
    produce([kafka.bootstrap], topic, ((r.key, r.value, r.sent_ms) for r in generate(SPEC)))
    messages = consume_all(kafka.bootstrap, topic)
    return topic, reference(messages)


def run_flow(kafka, topic, redis_url, prefix, dsn, database, workers):
    outs = {name: kafka.create_topic(f"{name}-{prefix}") for name in ("dead", "actions", "alerts")}
    settings = load_settings(
        None, env={}, source__kind="kafka", output__kind="kafka",
        kafka__brokers=[kafka.bootstrap], kafka__events_topic=topic, kafka__tail=False,
        kafka__dead_letter_topic=outs["dead"], kafka__actions_topic=outs["actions"],
        kafka__alerts_topic=outs["alerts"], redis__url=redis_url, redis__key_prefix=prefix,
        clickhouse__dsn=dsn, clickhouse__database=database, flow__shards=8,
        flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None, flow__allowed_lateness_s=60,
        trigger__rules=PAGES_ONLY)  # the oracle below knows this one rule
    STATS.reset()
    run(settings, redis_url, workers=workers)
    return settings, outs


def redis_features(redis_url, prefix) -> dict[str, dict[str, str]]:
    """Every hash, users' and anonymous visitors' (their ids never collide in this stream)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    out = {}
    for kind in ("user", "anon"):
        head = f"{prefix}:v2:{kind}:"
        for key in client.scan_iter(match=head + "*", count=1000):
            assert key[len(head):] not in out
            out[key[len(head):]] = client.hgetall(key)
            assert 0 < client.ttl(key) <= 90 * 86400
    return out


def minute_rows(client, database) -> dict:
    rows = client.query(
        f"SELECT toUnixTimestamp(ts) * 1000, channel, campaign, event_name, sum(events), "
        f"uniqExactMerge(users), round(sum(revenue), 2) FROM {database}.events_minute FINAL "
        f"GROUP BY ts, channel, campaign, event_name").result_rows
    return {(m, c, k, e): (n, u, r) for m, c, k, e, n, u, r in rows}


def test_kafka_to_redis_clickhouse_actions_alerts(kafka, stream, redis_url, chdb_dsn, chdb_client,
                                                 ch_database):
    topic, ref = stream
    # The stream is big enough to mean something.
    assert len(ref["features"]) > 300 and len(ref["actions"]) > 100 and len(ref["minutes"]) > 2000
    assert sum(ref["dead"].values()) > 100 and len(ref["dead"]) >= 10
    settings, outs = run_flow(kafka, topic, redis_url, "e2e1", chdb_dsn, ch_database, 1)

    # Dead letters: every malformed record, with its reason and original bytes; nothing else.
    dead = [json.loads(m.value()) for m in consume_all(kafka.bootstrap, outs["dead"])]
    assert Counter(d["reason"] for d in dead) == ref["dead"]
    assert all(raw_of(d) for d in dead if d["reason"] != "oversized") and len(dead) > 20

    # Features: exact (every field, as text), per profile, as of the end of the input; visitors
    # who logged in are merged into their user and leave an alias; no profile without consent.
    got = redis_features(redis_url, "e2e1")
    assert set(got) == set(ref["features"])
    for user, expected in ref["features"].items():
        actual = {k: v for k, v in got[user].items() if k not in VOLATILE | MODEL_FIELDS}
        assert actual == expected, user
        for field in MODEL_FIELDS & set(got[user]):
            value = float(got[user][field])
            assert (0.0 <= value <= 1.0) if not field.endswith("_version") else value == int(value)
    scored = [u for u in got if "p_purchase_24h" in got[u]]
    assert len(scored) > 50 and all(got[u]["p_purchase_24h_version"] for u in scored)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert len(ref["aliases"]) > 10
    assert {a: client.get(f"e2e1:v2:alias:{a}") for a in ref["aliases"]} == ref["aliases"]

    # Minute aggregates in ClickHouse, duplicates not double-counted, unique users merged.
    assert minute_rows(chdb_client, ch_database) == ref["minutes"]

    # Actions: the third page view of each session, once, on the actions topic and in ClickHouse.
    # (Profiles touched by a login are left out of the exact check: when a visitor's session
    # merges into the user's depends on how the two keys' partitions interleave.)
    actions = [json.loads(m.value()) for m in consume_all(kafka.bootstrap, outs["actions"])]
    assert {(a["user_id"], a["event_ts_ms"]) for a in actions
            if a["user_id"] not in ref["linked"]} == ref["actions"]
    assert len({a["action_id"] for a in actions}) == len(actions)
    assert chdb_client.command(f"SELECT count() FROM {ch_database}.actions FINAL") == len(actions)

    # The traffic spike fires the traffic rule on the overall series, inside its window.
    alerts = [json.loads(m.value()) for m in consume_all(kafka.bootstrap, outs["alerts"])]
    firing = [a for a in alerts if a["status"] == "firing" and a["rule"] == "traffic_anomaly"]
    spike_start, spike_end = START_MS + 3600_000, START_MS + 4200_000
    print(f"users {len(got)} actions {len(actions)} alerts {len(alerts)} dead {len(dead)}")
    assert firing and all(spike_start <= a["first_seen_ms"] < spike_end for a in firing)
    assert {"mu", "sigma", "k", "z", "window", "severity", "response"} <= set(firing[0])
    assert chdb_client.command(f"SELECT count() FROM {ch_database}.alerts FINAL") == len(alerts)
    # each message says which baseline it crossed, on the topic and in ClickHouse alike
    assert firing[0]["baseline"] in ("level", "time of day", "shift from level",
                                     "shift from time of day"), firing[0]["baseline"]
    stored = dict(chdb_client.query(f"SELECT alert_id, baseline FROM {ch_database}.alerts FINAL "
                                    "WHERE status = 'firing'").result_rows)
    assert all(stored[a["alert_id"]] == a["baseline"] for a in alerts if a["status"] == "firing")
    assert all(a["baseline"] == "static threshold" for a in alerts if a["mu"] is not None
               and a["sigma"] is None)


def test_same_results_with_one_and_two_workers(kafka, stream, redis_url, chdb_dsn, chdb_client):
    topic, _ = stream
    results = []
    for workers in (1, 2):
        database = f"w{workers}_{topic.replace('-', '_')}"[:60]
        chdb_client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        prefix = f"w{workers}"
        _, outs = run_flow(kafka, topic, redis_url, prefix, chdb_dsn, database, workers)
        feats = {u: {k: v for k, v in f.items() if k not in VOLATILE}
                 for u, f in redis_features(redis_url, prefix).items()}
        # Minute rules judge complete minutes in order: the same alerts whatever the workers.
        # (Entity rules fire at the first crossing event seen, which depends on how partitions
        # interleave.)
        alerts = sorted(tuple(sorted(json.loads(m.value()).items()))
                        for m in consume_all(kafka.bootstrap, outs["alerts"])
                        if json.loads(m.value())["area"] in ("ops", "market", "ads"))
        results.append((feats, minute_rows(chdb_client, database), alerts))
    a, b = results[0][1], results[1][1]
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert not diff, f"minute rows differ (1 worker, 2 workers): {sorted(diff.items())[:20]}"
    fa, fb = results[0][0], results[1][0]
    fdiff = {u: (fa.get(u), fb.get(u)) for u in set(fa) | set(fb) if fa.get(u) != fb.get(u)}
    brief = {u: ({k: v for k, v in (x or {}).items() if (y or {}).get(k) != v},
                 {k: v for k, v in (y or {}).items() if (x or {}).get(k) != v})
             for u, (x, y) in fdiff.items()}
    assert not fdiff, f"features differ (1 worker, 2 workers): {len(fdiff)} {sorted(brief.items())[:4]}"
    assert results[0][0] and results[0][2] and results[0] == results[1]
