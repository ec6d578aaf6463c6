"""Dynamic-threshold detectors: one small protocol, ``learn_one(x)`` and ``score_one(x)``.

``RollingGaussian`` is the plain mu +/- k*sigma over the last ``window`` values, with a warm-up
and a floor on sigma (a flat series must not alert on a change of one).

>>> d = RollingGaussian(k=3.0, window=10, warmup=5, min_sigma=1.0)
>>> for x in [100, 102, 98, 101, 99, 100]:
...     d.learn_one(x)
>>> s = d.score_one(160)
>>> s.breach, s.direction, round(s.mu, 1)
(True, 'up', 100.0)
>>> d.score_one(101).breach
False
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Score:
    value: float
    mu: float
    sigma: float
    z: float
    breach: bool
    direction: str  # "up", "down" or "" when within bounds
    score: float  # in [0, 1]: how far outside the band, squashed


class RollingGaussian:
    def __init__(self, k: float = 4.0, window: int = 30, warmup: int = 10,
                 min_sigma: float = 1.0, direction: str = "both"):
        self.k = k
        self.window = window
        self.warmup = warmup
        self.min_sigma = min_sigma
        self.direction = direction
        self.values: deque[float] = deque(maxlen=window)

    def learn_one(self, x: float) -> None:
        self.values.append(float(x))

    @property
    def warm(self) -> bool:
        return len(self.values) >= self.warmup

    def stats(self) -> tuple[float, float]:
        n = len(self.values)
        if n == 0:
            return 0.0, self.min_sigma
        mu = sum(self.values) / n
        var = sum((v - mu) ** 2 for v in self.values) / max(n - 1, 1)
        return mu, max(math.sqrt(var), self.min_sigma)

    def score_one(self, x: float) -> Score:
        mu, sigma = self.stats()
        z = (x - mu) / sigma
        if not self.warm:
            return Score(x, mu, sigma, z, False, "", 0.0)
        up = z > self.k and self.direction in ("up", "both")
        down = z < -self.k and self.direction in ("down", "both")
        squashed = 1.0 - math.exp(-max(abs(z) - self.k, 0.0)) if (up or down) else 0.0
        return Score(x, mu, sigma, z, up or down, "up" if up else "down" if down else "", squashed)
