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

from models.envelope import pack, unpack
from models.learner import Learner
from models.quality import ModelQuality
from models.spec import ModelSpec
from models.training import LabelBatch, Training, TrainingOut
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.models")


def new_training(spec: ModelSpec, shards: int, period_ms: int) -> Training:
    learner = Learner(spec.name, learning_rate=spec.learning_rate,
                      intercept_lr=spec.intercept_lr, l2=spec.l2)
    return Training(spec.name, shards, period_ms, learner=learner,
                    quality=ModelQuality(spec.name), names=spec.input_names)


class LearnerLogic(StatefulBatchLogic):
    def __init__(self, spec: ModelSpec, shards: int, period_ms: int, resume: bytes | None,
                 snapshots: bool = True):
        self.spec, self.snapshots = spec, snapshots
        training, why = unpack(resume, spec) if resume is not None else (None, None)
        if why is not None:
            log.warning("model %s: snapshot refused, the model starts fresh: %s", spec.name, why)
            STATS.add_labeled("model_snapshots_refused", spec.name)
        if training is not None and (training.shards != shards or training.period_ms != period_ms):
            log.warning("model %s: snapshot refused, the model starts fresh: it was taken with "
                        "%d profile shards and a period of %d ms, this run has %d and %d",
                        spec.name, training.shards, training.period_ms, shards, period_ms)
            STATS.add_labeled("model_snapshots_refused", spec.name)
            training = None
        self.restored = training is not None
        self.training = training or new_training(spec, shards, period_ms)

    def on_batch(self, batches: list[LabelBatch]) -> tuple[list, bool]:
        out = TrainingOut()
        if self.restored:
            out.weights.extend(self.training.republish())
            self.restored = False
        step = self.training.on_batch(batches)
        out.weights += step.weights
        out.metrics += step.metrics
        out.drifts += step.drifts
        STATS.add_labeled("model_labels", self.spec.name, sum(len(b.labels) for b in batches))
        return ([out] if (out.weights or out.metrics or out.drifts) else []), False

    def on_eof(self) -> tuple[list, bool]:
        out = self.training.finish()
        return ([out] if (out.weights or out.metrics or out.drifts) else []), False

    def snapshot(self) -> bytes | None:
        return pack(self.spec, self.training) if self.snapshots else None
