"""The synthetic traffic generator: determinism, decoder agreement, ordering, realism, anomalies."""
from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.synthetic import (
    CHANNELS,
    DUPLICATE_WINDOW_MS,
    MALFORMED_REASONS,
    Anomaly,
    SyntheticRecord,
    SyntheticSpec,
    campaign_ids,
    expected_records,
    generate,
    rhythm,
)
from flows.events import DeadLetter, Event, decode

HOUR_MS = 3_600_000
VIEWS = ("page_view", "product_viewed")


def decoded(recs):
    return [decode(r.value, key=r.key) for r in recs]


@pytest.fixture(scope="module")
def hour():
    """The default spec: one hour at 50 events/s, with its generation time."""
    spec = SyntheticSpec()
    t0 = time.process_time()
    recs = list(generate(spec))
    cpu = time.process_time() - t0
    return spec, recs, cpu


@pytest.fixture(scope="module")
def hour_events(hour):
    """The first 20 minutes of the hour, decoded (decoding all of it would double the runtime)."""
    spec, recs, _ = hour
    events = decoded(r for r in recs if r.ts_ms < spec.start_ms + 1_200_000)
    assert len(events) > 40_000 and all(isinstance(e, Event) for e in events)
    return events


MIXED = SyntheticSpec(
    seed=11,
    events_per_s=30,
    duration_s=600,
    malformed_share=0.05,
    duplicate_share=0.04,
    max_disorder_ms=2_000,
    anomalies=(Anomaly("click_fraud", 120, 60), Anomaly("request_flood", 300, 10)),
)


@pytest.fixture(scope="module")
def mixed():
    return list(generate(MIXED))


# ---- determinism


def test_same_spec_gives_identical_stream_and_seed_changes_it(mixed):
    assert list(generate(MIXED)) == mixed
    other = list(generate(dataclasses.replace(MIXED, seed=12)))
    assert other != mixed
    assert [r.value for r in other[:50]] != [r.value for r in mixed[:50]]
    assert all(isinstance(r, SyntheticRecord) for r in mixed)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mixed[0].kind = "x"


def test_generate_is_lazy_and_endless_when_asked():
    head = list(itertools.islice(generate(SyntheticSpec(duration_s=None, events_per_s=200)), 2_000))
    assert len(head) == 2_000
    assert head[-1].ts_ms > head[0].ts_ms


@pytest.mark.parametrize(
    "bad",
    [
        dict(users=0),
        dict(events_per_s=0),
        dict(malformed_share=0.6, duplicate_share=0.5),
        dict(max_disorder_ms=-1),
        dict(anonymous_share=1.5),
        dict(anomalies=(Anomaly("meteor", 0, 10),)),
        dict(campaigns=0, anomalies=(Anomaly("click_fraud", 0, 10),)),
    ],
)
def test_invalid_specs_are_refused(bad):
    with pytest.raises(ValueError):
        generate(SyntheticSpec(**bad))


# ---- agreement with the decoder


def test_every_record_decodes_as_its_kind_says(mixed):
    seen = collections.Counter()
    for rec, out in zip(mixed, decoded(mixed)):
        if rec.kind in ("ok", "duplicate"):
            assert isinstance(out, Event), (rec.kind, out.reason, rec.value[:200])
            assert rec.key == out.user.encode()
            assert rec.ts_ms == out.ts_ms
        else:
            prefix, reason = rec.kind.split(":", 1)
            assert prefix == "malformed"
            assert isinstance(out, DeadLetter), rec.value[:200]
            assert out.reason == reason, (reason, out.detail, rec.value[:200])
        seen[rec.kind] += 1
    assert {f"malformed:{r}" for r in MALFORMED_REASONS} <= set(seen)
    total = len(mixed)
    malformed = sum(v for k, v in seen.items() if k.startswith("malformed:"))
    assert abs(malformed / total - MIXED.malformed_share) < 0.015
    assert abs(seen["duplicate"] / total - MIXED.duplicate_share) < 0.015


def test_malformed_records_are_the_hostile_kinds_described(mixed):
    by_reason = collections.defaultdict(list)
    for r in mixed:
        if r.kind.startswith("malformed:"):
            by_reason[r.kind[10:]].append(r.value)
    assert all(len(v) > 32_768 for v in by_reason["oversized"])
    assert all(b"\xff\xfe" in v for v in by_reason["not_utf8"])
    assert all(v.startswith(b"{") for v in by_reason["invalid_json"])
    revenue_strings = [orjson.loads(v)["properties"].get("revenue") for v in by_reason["bad_field"]]
    assert "12.5" in revenue_strings
    ids = [orjson.loads(v)["user_id"] for v in by_reason["bad_id"]]
    assert any(len(i) == 300 for i in ids) and any("\n" in i or "\x00" in i for i in ids)


def test_hostile_but_valid_user_ids_decode_ok(hour):
    _, recs, _ = hour
    hostile = {r.key for r in recs if r.kind == "ok" and any(c in r.key for c in b"*:{'")}
    assert any(b"DROP TABLE" in k for k in hostile)
    assert {b"*", b":", b"{"} <= {bytes([c]) for k in hostile for c in k}
    for r in recs:
        if r.key in hostile:
            ev = decode(r.value, key=r.key)
            assert isinstance(ev, Event) and ev.user.encode() == r.key and len(ev.user) <= 128
            break


# ---- ordering, ids, duplicates


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), disorder=st.sampled_from([0, 0, 250, 1_000, 5_000, 30_000]),
       dup=st.sampled_from([0.0, 0.05]))
def test_timestamps_are_ordered_within_the_disorder_bound(seed, disorder, dup):
    spec = SyntheticSpec(seed=seed, events_per_s=20, duration_s=120, max_disorder_ms=disorder,
                         duplicate_share=dup, malformed_share=0.02)
    high = spec.start_ms
    lag_seen = 0
    for r in generate(spec):
        if r.kind == "duplicate":
            assert r.ts_ms >= high - disorder - DUPLICATE_WINDOW_MS
            continue
        assert r.ts_ms >= high - disorder, (r.ts_ms, high, disorder)
        lag_seen = max(lag_seen, high - r.ts_ms)
        high = max(high, r.ts_ms)
        # late events from before the start (the simulation warms up) lag by the bound at most
        assert spec.start_ms - disorder <= r.ts_ms < spec.start_ms + 120_000
    if disorder >= 5_000:
        assert lag_seen > 0  # out-of-order delivery actually happens


def test_event_ids_unique_among_ok_records(hour_events, mixed):
    ids = [e.event_id for e in hour_events]
    assert len(ids) == len(set(ids))
    ok_ids = [orjson.loads(r.value)["event_id"] for r in mixed if r.kind == "ok"]
    assert len(ok_ids) == len(set(ok_ids))


def test_duplicates_resend_a_recent_ok_record(mixed):
    first_seen: dict[bytes, int] = {}
    newest = 0
    dups = 0
    for i, r in enumerate(mixed):
        if r.kind == "ok":
            first_seen.setdefault(r.value, i)
            newest = max(newest, r.ts_ms)
        elif r.kind == "duplicate":
            dups += 1
            assert r.value in first_seen, "a duplicate must repeat an earlier ok record"
            orig = mixed[first_seen[r.value]]
            assert (orig.key, orig.ts_ms, orig.anomaly) == (r.key, r.ts_ms, r.anomaly)
            assert newest - r.ts_ms <= MIXED.max_disorder_ms + DUPLICATE_WINDOW_MS
    assert dups > 100


# ---- realism


def test_volume_matches_the_rate_and_rhythm(hour):
    spec, recs, _ = hour
    expected = expected_records(spec)  # 50/s x the rhythm between 00:00 and 01:00 UTC
    assert abs(len(recs) - expected) <= 0.25 * expected
    assert abs(len(recs) - 180_000) <= 0.25 * 180_000  # the nominal 50/s x 3600 s
    assert recs[0].ts_ms >= spec.start_ms and recs[-1].ts_ms < spec.start_ms + HOUR_MS


def test_funnel_drops_at_each_step(hour_events):
    names = collections.Counter(e.name for e in hour_events)
    views = names["page_view"] + names["product_viewed"]
    assert views > names["add_to_cart"] > names["checkout_started"] > names["order_completed"] > 100
    assert 0.3 < names["checkout_started"] / names["add_to_cart"] < 0.6
    assert 0.5 < names["order_completed"] / names["checkout_started"] < 0.95
    orders = [e for e in hour_events if e.name == "order_completed"]
    assert all(e.revenue > 0 and e.properties["order_id"] and e.properties["currency"] for e in orders)
    assert len({e.properties["order_id"] for e in orders}) == len(orders)
    for name in ("search", "remove_from_cart", "payment_failed", "login", "login_failed", "signup",
                 "identify", "share", "favorite", "coupon_claimed", "coupon_redeemed", "feedback",
                 "ad_impression", "ad_click", "push_sent", "push_opened", "sms_sent", "sms_clicked",
                 "email_sent", "email_opened", "wishlist_shared"):
        assert names[name] > 0, name
    assert names["ad_impression"] > names["ad_click"]
    assert names["push_sent"] > names["push_opened"]
    assert names["email_sent"] > names["email_opened"]


def test_sessions_have_several_views_seconds_apart(hour_events):
    by_user = collections.defaultdict(list)
    for e in hour_events:
        if e.name in VIEWS and e.channel in ("web", "app", "mini_program"):
            by_user[e.user].append(e.ts_ms)
    sessions = []
    for stamps in by_user.values():
        stamps.sort()
        run = 1
        for a, b in zip(stamps, stamps[1:]):
            if b - a > 30 * 60_000:
                sessions.append(run)
                run = 1
            else:
                run += 1
        sessions.append(run)
    assert sum(1 for n in sessions if n >= 3) > 0.3 * len(sessions)
    gaps = [b - a for s in by_user.values() for a, b in zip(s, s[1:]) if b - a < 30 * 60_000]
    gaps.sort()
    assert 1_000 <= gaps[len(gaps) // 2] <= 60_000  # seconds apart


def test_events_carry_segment_fields_and_context(hour, hour_events):
    spec, recs, _ = hour
    docs = [orjson.loads(r.value) for r in recs[:20_000]]
    assert {d["type"] for d in docs} == {"track", "page", "identify"}
    assert any(isinstance(d["timestamp"], int) for d in docs)
    assert any(isinstance(d["timestamp"], str) and d["timestamp"].endswith("Z") for d in docs)
    assert any("user_id" in d and "anonymous_id" in d for d in docs if d["type"] == "identify")
    anonymous = [d for d in docs if "user_id" not in d]
    assert 0.05 < len(anonymous) / len(docs) < 0.5
    device = [d["context"] for d in docs if "ip" in d["context"]]
    for ctx in device[:500]:
        assert set(ctx) >= {"channel", "ip", "user_agent", "device", "geo", "consent", "locale", "timezone"}
        assert set(ctx["device"]) == {"id", "type", "os"} and set(ctx["geo"]) == {"country", "region", "city"}
    refusing = {d.get("user_id") for d in docs if not d["context"]["consent"]["profiling"]}
    everyone = {d.get("user_id") for d in docs}
    assert 0 < len(refusing) < 0.15 * len(everyone)
    assert {e.channel for e in hour_events} == set(CHANNELS)
    assert {e.campaign for e in hour_events if e.campaign} == set(campaign_ids(spec))
    clicks = [d for d in docs if d.get("event") == "ad_click"]
    assert clicks and all(0.2 <= d["properties"]["cost"] <= 2.0 for d in clicks)
    # a session that starts from a click carries UTM and the campaign id
    attributed = [d for d in docs if d.get("event") in VIEWS and "campaign" in d["context"]]
    assert attributed
    for d in attributed:
        assert set(d["context"]["campaign"]) == {"source", "medium", "name", "content", "term"}
        assert d["properties"]["campaign_id"] in campaign_ids(spec)


def test_daily_rhythm_is_visible_over_a_day():
    spec = SyntheticSpec(seed=5, events_per_s=0.5, duration_s=86_400)
    per_hour = collections.Counter((r.ts_ms - spec.start_ms) // HOUR_MS for r in generate(spec))
    assert per_hour[20] > 2 * per_hour[3]  # 20:00-21:00 vs 03:00-04:00 UTC
    assert max(per_hour, key=per_hour.get) in range(17, 23)
    assert min(per_hour, key=per_hour.get) in range(1, 8)
    assert abs(sum(per_hour.values()) - expected_records(spec)) < 0.25 * expected_records(spec)
    assert max(rhythm(h * HOUR_MS) for h in range(24)) / min(rhythm(h * HOUR_MS) for h in range(24)) == pytest.approx(3)


# ---- anomalies


def per_minute(recs, start_ms):
    return collections.Counter((r.ts_ms - start_ms) // 60_000 for r in recs)


def test_traffic_spike_multiplies_the_traffic_in_its_window():
    spec = SyntheticSpec(seed=2, events_per_s=10, duration_s=3_600,
                         anomalies=(Anomaly("traffic_spike", 1_200, 600),))
    recs = list(generate(spec))
    counts = per_minute(recs, spec.start_ms)
    inside = [counts[m] for m in range(20, 30)]
    outside = [counts[m] for m in range(60) if not 20 <= m < 32]
    assert sum(inside) / len(inside) > 2 * sum(outside) / len(outside)
    tagged = [r for r in recs if r.anomaly == "traffic_spike"]
    assert tagged and min(r.ts_ms for r in tagged) >= spec.start_ms + 1_200_000
    assert all(isinstance(e, Event) for e in decoded(tagged[:2_000]))


def test_click_fraud_comes_from_one_ip_with_fresh_ids(mixed):
    fraud = [r for r in mixed if r.anomaly == "click_fraud" and r.kind == "ok"]
    events = decoded(fraud)
    assert all(e.name == "ad_click" for e in events)
    assert len({e.ip for e in events}) == 1 and len({e.campaign for e in events}) == 1
    assert len({e.user for e in events}) == len(events)
    assert all(e.user.startswith("anon-") and e.cost > 0 for e in events)
    # 300 clicks/min for 60 s (less the 5% malformed); duplicates of them are extra
    assert 220 < len(fraud) < 380
    normal_clicks = [e for e in decoded(r for r in mixed if r.anomaly is None and r.kind == "ok")
                     if e.name == "ad_click"]
    assert normal_clicks and events[0].ip not in {e.ip for e in normal_clicks}
    flood = decoded(r for r in mixed if r.anomaly == "request_flood" and r.kind == "ok")
    assert len({e.ip for e in flood}) == 1 and all(e.name == "page_view" for e in flood)
    assert 1_200 < len(flood) < 1_800  # 150/s for 10 s


def test_cvr_drop_lowers_conversion_in_its_window():
    spec = SyntheticSpec(seed=4, events_per_s=20, duration_s=3_600,
                         anomalies=(Anomaly("cvr_drop", 1_200, 1_200),))
    lo, hi = spec.start_ms + 1_200_000, spec.start_ms + 2_400_000
    counts = collections.Counter()
    tagged = 0
    for r in generate(spec):
        tagged += r.anomaly == "cvr_drop"
        if b'"checkout_started"' in r.value or b'"order_completed"' in r.value:
            name = "checkout" if b'"checkout_started"' in r.value else "order"
            counts[name, lo <= r.ts_ms < hi] += 1
    inside = counts["order", True] / counts["checkout", True]
    outside = counts["order", False] / counts["checkout", False]
    assert inside < 0.5 * outside
    assert tagged > 0


# ---- speed


def test_throughput_is_reported(hour, capsys):
    _, recs, cpu = hour
    with capsys.disabled():
        print(f"\n[synthetic] generated {len(recs):,} records in {cpu:.2f} s CPU "
              f"= {len(recs) / cpu:,.0f} records/s")
    assert cpu > 0
