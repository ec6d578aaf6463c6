"""Pure logic of features and time: sliding windows, watermark, timers, dedupe, late events,
identity stitching and consent, through both keyed stages (tests/engine_harness.py)."""
from array import array
import pickle

from hypothesis import given, settings, strategies as st

from config.registry import load_registry
from features.buckets import MinuteBuckets
from features.profile import FeaturePlan
from flows.shard import Chunk, IngestShard, ShardConfig, ShardOut
from tests.engine_harness import Harness, event as ev

H = 3_600_000
DAY = 86_400_000
T0 = 1_795_392_000_000  # 2026-11-23T00:00Z
PLAN = FeaturePlan(load_registry())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 2), st.integers(-50, 100)), max_size=60),
       st.lists(st.integers(0, 3200), min_size=1, max_size=5))
def test_bucket_totals_equal_brute_force(adds, nows):
    """Adds interleaved with "now" moving forward: every slot equals its definition."""
    slots = [(m, w) for m in range(3) for w in (1, 60, 1440, None)]
    b = MinuteBuckets(slots)
    nows = sorted(nows)
    done = []
    for i, (minute, metric, value) in enumerate(adds):
        if i < len(nows):
            b.advance(nows[i])
        b.add(minute, metric, value)
        done.append((minute, metric, value))
    b.advance(nows[-1] + 1)
    now = b.now
    for slot, (metric, w) in enumerate(slots):
        expected = sum(v for m, k, v in done if k == metric and (w is None or now - w < m <= now))
        assert b.totals[slot] == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=30), st.integers(3000, 4000))
def test_next_expiry_is_the_first_change(minutes, as_of):
    b = MinuteBuckets([(0, 60), (0, 1440)])
    b.advance(as_of)
    for m in minutes:
        b.add(m, 0, 1)
    nxt = b.next_expiry()
    before = list(b.totals)
    if nxt is None:
        return
    assert nxt > as_of
    probe = pickle.loads(pickle.dumps(b))
    probe.advance(nxt - 1)
    assert list(probe.totals) == before  # nothing left a window before nxt
    probe.advance(nxt)
    assert list(probe.totals) != before


def test_counts_decay_with_the_watermark_when_the_user_is_silent():
    h = Harness()
    h.feed([ev(1, "quiet", "page_view", T0)])
    assert h.features("quiet")["views_1h"] == "1"
    # Another user's traffic moves the stream clock; the quiet user's 1h count must expire.
    h.feed([ev(2, "busy", "page_view", T0 + H + 60_000)])
    quiet = h.features("quiet")
    assert "views_1h" not in quiet and quiet["views_24h"] == "1"  # sparse: 0 is not stored
    assert int(quiet["as_of"]) == T0 + H  # the minute its bucket left the window
    # A day later "days since" and "account age" move, and after 30 days the user is churned.
    h.feed([ev(3, "busy", "page_view", T0 + 31 * DAY)])
    quiet = h.features("quiet")
    assert quiet["account_age_days"] == "31" and quiet["lifecycle"] == "churned"
    assert quiet["activity"] == "silent" and "views_30d" not in quiet


def test_late_events_are_dead_lettered_and_duplicates_dropped():
    s = IngestShard(0, ShardConfig(lateness_ms=60_000, profile_shards=1, ingest_shards=1), Harness().plan)
    out = ShardOut(0)
    s.ingest(Chunk(0, [ev(1, "u", "page_view", T0 + 10 * 60_000)], {0: T0 + 10 * 60_000}, 1), out)
    s.ingest(Chunk(0, [ev(1, "u", "page_view", T0 + 10 * 60_000)], {}, 1), out)  # retry
    s.ingest(Chunk(0, [ev(3, "u", "page_view", T0 + 9 * 60_000 + 30_000)], {}, 1), out)  # in time
    s.ingest(Chunk(0, [ev(4, "u", "page_view", T0 + 5 * 60_000)], {}, 1), out)  # too late
    assert out.duplicates == 1 and out.events == 2
    assert [d.reason for d in out.dead] == ["late_event"] and s.late_events == 1
    forwarded = [op[3].event_id for _, h in out.handovers for op in h.ops]
    assert forwarded == ["e1", "e3"]


def test_minutes_close_only_when_every_partition_passed_them():
    s = IngestShard(0, ShardConfig(lateness_ms=0, profile_shards=1, ingest_shards=1), Harness().plan)
    out = ShardOut(0)
    s.ingest(Chunk(0, [ev(1, "a", "page_view", T0)], {0: T0 + 5 * 60_000}, 2), out)
    assert out.minutes is None  # partition 1 not heard from yet
    s.ingest(Chunk(0, [], {1: T0 + 3 * 60_000}, 2), out)
    assert list(out.minutes.minutes) == [T0 // 60_000]
    assert out.minutes.closed_through == (T0 + 3 * 60_000) // 60_000 - 1


def test_chunks_of_one_batch_close_minutes_into_one_part():
    """Several chunks in one batch (as with 2 workers): every minute they close is in the part."""
    s = IngestShard(0, ShardConfig(lateness_ms=0, profile_shards=1, ingest_shards=1), Harness().plan)
    out = ShardOut(0)
    s.ingest(Chunk(0, [ev(1, "a", "page_view", T0)], {0: T0}, 1), out)
    s.ingest(Chunk(0, [ev(2, "a", "page_view", T0 + 60_000)], {0: T0 + 90_000}, 1), out)
    s.ingest(Chunk(0, [ev(3, "a", "page_view", T0 + 120_000)], {0: T0 + 150_000}, 1), out)
    assert sorted(out.minutes.minutes) == [T0 // 60_000, T0 // 60_000 + 1]
    assert out.minutes.closed_through == T0 // 60_000 + 1


def test_third_view_of_a_session_fires_once_and_a_new_session_fires_again():
    h = Harness()
    times = [0, 10_000, 20_000, 30_000, 40 * 60_000, 41 * 60_000, 42 * 60_000]
    h.feed([ev(i, "u", "page_view", T0 + t) for i, t in enumerate(times)])
    assert [a["event_ts_ms"] - T0 for a in h.actions] == [20_000, 42 * 60_000]
    assert len({a["action_id"] for a in h.actions}) == 2
    assert h.features("u")["session_pages"] == "3"


def test_a_visitor_who_logs_in_is_merged_into_the_user():
    h = Harness()
    h.feed([ev(1, "anon-1", "page_view", T0, campaign="c1"),
            ev(2, "anon-1", "add_to_cart", T0 + 60_000, props={"price": 10.0, "quantity": 2})])
    assert h.features("anon-1")["cart_items"] == "2"
    h.feed([ev(3, "u9", "login", T0 + 120_000, anon="anon-1"),
            ev(4, "u9", "page_view", T0 + 180_000, anon="anon-1", campaign="c2")])
    # events of the visitor that arrive after the link are the user's too
    h.feed([ev(5, "anon-1", "page_view", T0 + 240_000)])
    h.finish()
    assert h.features("anon-1") is None and h.aliases == {"anon-1": "u9"}
    u = h.features("u9")
    assert (u["views_1h"], u["cart_items"], u["cart_value"], u["logins_1h"]) == ("3", "2", "20.00", "1")
    assert (u["first_touch_campaign"], u["last_touch_campaign"], u["first_seen"]) == ("c1", "c2", str(T0))
    assert u["session_pages"] == "3"  # one session across the login


def test_a_merged_visitor_bridges_sessions_the_user_closed_long_ago():
    """The visitor's older events join the user's sessions on both sides when the login merges
    them, however far "now" has moved since: the same session whatever the arrival order."""
    m = 60_000
    h = Harness(ShardConfig(lateness_ms=60_000, ingest_shards=2, profile_shards=3))
    h.feed([ev(1, "u9", "page_view", T0), ev(2, "u9", "page_view", T0 + 5 * m)])
    h.feed([ev(3, "anon-1", "page_view", T0 + 20 * m), ev(4, "anon-1", "page_view", T0 + 45 * m)])
    h.feed([ev(5, "u9", "page_view", T0 + 70 * m), ev(6, "clock", "push_sent", T0 + 90 * m)])
    h.feed([ev(7, "u9", "login", T0 + 95 * m, anon="anon-1")])  # u9's first session is long shut
    h.finish()
    u = h.features("u9")
    assert (u["session_started_at"], u["session_pages"]) == (str(T0), "5")


def test_without_profiling_consent_there_is_no_profile_and_withdrawal_deletes_it():
    h = Harness()
    h.feed([ev(1, "u1", "page_view", T0), ev(2, "u2", "page_view", T0, consent=False),
            ev(3, "anon-7", "page_view", T0)])
    assert h.features("u1") and h.features("u2") is None and h.features("anon-7")
    h.feed([ev(4, "u1", "page_view", T0 + 1000, consent=False),
            ev(5, "anon-7", "page_view", T0 + 1000, consent=False)])
    assert h.features("u1") is None and h.features("anon-7") is None
    assert sum(len(s.store.users) for s in h.profiles.values()) == 0


def test_days_since_last_order_moves_at_day_and_month_boundaries():
    h = Harness()
    jan31 = 1_769_903_940_000  # 2026-01-31T23:59Z
    h.feed([ev(1, "u", "order_completed", jan31, revenue=50.0)])
    h.feed([ev(2, "other", "page_view", jan31 + 60_000)])  # 2026-02-01T00:00Z
    assert h.features("u")["days_since_last_order"] == "0"  # whole days, not calendar days
    h.feed([ev(3, "other", "page_view", jan31 + DAY)])
    assert h.features("u")["days_since_last_order"] == "1"
    assert h.features("u")["rfm_tier"] == "general-develop"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "anon-c"]), st.integers(0, 180), st.sampled_from(
    ["page_view", "add_to_cart", "order_completed", "login"])), min_size=1, max_size=40),
    st.integers(1, 10))
def test_batching_and_restore_do_not_change_final_features(events, size):
    """Snapshot/restore mid-stream and any batching give the same final features."""
    evs = sorted(events, key=lambda e: e[1])
    items = [ev(i, u, n, T0 + m * 60_000, revenue=10.0,
                anon="anon-c" if u == "b" and n == "login" else "") for i, (u, n, m) in
             enumerate((u, n, m) for u, m, n in evs)]

    def run(batch, restore):
        h = Harness()
        for i in range(0, len(items), batch):
            h.feed(items[i:i + batch])
            if restore:
                plan, h.plan = h.plan, None
                for s in [*h.ingest, *h.profiles.values()]:
                    s.store.plan = None
                h = pickle.loads(pickle.dumps(h))
                h.plan = plan
                for s in [*h.ingest, *h.profiles.values()]:
                    s.store.plan = plan
        h.finish()
        return {u: h.features(u) for u in h.redis}, h.aliases

    assert run(len(items), False) == run(size, True)


def brute_sessions(events, gap):
    """(start, end, views) of every chain of events no more than ``gap`` apart, by definition."""
    out = []
    for ts, view in sorted(events):
        if out and ts - out[-1][1] <= gap:
            out[-1] = (out[-1][0], ts, out[-1][2] + view)
        else:
            out.append((ts, ts, view))
    return out


def triples(sess):
    return [tuple(sess[i:i + 3]) for i in range(0, len(sess), 3)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 1)), max_size=40),
       st.integers(0, 200), st.randoms(use_true_random=False))
def test_sessions_as_intervals_equal_the_chains_of_their_events_in_any_order(events, gap, rnd):
    """Adding events in any order, or merging two profiles' sessions (a visitor who logs in),
    gives the sessions of the union, so the result does not depend on arrival order."""
    from features.profile import join_session

    shuffled = events[:]
    rnd.shuffle(shuffled)
    whole = array("q")
    for ts, view in shuffled:
        join_session(whole, ts, ts, view, gap)
    assert triples(whole) == brute_sessions(events, gap)

    cut = rnd.randint(0, len(shuffled))
    mine, theirs = array("q"), array("q")
    for ts, view in shuffled[:cut]:
        join_session(mine, ts, ts, view, gap)
    for ts, view in shuffled[cut:]:
        join_session(theirs, ts, ts, view, gap)
    for s, e, v in triples(theirs):
        join_session(mine, s, e, v, gap)
    assert triples(mine) == brute_sessions(events, gap)


def test_after_a_restart_the_first_write_removes_every_field_it_does_not_set():
    """Fields written after the snapshot the flow restarts from are unknown to the restored
    state: the first write after the restart deletes whatever it does not set."""
    from flows.shard import IngestLogic

    cfg = ShardConfig(lateness_ms=0, ingest_shards=1, profile_shards=1, snapshots=True)
    logic = IngestLogic(cfg, PLAN, None)
    logic.on_batch([Chunk(0, [ev(1, "anon-1", "page_view", T0)], {0: T0}, 1)])
    restarted = IngestLogic(cfg, PLAN, logic.snapshot())
    (out,), _ = restarted.on_batch([Chunk(0, [ev(2, "anon-1", "search", T0 + 1000)], {0: T0 + 1000}, 1)])
    (write,) = [w for w in out.features if w.user == "anon-1"]
    assert set(write.removed) == set(PLAN.fields) - set(write.values) and "orders_30d" in write.removed
    # without a restart, only fields that were written and fell to 0 are removed
    (out,), _ = restarted.on_batch([Chunk(0, [ev(3, "anon-1", "search", T0 + 2000)], {0: T0 + 2000}, 1)])
    assert [w.removed for w in out.features if w.user == "anon-1"] == [()]


def test_after_a_restart_a_profile_the_snapshot_does_not_know_also_removes_what_it_does_not_set():
    """A user first seen between the snapshot and the crash was written before the crash (say a
    cart that an order later emptied); the replay may set and clear that field within one flush,
    so the first write of every profile created after a restart removes what it does not set,
    including a user created by merging a visitor into them."""
    from flows.shard import IngestLogic, ProfileLogic

    cfg = ShardConfig(lateness_ms=0, ingest_shards=1, profile_shards=1, snapshots=True)
    ingest = IngestLogic(cfg, PLAN, IngestLogic(cfg, PLAN, None).snapshot())
    cart = ev(1, "u1", "add_to_cart", T0, props={"price": 10.0})
    order = ev(2, "u1", "order_completed", T0 + 1000, revenue=10.0)
    visit = ev(3, "anon-2", "page_view", T0 + 1000)
    login = ev(4, "u2", "login", T0 + 2000, anon="anon-2")
    (out,), _ = ingest.on_batch([Chunk(0, [cart, order, visit], {0: T0 + 1000}, 1)])
    (write,) = [w for w in out.features if w.user == "anon-2"]
    assert set(write.removed) == set(PLAN.fields) - set(write.values)

    profiles = ProfileLogic(cfg, PLAN, ProfileLogic(cfg, PLAN, None).snapshot())
    (hand,) = [h for _, h in out.handovers]
    (res,), _ = profiles.on_batch([hand])
    (write,) = [w for w in res.features if w.user == "u1"]
    assert "cart_items" not in write.values and "cart_items" in write.removed
    assert set(write.removed) == set(PLAN.fields) - set(write.values)

    (out,), _ = ingest.on_batch([Chunk(0, [login], {0: T0 + 2000}, 1)])
    (res,), _ = profiles.on_batch([h for _, h in out.handovers])
    (write,) = [w for w in res.features if w.user == "u2"]
    assert set(write.removed) == set(PLAN.fields) - set(write.values)


def test_after_a_restart_a_linked_visitor_s_own_hash_is_deleted_once():
    """Replayed after a restart, a visitor's anonymous event may come after their login (the
    partitions interleave differently), so it joins the user; before the crash it may have come
    first and written the visitor's own hash, which must not stay behind."""
    from flows.shard import IngestLogic

    cfg = ShardConfig(lateness_ms=0, ingest_shards=1, profile_shards=1, snapshots=True)
    logic = IngestLogic(cfg, PLAN, None)
    logic.on_batch([Chunk(0, [ev(1, "u0", "page_view", T0)], {0: T0}, 2)])
    restarted = IngestLogic(cfg, PLAN, logic.snapshot())
    login = ev(2, "u9", "login", T0 + 1000, anon="anon-1", partition=1)
    visit = ev(3, "anon-1", "page_view", T0 + 500)
    later = ev(4, "anon-1", "page_view", T0 + 2000)
    (out,), _ = restarted.on_batch([Chunk(0, [login, visit, later], {0: T0 + 2000, 1: T0 + 1000}, 2)])
    assert [w.user for w in out.features if w.values is None] == ["anon-1"]
    ops = [op[3] for _, h in out.handovers for op in h.ops]
    assert [op.user for op in ops if hasattr(op, "user")] == ["u9", "u9", "u9"]


def test_an_erased_users_login_erases_the_device_it_names_late_or_not():
    """After u's erasure, u's own login naming a device (a replay, or still in flight) erases the
    device as well, whether the login is on time or late (behind the watermark)."""
    from privacy.erasure import ErasureRequest, reset_process_ledger

    reset_process_ledger(b"k" * 32, {})
    try:
        for late in (False, True):
            s = IngestShard(0, ShardConfig(lateness_ms=0, profile_shards=1, ingest_shards=1),
                            Harness().plan)
            out = ShardOut(0)
            s.ingest(Chunk(0, [ev(1, "u", "page_view", T0)], {0: T0 + 10 * 60_000}, 1), out)
            erased_at = T0 + 20 * 60_000
            s.ingest(Chunk(0, [], {}, 1, 0, None, [ErasureRequest("r1", "u", False, "t", erased_at)]),
                     out)
            login_ts = T0 + (60_000 if late else 15 * 60_000)  # the watermark is at T0 + 10 min
            out = ShardOut(0)
            s.ingest(Chunk(0, [ev(2, "u", "login", login_ts, anon="anon-d", identified=True)], {}, 1),
                     out)
            assert [r.request.subject for r in out.erasures] == ["anon-d"], late
            assert out.erasures[0].request.requested_by == "erasure follow-up"
            assert s.erased.covers("anon-d", T0) and not out.dead  # no dead letter for the login
            out = ShardOut(0)  # the device's own older events are dropped from now on
            s.ingest(Chunk(0, [ev(3, "anon-d", "page_view", T0 + 16 * 60_000)], {}, 1), out)
            assert out.events == 0
    finally:
        reset_process_ledger(None, {})


def test_a_profile_shard_drops_at_once_what_comes_for_a_person_it_erased():
    """An ingest shard that had not seen the erasure yet hands over an older event of the
    person: the profile shard, which has, drops it on receipt rather than holding it until it is
    released (held, the id went back into the snapshots after the erasure's compaction)."""
    from flows.shard import Handover, ProfileShard
    from privacy.erasure import ErasureRequest

    s = ProfileShard(0, ShardConfig(lateness_ms=0, profile_shards=1, ingest_shards=2), PLAN)
    out = ShardOut(0)
    erased_at = T0 + 20 * 60_000
    s.receive(Handover(0, 0, [(0, 1, T0, ev(1, "u", "page_view", T0, identified=True))], T0, {0: 1}), out)
    s.receive(Handover(0, 0, [(-1, -1, erased_at, ("erase", "u", ErasureRequest("r1", "u", False, "t", erased_at)))],
                       T0, {0: 1}), out)
    s.receive(Handover(0, 1, [], T0, {0: 1}), out)
    s.release(out)
    assert s.erased.covers("u", T0) and not s.pending
    late = ev(2, "u", "page_view", T0 + 60_000, identified=True)
    s.receive(Handover(0, 1, [(0, 0, late.ts_ms, late), (0, 2, T0, ev(3, "v", "page_view", T0))],
                       T0, {0: 0}), out)
    assert [item[3].user for item in s.pending] == ["v"]  # u's dropped, v's waits its turn
