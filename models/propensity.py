"""Purchase propensity: will this user order within the horizon? Online logistic regression
(River) with delayed labels.

At the first view of a session the model scores the user's current features and keeps the example
aside. The label resolves later, in event time: an order within the horizon makes it positive;
the horizon passing without one makes it negative. Only then does the model learn, so no future
data leaks into the features it learned from.

>>> m = PurchasePropensity(horizon_ms=3_600_000)
>>> x = {"views_1h": 3.0, "add_to_cart_1h": 1.0}
>>> m.remember("u1", ts_ms=0, x=x)
>>> m.on_order("u1", ts_ms=600_000)       # ordered 10 min later: one positive example learned
1
>>> m.remember("u2", ts_ms=0, x={"views_1h": 1.0})
>>> m.expire("u2", now_ms=3_600_000)      # horizon passed: one negative example learned
1
>>> 0.0 < m.predict_one(x) < 1.0
True
"""
from __future__ import annotations

import math

from river import linear_model, optim, preprocessing


class PurchasePropensity:
    def __init__(self, horizon_ms: int, learning_rate: float = 0.05):
        self.horizon_ms = horizon_ms
        self.learning_rate = learning_rate
        self.model = preprocessing.StandardScaler() | linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate)
        )
        self.pending: dict[str, list[tuple[int, dict[str, float]]]] = {}
        self.learned = 0
        self._compiled = None  # the scaler and weights per input as of `learned`: score_totals

    def predict_one(self, x: dict[str, float]) -> float:
        return self.model.predict_proba_one(x).get(True, 0.0)

    def score_totals(self, inputs: list[tuple[str, int, bool]], totals, session_pages: int) -> float:
        """``predict_one`` of the inputs read from a profile's window totals (``inputs``: name,
        slot, money in cents, in the model's x order; then ``session_pages``), without building
        the two dicts River's pipeline builds per call. It does the same float operations in
        the same order as River's scaler, dot product and sigmoid, so the result is equal
        (tests/test_model.py checks it bit for bit).

        >>> m = PurchasePropensity(horizon_ms=1)
        >>> m.remember("u", 0, {"orders_30d": 2.0, "session_pages": 3.0}); m.expire("u", 1)
        1
        >>> m.score_totals([("orders_30d", 0, False)], [2], 3) == m.predict_one(
        ...     {"orders_30d": 2.0, "session_pages": 3.0})
        True
        """
        compiled = self._compiled
        if compiled is None or compiled[0] != self.learned or compiled[1] is not inputs:
            compiled = self._compiled = self._compile(inputs)
        z = 0.0
        for slot, money_, mean, sd, w in compiled[2]:
            if w:
                z += w * (((totals[slot] / 100 if money_ else float(totals[slot])) - mean) / sd)
        mean, sd, w = compiled[3]
        if w:
            z += w * ((float(session_pages) - mean) / sd)
        z += compiled[4]
        if z < -30:
            return 0.0
        if z > 30:
            return 1.0
        return 1 / (1 + math.exp(-z))

    def _compile(self, inputs: list[tuple[str, int, bool]]) -> tuple:
        scaler, regression = self.model.steps.values()
        means, vars_, weights = scaler.means, scaler.vars, regression._weights

        def one(name: str) -> tuple[float, float, float]:
            var = vars_.get(name, 0.0)
            # a zero variance scales the input to 0.0, which adds nothing to the dot product
            return means.get(name, 0.0), (var ** 0.5 if var else 1.0), (weights.get(name, 0.0) if var else 0.0)
        return (self.learned, inputs, [(slot, money_, *one(name)) for name, slot, money_ in inputs],
                one("session_pages"), regression.intercept)

    def remember(self, user: str, ts_ms: int, x: dict[str, float]) -> None:
        """Keep an example whose label is not known yet."""
        self.pending.setdefault(user, []).append((ts_ms, x))

    def on_order(self, user: str, ts_ms: int) -> int:
        """An order at ts_ms: examples within the horizon before it are positives."""
        examples = self.pending.pop(user, None)
        if not examples:
            return 0
        keep, n = [], 0
        for ts, x in examples:
            if ts > ts_ms:
                keep.append((ts, x))  # an out-of-order order before this example
            else:
                self.model.learn_one(x, ts_ms - ts <= self.horizon_ms)
                n += 1
        if keep:
            self.pending[user] = keep
        self.learned += n
        return n

    def expire(self, user: str, now_ms: int) -> int:
        """Examples whose horizon passed without an order are negatives."""
        examples = self.pending.get(user)
        if not examples:
            return 0
        keep, n = [], 0
        for ts, x in examples:
            if ts + self.horizon_ms <= now_ms:
                self.model.learn_one(x, False)
                n += 1
            else:
                keep.append((ts, x))
        if keep:
            self.pending[user] = keep
        else:
            del self.pending[user]
        self.learned += n
        return n

    def adopt(self, user: str, examples: list[tuple[int, dict[str, float]]] | None) -> None:
        """Take over another profile's unlabelled examples (identity stitching)."""
        if examples:
            self.pending.setdefault(user, []).extend(examples)

    def next_due(self, user: str) -> int | None:
        examples = self.pending.get(user)
        return min(ts for ts, _ in examples) + self.horizon_ms if examples else None
