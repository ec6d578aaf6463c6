"""Leakage (issue 16): a planted input that only the label's own event sets (the orders of the
last 24 hours, for a model predicting an order within 24 hours) does not lift the AUC. The
profile shard's models (models/runtime.py) freeze each prediction's inputs as of the start of
its event's minute; the order comes ten minutes later, so the planted input is 0 in every
frozen vector. Read at the label's time instead, the same input gives the answer away: the same
learner then ranks perfectly, which shows the test could fail."""
from __future__ import annotations

import random

from config.registry import load_registry
from features.profile import FeaturePlan
from flows.events import Event
from models.learner import Learner
from models.runtime import ShardModels
from models.spec import load_models
from tests.model_oracle import auc

H, MIN = 3_600_000, 60_000
T0 = 1_795_132_800_000
PLAN = FeaturePlan(load_registry())
SPECS = load_models(doc={"models": [{
    "name": "purchase_propensity", "score_field": "p_purchase_24h", "description": "planted",
    "predict_on": ["page_view"], "once_per": "session", "target": ["order_completed"],
    "horizon": "24h", "inputs": [{"name": "views_1h"}, {"name": "orders_24h"}]}]})


def test_an_input_set_only_by_the_label_event_does_not_lift_the_auc():
    rnd = random.Random(5)
    m = ShardModels(SPECS, shard=0, period_ms=H, grace_ms=5 * MIN)
    fresh = Learner("purchase_propensity").publish(0, 10**6)
    m.receive(fresh)
    users, buyers, n = {}, set(), 0
    for i in range(400):  # one visit each, spread over four days; half of them buy
        user, t = f"u{i}", T0 + rnd.randrange(4 * 24 * H)
        names = ["page_view", "page_view"] + (["order_completed"] if rnd.random() < 0.5 else [])
        for k, name in enumerate(names):
            n += 1
            e = Event(event_id=f"e{n}", type="track", name=name, user=user, ts_ms=t + k * 10 * MIN,
                      channel="web", campaign="", revenue=20.0 if name == "order_completed" else 0.0,
                      cost=0.0, ip="")
            PLAN.apply(users.setdefault(user, PLAN.new_profile()), e)
            m.note(user, name, e.ts_ms)
        if names[-1] == "order_completed":
            buyers.add(user)
    m.advance(T0 + 6 * 24 * H, PLAN, users)  # every event played, every horizon closed
    labels = sorted((l for _, b in m.send(0) for l in b.labels), key=lambda l: l.made_ms)
    assert len(labels) == 400 and sum(l.y for l in labels) == len(buyers)
    names = SPECS["purchase_propensity"].input_names
    planted = names.index("orders_24h")
    assert all(l.x[planted] == 0.0 for l in labels)  # as of the scoring minute: not yet

    def second_half_auc(vectors: list[tuple]) -> float:
        learner = Learner("purchase_propensity", learning_rate=0.1)
        half = len(labels) // 2
        for x, l in zip(vectors[:half], labels[:half]):
            learner.learn_one(dict(zip(names, x)), l.y)
        return auc([(learner.predict_one(dict(zip(names, x))), l.y)
                    for x, l in zip(vectors[half:], labels[half:])])[0]

    frozen = second_half_auc([l.x for l in labels])
    assert abs(frozen - 0.5) < 0.1, frozen
    # the same input read when the label is known (the order counted): a perfect ranking
    leaked = second_half_auc([tuple(1.0 if k == planted and l.y else v for k, v in enumerate(l.x))
                              for l in labels])
    assert leaked > 0.95, leaked
