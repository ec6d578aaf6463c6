"""Detectors for what a z-score on one value misses (issue 17): a level that moved and stays, a
collector that died (a flat line), counts near zero. Each keeps the River-style protocol of
:mod:`alerts.detectors` and constant memory, and scores how rare its strength is for the series
itself (:class:`~alerts.calibration.TailCalibration`), so their scores compare with each other
and with :class:`~alerts.adaptive.AdaptiveGaussian`'s: :class:`alerts.ensemble.Ensemble`
combines them.

* :class:`LevelShift`: two-sided CUSUM of the standardised residuals from the baseline in use. A
  shift of 1-2 sigmas that a single value never shows adds up; once it is confirmed (``h``) the
  reference moves to the new level, so one shift is one alarm, and the next shift is judged
  against the new level.
* :class:`FlatLine`: how long the value has not moved at all, against the series' own runs of
  repeated values (a metric that is often flat at night needs a longer run).
* :class:`PoissonCounts`: counts judged against a Poisson rate per slot of the day (learned
  online): a burst is the upper tail of the count, a dead stretch the probability of seeing
  nothing for that long where something was expected.
"""
from __future__ import annotations

import math
from array import array

from alerts.calibration import TailCalibration, p_score
from alerts.detectors import Detector, Score

DAY_MS = 86_400_000
_LN10 = math.log(10.0)
CLIP_P = 1e-3  # the tail learns a strength at most as rare as this (a long anomaly is one)


class _Calibrated(Detector):
    """A strength per value, calibrated on the series' own strengths; one alarm per episode.

    Subclasses give ``_judge(x, t) -> (mu, sigma, z, warm, s, baseline)`` (s: the strength,
    >= 0; baseline: the words an alert says) and ``_learn(x, t, judged)`` (judged: what
    ``_judge`` said about x, before learning it). A value scores only when its score is a
    decade of probability above the best one of the episode so far (an episode ends when the
    strength falls back to 0): a change that lasts scores while it grows rarer, then not again
    until it is over.
    """

    __slots__ = ("tail", "episode")

    def __init__(self, k, direction, warmup, min_sigma, min_change, tail_q, tail_half_life,
                 tail_warmup):
        super().__init__(k, direction, warmup, min_sigma, min_change)
        # None: the strength is already in decades of probability (-log10 p)
        self.tail = TailCalibration(tail_q, tail_half_life, tail_warmup) if tail_q else None
        self.episode = 0.0  # the best score of the current episode

    def _judge(self, x: float, t: int | None):
        raise NotImplementedError

    def _learn(self, x: float, t: int | None, judged: tuple) -> None:
        raise NotImplementedError

    def score_one(self, x: float, t: int | None = None, n: float | None = None) -> Score:
        x = float(x)
        mu, sigma, z, warm, s, words = self._judge(x, t)
        if not warm or s <= 0.0:
            return Score(x, mu, sigma, self.k, z, False, "", 0.0, warm, words)
        score = self._score(s)
        if score <= self._bar():
            score = 0.0  # not much rarer than what this episode already reported
        breach = score > 0.0 and s > self.k and abs(x - mu) >= self.min_change * abs(mu)
        return Score(x, mu, sigma, self.k, z, breach,
                     ("up" if z > 0 else "down") if breach else "", score, warm, words)

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        x = float(x)
        judged = self._judge(x, t)
        mu, sigma, z, warm, s, _ = judged
        if warm:
            if s <= 0.0:
                self.episode = 0.0
            else:
                score = self._score(s)
                if score > self._bar():
                    self.episode = score
            if self.tail is not None:  # an alarm's own strengths do not widen the tail
                self.tail.learn_one(min(s, self.tail.strength_at(CLIP_P)))
        self._learn(x, t, judged)

    def _bar(self) -> float:
        """A new alarm of the episode must be rarer by a decade of probability (1/30)."""
        return self.episode + 1.0 / 30.0

    def _score(self, s: float) -> float:
        if self.tail is None:
            return p_score(10.0 ** -s) if s < 300 else 1.0
        return p_score(self.tail.p_value(s))


class LevelShift(_Calibrated):
    """Two-sided CUSUM of standardised residuals from the baseline in use (module docstring).

    The baseline is :class:`~alerts.adaptive.AdaptiveGaussian`'s (its level, or its time-of-day
    shape where that fits better: a CUSUM on a cyclic series' raw level would see the cycle),
    plus an offset: once a shift is confirmed (a sum reaches ``h`` sigmas) the offset takes the
    mean residual since the sums started, so the reference is the new level at once and the
    next shift is judged against it; the offset then fades at the baseline's half-life as the
    baseline itself moves there. ``drift``: the allowance per value, in sigmas (shifts below
    about twice it are ignored). ``mu`` and ``sigma`` are the reference's; the strength and
    ``z`` are the larger sum, in sigmas (``z`` signed: negative for a shift down), so an alert
    reads as for a single value (``z`` beyond ``k``), and its baseline says "shift from" the
    shape in use.

    Chosen by the cross-validation of issue 17 (``surgeflow nab-eval``): beside
    ``AdaptiveGaussian`` it lifts the shared series from 67.4 to 72.1 cross-validated (drift 0.5,
    h 12; neighbours drift 0.25-1, h 8-20 gave 54-64 over all series against 64.9).

    >>> import random
    >>> rng = random.Random(3)
    >>> d = LevelShift()
    >>> for i in range(1500):
    ...     d.learn_one(50 + rng.gauss(0, 1))
    >>> scores = []
    >>> for i in range(30):  # a shift of 2 sigmas: no single value is remarkable
    ...     x = 52 + rng.gauss(0, 1)
    ...     scores.append(d.score_one(x).score)
    ...     d.learn_one(x)
    >>> max(scores) > 0.1, d.score_one(52).mu > 51  # the reference moved to the new level
    (True, True)
    """

    __slots__ = ("half_life", "drift", "h", "n", "base", "owns_base", "offset", "_fade", "up",
                 "down", "fast", "since")

    def __init__(self, k: float = 8.0, half_life: float = 1000.0, drift: float = 0.5,
                 h: float = 12.0, warmup: int = 50, min_sigma: float = 0.0,
                 direction: str = "both", min_change: float = 0.0, tail_q: float = 0.95,
                 tail_half_life: float = 8000.0, tail_warmup: int = 200, base=None):
        super().__init__(k, direction, warmup, min_sigma, min_change, tail_q, tail_half_life,
                         tail_warmup)
        if half_life <= 0 or drift < 0 or h <= 0:
            raise ValueError("half_life > 0, drift >= 0, h > 0")
        from alerts.adaptive import AdaptiveGaussian  # (it imports this module's neighbours)

        self.half_life, self.drift, self.h = float(half_life), float(drift), float(h)
        # The baseline: its own (no likelihood, no cooldown, no calibration), or ``base``, an
        # AdaptiveGaussian learned by its owner after this detector learned each value (the
        # ensemble shares it: one time-of-day shape per series, not two).
        self.owns_base = base is None
        self.base = AdaptiveGaussian(half_life=half_life, lik_window=0, cooldown=0, tail_q=0) \
            if base is None else base
        self.n = 0
        self.offset = 0.0  # the confirmed shift not yet taken up by the baseline
        self._fade = 0.5 ** (1.0 / self.half_life)
        self.up = self.down = 0.0  # the two sums, in sigmas
        self.fast = 0.0  # mean residual since the sums last started
        self.since = 0

    def params(self) -> tuple[str, ...]:
        return ("half_life", "drift", "h", *super().params())

    def _sums(self, z: float) -> tuple[float, float]:
        return max(0.0, self.up + z - self.drift), max(0.0, self.down - z - self.drift)

    def _judge(self, x, t):
        name, mu, sigma, warm = self.base.baseline_named(t)
        mu += self.offset
        sigma = max(sigma, self.min_sigma, 1e-12)
        warm = warm and self.n >= max(self.warmup, 2)
        up, down = self._sums((x - mu) / sigma)
        s = up if self.direction == "up" else down if self.direction == "down" else max(up, down)
        # z is the sum that breaches, signed: the alert reads "z sigmas beyond k" as for a value
        z = up if self.direction == "up" or (self.direction == "both" and up >= down) else -down
        return mu, sigma, z, warm, s, "shift from " + self.base.words(name)

    def _learn(self, x, t, judged) -> None:
        mu, sigma = judged[0], judged[1]
        r = x - mu
        warm = self.base.count >= max(self.base.warmup, 2)  # the baseline's, as judged
        self.n += 1
        if warm and self.n > self.warmup:
            up, down = self._sums(r / sigma)
            self.since = self.since + 1 if (up or down) else 0
            self.fast = r if self.since <= 1 else self.fast + (r - self.fast) / self.since
            self.up, self.down = up, down
            if max(up, down) >= self.h:  # confirmed: the reference is the new level now
                self.offset += self.fast
                self.up = self.down = 0.0
                self.since = 0
        self.offset *= self._fade
        if self.owns_base:
            self.base.learn_one(x, t)


class FlatLine(_Calibrated):
    """The number of values in a row that did not move at all (module docstring).

    ``mu`` is the value the series is stuck at, ``sigma`` its usual move from one value to the
    next (EW mean absolute difference), ``z`` the run's length in values. The strength is the
    number of repeats, calibrated on the series' own runs (a count that is often 0 at night
    needs a long dead stretch). (Weighing each repeat by the series' share of repeated values
    instead was tried: worse by the cross-validation, as runs cluster at night.) A series that
    often repeats itself (an EW share of repeats above ``max_share``, 1 %: prices on a grid,
    counts that are often 0) is not judged at all: its runs say nothing of a dead collector.

    >>> import random
    >>> rng = random.Random(2)
    >>> d = FlatLine()
    >>> for i in range(2000):
    ...     d.learn_one(round(10 + rng.gauss(0, 1), 2))
    >>> scores = []
    >>> for i in range(20):  # the collector died: the last value, over and over
    ...     scores.append(d.score_one(10.0).score)
    ...     d.learn_one(10.0)
    >>> scores[0], max(scores) > 0.9, sum(s > 0 for s in scores), scores[-1]  # then quiet
    (0.0, True, 14, 0.0)
    """

    BASELINE = "repeats of one value"
    __slots__ = ("half_life", "_a", "n", "prev", "run", "move", "max_share", "share")

    def __init__(self, k: float = 4.0, half_life: float = 1000.0, warmup: int = 50,
                 tail_q: float = 0.95, tail_half_life: float = 8000.0, tail_warmup: int = 200,
                 max_share: float = 0.01):
        super().__init__(k, "both", warmup, 0.0, 0.0, tail_q, tail_half_life, tail_warmup)
        if half_life <= 0 or not 0 < max_share <= 1:
            raise ValueError("half_life > 0, 0 < max_share <= 1")
        self.max_share = float(max_share)
        self.share = 0.0  # EW share of values equal to the one before
        self.half_life = float(half_life)
        self._a = 1.0 - 0.5 ** (1.0 / self.half_life)
        self.n = 0
        self.prev: float | None = None
        self.run = 0  # values in a row equal to prev, prev's first included
        self.move = 0.0

    def params(self) -> tuple[str, ...]:
        return ("half_life", "k", "warmup", "max_share")

    def _judge(self, x, t):
        # a series that often repeats itself (prices on a grid, counts at night) is not judged
        warm = self.n >= max(self.warmup, 2) and self.share <= self.max_share
        run = self.run + 1 if x == self.prev else 1
        s = float(run - 1)  # values that repeated the one before
        return (self.prev if self.prev is not None else x), self.move, s, warm, s, self.BASELINE

    def _learn(self, x, t, judged) -> None:
        self.n += 1
        a = max(self._a, 1.0 / self.n)
        # the first repeats of a run count, not a long run's: that is the anomaly, not a habit
        self.share += a * ((1.0 if x == self.prev and self.run < 4 else 0.0) - self.share)
        if self.prev is not None:
            self.move += a * (abs(x - self.prev) - self.move)
        self.run = self.run + 1 if x == self.prev else 1
        self.prev = x


class PoissonCounts(_Calibrated):
    """Counts against a Poisson rate per slot of the day (module docstring). For a series that
    is not a count (negative or fractional values, or a rate above ``max_rate``) or not a
    Poisson one (the EW mean of ``(x - rate)^2 / rate``, 1 for Poisson counts, above
    ``max_dispersion``: bursty counts such as tweets), it stays silent: the Gaussian view fits
    those. ``max_rate`` 20 and ``max_dispersion`` 1.3 were chosen by the cross-validation of
    issue 17 as a member of :class:`~alerts.ensemble.AdaptiveEnsemble`.

    The strength is in decades of probability: ``-log10 P(X >= x)`` for a high count,
    ``-log10 P(nothing in the whole dead stretch)`` = expected count over the stretch / ln 10
    for a run of zeros. ``mu`` is the slot's rate, ``sigma`` its square root.

    >>> d = PoissonCounts()
    >>> for i in range(288 * 6):  # six days of 5-minute counts, about 4 per slot
    ...     d.learn_one([3, 5, 4, 4][i % 4], t=i * 300_000)
    >>> t = 288 * 6 * 300_000
    >>> d.score_one(4, t=t).score, d.score_one(40, t=t).score > 0.2
    (0.0, True)
    """

    BASELINE = "count rate by time of day"
    __slots__ = ("slots", "half_life_days", "max_rate", "n", "t_first", "step", "_a",
                 "rates", "counts", "zeros", "is_count", "max_dispersion", "dispersion")

    def __init__(self, k: float = 6.0, slots: int = 24, half_life_days: float = 7.0,
                 max_rate: float = 20.0, warmup: int = 288, tail_q: float = 0.95,
                 tail_half_life: float = 8000.0, tail_warmup: int = 200,
                 max_dispersion: float = 1.3, min_change: float = 0.0):
        super().__init__(k, "both", warmup, 0.0, min_change, tail_q, tail_half_life, tail_warmup)
        if slots < 1 or half_life_days <= 0 or max_rate <= 0:
            raise ValueError("slots >= 1, half_life_days > 0, max_rate > 0")
        self.slots, self.half_life_days, self.max_rate = int(slots), float(half_life_days), float(max_rate)
        self.n = 0
        self.t_first: int | None = None
        self.step = 0
        self._a = 0.0
        self.rates = array("d", bytes(8 * self.slots))
        self.counts = array("H", bytes(2 * self.slots))
        self.zeros = 0.0  # expected count over the current run of zeros
        self.is_count = True
        self.max_dispersion = float(max_dispersion)
        self.dispersion = 1.0  # EW mean of (x - rate)^2 / rate: 1 for Poisson counts

    def params(self) -> tuple[str, ...]:
        return ("k", "slots", "half_life_days", "max_rate", "max_dispersion", "warmup")

    def _slot(self, t: int | None) -> int:
        return 0 if t is None else (t % DAY_MS) * self.slots // DAY_MS

    def _judge(self, x, t):
        i = self._slot(t)
        lam = self.rates[i]
        warm = (self.is_count and self.n >= self.warmup and self.counts[i] >= 3
                and self.dispersion <= self.max_dispersion)
        if not warm or lam > self.max_rate:
            return lam, math.sqrt(max(lam, 0.0)), 0.0, False, 0.0, self.BASELINE
        lam = max(lam, 0.01)
        z = (x - lam) / math.sqrt(lam)
        if x == 0.0:
            s = (self.zeros + lam) / _LN10  # nothing for the whole stretch
        elif x > lam:
            s = -_log10_upper(x, lam)
        else:
            s = 0.0
        return lam, math.sqrt(lam), z, True, s, self.BASELINE

    def _learn(self, x, t, judged) -> None:
        self.n += 1
        if x < 0 or x != int(x) or (x > 10 * self.max_rate):
            self.is_count = False
        if t is not None and self.t_first is None:
            self.t_first = t
        elif t is not None and not self.step:
            self.step = max(1, t - self.t_first)
            per_slot_day = DAY_MS / self.step / self.slots
            self._a = 1.0 - 0.5 ** (1.0 / max(1.0, self.half_life_days * per_slot_day))
        i = self._slot(t)
        c = self.counts[i]
        if c >= 3:  # overdispersed counts (bursty: tweets, bots) are not judged as Poisson
            lam = max(self.rates[i], 0.5)
            self.dispersion += self._a * ((x - lam) ** 2 / lam - self.dispersion)
        self.zeros = self.zeros + self.rates[i] if x == 0.0 else 0.0
        if c < 65_535:
            self.counts[i] = c + 1
        self.rates[i] += max(self._a, 1.0 / (c + 1)) * (x - self.rates[i])


def _log10_upper(x: float, lam: float) -> float:
    """log10 P(X >= x) for X ~ Poisson(lam), x > lam (a Chernoff bound past 200 terms)."""
    k = int(x)
    term = math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))
    total, j = term, k
    while j < k + 200:
        j += 1
        term *= lam / j
        total += term
        if term < total * 1e-12:
            break
    if total > 0.0:
        return max(math.log10(total), -300.0)
    return (-lam + x * math.log(lam) - math.lgamma(x + 1)) / _LN10
