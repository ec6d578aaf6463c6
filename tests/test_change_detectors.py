"""The change detectors of issue 17 (alerts/changes.py) and their ensemble on generated series
(alerts/series_gen.py): each catches its kind of anomaly within a stated delay and stays quiet
on clean series of the kind; properties with hypothesis (scores in [0, 1], score_one changes
nothing, pickle round trip).

The threshold is the one the cross-validation chooses for the calibrated scores (about 0.13:
a strength as rare as 1 in 10,000 for the series); recall, delays and false alarms are over
six seeds each (figures measured when written: level shifts 16/18 within 13 rows, flat lines
15/15 within 7, counts 13/13 within 1; 0-1.4 false alarms per 1,000 rows; over 8 seeds)."""
from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings, strategies as st

from alerts.adaptive import AdaptiveGaussian
from alerts.changes import FlatLine, LevelShift, PoissonCounts
from alerts.ensemble import Ensemble
from alerts.series_gen import clean, generate

THRESHOLD = 0.13
SEEDS = range(6)


def scores(det, g) -> list[float]:
    out = []
    for t, x in zip(g.series.t, g.series.x):
        out.append(det.score_one(x, t).score)
        det.learn_one(x, t)
    return out


@pytest.mark.parametrize("kind, make, delay, recall, max_fa", [
    ("level_shift", LevelShift, 24, 0.85, 2.0),
    ("flatline", FlatLine, 12, 0.9, 1.0),
    ("low_counts", PoissonCounts, 6, 0.85, 3.0),
    ("variance_change", AdaptiveGaussian, 12, 0.9, 2.0),
    ("sparse_spikes", AdaptiveGaussian, 3, 0.9, 8.0),
])
def test_each_kind_is_caught_in_time_and_clean_series_stay_quiet(kind, make, delay, recall,
                                                                 max_fa):
    caught = total = 0
    for seed in SEEDS:
        g = generate(kind, seed)
        s = scores(make(), g)
        for a in g.anomalies:
            total += 1
            caught += any(v >= THRESHOLD for v in s[a:a + delay])
    assert total >= 6 and caught / total >= recall, (caught, total)
    alarms = rows = 0
    for seed in SEEDS:
        s = scores(make(), clean(kind, 100 + seed))
        start = int(0.15 * len(s))  # NAB's probation: the baselines are still learning
        alarms += sum(v >= THRESHOLD for v in s[start:])
        rows += len(s) - start
    assert 1000 * alarms / rows <= max_fa, 1000 * alarms / rows


# The default (AdaptiveEnsemble) on every generated kind, within 48 rows (4 hours); measured
# over 8 seeds when written: counts near zero 12/13 (false alarms 0.58 per 1,000 clean rows),
# odd cycles 16/17 (0.04), level shifts 12/18 (0.11), spikes 15/15 (3.6: the clean series has
# its usual spikes), variance 15/16 (0.26), daily 13/17 (0), drift 8/15 (0.07), weekly 8/20
# (0.62: the first weekend is new), flat lines 15/15 within 4 rows (0.11).
DEFAULT_BOUNDS = {"low_counts": (0.8, 1.5), "odd_period": (0.8, 0.5), "level_shift": (0.5, 1.0),
                  "sparse_spikes": (0.9, 6.0), "variance_change": (0.8, 1.0),
                  "daily_cycle": (0.6, 0.5), "drift": (0.4, 0.5), "weekly_cycle": (0.25, 1.5),
                  "flatline": (0.85, 1.0)}


@pytest.mark.parametrize("kind", sorted(DEFAULT_BOUNDS))
def test_the_default_catches_every_kind_and_stays_quiet_on_clean_series(kind):
    from alerts.ensemble import AdaptiveEnsemble

    recall, max_fa = DEFAULT_BOUNDS[kind]
    caught = total = alarms = rows = 0
    for seed in SEEDS:
        g = generate(kind, seed)
        s = scores(AdaptiveEnsemble(), g)
        for a in g.anomalies:
            total += 1
            caught += any(v >= THRESHOLD for v in s[a:a + 48])
        s = scores(AdaptiveEnsemble(), clean(kind, 100 + seed))
        start = int(0.15 * len(s))
        alarms += sum(v >= THRESHOLD for v in s[start:])
        rows += len(s) - start
    assert caught / total >= recall, (caught, total)
    assert 1000 * alarms / rows <= max_fa, 1000 * alarms / rows


def test_poisson_counts_stay_silent_on_bursty_counts_and_speak_on_poisson_ones():
    """Counts whose variance is well above their mean (a gamma-mixed Poisson, dispersion ~3.5:
    tweets, bots) are not judged as Poisson; the same mean drawn as Poisson is, and a burst
    of it scores."""
    import random as _random

    from alerts.series_gen import _poisson

    def run(bursty: bool) -> tuple[float, float]:
        rng, det, out = _random.Random(4), PoissonCounts(), []
        for i in range(288 * 8):
            lam = rng.gammavariate(2.0, 2.5) if bursty else 5.0
            x = float(_poisson(rng, lam)) + (25.0 if i == 288 * 7 else 0.0)
            out.append(det.score_one(x, t=i * 300_000).score)
            det.learn_one(x, t=i * 300_000)
        return max(out), det.dispersion

    top, dispersion = run(bursty=True)
    assert dispersion > 2.5 and top == 0.0
    top, dispersion = run(bursty=False)
    assert dispersion < 1.2 and top > THRESHOLD


def test_a_second_level_shift_is_judged_against_the_new_level():
    g = generate("level_shift", 0)  # three shifts
    assert len(g.anomalies) == 3
    s = scores(LevelShift(), g)
    assert all(any(v >= THRESHOLD for v in s[a:a + 24]) for a in g.anomalies)


def test_a_long_flat_line_scores_while_it_grows_rarer_then_stays_quiet():
    g = generate("flatline", 1)
    s = scores(FlatLine(), g)
    a = g.anomalies[0]
    assert g.series.x[a:a + 100] == [g.series.x[a]] * 100  # flat for at least 100 values
    assert 1 <= sum(v > 0 for v in s[a:a + 30]) <= 15
    assert max(s[a + 30:a + 100]) == 0.0


def test_a_flat_line_is_not_judged_on_a_series_that_often_repeats_itself():
    """Prices on a coarse grid repeat one value in about 1 of 7 steps: their runs say nothing
    of a dead collector, so a run of 40 is not scored; the same run on a fine grid is."""
    import random as _random

    def top_score(grid: float) -> float:
        rng, det, out = _random.Random(8), FlatLine(), []
        xs = [round((50 + rng.gauss(0, 2)) / grid) * grid for _ in range(3000)] + [50.0] * 40
        for x in xs:
            out.append(det.score_one(x).score)
            det.learn_one(x)
        return max(out[3000:])

    assert top_score(grid=1.0) == 0.0  # share of repeats ~0.14: above max_share, silent
    assert top_score(grid=0.001) > THRESHOLD


def test_poisson_counts_stay_silent_on_a_series_that_is_not_counts():
    s = scores(PoissonCounts(), generate("sparse_spikes", 0))
    assert max(s) == 0.0


def test_the_ensemble_names_the_member_that_spoke_and_keeps_its_words():
    e = Ensemble({"gaussian": AdaptiveGaussian, "flat": FlatLine, "shift": LevelShift})
    g = generate("flatline", 2)
    a = g.anomalies[0]
    for t, x in list(zip(g.series.t, g.series.x))[:a + 3]:
        who, s = e.judge(x, t)
        e.learn_one(x, t)
    assert who == "flat" and s.score > THRESHOLD and s.mu == g.series.x[a]
    assert s.z >= 2  # the run's length, in values


MAKERS = {"level_shift": lambda: LevelShift(warmup=5, tail_warmup=10),
          "flat_line": lambda: FlatLine(warmup=5, tail_warmup=10),
          "poisson": lambda: PoissonCounts(warmup=5, tail_warmup=10),
          "ensemble": lambda: Ensemble({"g": lambda: AdaptiveGaussian(warmup=5, lik_warmup=10,
                                                                       tail_warmup=10),
                                        "f": lambda: FlatLine(warmup=5, tail_warmup=10)})}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(MAKERS)),
       st.lists(st.one_of(st.integers(0, 30).map(float),
                          st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=300),
       st.floats(-1e7, 1e7, allow_nan=False))
def test_scores_in_0_1_scoring_changes_nothing_and_pickles(name, xs, probe):
    det = MAKERS[name]()
    for i, x in enumerate(xs):
        det.score_one(x, t=i * 300_000)
        det.learn_one(x, t=i * 300_000)
    before = pickle.dumps(det)
    t = len(xs) * 300_000
    first, second = det.score_one(probe, t=t), det.score_one(probe, t=t)
    assert first == second and pickle.dumps(det) == before
    assert 0.0 <= first.score <= 1.0
    assert pickle.loads(before).score_one(probe, t=t) == first


def test_the_default_shares_one_baseline_and_scores_as_two_would():
    """AdaptiveEnsemble's shift detector reads the Gaussian's baseline (one time-of-day shape
    per series, not two): the scores are those of an ensemble whose members each keep their
    own, and a pickle keeps the sharing."""
    from alerts.ensemble import AdaptiveEnsemble

    for kind in ("level_shift", "daily_cycle"):
        g = generate(kind, 1)
        shared = AdaptiveEnsemble()
        separate = Ensemble({"gaussian": AdaptiveGaussian, "shift": LevelShift,
                             "counts": PoissonCounts, "flat": FlatLine})
        for t, x in zip(g.series.t, g.series.x):
            assert shared.score_one(x, t) == separate.score_one(x, t)
            shared.learn_one(x, t)
            separate.learn_one(x, t)
    copy = pickle.loads(pickle.dumps(shared))
    assert copy.members["shift"].base is copy.members["gaussian"]
    assert shared.members["shift"].base is shared.members["gaussian"]
