"""Seasonal shapes for :class:`~alerts.adaptive.AdaptiveGaussian` (issue 17): a mean per slot
of a period (:class:`Profile`) and the period itself, found from the data
(:class:`PeriodFinder`). Constant memory per series.

A day and a week are known in advance (a shape each, over the day's and the week's slots);
any other cycle (a shift pattern of 8 hours, a batch job every 5) is found by the
autocorrelation of the series' recent values.
"""
from __future__ import annotations

import math
from array import array

import numpy as np


class Profile:
    """An exponentially weighted mean per slot of a period: a shape.

    ``period`` is in the timestamps' unit (ms) and may be fractional; ``anchor`` is the time
    of phase 0. Each slot forgets at ``half_life`` periods (``per_period`` values make one);
    a slot is warm once it has seen ``warm`` values.

    >>> p = Profile(period=4.0, slots=4, half_life=2.0, per_period=4)
    >>> for t in range(40):
    ...     p.learn_one(10.0 * (t % 4), t)
    >>> p.mean_at(6), p.mean_at(41)
    (20.0, 10.0)
    """

    __slots__ = ("period", "anchor", "means", "counts", "_a", "warm")

    def __init__(self, period: float, slots: int, half_life: float, per_period: float,
                 anchor: float = 0.0, warm: int = 2, typecode: str = "d"):
        if period <= 0 or slots < 1 or half_life <= 0 or per_period <= 0:
            raise ValueError("period, slots, half_life and per_period must be > 0")
        self.period = period
        self.anchor = anchor
        self.means = array(typecode, bytes(array(typecode).itemsize * slots))
        self.counts = array("H", bytes(2 * slots))  # saturates at 65,535: warm or not
        per_slot = per_period / slots  # values a slot sees per period
        self._a = 1.0 - 0.5 ** (1.0 / (half_life * per_slot))
        self.warm = min(int(warm), 65_535)

    def slot(self, t: float) -> int:
        if self.anchor:
            return int((t - self.anchor) % self.period * len(self.means) / self.period)
        return int((t % self.period) * len(self.means) // self.period)

    def mean_at(self, t: float) -> float | None:
        """The slot's mean at time t, or None while the slot is cold."""
        i = self.slot(t)
        return self.means[i] if self.counts[i] >= self.warm else None

    def learn_one(self, x: float, t: float) -> None:
        i = self.slot(t)
        c = self.counts[i]
        if c < 65_535:
            self.counts[i] = c + 1
        self.means[i] += max(self._a, 1.0 / (c + 1)) * (x - self.means[i])

    def rephase(self, period: float, now: float) -> None:
        """Takes a refined period, keeping the phase at ``now`` (so the shape stays in place)."""
        phase = (now - self.anchor) % self.period / self.period
        self.period = period
        self.anchor = now - phase * period


class Fit:
    """How well a baseline fits: the EW mean and variance of its residuals, and ``err``, their
    EW mean square about that mean (what the choice between baselines compares). The rate is
    the caller's (``1/n`` at first).

    >>> f = Fit()
    >>> for r in (1.0, 3.0, 1.0, 3.0):
    ...     f.learn_one(r, a=0.01)
    >>> f.mean, round(f.var, 2)
    (2.0, 1.0)
    """

    __slots__ = ("mean", "var", "err", "n")

    def __init__(self):
        self.mean = self.var = self.err = 0.0
        self.n = 0

    def learn_one(self, r: float, a: float) -> None:
        a = max(a, 1.0 / (self.n + 1))
        d = r - self.mean
        self.err += a * (d * d - self.err)
        self.mean += a * d
        self.var = (1.0 - a) * (self.var + a * d * d)
        self.n += 1


class PeriodFinder:
    """The dominant cycle of a series, in values, from the autocorrelation of its last
    ``window`` values (recomputed every quarter window; constant memory: the window as 32-bit
    floats). A cycle counts when its autocorrelation reaches ``min_acf`` after falling by at
    least ``min_drop`` from the values before it (so a slowly wandering series has none), at
    a lag of ``min_lag`` to a third of the window (three cycles seen). The period is refined
    to a fraction of a value from the peaks at 2, 4, 8... times it.

    >>> import random
    >>> rng, f = random.Random(1), PeriodFinder(window=600)
    >>> for i in range(600):
    ...     _ = f.learn_one(math.sin(2 * math.pi * i / 77.3) + rng.gauss(0, 0.3))
    >>> abs(f.period - 77.3) < 0.4
    True
    >>> rng, f, x = random.Random(3), PeriodFinder(window=600), 0.0
    >>> for i in range(6000):  # a random walk wanders but has no cycle
    ...     x += rng.gauss(0, 1)
    ...     if f.learn_one(x) and f.period:
    ...         print(i, f.period)
    >>> f.n, f.period
    (6000, 0.0)
    """

    __slots__ = ("window", "min_lag", "min_acf", "min_drop", "ring", "at", "n", "period", "acf")

    def __init__(self, window: int = 512, min_lag: int = 6, min_acf: float = 0.5,
                 min_drop: float = 0.5):
        if window < 6 * min_lag or min_lag < 3:
            raise ValueError("window >= 6 * min_lag, min_lag >= 3")
        self.window, self.min_lag = int(window), int(min_lag)
        self.min_acf, self.min_drop = float(min_acf), float(min_drop)
        self.ring = array("f", bytes(4 * self.window))
        self.at = 0
        self.n = 0
        self.period = 0.0  # in values; 0: no cycle found
        self.acf = 0.0  # its autocorrelation

    def learn_one(self, x: float) -> bool:
        """Adds x; True when the period was recomputed (every quarter window, once full)."""
        self.ring[self.at] = x
        self.at = (self.at + 1) % self.window
        self.n += 1
        if self.n < self.window or self.n % (self.window // 4):
            return False
        self.period, self.acf = self._find()
        return True

    def _find(self) -> tuple[float, float]:
        w = self.window
        y = np.roll(np.frombuffer(self.ring, dtype=np.float32).astype(np.float64), -self.at)
        i = np.arange(w, dtype=np.float64)
        y = y - np.polyval(np.polyfit(i, y, 1), i)  # a trend is not a cycle
        f = np.fft.rfft(y, 2 * w)
        acf = np.fft.irfft(f * np.conj(f))[:w]
        if acf[0] <= 0 or not np.isfinite(acf[0]):
            return 0.0, 0.0
        acf = acf / acf[0] * (w / (w - i))  # unbiased: each lag over its own overlap
        top = w // 3
        low = 1.0  # the lowest autocorrelation so far: a peak must rise from a trough
        best = 0
        for k in range(1, top):
            low = min(low, acf[k])
            if k >= self.min_lag and acf[k] >= self.min_acf and acf[k] - low >= self.min_drop:
                end = k  # the first hump above min_acf: the fundamental, not a multiple
                while end + 1 < w and acf[end + 1] >= self.min_acf:
                    end += 1
                best = k + int(np.argmax(acf[k:end + 1]))
                break
        if not best or best >= w - 1:
            return 0.0, 0.0
        period = _vertex(acf, best, best)
        m = 2  # the peaks at 2, 4, 8... periods (within half the window) refine it in turn
        while m * period <= w / 2:
            c, spread = m * period, max(2.0, 0.1 * period)
            lo, hi = max(1, int(c - spread)), min(w - 2, int(c + spread) + 1)
            k = lo + int(np.argmax(acf[lo:hi + 1]))
            if acf[k] < self.min_acf or acf[k] < acf[k - 1] or acf[k] < acf[k + 1]:
                break  # no clear peak there: keep what the nearer ones said
            period = _vertex(acf, k, period) / m
            m *= 2
        return float(period), float(acf[best])


def _vertex(a, k: int, period: float) -> float:
    """The lag of the top of the parabola fitted to ``a`` around its peak at ``k``, over a
    fifth of the period each side (a broad peak's top, not the noise's; not the next trough)."""
    h = max(1, int(0.2 * period))
    lo, hi = max(0, k - h), min(len(a) - 1, k + h)
    lags = np.arange(lo, hi + 1, dtype=np.float64)
    c2, c1, _ = np.polyfit(lags - k, a[lo:hi + 1], 2)
    if c2 >= 0:
        return float(k)
    return k + max(-h, min(h, -c1 / (2 * c2)))
