"""The engine's two keyed stages (without Bytewax) against the independent brute-force reference
(tests/reference_profiles.py), on random streams: several users and anonymous visitors who log
in, duplicates, out-of-order events within the allowed lateness, consent refusals, carts, orders
and weeks of event time (windows decaying, days passing), fed in random batch sizes."""
import orjson
from hypothesis import given, settings, strategies as st

from config.registry import load_registry
from flows.events import decode
from flows.shard import ShardConfig
from tests.engine_harness import Harness
from tests.reference_profiles import expected_profiles

T0 = 1_769_817_600_000  # 2026-01-31T00:00Z: the runs cross a month boundary
NAMES = ["page_view", "product_viewed", "search", "add_to_cart", "remove_from_cart",
         "checkout_started", "order_completed", "login", "push_sent", "push_opened",
         "email_sent", "email_opened", "sms_sent", "sms_clicked", "ad_click", "signup", "mystery"]
WHO = ["u1", "u2", "u:*3", "anon-a", "anon-b"]

step = st.tuples(
    st.sampled_from(WHO), st.sampled_from(NAMES),
    st.integers(0, 3 * 86_400_000),  # gap after the previous event (ms)
    st.integers(0, 50_000),  # disorder: event time moved back, within the lateness
    st.floats(0, 300).map(lambda x: round(x, 2)), st.integers(1, 3),
    st.sampled_from(["", "c1", "c2"]), st.booleans(),  # duplicate
    st.sampled_from([None, None, None, "anon-a", "anon-b"]),  # anonymous id sent with a user id
)


def records(steps, refuse):
    t, out = T0, []
    for i, (who, name, gap, back, price, qty, camp, dup, anon) in enumerate(steps):
        t += gap
        doc = {"event_id": f"e{i}", "type": "track", "event": name, "timestamp": t - back,
               "properties": {"price": price, "quantity": qty, "revenue": price,
                              **({"campaign_id": camp} if camp else {})},
               "context": {"channel": "web"}}
        if who.startswith("anon"):
            doc["anonymous_id"] = who
        else:
            doc["user_id"] = who
            if anon:
                doc["anonymous_id"] = anon
        if who == refuse:
            doc["context"]["consent"] = {"profiling": False}
        raw = orjson.dumps(doc)
        out.append(raw)
        if dup:
            out.append(raw)
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(step, min_size=1, max_size=60), st.integers(1, 15),
       st.sampled_from([None, "u2", "anon-b"]), st.integers(0, 40))
def test_engine_equals_the_reference(steps, batch, refuse, idle_days):
    raws = records(steps, refuse)
    h = Harness(ShardConfig(lateness_ms=60_000, ingest_shards=2, profile_shards=3))
    events = [decode(r) for r in raws]
    for i in range(0, len(events), batch):
        h.feed(events[i:i + batch])
        assert_writes_equal_a_full_recompute(h)
    end = max(e.ts_ms for e in events) + idle_days * 86_400_000
    if idle_days:  # time passes with no event of these users: another user's event moves it
        tick = orjson.dumps({"event_id": "tick", "type": "track", "event": "push_sent",
                             "user_id": "clock", "timestamp": end})
        raws.append(tick)
        h.feed([decode(tick)])
    h.finish()
    late = {d.raw and orjson.loads(d.raw)["event_id"] for d in h.dead}
    profiles, aliases = expected_profiles(((0, r) for r in raws), load_registry(), late_ids=late)
    got = {u: h.features(u) for u in h.redis}
    assert got == profiles
    assert h.aliases == aliases
    assert_writes_equal_a_full_recompute(h)


def assert_writes_equal_a_full_recompute(h: Harness) -> None:
    """Writes carry only the fields whose inputs moved (FeaturePlan.delta): what they add up to
    in Redis must be every value computed afresh from the profile's state."""
    stores = [s.store for s in h.ingest] + [s.store for s in h.profiles.values()]
    for store in stores:
        for user, p in store.users.items():
            full, _ = h.plan.values(user, p)
            stored = {k: v for k, v in h.redis[user].items() if k != "p_purchase_24h"}
            assert stored == full, user
