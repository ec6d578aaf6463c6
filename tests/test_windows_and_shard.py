"""Pure logic of features and time: sliding windows, watermark, timers, dedupe, late events."""
from hypothesis import given, settings, strategies as st

from features.windows import MinuteBuckets
from flows.events import Event
from flows.shard import Chunk, ShardConfig, ShardOut, ShardState

H = 3_600_000
T0 = 1_795_392_000_000


def ev(i, user, name, ts, revenue=0.0):
    return Event(f"e{i}", "track", name, user, ts, "web", "cmp", revenue, 0.0, "")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 2), st.floats(0, 100)), max_size=60),
       st.integers(0, 3200), st.sampled_from([1, 60, 1440]))
def test_bucket_totals_equal_brute_force(adds, as_of, window):
    b = MinuteBuckets(3)
    for minute, metric, value in adds:
        b.add(minute, metric, value)
    combined = b.window_totals([window, 60], as_of)
    for metric in range(3):
        for i, w in enumerate([window, 60]):
            expected = sum(v for m, k, v in adds if k == metric and as_of - w < m <= as_of)
            assert abs(combined[i * 3 + metric] - expected) < 1e-6
        assert abs(b.total(metric, window, as_of) - combined[metric]) < 1e-6


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=30), st.integers(0, 3000))
def test_next_expiry_is_the_first_change(minutes, as_of):
    b = MinuteBuckets(1)
    for m in minutes:
        b.add(m, 0, 1.0)
    nxt = b.next_expiry([60, 1440], as_of)
    totals = lambda t: (b.total(0, 60, t), b.total(0, 1440, t))  # noqa: E731
    if nxt is None:
        return
    assert nxt > as_of
    # no window changes between as_of+1 and nxt-1 from expiry alone (no new buckets after as_of)
    if max(minutes) <= as_of:
        assert all(totals(t) == totals(as_of) for t in range(as_of, nxt))
        assert totals(nxt) != totals(as_of)


def features_of(out: ShardOut) -> dict:
    latest = {}
    for user, values, _ in out.features:
        latest[user] = values
    return latest


def test_counts_decay_with_the_watermark_when_the_user_is_silent():
    s = ShardState(0, ShardConfig(lateness_ms=0))
    out = ShardOut(0)
    s.ingest(Chunk(0, [ev(1, "quiet", "page_view", T0)], {0: T0}, 1), out)
    s.flush(out)
    assert features_of(out)["quiet"]["views_1h"] == "1"
    # Another user's traffic moves the stream clock; the quiet user's 1h count must expire.
    out = ShardOut(0)
    s.ingest(Chunk(0, [ev(2, "busy", "page_view", T0 + H + 60_000)], {0: T0 + H + 60_000}, 1), out)
    s.flush(out)
    quiet = features_of(out)["quiet"]
    assert (quiet["views_1h"], quiet["views_24h"]) == ("0", "1")
    assert int(quiet["as_of"]) == T0 + H  # the minute its bucket left the window


def test_late_events_are_dead_lettered_and_duplicates_dropped():
    s = ShardState(0, ShardConfig(lateness_ms=60_000))
    out = ShardOut(0)
    s.ingest(Chunk(0, [ev(1, "u", "page_view", T0 + 10 * 60_000)], {0: T0 + 10 * 60_000}, 1), out)
    s.ingest(Chunk(0, [ev(1, "u", "page_view", T0 + 10 * 60_000)], {}, 1), out)  # retry
    s.ingest(Chunk(0, [ev(3, "u", "page_view", T0 + 9 * 60_000 + 30_000)], {}, 1), out)  # in time
    s.ingest(Chunk(0, [ev(4, "u", "page_view", T0 + 5 * 60_000)], {}, 1), out)  # too late
    s.flush(out)
    assert out.duplicates == 1 and out.events == 2
    assert [d.reason for d in out.dead] == ["late_event"]
    assert features_of(out)["u"]["views_1h"] == "2"


def test_minutes_close_only_when_every_partition_passed_them():
    s = ShardState(0, ShardConfig(lateness_ms=0))
    out = ShardOut(0)
    s.ingest(Chunk(0, [ev(1, "a", "page_view", T0)], {0: T0 + 5 * 60_000}, 2), out)
    assert out.aggregates == [] and out.report is None  # partition 1 not heard from yet
    s.ingest(Chunk(0, [], {1: T0 + 3 * 60_000}, 2), out)
    assert [row[0] for row in out.aggregates] == [T0]
    assert out.report[1] == (T0 + 3 * 60_000) // 60_000 - 1


def test_third_view_of_a_session_fires_once_and_a_new_session_fires_again():
    s = ShardState(0, ShardConfig(lateness_ms=0))
    out = ShardOut(0)
    times = [0, 10_000, 20_000, 30_000, 40 * 60_000, 41 * 60_000, 42 * 60_000]
    s.ingest(Chunk(0, [ev(i, "u", "page_view", T0 + t) for i, t in enumerate(times)], {0: T0}, 1), out)
    assert [a["event_ts_ms"] - T0 for a in out.actions] == [20_000, 42 * 60_000]
    assert len({a["action_id"] for a in out.actions}) == 2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 180), st.sampled_from(
    ["page_view", "add_to_cart", "order_completed"])), min_size=1, max_size=40),
    st.integers(1, 10))
def test_chunking_does_not_change_final_features(events, chunk_size):
    """Snapshot/restore mid-stream and any batching give the same final features."""
    import pickle
    evs = sorted(events, key=lambda e: e[1])
    items = [ev(i, u, n, T0 + m * 60_000, 10.0) for i, (u, m, n) in enumerate(evs)]

    def run(size, restore):
        s = ShardState(0, ShardConfig(lateness_ms=0))
        final = {}
        for i in range(0, len(items), size):
            out = ShardOut(0)
            part = items[i:i + size]
            s.ingest(Chunk(0, part, {0: max(e.ts_ms for e in part)}, 1), out)
            s.flush(out)
            final.update(features_of(out))
            if restore:
                s = pickle.loads(pickle.dumps(s))
        out = ShardOut(0)
        s.finish(out)
        final.update(features_of(out))
        return {u: {k: v for k, v in f.items() if k != "p_purchase_24h"} for u, f in final.items()}

    assert run(len(items), False) == run(chunk_size, True)
