"""Point-in-time values (FeaturePlan.values_at): a profile's values as of the start of an earlier
minute do not depend on what came in since, nor on the order the events came in (the models read
their inputs so; this is what makes a score the same with 1 and N workers)."""
from __future__ import annotations

import random

from hypothesis import example, given, settings, strategies as st

from config.registry import load_registry
from features.buckets import MinuteBuckets
from features.profile import FeaturePlan, point_in_time_error
from flows.events import Event
from models.spec import load_models

MIN, DAY = 60_000, 86_400_000
T0 = 1_795_392_000_000  # a midnight (UTC)
NAMES = ["page_view", "product_viewed", "order_completed", "push_sent", "push_opened", "login",
         "ad_click", "signup", "email_sent", "email_opened", "add_to_cart"]
PLAN = FeaturePlan(load_registry())
INPUTS = sorted({name for spec in load_models().values() for name, _, _ in spec.inputs})
READ = PLAN.inputs_at(tuple(INPUTS))


def event(name: str, ts: int, n: int) -> Event:
    return Event(event_id=f"e{n}", type="track", name=name, user="u1", ts_ms=ts, channel="web",
                 campaign="", revenue=12.5 if name == "order_completed" else 0.0, cost=0.0, ip="")


def profile(events: list[Event], parts: int = 1, seed: int = 0):
    """The events applied in a shuffled order, split over ``parts`` profiles merged at the end
    (an anonymous visitor's profile absorbed at login)."""
    rnd = random.Random(seed)
    order = events[:]
    rnd.shuffle(order)
    profiles = [PLAN.new_profile() for _ in range(parts)]
    for i, e in enumerate(order):
        PLAN.apply(profiles[i % parts], e)
    for other in profiles[1:]:
        PLAN.merge(profiles[0], other)
    return profiles[0]


timeline = st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, 40 * DAY // MIN),
                              st.integers(0, MIN - 1)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(timeline,  # as of up to 20 h back, or (the usual case: a score a minute late) minutes
       st.one_of(st.integers(-20 * 60 * MIN, 60 * MIN), st.integers(-5 * MIN, 2 * MIN)),
       st.integers(1, 2), st.integers(0, 9),
       st.one_of(st.integers(0, 2 * 60 * MIN), st.integers(0, 3 * MIN)))
@example([("order_completed", 10, 5), ("order_completed", 20, 0)], -30, 1, 0, 0)
@example([("page_view", 2, 0), ("page_view", 61, 0)], 0, 1, 0, 2 * MIN)  # one leaves the hour since
def test_later_events_and_order_do_not_move_a_point_in_time_value(items, at, parts, seed, later):
    """As of a time up to 20 h before the latest event (a score is computed about a minute
    after its event: the buckets keep a day past the longest window for it)."""
    events = [event(name, T0 + minute * MIN + ms, n) for n, (name, minute, ms) in enumerate(items)]
    at += max(e.ts_ms for e in events)
    before = [e for e in events if e.ts_ms < at // MIN * MIN]
    full = profile(events, parts, seed)
    PLAN.advance(full, max(at, full.as_of) + later)
    earlier = profile(before, 1, seed + 1) if before else PLAN.new_profile()
    a, b = PLAN.values_at("u1", full, at), PLAN.values_at("u1", earlier, at)
    assert {n: a(n) for n in INPUTS} == {n: b(n) for n in INPUTS}
    # the models' compiled reader gives the same values
    assert READ("u1", full, at) == [a(n) for n in INPUTS]


def test_point_in_time_values_against_a_reading_of_the_events():
    """An oracle from the event list alone, for a few inputs of each kind."""
    rnd = random.Random(3)
    events = [event(rnd.choice(NAMES), T0 + rnd.randrange(35 * DAY), n) for n in range(400)]
    p = profile(events, 2, 5)
    for at in (T0 + 35 * DAY - 19 * 3_600_000 + 123_456, T0 + 35 * DAY + 7 * MIN):
        cut = at // MIN * MIN  # nothing of the minute of `at` counts
        value = PLAN.values_at("u1", p, at)

        def count(names, window_ms=None):
            return sum(1 for e in events if e.name in names and e.ts_ms < cut
                       and (window_ms is None or e.ts_ms >= cut - window_ms))
        views = {"page_view", "product_viewed", "screen"}
        assert value("views_1h") == count(views, 3_600_000)
        assert value("views_7d") == count(views, 7 * DAY)
        assert value("orders_lifetime") == count({"order_completed"})
        assert value("revenue_30d") == 12.5 * count({"order_completed"}, 30 * DAY)
        # the last order within the longest window (30 days), to the minute
        last_order = max(e.ts_ms for e in events if e.name == "order_completed" and e.ts_ms < cut)
        assert cut - last_order < 30 * DAY
        assert value("days_since_last_order") == (cut - last_order // MIN * MIN) // DAY
        opens, sent = count({"push_opened"}, 30 * DAY), count({"push_sent"}, 30 * DAY)
        assert value("push_open_rate_30d") == (opens / sent if sent else None)


def test_every_model_input_has_a_point_in_time_value():
    registry = load_registry()
    assert [n for n in INPUTS if point_in_time_error(registry, n)] == []
    assert "session" in point_in_time_error(registry, "session_pages")
    assert "cart" in point_in_time_error(registry, "cart_items")


def test_total_at_matches_the_buckets_it_summed():
    b = MinuteBuckets(slots=[(0, 60), (0, None), (1, 1440)])
    added = []
    rnd = random.Random(7)
    for _ in range(500):
        minute, metric = rnd.randrange(3000), rnd.randrange(2)
        b.advance(max(b.now, minute))
        b.add(minute, metric, 1)
        added.append((minute, metric))
    b.advance(3100)
    for at in range(3100 - 1440, 3101, 37):
        assert b.total_at(0, at) == sum(1 for m, k in added if k == 0 and at - 60 < m <= at)
        assert b.total_at(1, at) == sum(1 for m, k in added if k == 0 and m <= at)
        assert b.total_at(2, at) == sum(1 for m, k in added if k == 1 and at - 1440 < m <= at)
