"""A profile shard's side of the online models: it scores with the versions the learner
published, keeps its users' open predictions, and sends the labels they resolve to the learner.

Scoring is deterministic: an event at ``t`` is scored with version ``version_for(t)``
(models/training.py), never with "whatever arrived last". A shard that does not have that
version yet must hold the event (:meth:`ShardModels.can_score` says so; flows/shard.py holds
it). So 1 and N workers give the same scores.

>>> from models.spec import load_models
>>> from models.learner import Learner
>>> specs = {"purchase_propensity": load_models()["purchase_propensity"]}
>>> H = 3_600_000
>>> m = ShardModels(specs, shard=0, period_ms=H, grace_ms=0)
>>> m.can_score(10)  # no version yet
False
>>> m.receive(Learner("purchase_propensity").publish(0, 5))  # the fresh model, versions 0-5
>>> m.can_score(10), m.can_score(6 * H)
(True, False)
>>> m.on_event("u1", "page_view", 10, {"views_1h": 1}.get, session_start=10)
True
>>> m.scores("u1")
{'p_purchase_24h': '0.500000', 'p_purchase_24h_version': '0'}
>>> m.on_event("u1", "page_view", 20, {"views_1h": 2}.get, session_start=10)  # same session
False
>>> m.on_event("u1", "order_completed", 30, {}.get, session_start=10)
False
>>> [(b.shard, len(b.labels), b.labels[0].y) for _, b in m.send(mark_ms=40)]
[(0, 1, True)]
"""
from __future__ import annotations

from collections.abc import Callable

from models.labels import Label, OpenPredictions
from models.learner import Weights
from models.spec import ModelSpec
from models.training import LabelBatch, version_for

DAY_MS = 86_400_000
VERSIONS_KEPT = 4  # per model: an event may still need the version before the newest


class ShardModels:
    def __init__(self, specs: dict[str, ModelSpec], shard: int, period_ms: int, grace_ms: int):
        self.specs = specs
        self.shard, self.period_ms, self.grace_ms = shard, period_ms, grace_ms
        self.versions: dict[str, list[Weights]] = {name: [] for name in specs}
        self.book = OpenPredictions({name: s.label_rule for name, s in specs.items()})
        self.outbox: dict[str, list[Label]] = {name: [] for name in specs}
        self.last: dict[str, dict[str, tuple[float, int]]] = {}  # user -> model -> (score, version)
        self.once: dict[str, dict[str, int]] = {}  # user -> model -> session start or day scored
        self.unscored = 0  # predictions skipped for want of a version (only if not held)

    # -- versions ---------------------------------------------------------------------------
    def receive(self, w: Weights) -> None:
        """A version from the learner (a repeat after a restart is harmless: the same model)."""
        mine = self.versions.get(w.model)
        if mine is None:
            return  # a model this run does not declare
        if mine and w.version <= mine[-1].last_version:
            return  # known already
        mine.append(w)
        if len(mine) > VERSIONS_KEPT:
            del mine[0]

    def weights_for(self, model: str, ts: int) -> Weights | None:
        need = version_for(ts, self.period_ms, self.grace_ms)
        mine = self.versions[model]
        for w in reversed(mine):
            if w.version <= need <= w.last_version:
                return w
        if mine and need < mine[0].version and mine[0].learned == 0:
            return mine[0]  # before the first version: the same fresh model
        return None

    def can_score(self, ts: int) -> bool:
        """Does every model have the version an event at ``ts`` needs?"""
        need = version_for(ts, self.period_ms, self.grace_ms)
        for mine in self.versions.values():
            if not mine or need > mine[-1].last_version:
                return False
        return True

    # -- events and time ---------------------------------------------------------------------
    def on_event(self, user: str, name: str, ts: int, value_of: Callable[[str], object],
                 session_start: int | None) -> bool:
        """One event of the user's, after the profile took it in (``value_of``: the profile's
        feature values now). First what was due before it resolves by its horizon (as its
        timer would: else whether the timer fired before this event depended on the batches),
        then what it is the target of; then it scores where it is a prediction point. True when
        a score changed."""
        for label in self.book.expire(user, ts):
            self.outbox[label.model].append(label)
        for label in self.book.on_event(user, name, ts):
            self.outbox[label.model].append(label)
        scored = False
        for model, spec in self.specs.items():
            if not spec.predicts_on(name):
                continue
            if spec.once_per != "event":
                key = session_start if spec.once_per == "session" else ts // DAY_MS
                if key is None:
                    continue
                seen = self.once.setdefault(user, {})
                if seen.get(model) == key:
                    continue
                seen[model] = key
            w = self.weights_for(model, ts)
            if w is None:
                self.unscored += 1
                continue
            x = spec.vector(_Values(value_of), name)
            score = w.predict_one(x)
            # the version the time needs (one publication may stand for several); before the
            # first publication, the first (the same fresh model)
            version = max(w.version, version_for(ts, self.period_ms, self.grace_ms))
            self.last.setdefault(user, {})[model] = (score, version)
            # the input kept as a tuple in the spec's order: a fraction of a dict's memory
            self.book.open(user, model, ts, tuple(x.values()), version, score)
            scored = True
        return scored

    def expire(self, user: str, now_ms: int) -> None:
        """The user's timer: predictions whose horizon passed before ``now_ms`` resolve."""
        for label in self.book.expire(user, now_ms):
            self.outbox[label.model].append(label)

    def next_due(self, user: str) -> int | None:
        """When to call :meth:`expire` for the user (just after the first horizon ends)."""
        due = self.book.next_due(user)
        return None if due is None else due + 1

    def send(self, mark_ms: int) -> list[tuple[str, LabelBatch]]:
        """One batch per model: the labels resolved since the last call, and the mark (every
        label before it has been sent). Sent even when empty: the learner waits for every
        shard's mark."""
        out = []
        for model, labels in self.outbox.items():
            out.append((model, LabelBatch(self.shard, mark_ms, labels, model)))
            self.outbox[model] = []
        return out

    # -- what the profile shows ------------------------------------------------------------
    def scores(self, user: str) -> dict[str, str]:
        """The user's last scores and their versions, as Redis fields."""
        out = {}
        for model, (score, version) in self.last.get(user, {}).items():
            field = self.specs[model].score_field
            out[field] = f"{score:.6f}"
            out[f"{field}_version"] = str(version)
        return out

    def score(self, user: str, field: str) -> float | None:
        """The last score in a field (a trigger rule's condition reads it)."""
        for model, (score, _) in self.last.get(user, {}).items():
            if self.specs[model].score_field == field:
                return score
        return None

    # -- the profile's life --------------------------------------------------------------------
    def take(self, user: str) -> tuple:
        """Everything of the user's, to move with the profile to another shard."""
        return (self.book.take(user), self.last.pop(user, None), self.once.pop(user, None))

    def adopt(self, user: str, moved: tuple | None) -> None:
        """A moved profile's state, merged into the user's (identity stitching)."""
        if not moved:
            return
        predictions, last, once = moved
        self.book.adopt(user, predictions)
        if last:
            mine = self.last.setdefault(user, {})
            for model, value in last.items():
                mine.setdefault(model, value)
        if once:
            self.once.setdefault(user, {}).update({m: k for m, k in once.items()
                                                    if m not in self.once[user]})

    def drop(self, user: str) -> None:
        """The profile is gone (time to live, consent, erasure): its predictions go unlearned."""
        self.book.erase(user)
        self.last.pop(user, None)
        self.once.pop(user, None)


class _Values:
    """The profile's values as the spec's ``vector`` reads them (``.get``)."""

    __slots__ = ("value_of",)

    def __init__(self, value_of: Callable[[str], object]):
        self.value_of = value_of

    def get(self, name: str) -> float | None:
        v = self.value_of(name)
        return None if v is None or isinstance(v, str) else float(v)
