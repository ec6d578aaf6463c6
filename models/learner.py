"""One model's learner, and the versioned weights it publishes for scoring.

A model has exactly one :class:`Learner`, whatever the number of workers: labelled examples flow
to it, it learns them in the order it is given (the caller makes that order canonical), and it
publishes :class:`Weights`, numbered versions that anyone can score with. Scoring never touches
the learner, so predicting changes nothing, and a score says which version gave it.

The learner is River's logistic regression behind a running standard scaler, trained by plain
SGD. A version is a frozen copy of what scoring needs: the scaler's means and deviations, the
coefficients and the intercept. :meth:`Weights.predict_one` does River's float operations in
River's order, so it gives River's score (tests/test_model_learner.py checks it).

>>> learner = Learner("purchase_propensity", learning_rate=0.1)
>>> w0 = learner.publish()
>>> (w0.version, w0.learned, w0.predict_one({"views_1h": 3.0}))
(1, 0, 0.5)
>>> for _ in range(50):
...     learner.learn_one({"views_1h": 5.0}, True)
...     learner.learn_one({"views_1h": 1.0}, False)
>>> w1 = learner.publish()
>>> (w1.version, w1.learned)
(2, 100)
>>> w1.predict_one({"views_1h": 5.0}) > 0.5 > w1.predict_one({"views_1h": 1.0})
True
>>> w0.predict_one({"views_1h": 3.0})  # an old version does not move
0.5
"""
from __future__ import annotations

import math

from river import linear_model, optim, preprocessing


class Weights:
    """A published version of a model: scoring only, immutable, small, picklable."""

    __slots__ = ("model", "version", "learned", "terms", "intercept", "last_version", "_rows")

    def __init__(self, model: str, version: int, learned: int,
                 terms: dict[str, tuple[float, float, float]], intercept: float,
                 last_version: int | None = None):
        self.model, self.version, self.learned = model, version, learned
        self.terms = terms  # input -> (mean, standard deviation, coefficient)
        self.intercept = intercept
        # the same model is every version from `version` to this one (no label in between)
        self.last_version = version if last_version is None else last_version
        self._rows: dict[tuple, tuple] = {}  # input names -> their terms by position

    def __getstate__(self) -> tuple:
        return (self.model, self.version, self.learned, self.terms, self.intercept,
                self.last_version)

    def __setstate__(self, state: tuple) -> None:
        (self.model, self.version, self.learned, self.terms, self.intercept,
         self.last_version) = state
        self._rows = {}

    def to_json(self) -> dict:
        """A plain document (floats round-trip exactly through JSON): for the channel that
        takes versions to the shards. No pickle: the store it crosses is not trusted code."""
        return {"model": self.model, "version": self.version, "learned": self.learned,
                "terms": {k: list(v) for k, v in self.terms.items()},
                "intercept": self.intercept, "last_version": self.last_version}

    @classmethod
    def from_json(cls, doc: dict) -> "Weights":
        return cls(doc["model"], int(doc["version"]), int(doc["learned"]),
                   {k: (float(v[0]), float(v[1]), float(v[2])) for k, v in doc["terms"].items()},
                   float(doc["intercept"]), int(doc["last_version"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Weights) and self.__getstate__() == other.__getstate__()

    def __repr__(self) -> str:
        return f"Weights({self.model!r}, version={self.version}, learned={self.learned})"

    def predict_one(self, x: dict[str, float]) -> float:
        """P(y = 1 | x): the scaled inputs' dot product with the coefficients, through a
        sigmoid. Inputs the model never saw count 0 (River's scaler does the same)."""
        z = 0.0
        terms = self.terms
        for name, value in x.items():
            t = terms.get(name)
            if t is not None:
                mean, sd, w = t
                z += w * ((value - mean) / sd)
        z += self.intercept
        # River's sigmoid clamps the same way (river.utils.math.sigmoid)
        if z < -30:
            return 0.0
        if z > 30:
            return 1.0
        return 1 / (1 + math.exp(-z))

    def predict_row(self, names: tuple[str, ...], row: tuple[float, ...]) -> float:
        """:meth:`predict_one` of ``dict(zip(names, row))``, the same floats in the same order,
        with the terms looked up once per list of names.

        >>> w = Weights("m", 1, 10, {"a": (1.0, 2.0, 0.5), "c": (0.0, 1.0, -1.0)}, 0.25)
        >>> w.predict_row(("a", "b", "c"), (3.0, 9.0, 1.0)) == w.predict_one({"a": 3.0, "b": 9.0, "c": 1.0})
        True
        """
        plan = self._rows.get(names)
        if plan is None:
            terms = self.terms
            plan = self._rows[names] = tuple((i, *terms[n]) for i, n in enumerate(names)
                                             if n in terms)
        z = 0.0
        for i, mean, sd, w in plan:
            z += w * ((row[i] - mean) / sd)
        z += self.intercept
        if z < -30:
            return 0.0
        if z > 30:
            return 1.0
        return 1 / (1 + math.exp(-z))


class Learner:
    """The single learner of one model (River: StandardScaler | LogisticRegression, SGD)."""

    def __init__(self, model: str, learning_rate: float = 0.01, intercept_lr: float = 0.01,
                 l2: float = 0.0):
        self.model = model
        self.params = {"learning_rate": learning_rate, "intercept_lr": intercept_lr, "l2": l2}
        self.pipeline = preprocessing.StandardScaler() | linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate), intercept_lr=intercept_lr, l2=l2)
        self.learned = 0
        self.version = 0

    def learn_one(self, x: dict[str, float], y: bool) -> None:
        self.pipeline.learn_one(x, bool(y))
        self.learned += 1

    def predict_one(self, x: dict[str, float]) -> float:
        """River's own score with the learner's current state (the published versions may be
        older)."""
        return self.pipeline.predict_proba_one(x).get(True, 0.0)

    def publish(self, version: int | None = None, last_version: int | None = None) -> Weights:
        """A new version: the learner's state now, frozen. Numbered in sequence unless
        ``version`` is given (models/training.py numbers them by event-time period, and one
        publication may stand for a run of versions with no label between them)."""
        scaler, regression = self.pipeline.steps.values()
        coef = regression._weights
        terms: dict[str, tuple[float, float, float]] = {}
        for name, mean in scaler.means.items():
            var = scaler.vars.get(name, 0.0)
            # River scales an input of zero variance to 0.0: it adds nothing to the sum
            if var:
                w = coef.get(name, 0.0)
                if w:
                    terms[name] = (mean, var ** 0.5, w)
        self.version = self.version + 1 if version is None else version
        return Weights(self.model, self.version, self.learned, terms, regression.intercept,
                       last_version)
