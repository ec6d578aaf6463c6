"""Detectors on known series: injected shifts, spikes, drops and seasonal patterns are caught
within a bounded delay, noise and small samples are not; protocol properties (scores in
[0, 1], score_one changes nothing, pickling, warm-up, direction, min_change)."""
import math
import pickle
import random

import pytest
from hypothesis import given, settings, strategies as st

from alerts.adaptive import AdaptiveGaussian
from alerts.detectors import (BinomialRatio, EWGaussian, RobustGaussian, SeasonalGaussian,
                              WindowedGaussian)
from alerts.nab import NabWindowedGaussian

FIVE_MIN = 300_000
HOUR = 3_600_000

# Each detector with parameters for a 5-minute series of ~N(100, 2).
FACTORIES = {
    "windowed": lambda **kw: WindowedGaussian(**{"k": 4, "window": 200, "warmup": 20, **kw}),
    "ew": lambda **kw: EWGaussian(**{"k": 4, "half_life": 100, "warmup": 20, **kw}),
    "robust": lambda **kw: RobustGaussian(**{"k": 4, "window": 200, "warmup": 20, **kw}),
    "seasonal": lambda **kw: SeasonalGaussian(**{"k": 4, "slots": 24, "warmup": 3, **kw}),
    "adaptive": lambda **kw: AdaptiveGaussian(**{"warmup": 20, "lik_warmup": 100, **kw}),
}


def noise(n, seed=1, sd=2.0, level=100.0):
    rng = random.Random(seed)
    return [level + rng.gauss(0, sd) for _ in range(n)]


def run(det, values, start=0):
    """Score then learn each value; the rows (from ``start`` on) that breach, with directions."""
    hits = []
    for i, x in enumerate(values):
        s = det.score_one(x, t=i * FIVE_MIN)
        if s.breach and i >= start:
            hits.append((i, s.direction))
        det.learn_one(x, t=i * FIVE_MIN)
    return hits


def first_delay(det, values, at):
    hits = [i for i, _ in run(det, values, start=at)]
    return hits[0] - at if hits else None


@pytest.mark.parametrize("name", FACTORIES)
def test_spike_caught_at_once_and_drop_too(name):
    for sign, direction in ((1, "up"), (-1, "down")):
        values = noise(1200, seed=2)
        values[1100] = 100 + sign * 60  # 30 sigmas
        hits = run(FACTORIES[name](), values, start=1000)
        assert hits == [(1100, direction)], hits


@pytest.mark.parametrize("name", FACTORIES)
def test_level_shift_caught_within_bound(name):
    values = noise(1100, seed=3) + [130 + x - 100 for x in noise(100, seed=4)]  # +15 sigmas
    delay = first_delay(FACTORIES[name](), values, at=1100)
    assert delay is not None and delay <= 2, delay


@pytest.mark.parametrize("name", ["windowed", "ew", "robust", "adaptive"])
def test_pure_noise_stays_quiet(name):
    # k=4 (8 for ours): a breach on 2,000 normal values is a 1-in-15,000 event or rarer.
    assert run(FACTORIES[name](), noise(2000, seed=5), start=0) == []


def test_adaptive_likelihood_catches_a_moderate_shift_that_no_single_value_shows():
    # +3.5 sigmas for good: no value is beyond k=8, but six in a row are far above usual.
    values = noise(1500, seed=6) + [107 + x - 100 for x in noise(100, seed=7)]
    assert first_delay(AdaptiveGaussian(warmup=20, lik_warmup=100), values, at=1500) <= 6
    assert first_delay(AdaptiveGaussian(warmup=20, lik_window=0), values, at=1500) is None


def test_adaptive_cooldown_one_alarm_per_incident():
    values = noise(1200, seed=8)
    for i in range(1100, 1110):  # ten bad values in a row: one alarm, not ten
        values[i] += 60
    assert [i for i, _ in run(AdaptiveGaussian(warmup=20, lik_warmup=100), values, 1000)] == [1100]
    assert len(run(AdaptiveGaussian(warmup=20, lik_warmup=100, cooldown=0), values, 1000)) >= 10


def daily(days, peak=400.0, base=100.0, seed=9, step=HOUR):
    """(t, value): base with noise, ``peak`` at 20:00 every day."""
    rng = random.Random(seed)
    out = []
    for t in range(0, days * 86_400_000, step):
        hour = (t // HOUR) % 24
        out.append((t, (peak if hour == 20 else base) + rng.gauss(0, 3)))
    return out


@pytest.mark.parametrize("name", ["seasonal", "adaptive"])
def test_daily_peak_is_normal_but_the_same_value_at_night_is_not(name):
    det = FACTORIES[name](**({"lik_warmup": 50} if name == "adaptive" else {}))
    alarms = []
    for i, (t, x) in enumerate(daily(14)):
        s = det.score_one(x, t)
        if i >= 24 * 7 and s.breach:  # after a week: the peak is known
            alarms.append(t)
        det.learn_one(x, t)
    assert alarms == []
    night = 14 * 86_400_000 + 3 * HOUR
    assert det.score_one(400, night).breach and det.score_one(400, night).direction == "up"
    assert not det.score_one(400, 14 * 86_400_000 + 20 * HOUR).breach


def test_plain_detector_cannot_tell_the_peak_from_the_night():
    det = EWGaussian(k=4, half_life=100, warmup=20)
    for t, x in daily(14):
        det.learn_one(x, t)
    night = det.score_one(400, 14 * 86_400_000 + 3 * HOUR)
    peak = det.score_one(400, 14 * 86_400_000 + 20 * HOUR)
    assert night == peak  # the same judgement: a page every evening, or none at night


def test_adaptive_missing_daily_peak_caught_within_a_day():
    values = daily(14, step=FIVE_MIN)
    det = AdaptiveGaussian(warmup=20)
    t_start = 12 * 86_400_000
    hits = []
    for t, x in values:
        if t >= t_start and (t // HOUR) % 24 == 20:
            x = 100.0  # day 12 on: the evening peak does not come
        s = det.score_one(x, t)
        if t >= t_start and s.breach:
            hits.append(t)
        det.learn_one(x, t)
    assert hits and hits[0] - (t_start + 20 * HOUR) <= 3 * FIVE_MIN
    assert det.score_one(100.0, t_start + 20 * HOUR).direction in ("down", "")


def test_ratio_small_samples_ignored_real_drop_caught():
    det = BinomialRatio(k=3, half_life=24, warmup=6, min_trials=30)
    rng = random.Random(10)
    for _ in range(48):
        n = 1000
        det.learn_one(sum(rng.random() < 0.05 for _ in range(n)) / n, n=n)
    assert not det.score_one(0.0, n=5).breach  # 0 of 5: nothing to say
    assert not det.score_one(0.5, n=4).breach
    assert not det.score_one(0.06, n=1000).breach  # within sampling noise
    drop = det.score_one(0.02, n=1000)
    assert drop.breach and drop.direction == "down"


# --- protocol properties, every detector ---------------------------------------------------

ALL = {**FACTORIES,
       "ratio": lambda **kw: BinomialRatio(**{"k": 3, "warmup": 5, **kw}),
       "nab_windowed": lambda **kw: NabWindowedGaussian(**{"window": 50, "step": 5, **kw})}

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=80), warmup=st.integers(2, 30))
def test_scores_in_unit_interval_never_raise_no_breach_in_warmup(name, values, warmup):
    det = ALL[name](warmup=warmup)
    for i, x in enumerate(values):
        n = 100.0 if name == "ratio" else None
        x = min(max(abs(x) / 1e6, 0.0), 1.0) if name == "ratio" else x
        s = det.score_one(x, t=i * FIVE_MIN, n=n)
        assert 0.0 <= s.score <= 1.0 and not math.isnan(s.score)
        if i < warmup:
            assert not s.breach
        det.learn_one(x, t=i * FIVE_MIN, n=n)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None)
@given(values=st.lists(finite, min_size=30, max_size=60), probe=finite)
def test_score_one_changes_nothing_and_pickle_keeps_the_future(name, values, probe):
    ratio = name == "ratio"
    scale = (lambda v: min(abs(v) / 1e6, 1.0)) if ratio else (lambda v: v)
    n = 200.0 if ratio else None
    det = ALL[name](warmup=5)
    for i, x in enumerate(values[:20]):
        det.learn_one(scale(x), t=i * FIVE_MIN, n=n)
    first = det.score_one(scale(probe), t=20 * FIVE_MIN, n=n)
    assert det.score_one(scale(probe), t=20 * FIVE_MIN, n=n) == first
    twin = pickle.loads(pickle.dumps(det))
    for i, x in enumerate(values[20:], start=20):
        a = det.score_one(scale(x), t=i * FIVE_MIN, n=n)
        b = twin.score_one(scale(x), t=i * FIVE_MIN, n=n)
        assert a == b or (math.isnan(a.z) and math.isnan(b.z))
        det.learn_one(scale(x), t=i * FIVE_MIN, n=n)
        twin.learn_one(scale(x), t=i * FIVE_MIN, n=n)


@pytest.mark.parametrize("name", FACTORIES)
def test_direction_respected(name):
    for direction, caught, ignored in (("up", 160, 40), ("down", 40, 160)):
        det = FACTORIES[name](direction=direction)
        for i, x in enumerate(noise(300, seed=11)):
            det.learn_one(x, t=i * FIVE_MIN)
        t = 300 * FIVE_MIN
        assert det.score_one(caught, t).breach and det.score_one(caught, t).direction == direction
        ignored_score = det.score_one(ignored, t)
        assert not ignored_score.breach and ignored_score.score == 0.0


@pytest.mark.parametrize("name", FACTORIES)
def test_min_change_respected(name):
    # sigma ~2 around 100: 120 is 10 sigmas but only +20 %; min_change=0.3 wants +30 %.
    plain, gated = FACTORIES[name](), FACTORIES[name](min_change=0.3)
    for i, x in enumerate(noise(300, seed=12)):
        plain.learn_one(x, t=i * FIVE_MIN)
        gated.learn_one(x, t=i * FIVE_MIN)
    t = 300 * FIVE_MIN
    assert plain.score_one(120, t).breach and not gated.score_one(120, t).breach
    assert gated.score_one(140, t).breach


def test_adaptive_score_carries_the_band():
    det = AdaptiveGaussian(warmup=20, lik_warmup=50)
    for i, x in enumerate(noise(400, seed=13)):
        det.learn_one(x, t=i * FIVE_MIN)
    s = det.score_one(130, t=400 * FIVE_MIN)
    assert abs(s.mu - 100) < 1 and 1 < s.sigma < 3 and s.k == 8
    assert s.z == pytest.approx((130 - s.mu) / s.sigma)
    assert s.score == pytest.approx(abs(s.z) / (abs(s.z) + s.k), rel=1e-9) or s.score > 0.5


def test_adaptive_rejects_bad_parameters():
    with pytest.raises(ValueError):
        AdaptiveGaussian(half_life=0)
    with pytest.raises(ValueError):
        AdaptiveGaussian(cooldown=-1)
    with pytest.raises(ValueError):
        AdaptiveGaussian(direction="sideways")
