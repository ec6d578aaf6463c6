"""Bounded state in the ingest shards under hostile cardinality: anonymous profiles, identity
links, minute rows and bounce pages stop growing at their caps, evict deterministically (least
recently active in event time, ties by id) and count each eviction; below the caps nothing
changes. The long version with a million ids is bench/bench_state_bounds.py."""
from __future__ import annotations

import gc
import tracemalloc

from hypothesis import given, settings, strategies as st

from config.registry import load_registry
from features.profile import FeaturePlan
from flows.eviction import OldestFirst
from flows.shard import OTHER, Chunk, IngestShard, ShardConfig, ShardOut
from surgeflow.stats import STATS
from tests.engine_harness import event

PLAN = FeaturePlan(load_registry())
T = 1_795_392_000_000
MIN = 60_000


def shard(**caps) -> IngestShard:
    return IngestShard(0, ShardConfig(ingest_shards=1, idle_ms=None, **caps), PLAN)


def feed(s: IngestShard, events) -> ShardOut:
    out = ShardOut(0)
    events = list(events)
    s.ingest(Chunk(0, events, {0: max(e.ts_ms for e in events)}, 1), out)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 50)), max_size=80),
       st.integers(1, 5))
def test_oldest_first_evicts_the_least_recently_active(touches, cap):
    """Against a brute force: the key popped is the one with the smallest last time (then id)."""
    lru, last = OldestFirst(), {}
    for key, ts in touches:
        lru.touch(key, ts)
        last[key] = max(ts, last.get(key, ts))
        while len(last) > cap:
            expected = min(last, key=lambda k: (last[k], k))
            assert lru.pop_oldest() == expected
            del last[expected]
    assert len(lru) == len(last) and len(lru.heap) <= 2 * len(lru.last) + 64


def test_anonymous_profiles_stop_at_their_cap_and_evict_the_oldest():
    s = shard(max_anonymous=100)
    before = STATS.labeled("evictions").get("anonymous_profile", 0)
    out = feed(s, [event(f"e{i}", f"anon-{i}", "page_view", T + i) for i in range(150)])
    assert len(s.store.users) == 100
    assert set(s.store.users) == {f"anon-{i}" for i in range(50, 150)}  # the 50 oldest went
    assert STATS.labeled("evictions")["anonymous_profile"] - before == 50
    deleted = {w.user for w in out.features if w.values is None}
    assert deleted == {f"anon-{i}" for i in range(50)}  # their hashes go too, as at the TTL
    # an evicted visitor coming back starts afresh; the oldest active one goes instead
    feed(s, [event("back", "anon-0", "page_view", T + 1000)])
    assert "anon-0" in s.store.users and "anon-50" not in s.store.users


def test_identity_links_stop_at_their_cap_and_expire_after_the_ttl():
    s = shard(max_links=10, state_ttl_ms=30 * MIN)
    feed(s, [event(f"e{i}", f"u{i}", "login", T + i, anon=f"anon-{i}") for i in range(25)])
    assert len(s.links) == 10 and set(s.links) == {f"anon-{i}" for i in range(15, 25)}
    feed(s, [event("use", "anon-15", "page_view", T + 5 * MIN)])  # anon-15's link is in use
    feed(s, [event("late", "u99", "page_view", T + 31 * MIN + 60_000)])
    assert set(s.links) == {"anon-15"}  # the unused ones went after the TTL
    assert len(s.link_age) == 1


def test_minute_rows_and_bounce_pages_fold_into_other_beyond_the_cap():
    s = shard(max_minute_rows=20)
    feed(s, [event(i, f"anon-{i}", "page_view" if i % 2 else f"name-{i}", T + i,
                   campaign=f"c{i}", props={"page": f"/p{i}"}) for i in range(100)])
    rows = s.minutes[T // MIN]
    assert len(rows) == 21 and (OTHER, OTHER, OTHER, OTHER) in rows
    assert sum(r[0] for r in rows.values()) == 100  # totals stay right
    assert len(s.cohorts[T // MIN]) <= 21


def test_a_million_random_ids_keep_memory_flat_after_the_caps():
    s = shard(max_anonymous=2_000, max_links=2_000, max_minute_rows=500)
    tracemalloc.start()
    sizes = []
    for block in range(20):  # 20 x 5,000 = 100,000 ids in CI (a million in the bench)
        base = block * 5_000
        feed(s, [event(f"x{base + i}", f"anon-r{base + i}", f"n{(base + i) % 7919}",
                       T + (base + i) * 10, anon=f"anon-r{base + i}",
                       identified=False) for i in range(0, 5_000, 2)]
             + [event(f"y{base + i}", f"u{base + i}", "login", T + (base + i) * 10,
                      anon=f"anon-l{base + i}") for i in range(1, 5_000, 2)])
        gc.collect()
        sizes.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert len(s.store.users) <= 2_000 and len(s.links) <= 2_000
    # once the caps hold (after the first blocks), memory stays flat: the last quarter holds no
    # more than the second (uncapped, it grows about 2.4 times between them)
    assert sum(sizes[15:]) < 1.1 * sum(sizes[5:10]), sizes


def test_the_timer_heap_stays_proportional_to_the_profiles():
    """A quiet profile is scheduled when its next bucket leaves a long window (about a day
    on); active again, it is scheduled sooner, and the later entry stays in the heap until its
    time. Users who go quiet and active again many times a day must not grow the heap beyond
    O(profiles) (without the compaction: 4,800 entries for 300 profiles here)."""
    from config.registry import load_registry
    from features.profile import FeaturePlan
    from flows.shard import ProfileStore, ShardConfig, ShardOut
    from tests.engine_harness import event

    plan = FeaturePlan(load_registry())
    store = ProfileStore(plan, ShardConfig(lateness_ms=0))
    t0 = 1_795_392_000_000
    out = ShardOut(0)
    peak = 0
    for cycle in range(30):  # every 90 minutes: each user active once, then quiet
        now = t0 + cycle * 90 * 60_000
        for u in range(300):
            store.apply(event(f"{cycle}-{u}", f"u{u}", "page_view", now + u), out)
        store.flush(out)
        store.advance(now + 89 * 60_000, out)
        store.flush(out)
        peak = max(peak, len(store.timers))
    assert len(store.users) == 300
    assert peak <= 2 * len(store.users) + 1024
    due = sorted((p.next_due, name) for name, p in store.users.items())
    live = sorted(t for t in store.timers if store.users[t[1]].next_due == t[0])
    assert live == due  # every live schedule is still in the heap
