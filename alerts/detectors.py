"""Dynamic-threshold detectors: one small protocol, River style.

Every detector judges one metric series, one value at a time:

* ``score_one(x, t=None, n=None) -> Score``: the value judged against what was learned so far
  (mu, sigma, k, z, breach, direction and a score in [0, 1]); it changes nothing;
* ``learn_one(x, t=None, n=None)``: the value joins the baseline.

``t`` is the value's event time in epoch milliseconds (seasonal detectors use it), ``n`` its sample
size (ratio detectors use it; a CTR of 2 clicks out of 10 impressions has ``n=10``). Callers
score first, then learn; keeping a breaching value out of the baseline is their choice.

The family, and what each adds over the plain rolling mu +/- k*sigma (:class:`WindowedGaussian`):

* :class:`EWGaussian`: exponentially weighted mean and variance, O(1) memory; adapts to a new level
  at a chosen half-life instead of a hard window edge.
* :class:`RobustGaussian`: rolling median and MAD: one outlier neither moves mu nor inflates sigma.
* :class:`SeasonalGaussian`: a baseline per hour of the day (or of the week), learned online, so
  the evening peak is not an anomaly and a quiet evening is.
* :class:`BinomialRatio`: a ratio (CTR, CVR) judged against its own sample size: sigma is the
  binomial standard error sqrt(p (1 - p) / n), so 1 conversion out of 3 clicks does not alert.

:class:`alerts.adaptive.AdaptiveGaussian` combines a level and a seasonal baseline with a
likelihood of recent |z| and a cooldown; ``alerts.nab`` measures the family on NAB.

Common parameters: ``k`` (the band in sigmas), ``direction`` ("up", "down" or "both"), ``warmup``
(values learned before any breach), ``min_sigma`` (a floor on sigma: a flat series must not alert
on a change of one) and ``min_change`` (a breach also needs ``|x - mu| >= min_change * |mu|``:
"CPC above 120 % of baseline" is ``min_change=0.2, direction="up"``).

>>> d = EWGaussian(k=3, half_life=20, warmup=5)
>>> for x in [100, 102, 98, 101, 99, 100, 101, 99]:
...     d.learn_one(x)
>>> s = d.score_one(130)
>>> s.breach, s.direction, round(s.mu), s.z > 3, 0 < s.score <= 1
(True, 'up', 100, True, True)
>>> d.score_one(100.5).breach
False
"""
from __future__ import annotations

import math
from array import array
from bisect import bisect_left, insort
from dataclasses import dataclass

DIRECTIONS = ("up", "down", "both")
_SQRT2 = math.sqrt(2.0)
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its sigma


@dataclass(frozen=True, slots=True)
class Score:
    """A value judged against its baseline. ``score`` is the two-sided normal probability of
    ``|z|`` in the watched direction (0 at mu or on the ignored side, towards 1 far outside);
    ``breach`` needs a warm baseline, ``z`` beyond ``k`` and the minimum relative change."""

    value: float
    mu: float
    sigma: float
    k: float
    z: float
    breach: bool
    direction: str  # "up" or "down" when breaching, else ""
    score: float
    warm: bool
    baseline: str = ""  # which baseline judged it, in words: "level", "time of day", ...


class Detector:
    """Shared parameters and the judgement; subclasses give the baseline (mu, sigma, warm)."""

    __slots__ = ("k", "direction", "warmup", "min_sigma", "min_change")
    BASELINE = "level"  # the alert's words for what the value was judged against

    def __init__(self, k: float, direction: str, warmup: int, min_sigma: float, min_change: float):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        if k <= 0 or warmup < 0 or min_sigma < 0 or min_change < 0:
            raise ValueError("k must be > 0; warmup, min_sigma and min_change >= 0")
        self.k = float(k)
        self.direction = direction
        self.warmup = int(warmup)
        self.min_sigma = float(min_sigma)
        self.min_change = float(min_change)

    def baseline(self, t: int | None = None, n: float | None = None) -> tuple[float, float, bool]:
        raise NotImplementedError

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        raise NotImplementedError

    def score_one(self, x: float, t: int | None = None, n: float | None = None) -> Score:
        mu, sigma, warm = self.baseline(t, n)
        return self.judge(float(x), mu, sigma, warm)

    def judge(self, x: float, mu: float, sigma: float, warm: bool) -> Score:
        sigma = max(sigma, self.min_sigma)
        z = (x - mu) / sigma if sigma > 0 else (0.0 if x == mu else math.copysign(math.inf, x - mu))
        side = z if self.direction == "up" else -z if self.direction == "down" else abs(z)
        if not warm or side <= 0:
            return Score(x, mu, sigma, self.k, z, False, "", 0.0, warm, self.BASELINE)
        score = math.erf(side / _SQRT2) if side != math.inf else 1.0
        breach = side > self.k and abs(x - mu) >= self.min_change * abs(mu)
        return Score(x, mu, sigma, self.k, z, breach, ("up" if z > 0 else "down") if breach else "",
                     score, warm, self.BASELINE)

    def __repr__(self) -> str:
        params = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params())
        return f"{type(self).__name__}({params})"

    def params(self) -> tuple[str, ...]:
        return ("k", "direction", "warmup", "min_sigma", "min_change")


class WindowedGaussian(Detector):
    """The plain detector (NAB's "Windowed Gaussian"): mean and standard deviation of the last
    ``window`` values, outliers included. It is the baseline the others are measured against.

    >>> d = WindowedGaussian(k=3.0, window=10, warmup=5, min_sigma=1.0)
    >>> for x in [100, 102, 98, 101, 99, 100]:
    ...     d.learn_one(x)
    >>> s = d.score_one(160)
    >>> s.breach, s.direction, round(s.mu, 1)
    (True, 'up', 100.0)
    >>> d.score_one(101).breach
    False
    """

    BASELINE = "window"
    __slots__ = ("window", "values", "at", "count", "total", "squares")

    def __init__(self, k: float = 3.0, window: int = 60, warmup: int = 10, min_sigma: float = 0.0,
                 direction: str = "both", min_change: float = 0.0):
        super().__init__(k, direction, warmup, min_sigma, min_change)
        if window < 2:
            raise ValueError("window must be >= 2")
        self.window = int(window)
        self.values = array("d")  # a ring buffer: 8 bytes per value
        self.at = 0
        self.count = 0  # values learned, ever
        self.total = 0.0
        self.squares = 0.0

    def params(self) -> tuple[str, ...]:
        return ("window", *super().params())

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        x = float(x)
        if len(self.values) < self.window:
            self.values.append(x)
        else:
            old = self.values[self.at]
            self.values[self.at] = x
            self.at = (self.at + 1) % self.window
            self.total -= old
            self.squares -= old * old
        self.total += x
        self.squares += x * x
        self.count += 1
        if self.count % self.window == 0:  # running sums drift: recompute them now and then
            self.total = math.fsum(self.values)
            self.squares = math.fsum(v * v for v in self.values)

    def baseline(self, t: int | None = None, n: float | None = None) -> tuple[float, float, bool]:
        size = len(self.values)
        if size == 0:
            return 0.0, 0.0, False
        mu = self.total / size
        var = max(self.squares / size - mu * mu, 0.0) * size / max(size - 1, 1)
        return mu, math.sqrt(var), self.count >= max(self.warmup, 2)


class EWGaussian(Detector):
    """Exponentially weighted mean and variance: each value's weight halves every ``half_life``
    values. Constant memory, and a new level becomes the baseline smoothly.

    >>> d = EWGaussian(k=4, half_life=10, warmup=3)
    >>> d.score_one(500).breach  # nothing learned yet: no alert during warm-up
    False
    >>> for x in [10, 12, 11, 9, 10, 11]:
    ...     d.learn_one(x)
    >>> d.score_one(40).direction, d.score_one(10.5).breach
    ('up', False)
    """

    __slots__ = ("half_life", "alpha", "mean", "var", "count")

    def __init__(self, k: float = 3.0, half_life: float = 30.0, warmup: int = 10,
                 min_sigma: float = 0.0, direction: str = "both", min_change: float = 0.0):
        super().__init__(k, direction, warmup, min_sigma, min_change)
        if half_life <= 0:
            raise ValueError("half_life must be > 0")
        self.half_life = float(half_life)
        self.alpha = 1.0 - 0.5 ** (1.0 / self.half_life)
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    def params(self) -> tuple[str, ...]:
        return ("half_life", *super().params())

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        x = float(x)
        self.count += 1
        if self.count == 1:
            self.mean = x
            return
        # Early on the weight is 1/count (a plain mean), later alpha: no bias towards the first value.
        a = max(self.alpha, 1.0 / self.count)
        diff = x - self.mean
        self.mean += a * diff
        self.var = (1.0 - a) * (self.var + a * diff * diff)

    def baseline(self, t: int | None = None, n: float | None = None) -> tuple[float, float, bool]:
        return self.mean, math.sqrt(self.var), self.count >= max(self.warmup, 2)


class RobustGaussian(Detector):
    """Rolling median and MAD over the last ``window`` values (sigma = 1.4826 MAD): a spike does
    not drag mu towards it nor widen the band for the values after it.

    >>> d = RobustGaussian(k=3, window=20, warmup=5)
    >>> for x in [10, 11, 9, 10, 500, 10, 11, 9, 10]:  # one wild value among normal ones
    ...     d.learn_one(x)
    >>> s = d.score_one(16)
    >>> s.mu, round(s.sigma, 2), s.breach
    (10.0, 1.48, True)
    >>> g = WindowedGaussian(k=3, window=20, warmup=5)
    >>> for x in [10, 11, 9, 10, 500, 10, 11, 9, 10]:
    ...     g.learn_one(x)
    >>> g.score_one(16).breach  # the plain band is blown wide open by the one outlier
    False
    """

    BASELINE = "window median"
    __slots__ = ("window", "ring", "at", "ordered", "count")

    def __init__(self, k: float = 3.0, window: int = 60, warmup: int = 10, min_sigma: float = 0.0,
                 direction: str = "both", min_change: float = 0.0):
        super().__init__(k, direction, warmup, min_sigma, min_change)
        if window < 3:
            raise ValueError("window must be >= 3")
        self.window = int(window)
        self.ring = array("d")
        self.at = 0
        self.ordered: list[float] = []
        self.count = 0

    def params(self) -> tuple[str, ...]:
        return ("window", *super().params())

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        x = float(x)
        if len(self.ring) < self.window:
            self.ring.append(x)
        else:
            old = self.ring[self.at]
            self.ring[self.at] = x
            self.at = (self.at + 1) % self.window
            del self.ordered[bisect_left(self.ordered, old)]
        insort(self.ordered, x)
        self.count += 1

    def baseline(self, t: int | None = None, n: float | None = None) -> tuple[float, float, bool]:
        s = self.ordered
        if not s:
            return 0.0, 0.0, False
        mu = _median(s)
        return mu, _MAD_TO_SIGMA * _mad(s, mu), self.count >= max(self.warmup, 3)


class SeasonalGaussian(Detector):
    """A baseline per slot of a season, learned online: by default one per hour of the day
    (``slots=24``); ``period="week", slots=168`` gives one per hour of the week. Each slot keeps an
    exponentially weighted mean and variance whose weight halves every ``half_life`` seasons.
    Until a slot has seen ``warmup`` values, the value is judged against all values (the same EW
    statistics over every slot, half-life ``half_life * slots``), so a new series is not blind.
    A slot's variance comes from few values (one a day), so it is shrunk towards the pooled
    variance of all slots' residuals, as if that were ``prior`` more values: with the raw slot
    variance, a week of N(100, 3) once gave a slot sigma of 0.44 and a 7-sigma false alarm.

    >>> day = 86_400_000
    >>> d = SeasonalGaussian(k=4, slots=24, warmup=3, min_sigma=1)
    >>> for t in range(0, 5 * day, 3_600_000):  # five days: 100 at night, 400 at 20:00
    ...     d.learn_one(400 if (t // 3_600_000) % 24 == 20 else 100, t=t)
    >>> d.score_one(400, t=5 * day + 20 * 3_600_000).breach  # the evening peak, as every day
    False
    >>> d.score_one(400, t=5 * day + 3 * 3_600_000).breach  # the same value at 03:00
    True
    """

    BASELINE = "time of day"
    __slots__ = ("period_ms", "slots", "half_life", "alpha", "means", "vars", "counts", "overall",
                 "prior", "pooled", "pooled_n")

    PERIODS = {"day": 86_400_000, "week": 7 * 86_400_000}

    def __init__(self, k: float = 3.0, period: str = "day", slots: int = 24, half_life: float = 4.0,
                 warmup: int = 3, min_sigma: float = 0.0, direction: str = "both",
                 min_change: float = 0.0, prior: float = 3.0):
        super().__init__(k, direction, warmup, min_sigma, min_change)
        if period not in self.PERIODS:
            raise ValueError(f"period must be one of {sorted(self.PERIODS)}")
        if slots < 1 or half_life <= 0:
            raise ValueError("slots must be >= 1 and half_life > 0")
        self.period_ms = self.PERIODS[period]
        self.slots = int(slots)
        self.half_life = float(half_life)
        self.alpha = 1.0 - 0.5 ** (1.0 / self.half_life)
        self.means = array("d", bytes(8 * self.slots))
        self.vars = array("d", bytes(8 * self.slots))
        self.counts = array("l", bytes(array("l").itemsize * self.slots))
        self.overall = EWGaussian(k, half_life * slots, warmup * slots, min_sigma, direction, min_change)
        self.prior = float(prior)
        self.pooled = 0.0  # EW variance of the residuals from the slot means, all slots
        self.pooled_n = 0

    def params(self) -> tuple[str, ...]:
        return ("slots", "half_life", "prior", *super().params())

    def slot(self, t: int) -> int:
        return int((t % self.period_ms) * self.slots // self.period_ms)

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        if t is None:
            raise ValueError("a seasonal detector needs the value's time t")
        x = float(x)
        self.overall.learn_one(x)
        i = self.slot(t)
        if self.counts[i] >= 2:
            self.pooled_n += 1
            b = max(self.overall.alpha, 1.0 / self.pooled_n)
            self.pooled += b * ((x - self.means[i]) ** 2 - self.pooled)
        self.counts[i] += 1
        if self.counts[i] == 1:
            self.means[i] = x
            return
        a = max(self.alpha, 1.0 / self.counts[i])
        diff = x - self.means[i]
        self.means[i] += a * diff
        self.vars[i] = (1.0 - a) * (self.vars[i] + a * diff * diff)

    def baseline(self, t: int | None = None, n: float | None = None) -> tuple[float, float, bool]:
        if t is None:
            raise ValueError("a seasonal detector needs the value's time t")
        i = self.slot(t)
        if self.counts[i] >= max(self.warmup, 2):
            n_eff = min(self.counts[i], 1.0 / self.alpha)  # values a slot's variance rests on
            var = (n_eff * self.vars[i] + self.prior * self.pooled) / (n_eff + self.prior)
            return self.means[i], math.sqrt(var), True
        return self.overall.baseline()


class BinomialRatio(Detector):
    """A ratio metric (CTR, CVR): ``x`` is the ratio over ``n`` trials (impressions, clicks).
    The baseline rate p is the exponentially weighted successes over trials; sigma is the
    standard error of a ratio over n trials, sqrt(p (1 - p) / n), plus the variation real rates
    show beyond sampling (over-dispersion, learned). Small samples have wide bands, and fewer
    than ``min_trials`` trials are never judged.

    >>> d = BinomialRatio(k=3, half_life=24, warmup=3, min_trials=20)
    >>> for _ in range(12):
    ...     d.learn_one(0.05, n=2000)            # a steady 5 % on 2,000 clicks an hour
    >>> d.score_one(0.0, n=3).breach             # no conversion out of 3 clicks: nothing to say
    False
    >>> d.score_one(0.2, n=50).breach            # 10 conversions out of 50: 4x the rate
    True
    >>> d.score_one(0.01, n=2000).direction      # 20 out of 2,000 is a real drop
    'down'
    """

    BASELINE = "rate"
    __slots__ = ("half_life", "alpha", "min_trials", "hits", "trials", "excess", "count")

    def __init__(self, k: float = 3.0, half_life: float = 24.0, warmup: int = 6,
                 min_trials: float = 30.0, direction: str = "both", min_change: float = 0.0,
                 min_sigma: float = 0.0):
        super().__init__(k, direction, warmup, min_sigma, min_change)
        self.half_life = float(half_life)
        self.alpha = 1.0 - 0.5 ** (1.0 / self.half_life)
        self.min_trials = float(min_trials)
        self.hits = 0.0  # EW successes
        self.trials = 0.0  # EW trials
        self.excess = 0.0  # EW variance of the rate beyond the binomial one
        self.count = 0

    def params(self) -> tuple[str, ...]:
        return ("half_life", "min_trials", *super().params())

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        if not n or n <= 0:
            return  # no trials: nothing learned
        x = min(max(float(x), 0.0), 1.0)
        if self.trials > 0:
            p = self.hits / self.trials
            seen = (x - p) ** 2 - p * (1.0 - p) / n
            a = max(self.alpha, 1.0 / (self.count + 1))
            self.excess = max((1.0 - a) * self.excess + a * seen, 0.0)
        keep = 1.0 - self.alpha
        self.hits = keep * self.hits + x * n
        self.trials = keep * self.trials + n
        self.count += 1

    def baseline(self, t: int | None = None, n: float | None = None) -> tuple[float, float, bool]:
        if self.trials <= 0:
            return 0.0, 0.0, False
        p = self.hits / self.trials
        if not n or n < self.min_trials:
            return p, math.inf, False
        sigma = math.sqrt(p * (1.0 - p) / n + self.excess)
        return p, sigma, self.count >= max(self.warmup, 2)


def _median(s: list[float]) -> float:
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2.0


def _mad(s: list[float], mu: float) -> float:
    """Median absolute deviation of the sorted list ``s`` around ``mu``, in O(log n): the
    deviations below and above mu are two sorted sequences; take the middle of their merge.

    >>> _mad([1, 2, 3, 4, 100], 3.0)
    1.0
    >>> _mad([1.0, 1.0, 2.0, 2.0, 4.0, 6.0, 9.0], 2.0)
    1.0
    """
    n = len(s)
    cut = bisect_left(s, mu)
    below = cut  # deviations mu - s[cut-1], mu - s[cut-2], ... ascending
    above = n - cut  # deviations s[cut] - mu, s[cut+1] - mu, ... ascending

    def kth(k: int) -> float:  # k-th smallest deviation (0-based), by halving k
        i = j = 0  # consumed from below / above
        while True:
            if i == below:
                return s[cut + j + k] - mu
            if j == above:
                return mu - s[cut - 1 - i - k]
            if k == 0:
                return min(mu - s[cut - 1 - i], s[cut + j] - mu)
            step = (k + 1) // 2
            ti = min(step, below - i)
            tj = min(step, above - j)
            if mu - s[cut - 1 - i - ti + 1] <= s[cut + j + tj - 1] - mu:
                i += ti
                k -= ti
            else:
                j += tj
                k -= tj

    if n % 2:
        return kth(n // 2)
    return (kth(n // 2 - 1) + kth(n // 2)) / 2.0
