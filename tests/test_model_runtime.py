"""A profile shard's side of the models (models/runtime.py): scores by the version an event's time
needs, whenever the versions arrive; when each model scores; what moves with a profile."""
from __future__ import annotations

from hypothesis import example, given, settings, strategies as st

from models.learner import Learner
from models.runtime import DAY_MS, ShardModels
from models.spec import load_models
from models.training import version_for

H = 3_600_000
GRACE = 5 * 60_000
SPECS = load_models()


def versions(n: int) -> list:
    """n successive versions of each model, each learned from one more labelled example."""
    out = []
    for model, spec in SPECS.items():
        learner = Learner(model, learning_rate=0.5)
        for v in range(n):
            out.append(learner.publish(v, v))
            learner.learn_one({name: float(v % 3) for name in spec.input_names}, v % 2 == 0)
    return out


def replay(events, arrivals):
    """Feed events in order, holding one that cannot be scored yet (as the profile shard does).
    A version arrives at the earliest at the index it is paired with, and never while the
    shard still holds an event before its period boundary: the learner publishes version k
    only once every shard's mark passed k periods, and a shard's mark stops at what it holds."""
    m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=GRACE)
    held, scores = [], []
    queues: dict[str, list] = {}  # one channel per model
    for i, w in arrivals:
        queues.setdefault(w.model, []).append((i, w))

    def deliverable(index: int):
        for queue in queues.values():
            if queue and queue[0][0] <= index and not any(
                    ts < queue[0][1].version * H for _, _, ts in held):
                return queue
        return None

    def work(index: int) -> None:
        while True:
            while held and m.can_score(held[0][2]):
                u, n, t = held.pop(0)
                m.on_event(u, n, t, {"views_1h": t % 7}.get, session_start=t // (2 * H))
                scores.append((u, n, t, m.scores(u)))
            queue = deliverable(index)
            if queue is None:
                return
            m.receive(queue.pop(0)[1])

    for i, event in enumerate(events):
        work(i)
        held.append(event)
    work(len(events))
    assert not held, "a held event could never be scored"
    return scores, m


events_st = st.lists(st.tuples(st.sampled_from(["a", "b"]),
                               st.sampled_from(["page_view", "push_sent", "order_completed",
                                                "push_opened"]),
                               st.integers(0, 9 * H)), min_size=1, max_size=25).map(
    lambda es: sorted(es, key=lambda e: e[2]))


@settings(max_examples=120, deadline=None)
@given(events_st, st.data())
def test_scores_are_the_same_whenever_the_versions_arrive(events, data):
    all_versions = versions(12)

    def earliest(w) -> int:
        # The learner publishes version k once every shard's mark passed k periods: this shard
        # has then taken in every event before that time
        return next((i for i, e in enumerate(events) if e[2] >= w.version * H), len(events))

    early, _ = replay(events, sorted(((earliest(w), w) for w in all_versions),
                                     key=lambda a: a[0]))
    arrivals = [(data.draw(st.integers(earliest(w), len(events))), w) for w in all_versions]
    by_model: dict[str, int] = {}
    ordered = []
    for i, w in sorted(arrivals, key=lambda a: (a[1].model, a[1].version)):
        i = max(i, by_model.get(w.model, 0))  # a model's versions arrive in order
        by_model[w.model] = i
        ordered.append((i, w))
    ordered.sort(key=lambda a: a[0])  # stable: each model's versions stay in order
    late, _ = replay(events, ordered)
    assert late == early
    for user, name, ts, fields in early:
        if name == "push_sent":
            # the version the event's time needs (before the first: the first, a fresh model)
            assert fields["p_click_30m_version"] == str(max(version_for(ts, H, GRACE), 0))


def test_when_each_model_scores():
    m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=0)
    for w in versions(1):
        m.receive(w)
        w.last_version = 100
    values = {"views_1h": 2}.get
    assert m.on_event("u", "page_view", 10, values, session_start=10)  # propensity + churn
    assert set(m.last["u"]) == {"purchase_propensity", "churn_risk"}
    assert not m.on_event("u", "page_view", 20, values, session_start=10)  # same session and day
    assert m.on_event("u", "push_sent", 30, values, session_start=10)  # ctr: every send
    assert m.on_event("u", "push_sent", 40, values, session_start=10)
    assert m.on_event("u", "page_view", DAY_MS + 5, values, session_start=DAY_MS + 5)
    opened = {model: p.made_ms for model, p in m.book.open_by_user["u"].items()}
    # ctr's second send found the first open, whose 30 minutes had passed by the next day's
    # event: resolved first (a negative, at its due time), as its timer would have; churn's first
    # was resolved by the view at 20 (activity) and the next day's first event opened another
    assert opened == {"purchase_propensity": 10, "churn_risk": DAY_MS + 5}
    churn = [l for l in m.outbox["churn_risk"]]
    assert [(l.made_ms, l.labelled_ms, l.y) for l in churn] == [(10, 20, False)]
    ctr = [l for l in m.outbox["ctr"]]
    assert [(l.made_ms, l.labelled_ms, l.y) for l in ctr] == [(30, 30 + 30 * 60_000, False)]


def test_labels_go_out_with_every_shards_mark_and_the_input_frozen_as_a_tuple():
    m = ShardModels(SPECS, shard=3, period_ms=H, grace_ms=0)
    for w in versions(1):
        m.receive(w)
    m.on_event("u", "push_sent", 0, {"ad_clicks_7d": 4}.get, session_start=0)
    m.on_event("u", "push_opened", 60_000, {"ad_clicks_7d": 99}.get, session_start=0)
    batches = dict(m.send(mark_ms=61_000))
    assert set(batches) == set(SPECS)  # every model hears from the shard, labels or not
    (label,) = batches["ctr"].labels
    assert (label.y, label.labelled_ms, batches["ctr"].mark_ms, batches["ctr"].shard) == (True, 60_000, 61_000, 3)
    x = dict(zip(SPECS["ctr"].input_names, label.x))
    assert x["ad_clicks_7d"] == 4.0 and x["event=push_sent"] == 1.0
    # the send was also the day's first event: churn scored, and the open ended it (activity)
    assert [(l.made_ms, l.y) for l in batches["churn_risk"].labels] == [(0, False)]
    assert batches["purchase_propensity"].labels == []
    assert all(not b.labels for _, b in m.send(mark_ms=62_000))  # sent once


def test_a_profile_moves_with_its_predictions_and_scores_and_a_drop_forgets_them():
    m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=0)
    for w in versions(1):
        m.receive(w)
    m.on_event("visitor", "page_view", 10, {}.get, session_start=10)
    moved = m.take("visitor")
    assert m.scores("visitor") == {} and m.next_due("visitor") is None
    m.adopt("user", moved)
    assert m.score("user", "p_purchase_24h") == 0.5
    assert m.next_due("user") == 10 + SPECS["purchase_propensity"].horizon_ms + 1  # the nearer
    m.expire("user", 10 + 31 * DAY_MS)
    labels = {b.labels[0].model: b.labels[0].y for _, b in m.send(0) if b.labels}
    assert labels == {"purchase_propensity": False, "churn_risk": True}  # no order; silent
    m.on_event("user", "page_view", 32 * DAY_MS, {}.get, session_start=32 * DAY_MS)
    m.drop("user")
    assert m.scores("user") == {} and len(m.book) == 0


@settings(max_examples=300, deadline=None)
@given(events_st, st.lists(st.integers(0, 9 * H), max_size=10))
@example([("a", "push_sent", 0), ("a", "push_sent", 2 * H)], [H])  # a timer between two sends
def test_labels_and_scores_do_not_depend_on_when_the_timers_fire(events, timer_times):
    """A timer fires when the watermark passes a horizon, which depends on the batches: an event
    after the horizon resolves the prediction first, so the same labels and scores come out
    whether the timer fired before it or not."""
    def run(timers):
        m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=0)
        for w in versions(1):
            m.receive(w)
            w.last_version = 100
        scores, pending = [], sorted(timers)
        for user, name, ts in events:
            while pending and pending[0] <= ts:  # the watermark moved on before this event
                now = pending.pop(0)
                for u in ("a", "b"):
                    m.expire(u, now)
            m.on_event(user, name, ts, {"views_1h": ts % 5}.get, session_start=ts // (2 * H))
            scores.append(m.scores(user))
        for u in ("a", "b"):
            m.expire(u, 10**15)
        labels = sorted((b.model, l.user, l.made_ms, l.labelled_ms, l.y)
                        for _, b in m.send(0) for l in b.labels)
        return scores, labels

    assert run(timer_times) == run([])
