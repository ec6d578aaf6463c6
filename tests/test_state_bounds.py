"""Bounded state under hostile cardinality (issue 12, point 5): the entity rules' keys, the
minute rules' series and the cart, each capped with a deterministic eviction and a counter.

Window counts of the entity rules against brute force (any arrival order, reversed logins in
O(log n)); caps hold for any input; below a cap nothing changes; which entities are kept does
not depend on when the watermark moved; an evicted entity's open alert resolves as if it had
been kept; capped minute series equal a brute-force model of the eviction; the cart keeps the
newest lines whatever the arrival order; memory stays flat once the caps are reached
(200,000 distinct ids and names here, 1,000,000 in bench/bench_state_bounds.py); snapshots from
before the caps resume.
"""
from __future__ import annotations

import functools
import os
import pickle
import random
import subprocess
import sys
import time
import tracemalloc
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from alerts import entities
from alerts.entities import EntityRules, Signal, _Distinct, _Windowed
from alerts.metrics import MinuteSeries, ip_cluster, normal_ip
from alerts.minute_rules import MinuteRules
from alerts.rules import RuleCatalogue, load_rules
from config.registry import load_registry
from features.profile import FeaturePlan
from flows.minutes import CompleteMinute
from surgeflow.stats import STATS
from tests.engine_harness import event

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = load_rules()
ENTITY_RULES = CATALOGUE.entity_rules
MIN = 60_000
LATENESS = 60_000


# -- window counts: the O(log n) structures against brute force ---------------------------------

def distinct_in(events, end, window):
    """Distinct values with a time in (end - window, end]."""
    return len({v for v, t in events if end - window < t <= end})


def best_window(events, ts, window, count):
    """The largest count of a window holding ts (windows end at an event time in [ts, ts + window)),
    and the first end reaching it."""
    best, at = 0, ts
    for end in sorted({t for _, t in events if ts <= t < ts + window}):
        n = count(end)
        if n > best:
            best, at = n, end
    return best, at


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABCDE"), st.integers(0, 400)), min_size=1, max_size=60),
       st.sampled_from([1, 7, 50, 100]), st.booleans())
def test_distinct_values_equal_brute_force_in_any_order(logins, window, reverse):
    if reverse:
        logins = sorted(logins, key=lambda x: -x[1])
    d = _Distinct()
    seen = []
    for value, ts in logins:
        d.add(value, ts, window)
        seen.append((value, ts))
        assert d.peak(ts, window) == best_window(seen, ts, window,
                                                 lambda e: distinct_in(seen, e, window))
    for end in range(-2, 520, 3):
        assert d.count(end, window) == distinct_in(seen, end, window)
    assert d.size() <= 4 * len(seen) + 10 * len(d.cover)
    assert pickle.loads(pickle.dumps(d)).items() == d.items()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from("ABCDEFG"), st.integers(0, 60)),
                min_size=1, max_size=60), st.sampled_from([5, 20, 60]))
def test_distinct_values_after_pruning_equal_brute_force(steps, window):
    """Forgetting what only times at or before ``before`` made changes no window ending at or
    after before + window, where every later query falls (later events are on time)."""
    d = _Distinct()
    seen = []
    now, before = 0, -(10**9)
    for advance, value, jitter in steps:
        now += advance
        if advance == 5:  # the sweep moved: forget up to a window behind "now"
            before = max(before, now - window)
            d.prune(before, window)
        ts = now + jitter
        d.add(value, ts, window)
        seen.append((value, ts))
        assert d.peak(ts, window) == best_window(seen, ts, window,
                                                 lambda e: distinct_in(seen, e, window))
        for end in range(now, now + 2 * window + 61, 4):
            assert d.count(end, window) == distinct_in(seen, end, window)
    assert set(d.cover) >= {v for v, t in seen if t > before}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=80), st.sampled_from([1, 3, 7]),
       st.sampled_from([1, 2, 60]))
def test_bucket_counts_of_wide_windows_equal_brute_force(times, bucket, buckets_per_window):
    window = bucket * buckets_per_window
    c = _Windowed()
    starts = []
    for ts in times:
        b = ts - ts % bucket
        c.add(b, window)
        starts.append(b)

        def total(end):
            return sum(1 for s in starts if end - window < s <= end)
        assert c.peak(b, window) == best_window([(None, s) for s in starts], b, window, total)
    for end in range(0, 700, 5):
        assert c.count(end, window) == sum(1 for s in starts if end - window < s <= end)


def test_reversed_logins_cost_log_n_in_the_users_state():
    """Logins of one user arriving newest first (the worst order for the old structure, cubic
    over the stream): the state holds each country's covered range, not every login."""
    rules = EntityRules([CATALOGUE.rule("user_login_countries")])
    t0 = 1_795_392_000_000
    start = time.perf_counter()
    alerts = []
    for i in range(20_000):  # one a second, newest first, within one day
        alerts += rules.observe(Signal(t0 + 80_000_000 - i * 1000, "login", "victim", "",
                                       ("CN", "US", "DE")[i % 3]))
    elapsed = time.perf_counter() - start
    state = rules.rules[0].entities["victim"]
    assert len(state.cover) == 3 and state.size() <= 3 * 4 + 8
    assert alerts == []  # 3 countries: not more than 3
    assert elapsed < 10  # about 0.3 s here; the old structure took hours at this size


# -- entity rules: caps, eviction, resolve -------------------------------------------------------

IPS = [f"203.0.{i % 4}.{i}" for i in range(24)] + ["2001:db8:1::7", "2001:db8:2::7"]
NAMES = ["page", "page", "ad_click", "ad_click", "login_failed", "login", "order_completed"]


def signal_stream(draw_list):
    """(ts, signal) on time: bases go up, each time up to the lateness after its base."""
    out, base = [], 1_795_392_000_000
    for step, jitter, ip, user, name, country in draw_list:
        base += step
        out.append(Signal(base + jitter, name, f"u{user}", IPS[ip], country, 3, ""))
    return out


STREAM = st.lists(st.tuples(st.sampled_from([0, 0, 5, 300, 20_000, 400_000]),
                            st.integers(0, LATENESS - 1), st.integers(0, len(IPS) - 1),
                            st.integers(0, 12), st.sampled_from(NAMES),
                            st.sampled_from(["CN", "US", "DE", "BR", "JP"])),
                  min_size=1, max_size=120)


def run_entities(signals, cap, tick_every=1):
    rules = EntityRules(ENTITY_RULES, max_entity_keys=cap)
    alerts, top = [], -(2**62)
    for i, s in enumerate(signals):
        alerts += rules.observe(s)
        top = max(top, s.ts_ms)
        if (i + 1) % tick_every == 0:
            alerts += rules.tick(top - LATENESS)
        for r in rules.rules:
            assert len(r.entities) <= cap and len(r.seen) == len(r.entities)
            assert set(r.settled) <= set(r.breached) <= set(r.life.open)
    return rules, alerts, top


@settings(max_examples=80, deadline=None)
@given(STREAM, st.integers(1, 6))
def test_entity_caps_hold_for_any_input(stream, cap):
    run_entities(signal_stream(stream), cap)


@settings(max_examples=60, deadline=None)
@given(STREAM, st.integers(1, 7))
def test_below_the_cap_entity_rules_are_unchanged(stream, tick_every):
    """A cap never exceeded (exactly the entities seen) changes nothing: same alerts, same
    state, as without a cap."""
    signals = signal_stream(stream)
    big, alerts_big, _ = run_entities(signals, 10**9, tick_every)
    seen = max(len({_entity(r, s) for s in signals} - {""}) for r in big.rules)  # most in a rule
    capped, alerts_capped, _ = run_entities(signals, max(seen, 1), tick_every)
    assert alerts_capped == alerts_big
    assert pickle.dumps(capped.rules) == pickle.dumps(big.rules)


def _entity(r, s: Signal) -> str:
    kind = r.metric.entity
    if r.metric.events is not None and s.name not in r.metric.events:
        return ""
    if r.metric.distinct and not getattr(s, r.metric.distinct):
        return ""
    return s.user if kind == "user" else s.ip if kind == "ip" else ip_cluster(s.ip)


@settings(max_examples=60, deadline=None)
@given(STREAM, st.integers(1, 5), st.integers(2, 9))
def test_kept_entities_do_not_depend_on_when_the_watermark_moved(stream, cap, every):
    """The same signals, the watermark moved after every signal or after every few: the same
    live entities are kept (idle ones are only forgotten sooner or later), counting the same."""
    signals = signal_stream(stream)
    a, _, top = run_entities(signals, cap, 1)
    b, _, _ = run_entities(signals, cap, every)
    watermark = top - LATENESS
    a.tick(watermark)
    b.tick(watermark)
    for ra, rb in zip(a.rules, b.rules):
        horizon = watermark - ra.window - ra.bucket
        live_a = {e for e, st_ in ra.entities.items() if st_.last() > horizon}
        live_b = {e for e, st_ in rb.entities.items() if st_.last() > horizon}
        assert live_a == live_b, ra.spec.name
        for e in live_a:
            for end in range(watermark, watermark + ra.window + ra.bucket + 1,
                             max(ra.bucket // 3, 1)):
                assert ra.entities[e].count(end, ra.window) == rb.entities[e].count(end, ra.window)


def test_an_evicted_entitys_open_alert_resolves_as_if_it_had_been_kept():
    """Click fraud from one /24 fires; clicks from other clusters then push it out of a cap of
    3 before the watermark passes its hour: it still resolves at the same event time, with the
    same value, as without the cap, and each eviction is counted."""
    t0 = 1_795_392_000_000
    fraud = [Signal(t0 + i * 2000, "ad_click", "u", "198.51.100.7", "", 1) for i in range(120)]
    others = [Signal(t0 + 70 * MIN + i * 1000, "ad_click", "u", f"10.{i}.0.1", "", 1)
              for i in range(6)]
    outcomes = []
    for cap in (10**9, 3):
        rules = EntityRules([CATALOGUE.rule("ip_cluster_click_fraud")], max_entity_keys=cap)
        before = STATS.labeled("evictions").get("entity_key", 0)
        out = [a for s in fraud + others for a in rules.observe(s)]
        assert ("198.51.100.0/24" in rules.rules[0].entities) == (cap > 3)
        out += rules.tick(t0 + 3 * 3_600_000)
        evicted = STATS.labeled("evictions").get("entity_key", 0) - before
        outcomes.append(([(a.series, a.status, a.at_ms - t0, a.value) for a in out], evicted))
    assert outcomes[0] == ([("ip_cluster=198.51.100.0/24", "firing", 100_000, 51.0),
                            ("ip_cluster=198.51.100.0/24", "resolved", 180_000 + 3_600_000, 0.0)], 0)
    assert outcomes[1] == (outcomes[0][0], 4)


def test_a_lower_cap_after_a_restart_evicts_at_once():
    rules = EntityRules([CATALOGUE.rule("ip_request_flood")])
    for i in range(10):
        rules.observe(Signal(1_000 + i, "page", "u", f"10.0.0.{i}", ""))
    resumed = pickle.loads(pickle.dumps(rules)).retuned([CATALOGUE.rule("ip_request_flood")], 4)
    assert sorted(resumed.rules[0].entities) == [f"10.0.0.{i}" for i in range(6, 10)]


# -- minute series ------------------------------------------------------------------------------

def campaign_minute(minute: int, data: dict[str, tuple[int, int]], pages=()) -> CompleteMinute:
    rows = []
    for campaign, (imps, clicks) in sorted(data.items()):
        if imps:
            rows.append(("ad", campaign, "", "ad_impression", imps, 0.0, 0.0, 0, []))
        if clicks:
            rows.append(("ad", campaign, "", "ad_click", clicks, 0.0, 0.25 * clicks, 0, []))
    return CompleteMinute(minute, rows, bounces={p: [2, 1] for p in pages})


MINUTES = st.lists(st.dictionaries(st.sampled_from([f"c{i}" for i in range(9)]),
                                   st.tuples(st.integers(0, 20), st.integers(0, 5)), max_size=5),
                   min_size=1, max_size=40)


@settings(max_examples=120, deadline=None)
@given(MINUTES, st.integers(1, 5), st.sampled_from([1, 3, 10]))
def test_capped_minute_series_equal_a_brute_force_of_the_eviction(minutes, cap, window):
    """Each minute the campaigns active in it become the most recent; beyond the cap the least
    recently active goes (ties: the smallest key) and forgets its sums: a campaign back later
    counts from its return. Ratios over the window equal that, for every kept campaign."""
    s = MinuteSeries({window}, max_series=cap)
    last: dict[str, int] = {}
    since: dict[str, int] = {}
    history = []
    for m, data in enumerate(minutes):
        data = {c: v for c, v in data.items() if v != (0, 0)}
        s.add(campaign_minute(m, data))
        history.append(data)
        for c in data:
            since.setdefault(c, m)
            last[c] = m
        while len(last) > cap:
            victim = min(last, key=lambda c: (last[c], c))
            del last[victim], since[victim]
        assert sorted(s.series("events", "campaign", 1)) == sorted(f"campaign={c}" for c in last)
        expected = {}
        for c in last:
            imps = sum(history[k].get(c, (0, 0))[0] for k in range(max(since[c], m - window + 1), m + 1))
            clicks = sum(history[k].get(c, (0, 0))[1] for k in range(max(since[c], m - window + 1), m + 1))
            if imps:
                expected[f"campaign={c}"] = (pytest.approx(clicks / imps), imps)
        assert s.series("ctr", "campaign", window) == expected
        assert len(s.recency["campaign"]) <= cap
        assert set(s.key_minutes) <= {f"campaign={c}" for c in last}


@settings(max_examples=40, deadline=None)
@given(MINUTES)
def test_below_the_cap_minute_rules_are_unchanged(minutes):
    names = {c for data in minutes for c in data}
    capped = MinuteRules(CATALOGUE, max_series=max(len(names), 1))
    uncapped = MinuteRules(CATALOGUE, max_series=10**9)
    for m, data in enumerate(minutes * 3):
        assert capped.judge(campaign_minute(m, data)) == uncapped.judge(campaign_minute(m, data))
    assert pickle.dumps(capped.detectors) == pickle.dumps(uncapped.detectors)


def test_a_series_with_an_open_alert_is_evicted_last():
    catalogue = RuleCatalogue.model_validate({"rules": [{
        "name": "campaign_clicks", "area": "ads", "metric": "events", "by": "campaign",
        "severity": "II", "response": "look", "threshold": {"above": 50}}]})
    rules = MinuteRules(catalogue, max_series=2)
    # c0 breaches at minute 0 and stays quiet (still judged as zero: its alert is open until
    # it resolves); newer campaigns come and go around it
    out = rules.judge(CompleteMinute(0, [("ad", "c0", "", "ad_click", 90, 0.0, 0.0, 0, [])]))
    assert [a.status for a in out] == ["firing"]
    rules.lifecycles["campaign_clicks"].resolve_ms = 10**9  # keep it open
    for m in range(1, 6):
        rules.judge(CompleteMinute(m, [("ad", f"n{m}", "", "ad_click", 1, 0.0, 0.0, 0, [])]))
        assert "campaign=c0" in rules.series.recency["campaign"].last
        assert len(rules.series.recency["campaign"]) == 2
    rules.lifecycles["campaign_clicks"].open.clear()  # resolved: now the least recent goes first
    rules.judge(CompleteMinute(6, [("ad", "n6", "", "ad_click", 1, 0.0, 0.0, 0, [])]))
    assert sorted(rules.series.recency["campaign"].last) == ["campaign=n5", "campaign=n6"]


def test_every_split_is_capped_and_evicted_detectors_go():
    rules = MinuteRules(CATALOGUE, max_series=3)
    before = STATS.labeled("evictions").get("minute_series", 0)
    for m in range(30):
        rows = [(f"ch{m}-{k}", f"camp{m}-{k}", "", name, 5, 0.0, 0.5, 0, [])
                for k in range(4) for name in ("ad_impression", "ad_click", "checkout_started")]
        rules.judge(CompleteMinute(m, rows, bounces={f"/p{m}-{k}": [3, 1] for k in range(4)}))
        sizes = {split: len(r) for split, r in rules.series.recency.items()}
        assert sizes == {"channel": 3, "campaign": 3, "page": 3}
        assert len({key for _, key in rules.detectors if key != "all"}) <= 9
        assert all(len(sums) <= 3 * 2 + 1 for sums in rules.series.sums.values())
    assert STATS.labeled("evictions").get("minute_series", 0) - before > 3 * 30 * 1


# -- the cart ------------------------------------------------------------------------------------

CART = st.lists(st.tuples(st.sampled_from(["add_to_cart", "add_to_cart", "remove_from_cart",
                                           "order_completed"]),
                          st.integers(0, 40), st.integers(1, 3), st.integers(1, 9)),
                min_size=1, max_size=40)


@functools.lru_cache(maxsize=None)
def cart_plan(cap: int) -> FeaturePlan:
    return FeaturePlan(load_registry(), max_cart_items=cap)


def cart_events(ops):
    return [event(i, "u1", name, 1_795_392_000_000 + t * 1000,
                  props={"quantity": q, "price": float(p)}) for i, (name, t, q, p) in enumerate(ops)]


@settings(max_examples=150, deadline=None)
@given(CART, st.integers(1, 6), st.randoms(use_true_random=False))
def test_the_cart_keeps_the_newest_lines_whatever_the_arrival_order(ops, cap, rnd):
    evs = cart_events(ops)
    orders = [e.ts_ms for e in evs if e.name == "order_completed"]
    last_order = max(orders) if orders else None
    lines = sorted((e.ts_ms, (1 if e.name == "add_to_cart" else -1) * e.properties["quantity"],
                    (1 if e.name == "add_to_cart" else -1) * e.properties["quantity"] * 100
                    * int(e.properties["price"]))
                   for e in evs if e.name != "order_completed"
                   and (last_order is None or e.ts_ms > last_order))
    expected = lines[max(0, len(lines) - cap):]
    plan, uncapped = cart_plan(cap), cart_plan(10**6)
    for order in (evs, evs[::-1], rnd.sample(evs, len(evs))):
        p = plan.new_profile()
        for e in order:
            plan.apply(p, e)
        assert sorted(p.cart) == expected
        if len(lines) <= cap:  # below the cap: what the uncapped plan computes
            q = uncapped.new_profile()
            for e in order:
                uncapped.apply(q, e)
            assert plan.values("u1", p)[0] == uncapped.values("u1", q)[0]


def test_merging_two_carts_keeps_the_cap():
    plan = FeaturePlan(load_registry(), max_cart_items=3)
    a, b = plan.new_profile(), plan.new_profile()
    for i, e in enumerate(cart_events([("add_to_cart", t, 1, 2) for t in range(0, 10, 2)])):
        plan.apply(a, e)
    for e in cart_events([("add_to_cart", t, 1, 2) for t in range(1, 10, 2)]):
        plan.apply(b, e)
    plan.merge(a, b)
    assert sorted(c[0] for c in a.cart) == [1_795_392_007_000, 1_795_392_008_000, 1_795_392_009_000]


# -- memory: flat once the caps are reached -----------------------------------------------------

def traced_growth(fn, n: int, start: int) -> dict[int, int]:
    """Run fn(i) for i < n, tracing allocations from ``start`` (the caps are reached by then):
    the heap allocated since then and still alive, halfway through the traced part and at its
    end. Both are the state replaced since ``start`` (the caps churn it); growth between them is
    state that is not bounded."""
    out = {}
    for i in range(start):
        fn(i)
    tracemalloc.start()
    try:
        for i in range(start, n):
            fn(i)
            if i + 1 in (start + (n - start) // 2, n):
                normal_ip.cache_clear()  # (bounded caches of the address parser)
                ip_cluster.cache_clear()
                out[i + 1] = tracemalloc.get_traced_memory()[0]
        return out
    finally:
        tracemalloc.stop()


def test_entity_memory_is_flat_after_the_cap_with_200k_random_ids():
    """100,000 events, each from a new IP and a new user with a new country name (200,000
    distinct ids), through the per-IP, per-cluster and per-user rules with a cap of 1,000."""
    rules = EntityRules(ENTITY_RULES, max_entity_keys=1_000)
    t0 = 1_795_392_000_000

    def one(i):
        x = (i * 0x9E3779B1) & 0xFFFFFFFF  # a bijection: every IP and user is new
        ip = f"{x >> 24 & 255}.{x >> 16 & 255}.{x >> 8 & 255}.{x & 255}"
        rules.observe(Signal(t0 + i * 10, ("login", "ad_click")[i & 1], f"user-{x:08x}", ip,
                             f"C{x:08x}"))
        if i % 1000 == 999:
            rules.tick(t0 + i * 10 - LATENESS)

    heap = traced_growth(one, 100_000, 90_000)
    assert all(len(r.entities) <= 1_000 and len(r.seen.heap) <= 2 * 1_000 + 64 for r in rules.rules)
    a, b = heap.values()
    assert b - a < 128 * 1024, heap  # about 2 KB per distinct id more without the cap


def test_minute_series_memory_is_flat_after_the_cap_with_200k_random_names():
    """100 minutes of 2,000 new campaign names and 100 new pages each (210,000 names) through
    every minute rule, with a cap of 200 series per split."""
    catalogue = RuleCatalogue.model_validate({"rules": [
        r.model_dump(by_alias=True) for r in CATALOGUE.rules
        if r.window_ms <= 60 * MIN]})  # windows up to an hour: the queues are full after it
    rules = MinuteRules(catalogue, max_series=200)
    rng = random.Random(5)

    def one(m):
        rows = []
        for _ in range(2_000):
            c = f"camp-{rng.getrandbits(64):x}"
            rows += [("ad", c, "", "ad_impression", 20, 0.0, 0.0, 0, []),
                     ("ad", c, "", "ad_click", 2, 0.0, 1.0, 0, [])]
        rules.judge(CompleteMinute(m, rows,
                                   bounces={f"/p/{rng.getrandbits(64):x}": [2, 1] for _ in range(100)}))

    heap = traced_growth(one, 100, 90)
    assert rules.series.size() <= 2 * 200 + 1
    assert len(rules.detectors) <= len(rules.rules) * 201
    a, b = heap.values()
    assert b - a < 128 * 1024, heap


# -- snapshots from before the caps resume -------------------------------------------------------

class _LegacyCounts:
    __slots__ = ("starts", "counts")


class _LegacyDistinct:
    __slots__ = ("seen",)


class _LegacyRule:
    __slots__ = ("spec", "metric", "window", "bucket", "limit", "life", "entities", "breached")


def legacy_pickle(rules: EntityRules, raw: dict) -> bytes:
    """The bytes a snapshot of the code before the caps held: per-entity bucket lists (wide
    windows too), distinct values with every time, no recency, no cap. ``raw`` holds the
    signals seen, per rule and entity, to rebuild the old per-entity state."""
    mp = pytest.MonkeyPatch()
    try:
        old_rules = []
        for r in rules.rules:
            o = _LegacyRule()
            for name in _LegacyRule.__slots__:
                setattr(o, name, getattr(r, name))
            o.entities = {}
            for entity, signals in raw[r.spec.name].items():
                if r.metric.distinct:
                    d = _LegacyDistinct()
                    d.seen = {}
                    for s in signals:
                        d.seen.setdefault(getattr(s, r.metric.distinct), []).append(s.ts_ms)
                    o.entities[entity] = d
                else:
                    c = _LegacyCounts()
                    buckets: dict[int, int] = {}
                    for s in signals:
                        b = s.ts_ms - s.ts_ms % r.bucket
                        buckets[b] = buckets.get(b, 0) + 1
                    c.starts, c.counts = sorted(buckets), [buckets[b] for b in sorted(buckets)]
                    o.entities[entity] = c
            old_rules.append(o)
        state = {k: v for k, v in rules.__dict__.items() if k not in ("max_entity_keys", "swept")}
        old_of = {id(r): o for r, o in zip(rules.rules, old_rules)}
        state["rules"] = old_rules
        state["every_event"] = [old_of[id(r)] for r in rules.every_event]
        state["by_event"] = {k: [old_of[id(r)] for r in v] for k, v in rules.by_event.items()}
        shell = EntityRules.__new__(EntityRules)
        shell.__dict__.update(state)
        for cls, name in ((_LegacyCounts, "_Counts"), (_LegacyDistinct, "_Distinct"),
                          (_LegacyRule, "_Rule")):
            cls.__qualname__ = cls.__name__ = name
            cls.__module__ = "alerts.entities"
            mp.setattr(entities, name, cls)
        mp.setattr(EntityRules, "__getstate__", lambda self: self.__dict__, raising=False)
        return pickle.dumps(shell)
    finally:
        mp.undo()


def test_an_entity_snapshot_from_before_the_caps_resumes():
    t0 = 1_795_392_000_000
    first = [Signal(t0 + i * 700, n, f"u{i % 3}", f"198.51.100.{i % 5}", c, 3)
             for i, (n, c) in enumerate([("ad_click", "CN"), ("login", "US"), ("login", "DE"),
                                         ("login_failed", "BR")] * 30)]
    then = [Signal(t0 + 100_000 + i * 900, n, f"u{i % 3}", f"198.51.100.{i % 5}", c, 3)
            for i, (n, c) in enumerate([("ad_click", "JP"), ("login", "FR"), ("login", "IT")] * 30)]
    kept = EntityRules(ENTITY_RULES)
    raw: dict = {r.spec.name: {} for r in kept.rules}
    for s in first:
        kept.observe(s)
        for r in kept.rules:
            e = _entity(r, s)
            if e:
                raw[r.spec.name].setdefault(e, []).append(s)
    resumed = pickle.loads(legacy_pickle(kept, raw)).retuned(ENTITY_RULES, 100)
    assert resumed.max_entity_keys == 100
    for r in resumed.rules:
        assert len(r.seen) == len(r.entities)
        assert all(type(st_).__name__ in ("_Counts", "_Windowed", "_Distinct")
                   for st_ in r.entities.values())
    a = [x for s in then for x in kept.observe(s)] + kept.tick(t0 + 30 * 3_600_000)
    b = [x for s in then for x in resumed.observe(s)] + resumed.tick(t0 + 30 * 3_600_000)
    assert a == b and any(x.rule == "user_login_countries" for x in a)


def test_a_minute_series_snapshot_from_before_the_caps_resumes():
    rules = MinuteRules(CATALOGUE)
    for m in range(30):
        rules.judge(campaign_minute(m, {f"c{m % 4}": (100, 3), "c9": (50, 1)}, pages=[f"/p{m % 3}"]))
    old = pickle.loads(pickle.dumps(rules))
    series = old.series.__dict__  # as the code before the caps kept it: (minute, counts) queues
    series["queues"] = {w: deque((m, series["rows"][m]) for m in q)
                        for w, q in series["queues"].items()}
    for name in ("max_series", "recency", "rows", "peaks", "key_minutes", "evicted"):
        del series[name]
    resumed = pickle.loads(pickle.dumps(old)).retuned(CATALOGUE, max_series=5)
    assert resumed.series.max_series == 5
    assert sorted(resumed.series.recency["campaign"].last) == [f"campaign=c{i}" for i in (0, 1, 2, 3, 9)]
    for m in range(30, 60):
        minute = campaign_minute(m, {f"c{m % 4}": (100, 3), "c9": (50, 1)}, pages=[f"/p{m % 3}"])
        assert resumed.judge(minute) == rules.judge(minute)
    assert resumed.series.sums == rules.series.sums


def test_a_profile_snapshot_with_a_cart_in_arrival_order_resumes():
    plan = FeaturePlan(load_registry(), max_cart_items=3)
    p = plan.new_profile()
    p.cart = [(50, 1, 100), (10, 1, 100), (40, 1, 100), (20, 1, 100)]  # as the old code kept it
    p = pickle.loads(pickle.dumps(p))
    plan.apply(p, event(1, "u1", "add_to_cart", 60, props={"price": 1.0}))
    assert sorted(c[0] for c in p.cart) == [40, 50, 60]


# -- the same input gives the same state, whatever the hash seed ----------------------------------

_DIGEST = """
import hashlib, pickle, random
from alerts.entities import EntityRules, Signal
from alerts.minute_rules import MinuteRules
from alerts.rules import load_rules
from flows.minutes import CompleteMinute
cat = load_rules()
rng = random.Random(3)
e = EntityRules(cat.entity_rules, max_entity_keys=7)
for i in range(3000):
    e.observe(Signal(10**12 + i * 40, ("page", "ad_click", "login")[i % 3], f"u{rng.randrange(40)}",
                     f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(9)}", f"C{rng.randrange(6)}"))
    if i % 50 == 0:
        e.tick(10**12 + i * 40 - 60_000)
m = MinuteRules(cat, max_series=5)
for k in range(40):
    m.judge(CompleteMinute(k, [("ad", f"c{rng.randrange(12)}", "", "ad_click", 3, 0.0, 1.0, 0, [])
                               for _ in range(6)], bounces={f"/p{rng.randrange(9)}": [2, 1]}))
state = ([(r.entities, r.seen.last, r.seen.heap, r.breached, r.settled, r.life.open,
           r.life.quiet_until) for r in e.rules],
         m.series, m.detectors, m.last_judged, [(l.open, l.quiet_until) for l in m.lifecycles.values()])
print(hashlib.sha256(pickle.dumps(state)).hexdigest())
"""


def test_the_same_input_gives_the_same_state_whatever_the_hash_seed():
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _DIGEST], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1
