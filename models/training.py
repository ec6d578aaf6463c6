"""The learner's step: labels from every profile shard in, numbered versions of the model out.

Determinism is the point. Labels reach the learner from several shards, in an order that
depends on batches, workers and processes. So the learner learns in *periods of event time*:
once every shard has said that all its labels before the end of a period have been sent (its
``mark``), the period's labels are learned in one canonical order (learning time, prediction
time, user), and the learner publishes the version for that period boundary. Version ``k`` is
the model learned from every label with a learning time before ``k * period``, whatever the
number of workers: 1 and N workers give the same versions, bit for bit.

A label is learned when its prediction's *horizon closes* (``made + horizon``), not when it
resolves: a positive comes within hours, a negative only once the horizon has passed, so learning
each at its resolution would feed the model the recent positives with the old negatives (the
delayed-feedback bias: on the synthetic stream the purchase model's scores ranked at 0.53 where
the same learner, fed by closed horizons, ranked at 0.62). Every prediction of a cohort is learned
together, with what it turned out to be; the model lags by its horizon. ``horizon_ms=0``: at
the label time.

The shards score an event at time ``t`` with version ``floor((t - grace) / period)``
(:func:`version_for`): the model as of the last period boundary at least ``grace`` before the
event, so that live the version is published before it is needed.

>>> from models.labels import Label, Prediction
>>> def label(user, made, at, y):
...     return Label(Prediction("m", made, at + 10, {"x": 1.0 if y else 0.0}, 0, 0.5), user, at, y)
>>> H = 3_600_000
>>> t = Training("m", shards=2, period_ms=H)
>>> t.on_batch([LabelBatch(0, mark_ms=H // 2, labels=[])]).weights  # shard 1 not heard yet
[]
>>> [(w.version, w.learned) for w in t.on_batch([LabelBatch(1, H // 2)]).weights]  # the start
[(0, 0)]
>>> t.on_batch([LabelBatch(0, mark_ms=H + 5, labels=[label("a", 0, H - 9, True)])]).weights
[]
>>> out = t.on_batch([LabelBatch(1, mark_ms=5 * H, labels=[label("b", 10, H - 60, False)])])
>>> [(w.version, w.last_version, w.learned) for w in out.weights]  # both shards past one hour
[(1, 1, 2)]
>>> [(w.version, w.last_version) for w in t.on_batch([LabelBatch(0, 5 * H)]).weights]  # no label
[(2, 5)]
>>> sorted({row[2] for row in out.metrics})[:3]
['auc', 'calibration', 'label_delay_s']
"""
from __future__ import annotations

import heapq
import math
import struct
from dataclasses import dataclass, field

from alerts.lifecycle import Lifecycle, Verdict
from models.labels import Label
from models.learner import Learner, Weights
from models.quality import MINUTE_MS, ModelQuality


RECENT_KEPT = 4
END_MS = 2**62
# A label held for its metrics: close, prediction time, score, y, label time; big-endian, so the
# bytes sort as the numbers do (times and scores are never negative): 33 bytes, not a tuple.
_HELD = struct.Struct(">qqd?q")


def version_for(ts_ms: int, period_ms: int, grace_ms: int) -> int:
    """The version a score at ``ts_ms`` uses.

    >>> version_for(3_600_000 + 299_999, 3_600_000, 300_000), version_for(3_900_000, 3_600_000, 300_000)
    (0, 1)
    """
    return (ts_ms - grace_ms) // period_ms


@dataclass
class LabelBatch:
    """What one profile shard sends a model's learner with each batch: the labels it resolved,
    and its mark: every label with a label time before it has now been sent."""

    shard: int
    mark_ms: int
    labels: list[Label] = field(default_factory=list)
    model: str = ""  # the learner it goes to (the step's key)


@dataclass
class TrainingOut:
    weights: list[Weights] = field(default_factory=list)  # versions published, in order
    metrics: list[tuple] = field(default_factory=list)  # (minute_ms, model, metric, value, labels)
    drifts: list[tuple[int, int]] = field(default_factory=list)  # (labels learned, its prediction time)
    end: bool = False  # every shard sent its final mark: the versions channel may end
    alerts: list[dict] = field(default_factory=list)  # model_drift: firing, then resolved
    model: str = ""


def _canonical(l: Label, at: int) -> tuple:
    """A total order: two labels that compare equal are the same example (the order of equal
    ones cannot change what is learned)."""
    x = l.x if type(l.x) is tuple else sorted(l.x.items())
    return (at, l.labelled_ms, l.made_ms, l.user, l.y, l.score, x)


class Training:
    """One model's learner and its progressive quality, driven by the shards' labels.

    Versions: version ``k`` is the model learned from the labels with a label time before
    ``k * period``. A publication stands for a run of versions with no label between them
    (``Weights.version`` .. ``Weights.last_version``), so a quiet night or a gap of days in a
    replay costs one message, not one per period."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"horizon_ms": 0, "measured_ms": 0, "held": [], "floor_ms": None,
                              "latest_ms": None, "cutoff_ms": None, **state})

    def __init__(self, model: str, shards: int, period_ms: int, learner: Learner | None = None,
                 quality: ModelQuality | None = None, names: tuple[str, ...] | None = None,
                 horizon_ms: int = 0, measured_ms: int = 0):
        if period_ms <= 0 or period_ms % MINUTE_MS:
            raise ValueError(f"a model's period is whole minutes, not {period_ms} ms")
        self.model, self.shards, self.period_ms = model, shards, period_ms
        self.names = names  # the inputs' names, when labels carry their input as a tuple
        self.horizon_ms = horizon_ms  # a label is learned when its horizon closes (0: at once)
        # A label learned at once is measured when its horizon closes all the same: the rolling
        # AUC then compares scores of one cohort, given by about the same model. Measured as
        # they resolve, the window held positives scored days earlier, by an older model, beside
        # fresh negatives: on the synthetic stream churn's rolling AUC read 0.27 where each
        # day's predictions ranked at 0.57 to 0.62. Only (close, made, score, y, label time) wait.
        self.measured_ms = measured_ms if not horizon_ms else 0
        self.held: list[bytes] = []  # a heap of _HELD records
        self.floor_ms: int | None = None  # metrics before this time are closed
        self.latest_ms: int | None = None  # the latest label time seen
        self.cutoff_ms: int | None = None  # at the input's end: no metric for later closes
        self.learner = learner or Learner(model)
        self.quality = quality or ModelQuality(model)
        self.marks: dict[int, int] = {}
        self.pending: list[Label] = []
        self.covered: int | None = None  # the last version published
        self.minute: int | None = None  # the label minute whose metrics are open
        self.recent: list[Weights] = []  # the last publications: sent again after a restore
        # a drift of the loss (ADWIN) fires an alert for its label minute; 30 minutes without
        # one resolve it
        self.drift = Lifecycle("model_drift", severity="II", area="models", window="1m",
                               response="the model's loss moved up: check its inputs and the "
                                        "events behind its target; the model adapts on its own",
                               resolve_ms=30 * MINUTE_MS)
        self.drift_in_minute = False

    def complete_ms(self) -> int | None:
        """Every label before this time has arrived (None until every shard has spoken)."""
        if len(self.marks) < self.shards:
            return None
        return min(self.marks.values())

    def on_batch(self, batches: list[LabelBatch]) -> TrainingOut:
        out = TrainingOut()
        for b in batches:
            self.pending.extend(b.labels)
            for l in b.labels:
                if self.latest_ms is None or l.labelled_ms > self.latest_ms:
                    self.latest_ms = l.labelled_ms
            if b.mark_ms > self.marks.get(b.shard, -(2**62)):
                self.marks[b.shard] = b.mark_ms
        complete = self.complete_ms()
        if complete is None:
            return out
        if complete >= END_MS and self.cutoff_ms is None:
            self.cutoff_ms = self.latest_ms  # the input's end: see finish()
        period = self.period_ms
        target = complete // period  # every label of versions up to this one has arrived
        if self.covered is None:
            # The first version: the fresh (or restored) model, numbered at the period of the
            # first label, so any version before it is the same model. Whatever the batches,
            # every label before `complete` is here now: the numbering is deterministic.
            first = min([target] + [self._at(l) // period for l in self.pending])
            self.covered = first
            self._publish(out, first, first)
        while True:
            due = [l for l in self.pending if self._at(l) // period < target]
            if not due:
                break
            # the earliest period with labels; a label of a version already published (late)
            # goes into the next one
            k = max(min(self._at(l) // period for l in due), self.covered)
            if k > self.covered:  # versions up to k learned nothing new: the same model
                self._publish(out, self.covered + 1, k)
            batch = [l for l in due if max(self._at(l) // period, self.covered) == k]
            keep = set(map(id, batch))
            self.pending = [l for l in self.pending if id(l) not in keep]
            self._learn(self._sorted(batch), (k + 1) * period, out)
            self.covered = k + 1
            self._publish(out, k + 1, k + 1)
        if target > self.covered:
            self._publish(out, self.covered + 1, target)
            self.covered = target
        if self.held:
            self._measure_held(target * period, out)
        return out

    def _at(self, l: Label) -> int:
        """When a label is learned: its horizon's close (its label time at the latest), or its
        label time without a horizon. Every label before a shard's mark has arrived, and a
        label's time is at most its close: a complete mark covers the closes before it."""
        return max(l.made_ms + self.horizon_ms, l.labelled_ms) if self.horizon_ms else l.labelled_ms

    def _sorted(self, labels: list[Label]) -> list[Label]:
        return sorted(labels, key=lambda l: _canonical(l, self._at(l)))

    def _publish(self, out: TrainingOut, first: int, last: int) -> None:
        w = self.learner.publish(first, last)
        out.weights.append(w)
        self.recent.append(w)
        if len(self.recent) > RECENT_KEPT:
            del self.recent[0]

    def republish(self) -> list[Weights]:
        """The last publications again, after a restore: some may not have reached every shard
        before the snapshot (they are idempotent: a shard ignores a version it has)."""
        return list(self.recent)

    def finish(self) -> TrainingOut:
        """The input's end: every label still pending is learned (in the canonical order, as
        one last period), and the open minute's metrics close. A prediction whose horizon had
        not closed by the last label is learned but not measured: its cohort is incomplete
        (only the labels that resolve early came: the positives of a purchase, the negatives
        of churn), and measuring it would tilt the last rolling AUC."""
        out = TrainingOut()
        if self.cutoff_ms is None:
            self.cutoff_ms = self.latest_ms
        if self.pending:
            last = max(self._at(l) for l in self.pending) // self.period_ms
            start = last if self.covered is None else max(last, self.covered)
            if self.covered is None:
                self.covered = start
            batch, self.pending = self._sorted(self.pending), []
            self._learn(batch, END_MS, out)
            self.covered = start + 1
            self._publish(out, start + 1, start + 1)
        if self.held:
            self._measure_held(END_MS, out)
        if self.minute is not None:
            self._close_minute(out)
            self.minute = None
        return out

    def _learn(self, labels: list[Label], end_ms: int, out: TrainingOut) -> None:
        learner, names, measured = self.learner, self.names, self.measured_ms
        for l in labels:
            learner.learn_one(l.x if names is None else dict(zip(names, l.x)), l.y)
            if measured:
                heapq.heappush(self.held, _HELD.pack(l.made_ms + measured, l.made_ms, l.score,
                                                     l.y, l.labelled_ms))
            else:
                self._measure(self._at(l), l.score, l.y, l.made_ms, l.labelled_ms, out)
        if measured:
            self._measure_held(end_ms, out)
        else:
            self._close_minutes(end_ms, out)

    def _measure_held(self, end_ms: int, out: TrainingOut) -> None:
        """The held labels whose horizon closed before ``end_ms``, in the order of their closes
        (then prediction time, score, label: equal records are the same to the metrics)."""
        held = self.held
        while held and _HELD.unpack_from(held[0])[0] < end_ms:
            close, made, score, y, labelled = _HELD.unpack(heapq.heappop(held))
            self._measure(close, score, bool(y), made, labelled, out)
        self._close_minutes(end_ms, out)

    def _measure(self, at: int, score: float, y: bool, made: int, labelled: int,
                 out: TrainingOut) -> None:
        if self.cutoff_ms is not None and at > self.cutoff_ms:
            return
        if self.floor_ms is not None and at < self.floor_ms:
            at = self.floor_ms  # (a late label: its minute's metrics were written)
        minute = at // MINUTE_MS * MINUTE_MS
        if minute != self.minute:
            if self.minute is not None:
                self._close_minute(out)
            self.minute = minute
        if self.quality.update(score, y, made, labelled):
            out.drifts.append((self.learner.learned, made))
            self.drift_in_minute = True

    def _close_minutes(self, end_ms: int, out: TrainingOut) -> None:
        if end_ms < END_MS:
            self.floor_ms = end_ms if self.floor_ms is None else max(self.floor_ms, end_ms)
        if self.minute is not None and self.minute + MINUTE_MS <= end_ms:
            self._close_minute(out)  # no label of it can come now
            self.minute = None

    def _close_minute(self, out: TrainingOut) -> None:
        minute = self.minute
        rows = self.quality.close_minute(minute)
        out.metrics.extend(rows)
        loss = next((r[3] for r in rows if r[2] == "log_loss"), math.nan)
        n = next((r[4] for r in rows if r[2] == "labels"), 0)
        baseline = self.quality.detector.estimation
        verdict = Verdict(loss, baseline, math.nan, math.nan, math.nan, self.drift_in_minute,
                          n=float(n), detail=f"model {self.model}: log loss {loss:.4f} in the "
                          f"minute, ADWIN's mean {baseline:.4f} over {self.quality.labels} labels")
        for alert in self.drift.step(f"model={self.model}", minute + MINUTE_MS, minute, verdict):
            out.alerts.append(alert.to_dict())
        self.drift_in_minute = False
