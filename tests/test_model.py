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


def x_of(totals, pages) -> dict[str, float]:
    """The example River sees, as FeaturePlan.model_x_of builds it from a profile."""
    x = {name: (totals[slot] / 100 if money else float(totals[slot])) for name, slot, money in INPUTS}
    x["session_pages"] = float(pages)
    return x


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(totals, st.integers(0, 40), st.booleans()), max_size=30),
       st.lists(st.tuples(totals, st.integers(0, 40)), min_size=1, max_size=5))
def test_score_totals_equals_predict_one(examples, probes):
    model = PurchasePropensity(horizon_ms=1, learning_rate=0.05)

    def check():
        for t, pages in probes:
            assert model.score_totals(INPUTS, t, pages) == model.predict_one(x_of(t, pages))

    check()
    for i, (t, pages, bought) in enumerate(examples):
        model.remember(f"u{i}", 0, x_of(t, pages))
        (model.on_order if bought else model.expire)(f"u{i}", 1)
        check()  # after every update, so a stale compiled form would show
