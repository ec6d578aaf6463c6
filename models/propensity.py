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

    def predict_one(self, x: dict[str, float]) -> float:
        return self.model.predict_proba_one(x).get(True, 0.0)

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
