"""Delayed labels (models/labels.py) against an oracle written from the definition: a prediction
resolves on the first target event within its horizon, else by timer at its due time; one open
prediction per (user, model); nothing after the scoring time leaks into the frozen input."""
from __future__ import annotations

import pickle

from hypothesis import given, settings, strategies as st

from models.labels import LabelRule, OpenPredictions

H = 100
RULES = {
    "buy": LabelRule(horizon_ms=H, targets={"order"}),                 # positive on the target
    "churn": LabelRule(horizon_ms=H, targets={"*"}, positive="timeout"),  # positive on silence
}

# one user's history in event-time order: (t, "predict") or (t, event name)
step = st.tuples(st.integers(0, 400), st.sampled_from(["predict", "order", "view"]))
histories = st.lists(step, max_size=30).map(lambda h: sorted(h, key=lambda s: s[0]))


def oracle(history, model: str):
    """[(made, labelled, y)] by reading the definition off the whole history at once."""
    rule = RULES[model]
    out, busy_until = [], -1  # index of the action that resolved the last opened prediction
    for i, (t, what) in enumerate(history):
        if what != "predict" or i <= busy_until:
            continue
        due = t + H
        hit = next((j for j in range(i + 1, len(history))
                    if history[j][1] != "predict" and history[j][0] <= due
                    and (model == "churn" or history[j][1] == "order")), None)
        if hit is not None:
            out.append((t, history[hit][0], model == "buy"))
            busy_until = hit
        else:
            # the timer resolves it before the first action after the due time (or at the end)
            after = next((j for j in range(i + 1, len(history)) if history[j][0] > due), None)
            out.append((t, due, model == "churn"))
            busy_until = (after - 1) if after is not None else len(history)
    return out


def run(history, snapshot_at: int | None = None):
    """The book fed the history in order (pickled and restored before action ``snapshot_at``),
    then every horizon passed."""
    book = OpenPredictions(RULES)
    labels = []
    for i, (t, what) in enumerate(history):
        if i == snapshot_at:
            book = pickle.loads(pickle.dumps(book))
        labels += book.expire("u", t)
        if what == "predict":
            for model in RULES:
                book.open("u", model, t, {"t": float(t)}, version=1, score=0.5)
        else:
            labels += book.on_event("u", what, t)
    labels += book.expire("u", 10**9)
    return labels, book


@settings(max_examples=300, deadline=None)
@given(histories)
def test_labels_are_what_the_definition_says(history):
    labels, book = run(history)
    for model in RULES:
        got = [(l.made_ms, l.labelled_ms, l.y) for l in labels if l.model == model]
        assert sorted(got) == sorted(oracle(history, model)), model
        # the frozen input is the one given when the prediction was made
        assert all(l.x == {"t": float(l.made_ms)} for l in labels if l.model == model)
    assert len(book) == 0 and book.next_due("u") is None  # everything resolved at the end


@settings(max_examples=100, deadline=None)
@given(histories, st.integers(0, 30))
def test_a_snapshot_at_any_point_resolves_the_same(history, cut):
    """Open predictions pickle (the shard's state): stopping anywhere and going on from the
    restored book gives the same labels."""
    whole, _ = run(history)
    labels, _ = run(history, snapshot_at=cut)
    key = lambda l: (l.model, l.made_ms, l.labelled_ms, l.y)  # noqa: E731
    assert sorted(map(key, labels)) == sorted(map(key, whole))


def test_what_the_profile_learns_after_the_prediction_does_not_reach_its_input():
    book = OpenPredictions(RULES)
    x = {"views_1h": 2.0}
    book.open("u", "buy", 0, x, version=7, score=0.3)
    x["views_1h"] = 9.0             # the profile moves on
    x["ordered"] = 1.0              # a planted input, set only once the label is known
    (label,) = book.on_event("u", "order", 50)
    assert label.x == {"views_1h": 2.0}
    assert (label.version, label.score, label.y) == (7, 0.3, True)


def test_a_merge_keeps_the_earlier_open_prediction_and_erasure_drops_them():
    book = OpenPredictions(RULES)
    book.open("user", "buy", 50, {}, 1, 0.2)
    book.open("visitor", "buy", 10, {"v": 1.0}, 1, 0.6)
    book.open("visitor", "churn", 10, {}, 1, 0.1)
    book.adopt("user", book.take("visitor"))
    assert book.next_due("visitor") is None
    assert {m: p.made_ms for m, p in book.open_by_user["user"].items()} == {"buy": 10, "churn": 10}
    book.erase("user")
    assert len(book) == 0 and book.expire("user", 10**9) == []
