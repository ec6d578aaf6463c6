"""The tail calibration of alarm strengths (alerts/calibration.py): its p-values are calibrated
on streams whose law the test knows, whatever their scale; properties with hypothesis."""
from __future__ import annotations

import math
import pickle
import random

import pytest
from hypothesis import given, settings, strategies as st

from alerts.adaptive import AdaptiveGaussian
from alerts.calibration import TailCalibration, p_score


def _share_below(draw, alpha: float, n: int = 40_000, seed: int = 3) -> float:
    """Score then learn n draws; the share of those after the warm-up whose p <= alpha."""
    rng, cal = random.Random(seed), TailCalibration()
    hits = judged = 0
    for i in range(n):
        s = draw(rng)
        if i >= 2_000:
            judged += 1
            hits += cal.p_value(s) <= alpha
        cal.learn_one(s)
    return hits / judged


LAWS = {  # strengths as a detector sees them: |normal|, exponential, a heavier (log-normal) tail
    "half_normal": lambda rng: abs(rng.gauss(0, 1)),
    "exponential": lambda rng: rng.expovariate(1.0),
    "lognormal": lambda rng: rng.lognormvariate(0, 0.6),
}


@pytest.mark.parametrize("law", sorted(LAWS))
@pytest.mark.parametrize("scale", [0.2, 1.0, 25.0])
def test_the_p_values_are_calibrated_whatever_the_law_and_scale(law, scale):
    """Of the values judged, about alpha have p <= alpha (within a factor of 3: the tail is
    modelled as exponential, exact for the exponential law, near for the others)."""
    for alpha in (1e-2, 1e-3):
        share = _share_below(lambda rng: scale * LAWS[law](rng), alpha)
        assert alpha / 3 <= share <= alpha * 3, (law, scale, alpha, share)


def test_the_same_rarity_gets_the_same_score_on_a_spiky_and_a_smooth_series():
    rng = random.Random(11)
    smooth, spiky = TailCalibration(), TailCalibration()
    for _ in range(20_000):
        x = rng.expovariate(1.0)
        smooth.learn_one(x)
        spiky.learn_one(4 * x)
    exact = math.exp(-9.0)  # P(X >= 9) for the unit exponential law
    for cal, s in ((smooth, 9.0), (spiky, 36.0)):
        assert exact / 2 < cal.p_value(s) < exact * 2
    assert abs(p_score(smooth.p_value(9.0)) - p_score(spiky.p_value(36.0))) < 0.02


def test_before_its_warm_up_nothing_is_rare():
    cal = TailCalibration(warmup=50)
    for i in range(49):
        cal.learn_one(1.0 + i % 3)
    assert cal.p_value(1e6) == 1.0 and not cal.warm()
    cal.learn_one(1.0)
    assert cal.p_value(1e6) < 1e-9 and cal.warm()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=0, max_size=400),
       st.floats(0, 1e7, allow_nan=False), st.floats(0, 1e7, allow_nan=False))
def test_p_is_a_probability_that_falls_as_the_strength_grows(history, a, b):
    cal = TailCalibration(warmup=10)
    for s in history:
        cal.learn_one(s)
    lo, hi = sorted((a, b))
    p_lo, p_hi = cal.p_value(lo), cal.p_value(hi)
    assert 0.0 <= p_hi <= p_lo <= 1.0
    assert 0.0 <= p_score(p_hi) <= 1.0 and p_score(p_hi) >= p_score(p_lo)
    restored = pickle.loads(pickle.dumps(cal))
    assert restored.p_value(hi) == p_hi


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
       st.floats(-1e7, 1e7, allow_nan=False))
def test_the_calibrated_detector_scores_in_0_1_and_scoring_changes_nothing(xs, probe):
    det = AdaptiveGaussian(warmup=5, lik_warmup=10, tail_warmup=10)
    for i, x in enumerate(xs):
        det.learn_one(x, t=i * 60_000)
    before = pickle.dumps(det)
    t = len(xs) * 60_000
    first, second = det.score_one(probe, t=t), det.score_one(probe, t=t)
    assert first == second and pickle.dumps(det) == before
    assert 0.0 <= first.score <= 1.0
    assert pickle.loads(before).score_one(probe, t=t) == first
