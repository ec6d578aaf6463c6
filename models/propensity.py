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
from array import array

from river import linear_model, optim, preprocessing

MAX_MEMO = 1024  # scores memoised per model state, at most (see score_totals): < 1 MB


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
        # The score depends only on the totals' contents and the pages (for these weights):
        # profiles often share them (a first page view), so scores are memoised by content
        # until the model learns. Only for arrays, whose bytes are a cheap exact key.
        memo = compiled[5]
        key = (totals.typecode, totals.tobytes(), session_pages) if type(totals) is array else None
        if key is not None:
            score = memo.get(key)
            if score is not None:
                return score
        z = 0.0
        for slot, money_, mean, sd, w, at_zero in compiled[2]:
            v = totals[slot]
            if v:
                z += w * (((v / 100 if money_ else float(v)) - mean) / sd)
            else:
                z += at_zero  # the same term, computed once (most inputs are 0)
        mean, sd, w = compiled[3]
        if w:
            z += w * ((float(session_pages) - mean) / sd)
        z += compiled[4]
        if z < -30:
            score = 0.0
        elif z > 30:
            score = 1.0
        else:
            score = 1 / (1 + math.exp(-z))
        if key is not None:
            if len(memo) >= MAX_MEMO:
                memo.clear()  # bounded; it starts afresh whenever the model learns anyway
            memo[key] = score
        return score

    def _compile(self, inputs: list[tuple[str, int, bool]]) -> tuple:
        """(learned, inputs, per input (slot, money, mean, sd, weight, term of a 0 total),
        session_pages' (mean, sd, weight), intercept, score memo). Inputs of zero weight add
        nothing and are left out (score_totals skipped them)."""
        scaler, regression = self.model.steps.values()
        means, vars_, weights = scaler.means, scaler.vars, regression._weights

        def one(name: str) -> tuple[float, float, float]:
            var = vars_.get(name, 0.0)
            # a zero variance scales the input to 0.0, which adds nothing to the dot product
            return means.get(name, 0.0), (var ** 0.5 if var else 1.0), (weights.get(name, 0.0) if var else 0.0)
        terms = []
        for name, slot, money_ in inputs:
            mean, sd, w = one(name)
            if w:
                terms.append((slot, money_, mean, sd, w, w * ((0.0 - mean) / sd)))
        return (self.learned, inputs, terms, one("session_pages"), regression.intercept, {})

    def __getstate__(self) -> dict:
        # the compiled form and its memo are derived: rebuilt on the first score after a restore
        return {**self.__dict__, "_compiled": None}

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
