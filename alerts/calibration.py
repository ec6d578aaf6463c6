"""How rare is this alarm strength for this series? A tail probability, one value at a time.

A detector's strength (sigmas from its baseline) means different things on different series:
8 sigmas is a once-a-month event on a smooth server metric and a daily one on a spiky tweet
count. One threshold for every series (what NAB scores, and what an operator sets once) needs
the strength turned into a probability under the series' *own* history of strengths.

:class:`TailCalibration` does it with the peaks-over-threshold view of extreme value theory
(as SPOT, Siffer et al., KDD 2017, in constant memory): it tracks a high quantile ``u`` of the
strengths (level ``q``) and the mean excess ``beta`` of the strengths above it; beyond ``u`` the
tail is exponential, so

    p(s) = (1 - q) * exp(-(s - u) / beta)        (capped at 1)

is the probability of a strength at least ``s``. Both move with an exponential half-life (in
values), so the calibration follows a series whose noise changes. :func:`p_score` maps ``p``
to the detectors' score in [0, 1]: ``-log10(p) / 30``, so 0.1 is one value in 1,000 and 0.2
one in 10 ** 6 (a fixed scale: the same score means the same rarity on every series).

>>> import random
>>> rng = random.Random(1)
>>> spiky, smooth = TailCalibration(), TailCalibration()
>>> for _ in range(3000):
...     spiky.learn_one(abs(rng.gauss(0, 1)) * 3)  # strengths three times larger
...     smooth.learn_one(abs(rng.gauss(0, 1)))
>>> spiky.p_value(6) > 0.01, smooth.p_value(6) < 1e-4
(True, True)
>>> round(p_score(1e-3), 3), p_score(1.0), p_score(0.0)
(0.1, 0.0, 1.0)
"""
from __future__ import annotations

import math

SCORE_DECADES = 30.0  # p_score: a score of 1 is a probability of 1e-30 or less


def p_score(p: float) -> float:
    """A tail probability as a score in [0, 1]: ``-log10(p) / 30``."""
    if p <= 0.0:
        return 1.0
    return min(1.0, max(0.0, -math.log10(p) / SCORE_DECADES))


class TailCalibration:
    """Peaks over a tracked quantile: the tail probability of a strength (module docstring).

    ``q``: the quantile the tail starts at; ``half_life``: the memory, in values; ``warmup``:
    values learned before :meth:`p_value` answers anything below 1.
    """

    __slots__ = ("q", "half_life", "warmup", "_a", "n", "u", "beta")

    STEP = 4.0  # the quantile's step, in units of beta: moves fast, settles within ~1/a values

    def __init__(self, q: float = 0.95, half_life: float = 8000.0, warmup: int = 200):
        if not 0.0 < q < 1.0 or half_life <= 0 or warmup < 0:
            raise ValueError("0 < q < 1, half_life > 0, warmup >= 0")
        self.q, self.half_life, self.warmup = float(q), float(half_life), int(warmup)
        self._a = 1.0 - 0.5 ** (1.0 / self.half_life)
        self.n = 0
        self.u = 0.0
        self.beta = 1.0

    def learn_one(self, s: float) -> None:
        if not math.isfinite(s):
            return  # an infinite strength (a flat baseline broken) says nothing of the tail
        self.n += 1
        if self.n == 1:
            self.u = s
        a = max(self._a, 1.0 / self.n)
        tail = 1.0 - self.q
        # stochastic approximation of the q-quantile: up by (1 - q) steps when exceeded,
        # down by q otherwise, so it rests where a fraction 1 - q of the values exceed it
        self.u += a * self.STEP * self.beta * ((1.0 if s > self.u else 0.0) - tail)
        if s > self.u:  # the mean excess: only values in the tail, so at the tail's own rate
            self.beta += min(1.0, max(self._a / tail, 1.0 / self.n)) * ((s - self.u) - self.beta)

    def p_value(self, s: float) -> float:
        """The probability of a strength at least ``s`` (1 before the warm-up)."""
        if self.n < self.warmup or s <= 0.0:
            return 1.0
        if s == math.inf:
            return 0.0
        if self.beta <= 0.0:
            return 1.0 if s <= self.u else 0.0
        # (below u the exponent is positive: capped, as the probability is capped at 1 anyway)
        return min(1.0, (1.0 - self.q) * math.exp(min((self.u - s) / self.beta, 50.0)))

    def strength_at(self, p: float) -> float:
        """The strength whose tail probability is ``p`` (inf before the warm-up)."""
        if self.n < self.warmup or self.beta <= 0.0:
            return math.inf
        return self.u + self.beta * math.log((1.0 - self.q) / p)

    def warm(self) -> bool:
        return self.n >= self.warmup
