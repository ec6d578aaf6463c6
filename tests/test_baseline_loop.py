"""bench/baseline_loop.py on a real broker and Redis: its per-user window counts against a recount
made here from the same synthetic events (a plain loop, none of the baseline's code)."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

import orjson

from bench.baseline_loop import run_baseline
from connectors import kafka as kafka_io
from connectors.synthetic import SyntheticSpec, generate

SPEC = SyntheticSpec(seed=11, users=25, events_per_s=0.05, duration_s=5 * 3600)
# Records the baseline must skip without stopping: none of them counts, none makes a user.
BAD = [
    (None, b"{not json"),
    (None, b"[1, 2, 3]"),
    (None, b'{"event_id":"x1","type":"track","event":"page_view","timestamp":1795392000000}'),
    (b"u00001", b'{"event_id":"x2","event":"page_view","user_id":"u00001","timestamp":"yesterday"}'),
    (b"u00001", b'{"event_id":"x3","event":"page_view","user_id":"u00001","timestamp":true}'),
    (b"u00001", b'{"event_id":"x4","event":"page_view","user_id":"u00001","timestamp":99999999999999999}'),
]


def recount(records) -> dict[str, dict]:
    """Expected hash of every user, from the generator's own event times."""
    events = defaultdict(list)  # user -> [(ts_ms, name, revenue Decimal)]
    for r in records:
        doc = orjson.loads(r.value)
        user = doc["user_id"] if doc.get("user_id") is not None else doc["anonymous_id"]
        kind = doc.get("type", "track")
        name = doc.get("event") if kind == "track" else ("page_view" if kind == "page" else kind)
        revenue = Decimal(str(doc["properties"]["revenue"])) if name == "order_completed" else Decimal(0)
        events[user].append((r.ts_ms, name, revenue))
    expected = {}
    for user, evs in events.items():
        as_of = max(ts for ts, _, _ in evs)
        now_min = as_of // 60_000
        row = {"as_of": str(as_of)}
        for label, minutes in (("1h", 60), ("24h", 1440)):
            inside = [(n, rev) for ts, n, rev in evs if ts // 60_000 > now_min - minutes]
            row[f"views_{label}"] = str(sum(n in ("page_view", "product_viewed", "screen") for n, _ in inside))
            row[f"add_to_cart_{label}"] = str(sum(n == "add_to_cart" for n, _ in inside))
            row[f"orders_{label}"] = str(sum(n == "order_completed" for n, _ in inside))
            row[f"revenue_{label}"] = f"{sum((rev for _, rev in inside), Decimal(0)):.2f}"
        expected[user] = row
    return expected


def test_baseline_counts_match_a_recount(unique_topic, kafka, redis_client, redis_url):
    records = list(generate(SPEC))
    assert all(r.kind == "ok" for r in records) and 500 < len(records) < 1500
    topic = unique_topic("baseline", partitions=2)
    produced = kafka_io.produce([kafka.bootstrap], topic,
                                [(r.key, r.value) for r in records] + BAD)
    assert produced == len(records) + len(BAD)

    res = run_baseline(kafka.bootstrap, topic, redis_url, batch_size=64, prefix="bl-test")

    expected = recount(records)
    assert res["events"] == produced
    assert res["skipped"] == len(BAD)
    assert res["users"] == len(expected)
    assert res["batches"] > 2 and res["cpu_s"] > 0 and res["events_per_s"] > 0
    keys = {k.decode() for k in redis_client.scan_iter("bl-test:user:*", count=1000)}
    assert keys == {f"bl-test:user:{u}" for u in expected}
    for user, want in expected.items():
        got = {k.decode(): v.decode() for k, v in redis_client.hgetall(f"bl-test:user:{user}").items()}
        assert got == want, user
    # the data exercises what is checked: windows that differ, orders with revenue, anonymous users
    assert any(w["views_1h"] != w["views_24h"] for w in expected.values())
    assert sum(int(w["orders_24h"]) for w in expected.values()) >= 3
    assert any(Decimal(w["revenue_1h"]) > 0 for w in expected.values())
    assert any(u.startswith("anon-") for u in expected)
