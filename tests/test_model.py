"""The purchase-propensity model's fast score equals River's own prediction, bit for bit, whatever
the model has learned so far and whatever the profile's totals are."""
from hypothesis import given, settings, strategies as st

from config.registry import load_registry
from features.profile import FeaturePlan
from models.propensity import PurchasePropensity

PLAN = FeaturePlan(load_registry())
INPUTS = PLAN.model_inputs
N = len(PLAN._slots.slots)

totals = st.lists(st.integers(0, 10**7), min_size=N, max_size=N)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(totals, st.integers(0, 40), st.booleans()), max_size=30),
       st.lists(st.tuples(totals, st.integers(0, 40)), min_size=1, max_size=5))
def test_score_totals_equals_predict_one(examples, probes):
    model = PurchasePropensity(horizon_ms=1, learning_rate=0.05)
    for i, (t, pages, bought) in enumerate(examples):
        x = {name: (t[slot] / 100 if money else float(t[slot])) for name, slot, money in INPUTS}
        x["session_pages"] = float(pages)
        model.remember(f"u{i}", 0, x)
        (model.on_order if bought else model.expire)(f"u{i}", 1)
        for t2, pages2 in probes:  # after every update, so a stale compiled form would show
            x2 = {name: (t2[slot] / 100 if money else float(t2[slot])) for name, slot, money in INPUTS}
            x2["session_pages"] = float(pages2)
            assert model.score_totals(INPUTS, t2, pages2) == model.predict_one(x2)
    for t2, pages2 in probes:
        x2 = {name: (t2[slot] / 100 if money else float(t2[slot])) for name, slot, money in INPUTS}
        x2["session_pages"] = float(pages2)
        assert model.score_totals(INPUTS, t2, pages2) == model.predict_one(x2)
