"""Delayed labels: the open predictions of a shard's users, and how each resolves in event time.

A prediction freezes what the model saw (the input vector, the version and the score) when it
is made. Its label comes later:

- a *target* event within the horizon resolves it at once (``positive="target"``: an order
  within 24 h, a click within 30 min), or
- the horizon passing without one resolves it by timer (``positive="timeout"``: silent for 30
  days is churn; any event in time makes it a negative).

So "not converted yet" is never counted as a negative: a prediction stays open until one of the
two happens. There is at most one open prediction per (user, model): a user scored again while
one is open is not counted twice, so heavy users do not outweigh the rest.

>>> book = OpenPredictions({"propensity": LabelRule(horizon_ms=1_000, targets={"order"})})
>>> book.open("u1", "propensity", made_ms=0, x={"views": 2.0}, version=3, score=0.4)
True
>>> book.open("u1", "propensity", made_ms=10, x={"views": 3.0}, version=3, score=0.5)
False
>>> [(l.y, l.labelled_ms, l.x) for l in book.on_event("u1", "order", 500)]
[(True, 500, {'views': 2.0})]
>>> book.open("u2", "propensity", made_ms=0, x={}, version=3, score=0.1)
True
>>> book.next_due("u2"), book.expire("u2", now_ms=1_000), [l.y for l in book.expire("u2", 1_001)]
(1000, [], [False])
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabelRule:
    horizon_ms: int
    targets: frozenset[str] | set[str] = field(default_factory=frozenset)  # "*": any event
    positive: str = "target"  # "target": the target event is the positive; "timeout": silence

    def __post_init__(self) -> None:
        if self.positive not in ("target", "timeout"):
            raise ValueError(f"positive must be 'target' or 'timeout', not {self.positive!r}")
        object.__setattr__(self, "targets", frozenset(self.targets))

    def hits(self, event_name: str) -> bool:
        return event_name in self.targets or "*" in self.targets


class Prediction:
    """One open prediction: what the model saw and said, frozen at ``made_ms``."""

    __slots__ = ("model", "made_ms", "due_ms", "x", "version", "score")

    def __init__(self, model: str, made_ms: int, due_ms: int, x: dict[str, float], version: int,
                 score: float):
        self.model, self.made_ms, self.due_ms = model, made_ms, due_ms
        self.x, self.version, self.score = x, version, score

    def __getstate__(self) -> tuple:
        return (self.model, self.made_ms, self.due_ms, self.x, self.version, self.score)

    def __setstate__(self, state: tuple) -> None:
        self.model, self.made_ms, self.due_ms, self.x, self.version, self.score = state


class Label:
    """A resolved prediction: its frozen input, the score it got, and the outcome."""

    __slots__ = ("model", "user", "made_ms", "labelled_ms", "y", "x", "version", "score")

    def __init__(self, p: Prediction, user: str, labelled_ms: int, y: bool):
        self.model, self.user, self.made_ms = p.model, user, p.made_ms
        self.labelled_ms, self.y, self.x = labelled_ms, y, p.x
        self.version, self.score = p.version, p.score

    def __repr__(self) -> str:
        return (f"Label({self.model!r}, {self.user!r}, made={self.made_ms}, "
                f"labelled={self.labelled_ms}, y={self.y})")


class OpenPredictions:
    """The open predictions of one shard's users, at most one per (user, model)."""

    def __init__(self, rules: dict[str, LabelRule]):
        self.rules = rules
        self.open_by_user: dict[str, dict[str, Prediction]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.open_by_user.values())

    def open(self, user: str, model: str, made_ms: int, x: dict[str, float] | tuple, version: int,
             score: float) -> bool:
        """Open a prediction; False (nothing kept) when one of this model is open for the user.
        The input is copied (a dict) or immutable (a tuple, in the spec's input order): what
        the profile does later cannot leak into it."""
        mine = self.open_by_user.setdefault(user, {})
        if model in mine:
            return False
        mine[model] = Prediction(model, made_ms, made_ms + self.rules[model].horizon_ms,
                                 x if type(x) is tuple else dict(x), version, score)
        return True

    def on_event(self, user: str, event_name: str, ts_ms: int) -> list[Label]:
        """An event of the user's (call in event-time order): the predictions it resolves. An
        event before a prediction was made says nothing about it."""
        mine = self.open_by_user.get(user)
        if not mine:
            return []
        out = []
        for model, p in list(mine.items()):
            rule = self.rules[model]
            if p.made_ms <= ts_ms <= p.due_ms and rule.hits(event_name):
                out.append(Label(p, user, ts_ms, rule.positive == "target"))
                del mine[model]
        if not mine:
            del self.open_by_user[user]
        return out

    def expire(self, user: str, now_ms: int) -> list[Label]:
        """Event time is ``now_ms`` (nothing earlier can still come): the predictions whose
        horizon has passed resolve, labelled at their due time."""
        mine = self.open_by_user.get(user)
        if not mine:
            return []
        out = []
        for model, p in list(mine.items()):
            if now_ms > p.due_ms:
                out.append(Label(p, user, p.due_ms, self.rules[model].positive == "timeout"))
                del mine[model]
        if not mine:
            del self.open_by_user[user]
        return out

    def next_due(self, user: str) -> int | None:
        """When the user's first open prediction resolves by timer (for the shard's timers)."""
        mine = self.open_by_user.get(user)
        return min(p.due_ms for p in mine.values()) if mine else None

    def take(self, user: str) -> dict[str, Prediction]:
        """Remove and return a user's open predictions (the profile moves to another shard)."""
        return self.open_by_user.pop(user, {})

    def adopt(self, user: str, predictions: dict[str, Prediction]) -> None:
        """Take another profile's open predictions (identity stitching). Where both have one of
        a model open, the earlier stays: it was made first, with less known."""
        if not predictions:
            return
        mine = self.open_by_user.setdefault(user, {})
        for model, p in predictions.items():
            if model not in mine or p.made_ms < mine[model].made_ms:
                mine[model] = p

    def erase(self, user: str) -> None:
        """Erasure: the user's open predictions go, unlearned."""
        self.open_by_user.pop(user, None)
