"""A profile shard's side of the models (models/runtime.py): events noted in any order and played
in event time once the watermark passed them; scores by the version an event's time needs,
whenever the versions arrive; when each model scores; logins; what moves with a profile."""
from __future__ import annotations

import math
import random

from hypothesis import example, given, settings, strategies as st

from config.registry import load_registry
from features.profile import FeaturePlan
from flows.events import Event
from models.learner import Learner
from models.runtime import DAY_MS, ShardModels
from models.spec import load_models
from models.training import version_for

H = 3_600_000
MIN = 60_000
GRACE = 5 * MIN
SPECS = load_models()
PLAN = FeaturePlan(load_registry())


def versions(n: int) -> list:
    """n successive versions of each model, each learned from one more labelled example."""
    out = []
    for model, spec in SPECS.items():
        learner = Learner(model, learning_rate=0.5)
        for v in range(n):
            out.append(learner.publish(v, v))
            learner.learn_one({name: float(v % 3) for name in spec.input_names}, v % 2 == 0)
    return out


def forever(m: ShardModels) -> None:
    """Every version from 0 on is the fresh model."""
    for w in versions(1):
        w.last_version = 10**6
        m.receive(w)


class Shard:
    """The store's side, by hand: profiles that take the events in, and the models noting them."""

    def __init__(self, grace_ms: int = GRACE):
        self.m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=grace_ms)
        self.users: dict = {}
        self.n = 0

    def apply(self, user: str, name: str, ts: int) -> None:
        self.n += 1
        e = Event(event_id=f"e{self.n}", type="track", name=name, user=user, ts_ms=ts,
                  channel="web", campaign="", revenue=0.0, cost=0.0, ip="")
        p = self.users.setdefault(user, PLAN.new_profile())
        PLAN.apply(p, e)
        self.m.note(user, name, ts)
        if user in self.m.before:
            self.m.applied(e, PLAN)

    def merge(self, user: str, visitor: list, ts: int) -> None:
        """A visitor with these events logs in as ``user`` at ``ts``."""
        other = PLAN.new_profile()
        for i, (name, t) in enumerate(visitor):
            PLAN.apply(other, Event(event_id=f"v{i}", type="track", name=name, user="v", ts_ms=t,
                                    channel="web", campaign="", revenue=0.0, cost=0.0, ip=""))
        p = self.users.get(user)
        self.m.merged(user, ts, other, PLAN)
        self.m.merging(user, ts, p, PLAN)
        if p is None:
            self.users[user] = other
        else:
            PLAN.merge(p, other)

    def advance(self, watermark: int) -> None:
        self.m.advance(watermark, PLAN, self.users)

    def labels(self) -> list:
        return sorted((b.model, l.user, l.made_ms, l.labelled_ms, l.y, l.version, l.x)
                      for _, b in self.m.send(0) for l in b.labels)

    def scores(self) -> dict:
        return {u: self.m.scores(u) for u in sorted(self.users)}


NAMES = ["page_view", "push_sent", "order_completed", "push_opened", "ad_impression", "ad_click"]
events_st = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(NAMES),
                               st.integers(0, 9 * H)), min_size=1, max_size=30)


def run(events, seed: int, lateness: int, version_delays: list[int] | None):
    """Events arrive in a shuffled order within ``lateness`` of the stream's clock (the
    watermark never passes one still to come); the watermark moves at random points; each
    version arrives once the shard's mark allows it, plus a delay in steps. Returns every
    score as played, the labels and the final scores."""
    rnd = random.Random(seed)
    events = sorted(events, key=lambda e: e[2])
    # arrival order: a shuffle that keeps each event within `lateness` of the clock
    order = sorted(range(len(events)), key=lambda i: events[i][2] + rnd.randrange(lateness + 1))
    s = Shard()
    if version_delays is None:
        forever(s.m)
    pending = sorted(versions(12), key=lambda w: (w.version, w.model)) if version_delays else []
    waits = {id(w): d for w, d in zip(pending, version_delays or [])}
    clock = 0
    played = []

    def step():
        for user in sorted(s.m.advance(s.m.watermark, PLAN, s.users)):
            played.append((user, s.m.watermark, s.m.scores(user)))
        mark = s.m.mark(s.m.watermark)  # what the shard sends the learner after playing
        late = set()  # each model's channel is in order: a delayed version delays the next ones
        for w in list(pending):  # the learner publishes version k once every mark passed k periods
            if w.version * H <= mark:
                if waits[id(w)] > 0 or w.model in late:
                    waits[id(w)] = max(0, waits[id(w)] - 1)
                    late.add(w.model)
                    continue
                s.m.receive(w)
                pending.remove(w)

    for i in order:
        user, name, ts = events[i]
        s.apply(user, name, ts)
        clock = max(clock, ts)
        if rnd.random() < 0.4:
            s.m.watermark = max(s.m.watermark, clock - lateness)
            step()
    s.m.watermark = clock + 1  # the end: every event played
    for _ in range(200):
        step()
        if not s.m.blocked and s.m.idle():
            break
    assert s.m.idle(), "an event could never be played"
    return [(u, sc) for u, _, sc in played if sc], s.labels(), s.scores()


@settings(max_examples=150, deadline=None)
@given(events_st, st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from([0, MIN, 20 * MIN]),
       st.lists(st.integers(0, 3), min_size=36, max_size=36))
@example([("a", "push_sent", 0), ("a", "push_sent", 2 * H)], 1, 2, MIN, [0] * 36)
def test_scores_and_labels_do_not_depend_on_arrival_order_watermark_steps_or_version_timing(
        events, seed1, seed2, lateness, delays):
    one = run(events, seed1, lateness, delays)
    other = run(events, seed2, lateness, [0] * 36)
    assert one[1:] == other[1:]  # labels (with their frozen inputs and versions), final scores


def test_the_version_is_the_one_the_event_time_needs():
    s = Shard(grace_ms=GRACE)
    for w in versions(5):
        s.m.receive(w)
    s.apply("a", "push_sent", 3 * H + 4 * MIN)  # within the grace: still version 2
    s.apply("b", "push_sent", 3 * H + 6 * MIN)
    s.advance(4 * H)
    assert s.m.scores("a")["p_click_30m_version"] == str(version_for(3 * H + 4 * MIN, H, GRACE)) == "2"
    assert s.m.scores("b")["p_click_30m_version"] == "3"


def test_nothing_plays_before_the_watermark_passes_it_and_inputs_are_as_of_the_minute():
    s = Shard()
    forever(s.m)
    s.apply("u", "ad_click", 5 * MIN)
    s.apply("u", "push_sent", 10 * MIN + 30_000)
    s.apply("u", "ad_click", 10 * MIN + 1_000)  # same minute as the send: not in its input
    s.advance(10 * MIN + 30_000)
    assert "p_click_30m" not in s.m.scores("u")  # the watermark is not past the send yet
    s.advance(10 * MIN + 30_001)
    assert "p_click_30m" in s.m.scores("u")
    s.advance(2 * H)  # 30 min later, no open: a negative, labelled at its due time
    (label,) = [l for l in s.labels() if l[0] == "ctr"]
    x = dict(zip(SPECS["ctr"].input_names, label[6]))
    assert x["ad_clicks_7d"] == math.log1p(1) and x["event=push_sent"] == 1.0  # (one click)
    assert (label[2], label[3], label[4]) == (10 * MIN + 30_000, 40 * MIN + 30_000, False)


def test_when_each_model_scores():
    s = Shard()
    forever(s.m)
    for name, ts in (("page_view", 10), ("page_view", 20), ("push_sent", 30), ("push_sent", 40),
                     ("page_view", 31 * MIN), ("page_view", DAY_MS + 5)):
        s.apply("u", name, ts)
    s.advance(31 * MIN)
    # propensity once per session (the view at 10), churn once per day (at 10, ended by the view
    # at 20: activity), ctr per send (the second found the first open; 30 min later, a negative)
    assert {m: p.made_ms for m, p in s.m.book.open_by_user["u"].items()} == {
        "purchase_propensity": 10}
    assert [(l[0], l[2]) for l in s.m.book.open_by_user and s.labels()] == [
        ("churn_risk", 10), ("ctr", 30)]
    assert s.m.last["u"]["ctr"][0] == s.m.last["u"]["purchase_propensity"][0] == 0.5
    s.advance(DAY_MS + 6)
    # a new session at 31 min (more than 30 min after the send at 40 ms) re-scores propensity,
    # but its prediction of 10 is still open: not a second one. Churn: the view at 20 ended the
    # first (activity), the next day's first event opened another.
    opened = {m: p.made_ms for m, p in s.m.book.open_by_user["u"].items()}
    assert opened == {"purchase_propensity": 10, "churn_risk": DAY_MS + 5}
    assert s.m.once["u"]["purchase_propensity"] == DAY_MS + 5
    assert s.labels() == []


def test_labels_go_out_with_the_mark_and_a_user_waiting_for_a_version_holds_it():
    s = Shard()
    s.apply("u", "push_sent", 2 * H)
    s.apply("u", "push_opened", 2 * H + MIN)
    s.advance(3 * H)
    assert s.m.blocked == {"u"} and s.m.mark(3 * H) == 2 * H  # waits for version 1
    for w in versions(2):
        s.m.receive(w)
    s.advance(3 * H)
    assert not s.m.blocked and s.m.mark(3 * H) == 3 * H and s.m.idle()
    batches = dict(s.m.send(mark_ms=3 * H))
    assert set(batches) == set(SPECS)  # every model hears from the shard, labels or not
    (label,) = batches["ctr"].labels
    assert (label.y, label.labelled_ms, label.version) == (True, 2 * H + MIN, 1)
    assert isinstance(label.x, tuple)
    assert all(not b.labels for _, b in s.m.send(mark_ms=3 * H))  # sent once


def test_a_visitor_merged_at_a_login_counts_from_the_login_on_whenever_the_merge_came():
    visitor = [("page_view", 60 * MIN + i * MIN) for i in range(5)]

    def scenario(merge_first: bool):
        s = Shard()
        forever(s.m)
        s.apply("u", "page_view", 0)
        if merge_first:
            s.merge("u", visitor, ts=100 * MIN)
        s.apply("u", "push_sent", 90 * MIN)  # before the login: the visitor's views do not count
        if not merge_first:
            s.merge("u", visitor, ts=100 * MIN)
        s.apply("u", "push_sent", 140 * MIN)  # after it: they do
        s.advance(200 * MIN)
        return s.labels()

    a, b = scenario(True), scenario(False)
    assert a == b
    views = {l[2]: round(math.expm1(dict(zip(SPECS["ctr"].input_names, l[6]))["views_24h"]), 9)
             for l in a if l[0] == "ctr"}
    assert views == {90 * MIN: 1.0, 140 * MIN: 6.0}  # (the input is log(1 + views))


def test_a_profile_moves_with_its_state_and_a_drop_forgets_it():
    s = Shard()
    forever(s.m)
    s.apply("visitor", "page_view", 10)
    s.apply("visitor", "page_view", 20)
    s.advance(15)
    moved = s.m.take("visitor")
    assert s.m.scores("visitor") == {} and not s.m.noted
    s.m.adopt("user", moved)
    s.users["user"] = s.users.pop("visitor")
    assert s.m.score("user", "p_purchase_24h") == 0.5
    s.advance(10 + 31 * DAY_MS)  # the view at 20 plays, then both horizons pass
    got = {l[0]: l[4] for l in s.labels()}
    # no order within 24 h; the view at 20 was activity within the 30 days of the churn score
    assert got == {"purchase_propensity": False, "churn_risk": False}
    s.apply("user", "page_view", 32 * DAY_MS)
    s.m.drop("user")
    assert s.m.scores("user") == {} and len(s.m.book) == 0 and not s.m.noted


def test_events_noted_with_their_event_are_handed_back_in_event_time_once_played():
    m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=0)
    forever(m)
    users = {"u": PLAN.new_profile()}
    events = {ts: Event(event_id=f"e{ts}", type="track", name="page_view", user="u", ts_ms=ts,
                        channel="web", campaign="", revenue=0.0, cost=0.0, ip="")
              for ts in (30, 10, 20)}
    for ts, e in events.items():  # noted out of order, one without its event
        m.note("u", e.name, ts, e if ts != 20 else None)
    got = []

    def played(user, e):
        got.append((user, e.ts_ms, m.score(user, "p_purchase_24h")))
    m.advance(25, PLAN, users, played)
    assert got == [("u", 10, 0.5)]  # the score is already there for a rule to read
    m.advance(31, PLAN, users, played)
    assert [t for _, t, _ in got] == [10, 30]


def test_labels_leave_with_a_subject_hash_and_an_erasure_leaves_no_trace_of_the_user():
    import pickle

    m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=0, subject_key=b"k" * 32)
    forever(m)
    users = {"alice@example.com": PLAN.new_profile()}
    m.note("alice@example.com", "push_sent", 10)
    m.note("alice@example.com", "push_opened", 20)
    m.advance(30, PLAN, users)
    labels = [l for _, b in m.send(30) for l in b.labels]
    assert labels and all(l.user.startswith("s:") and "alice" not in l.user for l in labels)
    m.note("alice@example.com", "page_view", 40)  # noted, a timer due, a prediction open
    m.advance(50, PLAN, users)
    assert b"alice" in pickle.dumps(m)
    m.erase("alice@example.com")
    assert b"alice" not in pickle.dumps(m)
