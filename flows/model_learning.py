"""The learner step of the dataflow: one per model (keyed by the model's name), whatever the
number of workers and processes. The profile shards send it their labels and marks
(models/runtime.py); it learns them per event-time period in one canonical order
(models/training.py) and publishes numbered versions, which go back to the shards through the
versions channel (connectors/model_versions.py), and the model's metrics per minute.

Snapshots are one versioned envelope per model (models/envelope.py). A restored learner sends
its last publications again first: some may not have reached every shard before the snapshot.
A snapshot that no longer fits (another River line, other inputs) is refused with its reason in
the log, and the model starts fresh.
"""
from __future__ import annotations

import logging

from bytewax.operators import StatefulBatchLogic

from models.envelope import model_of, pack, unpack
from models.learner import Learner
from models.quality import ModelQuality
from models.spec import ModelSpec
from models.training import END_MS, LabelBatch, Training, TrainingOut
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.models")


def new_training(spec: ModelSpec, shards: int, period_ms: int) -> Training:
    learner = Learner(spec.name, learning_rate=spec.learning_rate,
                      intercept_lr=spec.intercept_lr, l2=spec.l2)
    return Training(spec.name, shards, period_ms, learner=learner,
                    quality=ModelQuality(spec.name), names=spec.input_names,
                    horizon_ms=spec.horizon_ms if spec.learn_at == "close" else 0,
                    measured_ms=spec.horizon_ms)


class LearnerLogic(StatefulBatchLogic):
    """The learner step's adapter. Bytewax's builder does not get the key, so the learner is
    made from the first batch (which names its model) or from the snapshot (which does)."""

    def __init__(self, specs: dict[str, ModelSpec], shards: int, period_ms: int,
                 resume: bytes | None, snapshots: bool = True):
        self.specs, self.shards, self.period_ms = specs, shards, period_ms
        self.snapshots = snapshots
        self.spec: ModelSpec | None = None
        self.training: Training | None = None
        self.restored = False
        self.ended = False
        if resume is not None:
            self._restore(resume)

    def _restore(self, resume: bytes) -> None:
        name = model_of(resume)
        spec = self.specs.get(name) if name is not None else None
        if spec is None:
            log.warning("model snapshot of %r dropped: no such model in this run", name)
            return
        self.spec = spec
        training, why = unpack(resume, spec)
        if why is not None:
            log.warning("model %s: snapshot refused, the model starts fresh: %s", spec.name, why)
            STATS.add_labeled("model_snapshots_refused", spec.name)
        shards, period_ms = self.shards, self.period_ms
        if training is not None and (training.shards != shards or training.period_ms != period_ms):
            log.warning("model %s: snapshot refused, the model starts fresh: it was taken with "
                        "%d profile shards and a period of %d ms, this run has %d and %d",
                        spec.name, training.shards, training.period_ms, shards, period_ms)
            STATS.add_labeled("model_snapshots_refused", spec.name)
            training = None
        self.restored = training is not None
        self.training = training or new_training(spec, shards, period_ms)

    def on_batch(self, batches: list[LabelBatch]) -> tuple[list, bool]:
        if self.training is None:
            self.spec = self.specs[batches[0].model]
            self.training = new_training(self.spec, self.shards, self.period_ms)
        out = TrainingOut(model=self.spec.name)
        if self.restored:
            out.weights.extend(self.training.republish())
            self.restored = False
        step = self.training.on_batch(batches)
        out.weights += step.weights
        out.metrics += step.metrics
        out.drifts += step.drifts
        out.alerts += step.alerts
        complete = self.training.complete_ms()
        if not self.ended and complete is not None and complete >= END_MS:
            out.end = self.ended = True
        STATS.add_labeled("model_labels", self.spec.name, sum(len(b.labels) for b in batches))
        return ([out] if (out.weights or out.metrics or out.alerts or out.end) else []), False

    def on_eof(self) -> tuple[list, bool]:
        if self.training is None:
            return [], False
        out = self.training.finish()
        out.model = self.spec.name
        return ([out] if (out.weights or out.metrics or out.alerts) else []), False

    def snapshot(self) -> bytes | None:
        if not self.snapshots or self.training is None:
            return None
        return pack(self.spec, self.training)


class ModelLoop:
    """The learners and the versions channel in one process, for what drives the shards by hand
    (bench/bench_cpu.py, the tests' harnesses): the profile shards' outputs in, for each profile
    shard the versions to hand it with its next batch out. The same order as the flow's, so the
    same scores."""

    def __init__(self, config, snapshots: bool = False):
        self.specs = {spec.name: spec for spec in config.models}
        self.shards, self.period_ms = config.profile_shards, config.model_period_ms
        self.snapshots = snapshots
        self.learners: dict[str, LearnerLogic] = {}
        self.outputs: list[TrainingOut] = []  # everything the learners produced, in order

    def feed(self, shard_outs: list) -> list:
        """The labels in these profile shard outputs go to their learners; returns the versions
        they published (Weights), to send to every profile shard."""
        by_model: dict[str, list[LabelBatch]] = {}
        for o in shard_outs:
            for model, batch in o.labels:
                by_model.setdefault(model, []).append(batch)
        published = []
        for model in sorted(by_model):
            logic = self.learners.get(model)
            if logic is None:
                logic = self.learners[model] = LearnerLogic(self.specs, self.shards,
                                                            self.period_ms, None, self.snapshots)
            for out in logic.on_batch(by_model[model])[0]:
                self.outputs.append(out)
                published += out.weights
        return published

    def finish(self) -> None:
        for model in sorted(self.learners):
            self.outputs += self.learners[model].on_eof()[0]
