"""Shapes found from the data (alerts/seasons.py) and their use by AdaptiveGaussian (issue 17):
the period of a cycle is recovered whatever it is, a series without one gets none, a refined
period keeps the shape in place; a cycle that is not a day and a weekly pattern become the
baseline, and the anomalies they hide are caught; properties with hypothesis."""
from __future__ import annotations

import math
import pickle
import random

from hypothesis import given, settings, strategies as st

from alerts.adaptive import AdaptiveGaussian
from alerts.seasons import PeriodFinder, Profile
from alerts.series_gen import clean, generate

FIVE_MIN = 300_000
THRESHOLD = 0.13


def scores(det, xs, ts):
    out = []
    for t, x in zip(ts, xs):
        out.append(det.score_one(x, t).score)
        det.learn_one(x, t)
    return out


@settings(max_examples=60, deadline=None)
@given(st.floats(8, 170), st.floats(0.0, 0.5), st.floats(0, 2 * math.pi), st.integers(0, 10**6))
def test_the_period_of_a_noisy_cycle_is_found(period, noise, phase, seed):
    rng = random.Random(seed)
    f = PeriodFinder(window=512)
    estimates = []
    for i in range(512 * 3):
        if f.learn_one(100 + 10 * math.sin(2 * math.pi * i / period + phase) + rng.gauss(0, 10 * noise)):
            estimates.append(f.period)
    # a period up to a third of the window: each estimate within 5 %, their median within 2 %
    # (measured over 400 random cases, periods 8-170, noise up to 0.5: worst 4.3 %, median
    # 1.6 %; hypothesis had found short periods fitted over a whole cycle at the multiples)
    assert len(estimates) == 9, estimates
    assert all(abs(e - period) <= 0.05 * period for e in estimates), (period, estimates)
    assert abs(sorted(estimates)[4] - period) <= 0.02 * period, (period, estimates)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["white", "walk", "ar"]), st.integers(0, 10**6))
def test_a_series_without_a_cycle_mostly_has_none(kind, seed):
    rng = random.Random(seed)
    f = PeriodFinder(window=512)
    x, found, tries = 0.0, 0, 0
    for _ in range(512 * 6):
        e = rng.gauss(0, 1)
        x = e if kind == "white" else x + e if kind == "walk" else 0.9 * x + e
        if f.learn_one(x):
            tries += 1
            found += f.period > 0
    assert tries == 21 and found <= 2  # measured: 3 cycles in 1,140 estimates over 60 series


def test_a_refined_period_keeps_the_shape_in_place():
    p = Profile(period=100.0, slots=10, half_life=4, per_period=100, anchor=7.0)
    for t in range(7, 1007):
        p.learn_one(float(p.slot(t)), t)  # each slot learns its own number
    now = 1007
    before = p.mean_at(now)
    p.rephase(103.0, now)
    assert p.mean_at(now) == before and p.period == 103.0
    assert p.mean_at(now + 51.5) == p.means[(p.slot(now) + 5) % 10]  # half the new period on


def test_an_odd_cycle_becomes_the_baseline_and_its_anomalies_are_caught():
    caught = total = 0
    for seed in range(6):
        g = generate("odd_period", seed)
        det = AdaptiveGaussian()
        s = scores(det, g.series.x, g.series.t)
        assert det.shape_in_use(g.series.t[-1]) == "cycle", seed
        for a in g.anomalies:
            total += 1
            caught += any(v >= THRESHOLD for v in s[a:a + 12])
    # without the cycle: 7 of 17 within 48 rows (8 seeds); with it 16 of 17 within 8
    assert total >= 10 and caught / total >= 0.85, (caught, total)
    old = [scores(AdaptiveGaussian(period_window=0), *_xt(generate("odd_period", seed)))
           for seed in range(6)]
    old_caught = sum(any(v >= THRESHOLD for v in s[a:a + 12])
                     for seed, s in enumerate(old) for a in generate("odd_period", seed).anomalies)
    assert old_caught < caught


def test_an_alert_on_a_found_cycle_names_it_in_hours():
    rng = random.Random(2)
    det = AdaptiveGaussian()
    period = 87.0  # values of 5 minutes: 7.25 hours
    for i in range(3000):
        det.learn_one(50 + 20 * math.sin(2 * math.pi * i / period) + rng.gauss(0, 1), t=i * FIVE_MIN)
    t = 3000 * FIVE_MIN
    words = det.baseline_words(t)
    assert words.startswith("cycle of ") and words.endswith(" h")
    assert abs(float(words.split()[2]) - 7.25) <= 0.05, words
    s = det.score_one(50 + 20 * math.sin(2 * math.pi * 3000 / period) + 15, t=t)
    assert s.breach and s.baseline == words and abs(s.sigma - 1) < 0.5


def test_clean_odd_cycles_stay_quiet():
    alarms = rows = 0
    for seed in range(6):
        g = clean("odd_period", 100 + seed)
        s = scores(AdaptiveGaussian(), g.series.x, g.series.t)
        start = int(0.15 * len(s))
        alarms += sum(v >= THRESHOLD for v in s[start:])
        rows += len(s) - start
    assert 1000 * alarms / rows <= 0.5  # measured 0.07 over 8 seeds


def _xt(g):
    return g.series.x, g.series.t


def _weekly(weeks: int, seed: int, drop_day: int | None = None):
    """5-minute values: a daily wave, weekends at 40 %; ``drop_day`` (a weekday) at 40 %."""
    rng = random.Random(seed)
    xs, ts = [], []
    t0 = 1_704_067_200_000  # a Monday, 00:00 UTC
    for i in range(weeks * 7 * 288):
        day = i // 288
        low = day % 7 >= 5 or day == drop_day
        xs.append(200 * (0.4 if low else 1.0) * (1 + 0.3 * math.sin(2 * math.pi * i / 288))
                  + rng.gauss(0, 4))
        ts.append(t0 + i * FIVE_MIN)
    return xs, ts


def test_the_week_becomes_the_baseline_weekends_stop_alarming_and_a_weekday_at_weekend_level_is_caught():
    drop = 3 * 7 + 2  # the fourth week's Wednesday
    xs, ts = _weekly(4, seed=1, drop_day=drop)
    det = AdaptiveGaussian()
    s = scores(det, xs, ts)
    third_weekend = range((2 * 7 + 5) * 288, (2 * 7 + 7) * 288)
    assert det.shape_in_use(ts[third_weekend[0] + 100]) == "week"
    assert max(s[i] for i in third_weekend) < THRESHOLD  # the weekend is expected by now
    assert max(s[drop * 288:drop * 288 + 12]) >= THRESHOLD  # the drop, within an hour
    # the first weekend is new: it alarms, with or without the week
    assert max(s[5 * 288:5 * 288 + 24]) >= THRESHOLD
    # without the week the day's shape mixes both kinds of day: its band is wide enough for a
    # weekend, so the drop is lost in it (measured: 0.03 against 0.61)
    s_day = scores(AdaptiveGaussian(week_half_life=0), xs, ts)
    assert max(s_day[drop * 288:(drop + 1) * 288]) < THRESHOLD


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 30).map(float), st.floats(-1e6, 1e6, allow_nan=False),
                          st.sampled_from([0.0, 1.0, -1.0])), min_size=1, max_size=400),
       st.floats(-1e7, 1e7, allow_nan=False), st.integers(1, 4))
def test_with_shapes_scores_in_0_1_scoring_changes_nothing_and_pickles(xs, probe, repeat):
    # a small window, so the cycle search runs on whatever hypothesis draws
    det = AdaptiveGaussian(warmup=5, lik_warmup=10, tail_warmup=10, period_window=36)
    xs = [x for x in xs for _ in range(repeat)]
    for i, x in enumerate(xs):
        det.score_one(x, t=i * FIVE_MIN)
        det.learn_one(x, t=i * FIVE_MIN)
    t = len(xs) * FIVE_MIN
    before = pickle.dumps(det)
    first, second = det.score_one(probe, t=t), det.score_one(probe, t=t)
    assert first == second and pickle.dumps(det) == before
    assert 0.0 <= first.score <= 1.0
    assert pickle.loads(before).score_one(probe, t=t) == first


def test_a_detector_pickled_before_the_week_and_the_cycle_restores_and_scores_as_it_did():
    """A flow snapshot written by the version before issue 17's shapes (tests/data: an
    AdaptiveGaussian pickled at commit ffc30e4 after 3 days of 5-minute values) restores; it
    scores as a detector without the week and the cycle fed the same values (the same
    arithmetic as that version), and goes on learning."""
    from pathlib import Path

    old = pickle.loads((Path(__file__).parent / "data" / "adaptive_gaussian_ffc30e4.pickle").read_bytes())
    same = AdaptiveGaussian(week_half_life=0, period_window=0)
    for i in range(864):
        same.learn_one(100 + 20 * math.sin(2 * math.pi * i / 288) + (i * 7919 % 13) / 4, t=i * FIVE_MIN)
    assert old.shape_in_use(864 * FIVE_MIN) == same.shape_in_use(864 * FIVE_MIN) == "day"
    for i in range(864, 900):
        x = 100 + 20 * math.sin(2 * math.pi * i / 288) + (40 if i == 880 else 0)
        assert old.score_one(x, t=i * FIVE_MIN) == same.score_one(x, t=i * FIVE_MIN)
        old.learn_one(x, t=i * FIVE_MIN)
        same.learn_one(x, t=i * FIVE_MIN)
    assert old.score_one(1000, t=900 * FIVE_MIN).breach  # above the cool-down of the +40 at 880
    assert pickle.loads(pickle.dumps(old)).score_one(130, t=900 * FIVE_MIN) == old.score_one(130, t=900 * FIVE_MIN)
