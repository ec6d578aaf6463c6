"""Model snapshots (models/envelope.py, flows/model_learning.py): a restore continues exactly as
an uninterrupted run; a snapshot that no longer fits is refused with its reason, and the model
starts fresh."""
from __future__ import annotations

import copy
import logging
import pickle
import random

import pytest

from flows.model_learning import LearnerLogic, new_training
from models.envelope import pack, unpack
from models.labels import Label, Prediction
from models.spec import load_models
from models.training import LabelBatch

H = 3_600_000
SPECS = load_models()
SPEC = SPECS["ctr"]


def batches(n: int, seed: int = 1) -> list[LabelBatch]:
    """Two shards' label batches over n hours, marks moving on."""
    rng = random.Random(seed)
    out = []
    for hour in range(n):
        for shard in (0, 1):
            labels = []
            for _ in range(rng.randint(0, 30)):
                at = hour * H + rng.randint(0, H - 1)
                x = tuple(float(rng.randint(0, 3)) for _ in SPEC.input_names)
                y = rng.random() < 0.2 + 0.1 * x[0]
                labels.append(Label(Prediction("ctr", at - 60_000, at + 1, x, 0, rng.random()),
                                    f"u{rng.randint(0, 50)}", at, y))
            out.append(LabelBatch(shard, (hour + 1) * H, labels, "ctr"))
    return out


def drive(logic: LearnerLogic, items: list[LabelBatch]):
    weights, metrics = [], []
    for b in items:
        for o in logic.on_batch([b])[0]:
            weights += o.weights
            metrics += o.metrics
    for o in logic.on_eof()[0]:
        weights += o.weights
        metrics += o.metrics
    return weights, metrics


def test_a_restore_at_any_batch_continues_as_an_uninterrupted_run():
    items = batches(12)
    whole_w, whole_m = drive(LearnerLogic({"ctr": SPEC}, 2, H, None), items)
    assert len(whole_m) > 30 and whole_w[-1].learned > 100
    for cut in (1, 7, 15):
        first = LearnerLogic({"ctr": SPEC}, 2, H, None)
        w1, m1 = [], []
        for b in items[:cut]:
            for o in first.on_batch([b])[0]:
                w1 += o.weights
                m1 += o.metrics
        resumed = LearnerLogic({"ctr": SPEC}, 2, H, first.snapshot())
        w2, m2 = drive(resumed, items[cut:])
        # the restored learner repeats its last publications first, then goes on as if never
        # stopped: the same versions and metrics
        repeated = len(first.training.recent)
        assert [w.__getstate__() for w in w2[:repeated]] == [w.__getstate__() for w in first.training.recent]
        assert [w.__getstate__() for w in w1 + w2[repeated:]] == [w.__getstate__() for w in whole_w]
        assert m1 + m2 == whole_m


@pytest.mark.parametrize("change, reason", [
    (lambda doc: doc.update(river="0.1.0"), "made with River 0.1.0"),
    (lambda doc: doc.update(schema="x", inputs=doc["inputs"] + ["gone_input"]),
     "inputs removed: ['gone_input']"),
    (lambda doc: doc.update(format=99), "format is 99"),
    (lambda doc: doc.update(model="churn_risk"), "of model 'churn_risk'"),
])
def test_an_incompatible_snapshot_is_refused_and_the_model_starts_fresh(change, reason, caplog):
    logic = LearnerLogic({"ctr": SPEC}, 2, H, None)
    drive(logic, batches(3))
    doc = pickle.loads(logic.snapshot())
    assert doc["training"].learner.learned > 0
    change(doc)
    blob = pickle.dumps(doc)
    assert reason in unpack(blob, SPEC)[1]
    with caplog.at_level(logging.WARNING, logger="surgeflow.models"):
        fresh = LearnerLogic({"ctr": SPEC}, 2, H, blob)
    if doc["model"] != "ctr":  # a model this run does not have: its snapshot is dropped
        assert fresh.training is None and "no such model in this run" in caplog.text
        return
    assert fresh.training.learner.learned == 0 and not fresh.restored
    assert "snapshot refused, the model starts fresh" in caplog.text and reason in caplog.text


def test_a_changed_input_default_is_refused_too_and_garbage_does_not_crash():
    spec = SPECS["purchase_propensity"]
    blob = pack(spec, new_training(spec, 2, H))
    changed = copy.deepcopy(spec)
    object.__setattr__(changed, "inputs", ((spec.inputs[0][0], 7.0, False),) + spec.inputs[1:])
    assert "their defaults or order" in unpack(blob, changed)[1]
    assert "cannot be read" in unpack(b"not a pickle", spec)[1]
    logic = LearnerLogic({spec.name: spec}, 3, H, blob)  # another number of shards: fresh as well
    assert logic.training.shards == 3 and not logic.restored
