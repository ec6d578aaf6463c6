"""The single learner of a model and its progressive quality, on tasks whose best possible
score is known (models/synthetic.py): labels arrive thousands of examples late, scores come from
published versions, and the learner must get within 0.01 of the optimum's AUC and calibration."""
from __future__ import annotations

import heapq
import math
import pickle
import random

import pytest
from hypothesis import given, settings, strategies as st

from models.learner import Learner, Weights
from models.quality import ModelQuality, log_loss
from models.synthetic import LogisticTask, exact_auc

# Three tasks shaped like the spec's models: inputs of their kinds, base rates of their targets.
TASKS = {
    # an order within 24 h: views, carts, past orders, spend; about 1 session in 8 converts
    "purchase_propensity": dict(
        weights={"views_1h": 0.35, "add_to_cart_1h": 0.9, "orders_30d": 0.45,
                 "revenue_30d": 0.04, "session_pages": 0.15},
        kinds={"views_1h": "count", "add_to_cart_1h": "count", "orders_30d": "count",
               "revenue_30d": "amount", "session_pages": "count"},
        bias=-6.5),
    # a click or open within 30 min of a send: the user's past rates and recency; about 1 in 20
    "ctr": dict(
        weights={"channel_rate_30d": 2.5, "clicks_7d": 0.5, "sends_7d": -0.25,
                 "days_since_last_click": -0.1},
        kinds={"channel_rate_30d": "rate", "clicks_7d": "count", "sends_7d": "count",
               "days_since_last_click": "count"},
        bias=-5.0),
    # silent for 30 days: falling sessions and logins; about 1 in 3
    "churn_risk": dict(
        weights={"sessions_7d": -0.6, "sessions_30d": -0.15, "logins_7d": -0.4,
                 "days_since_last_seen": 0.5},
        kinds={"sessions_7d": "count", "sessions_30d": "count", "logins_7d": "count",
               "days_since_last_seen": "count"},
        bias=0.3),
}


def progressive(task: LogisticTask, n: int, delay: tuple[int, int], publish_every: int = 200,
                seed: int = 5, learner: Learner | None = None, quality: ModelQuality | None = None):
    """Score each example with the last published version, learn its label ``delay`` examples
    later. Returns [(score, y, truth)], the drifts as (label count, labels of examples after the
    task's change), and the learner."""
    learner = learner or Learner("m")
    quality = quality or ModelQuality("m")
    weights = learner.publish()
    rng = random.Random(seed)
    pending: list = []
    out, drifts, labels, after_change = [], [], 0, 0
    change = task.change_at if task.change_at is not None else math.inf
    for i, (x, y, p) in enumerate(task.examples(n)):
        while pending and pending[0][0] <= i:
            _, j, xj, yj, sj = heapq.heappop(pending)
            learner.learn_one(xj, yj)
            labels += 1
            after_change += j >= change
            if quality.update(sj, yj, predicted_ms=j, labelled_ms=i):
                drifts.append((labels, after_change))
            if labels % publish_every == 0:
                weights = learner.publish()
        s = weights.predict_one(x)
        out.append((s, y, p))
        heapq.heappush(pending, (i + rng.randint(*delay), i, x, y, s))
    return out, drifts, learner


def auc_of(rows) -> float:
    return exact_auc([s for s, _, _ in rows], [y for _, y, _ in rows])


def oracle_auc(rows) -> float:
    """The true probabilities on the same labels: the best AUC any model can have here."""
    return exact_auc([p for _, _, p in rows], [y for _, y, _ in rows])


@pytest.mark.parametrize("model", sorted(TASKS))
def test_with_labels_thousands_of_examples_late_the_learner_reaches_the_optimum(model):
    spec = TASKS[model]
    task = LogisticTask(spec["weights"], spec["bias"], seed=7, kinds=spec["kinds"])
    rows, drifts, learner = progressive(task, 60_000, delay=(1_000, 5_000))
    second = rows[len(rows) // 2:]
    rate = sum(y for _, y, _ in second) / len(second)
    mean_score = sum(s for s, _, _ in second) / len(second)
    gap = oracle_auc(second) - auc_of(second)
    assert 0.02 < rate < 0.5  # the task is what its comment says
    assert gap < 0.01, (model, auc_of(second), oracle_auc(second))
    assert abs(mean_score - rate) < 0.01, (model, mean_score, rate)
    assert drifts == []  # a stationary task: no drift called
    assert learner.learned > 55_000  # every label but the last few thousand was learned


def test_a_planted_change_of_the_true_weights_is_called_within_500_labels_and_auc_recovers():
    spec = TASKS["purchase_propensity"]
    after = {"views_1h": -0.3, "add_to_cart_1h": 0.2, "orders_30d": 0.9, "revenue_30d": 0.0,
             "session_pages": -0.4}
    n, change = 40_000, 20_000
    # ADWIN watches the log loss: at a base rate near 1 in 3 a change of the ranking moves it.
    # (At 1 in 7 the same change leaves the mean loss nearly flat and is not called: a known
    # limit of a loss-based monitor, in the note.)
    task = LogisticTask(spec["weights"], spec["bias"] + 3.0, seed=11, kinds=spec["kinds"],
                        change_at=change, weights_after=after)
    rows, drifts, _ = progressive(task, n, delay=(1_000, 3_000))
    assert drifts, "the change was never called"
    first_labels, after_change = drifts[0]
    assert 0 < after_change <= 500, drifts  # called after the change, within 500 of its labels
    just_after = rows[change:change + 2_000]
    recovered = rows[change + 10_000:]
    assert oracle_auc(just_after) - auc_of(just_after) > 0.1  # the old weights were wrong
    assert oracle_auc(recovered) - auc_of(recovered) < 0.01


def test_published_weights_score_as_river_does_and_predicting_changes_nothing():
    learner = Learner("m", learning_rate=0.05)
    task = LogisticTask(TASKS["ctr"]["weights"], -1.0, seed=3, kinds=TASKS["ctr"]["kinds"])
    for x, y, _ in task.examples(2_000):
        learner.learn_one(x, y)
    weights = learner.publish()
    state = pickle.dumps(learner)
    for x, _, _ in task.examples(200):
        river = learner.predict_one(x)
        assert weights.predict_one(x) == pytest.approx(river, abs=1e-12)
        assert weights.predict_one(x) == weights.predict_one(x)
        assert learner.predict_one(x) == river
    assert pickle.dumps(learner) == state  # scoring learned nothing
    # an input never seen, or missing, counts as River counts it
    x = {"unknown": 5.0}
    assert weights.predict_one(x) == pytest.approx(learner.predict_one(x), abs=1e-12)


def test_a_restored_learner_continues_exactly_as_one_never_stopped():
    spec = TASKS["churn_risk"]
    examples = list(LogisticTask(spec["weights"], spec["bias"], seed=2, kinds=spec["kinds"])
                    .examples(3_000))
    whole, cut = Learner("m"), Learner("m")
    for x, y, _ in examples[:1_500]:
        whole.learn_one(x, y)
        cut.learn_one(x, y)
    cut = pickle.loads(pickle.dumps(cut))
    for x, y, _ in examples[1_500:]:
        whole.learn_one(x, y)
        cut.learn_one(x, y)
    assert whole.publish() == cut.publish()
    w = whole.publish()
    assert pickle.loads(pickle.dumps(w)) == w


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=1, max_size=120),
       st.integers(2, 50))
def test_the_rolling_auc_is_the_exact_auc_of_the_last_window(pairs, window):
    q = ModelQuality("m", window=window)
    for score, y in pairs:
        q.update(score, y, predicted_ms=0, labelled_ms=1_000)
    rows = {name: (value, n) for _, _, name, value, n in q.close_minute(0)}
    last = pairs[-window:]
    expected = exact_auc([s for s, _ in last], [y for _, y in last])
    if math.isnan(expected):
        assert "auc" not in rows  # one class only: no AUC is claimed
    else:
        assert rows["auc"][0] == pytest.approx(expected, abs=1e-9)
    assert rows["labels"] == (float(len(pairs)), len(pairs))
    loss = sum(log_loss(s, y) for s, y in pairs) / len(pairs)
    assert rows["log_loss"][0] == pytest.approx(loss)
    rate = sum(y for _, y in pairs) / len(pairs)
    assert rows["calibration"][0] == pytest.approx(sum(s for s, _ in pairs) / len(pairs) - rate)
    assert rows["label_delay_s"][0] == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(-1e3, 1e3), max_size=4),
       st.lists(st.tuples(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(-50, 50),
                                          max_size=3), st.booleans()), max_size=40))
def test_weights_equal_river_after_any_history(x, history):
    learner = Learner("m", learning_rate=0.05)
    for xi, yi in history:
        learner.learn_one(xi, yi)
    weights = learner.publish()
    assert isinstance(weights, Weights)
    assert weights.predict_one(x) == pytest.approx(learner.predict_one(x), abs=1e-9)
    assert 0.0 <= weights.predict_one(x) <= 1.0
