"""The learner's step (models/training.py): whatever the batches, the interleaving of the shards
and their marks, the versions published are the model learned from the labels before each
period boundary in one canonical order, with no gap and no overlap; the metrics too."""
from __future__ import annotations

import pickle

from hypothesis import given, settings, strategies as st

from models.labels import Label, Prediction
from models.learner import Learner
from models.training import END_MS, LabelBatch, Training, version_for

P = 3_600_000
SHARDS = 3
END = 12 * P


def make_label(user: int, made: int, at: int, y: bool, v: float) -> Label:
    x = {"a": v, "b": float(user % 3)}
    return Label(Prediction("m", made, at + 1, x, 0, 0.3 if y else 0.6), f"u{user}", at, y)


label_specs = st.lists(
    st.tuples(st.integers(0, SHARDS - 1), st.integers(0, 50), st.integers(0, 10 * P),
              st.integers(0, 3 * P), st.booleans(), st.floats(-5, 5)),
    max_size=40)


def schedule(data, labels_by_shard: dict[int, list[Label]]) -> list[LabelBatch]:
    """Each shard's labels cut into batches at drawn points, each batch with an honest mark
    (no label of the shard before it is still to come), the shards interleaved at random."""
    per_shard = []
    for shard in range(SHARDS):
        mine = sorted(labels_by_shard.get(shard, []), key=lambda l: l.labelled_ms)
        batches, i, mark = [], 0, 0
        while i < len(mine) or not batches:
            n = data.draw(st.integers(0, max(1, len(mine) - i)))
            chunk = mine[i:i + n]
            i += n
            nxt = mine[i].labelled_ms if i < len(mine) else END
            mark = data.draw(st.integers(mark, max(mark, nxt)))
            chunk = data.draw(st.permutations(chunk))  # order inside a batch says nothing
            batches.append(LabelBatch(shard, mark, list(chunk)))
        batches.append(LabelBatch(shard, END))
        per_shard.append(batches)
    out = []
    while any(per_shard):
        choices = [s for s in range(SHARDS) if per_shard[s]]
        s = data.draw(st.sampled_from(choices))
        take = data.draw(st.integers(1, len(per_shard[s])))
        out.extend(per_shard[s][:take])
        del per_shard[s][:take]
    return out


def run(batches: list[LabelBatch], in_groups_of: int, restart_at: int | None = None,
        horizon: int = 0, measured: int = 0):
    t = Training("m", SHARDS, P, horizon_ms=horizon, measured_ms=measured)
    weights, metrics = [], []
    for i in range(0, len(batches), in_groups_of):
        if restart_at is not None and i >= restart_at:
            t, restart_at = pickle.loads(pickle.dumps(t)), None
        out = t.on_batch(batches[i:i + in_groups_of])
        weights += out.weights
        metrics += out.metrics
    return weights, metrics + t.finish().metrics  # (the input's end: held metrics too)


@settings(max_examples=150, deadline=None)
@given(label_specs, st.data())
def test_versions_are_the_same_whatever_the_batches_and_equal_the_canonical_model(specs, data):
    labels_by_shard: dict[int, list[Label]] = {}
    for shard, user, at, lag, y, v in specs:
        labels_by_shard.setdefault(shard, []).append(make_label(user, max(0, at - lag), at, y, v))
    a = schedule(data, labels_by_shard)
    b = schedule(data, labels_by_shard)
    # learned at the label time, or when the prediction's horizon closes (never before its label)
    horizon = data.draw(st.sampled_from([0, 2 * P]))
    # learned at once, measured at once or when the horizon (here 3 h) closes
    measured = data.draw(st.sampled_from([0, 3 * P])) if not horizon else 0
    wa, ma = run(a, data.draw(st.integers(1, 4)), horizon=horizon, measured=measured)
    wb, mb = run(b, data.draw(st.integers(1, 4)), restart_at=data.draw(st.integers(0, len(b))),
                 horizon=horizon, measured=measured)

    def learned_at(l: Label) -> int:
        return max(l.made_ms + horizon, l.labelled_ms)

    # the oracle: every label in one total order (learning time, label time, prediction time,
    # user, ...), a model per boundary, written without models/training.py
    everything = sorted((l for ls in labels_by_shard.values() for l in ls),
                        key=lambda l: (learned_at(l), l.labelled_ms, l.made_ms, l.user, l.y,
                                       l.score, sorted(l.x.items())))
    first = min([learned_at(l) // P for l in everything], default=END // P)

    def oracle(version: int):
        learner = Learner("m")
        for l in everything:
            if learned_at(l) < version * P:
                learner.learn_one(l.x, l.y)
        return learner.publish(version)

    by_version = []
    for published in (wa, wb):
        # contiguous, no overlap, from at most the first label's period to the end; the first
        # publication is the fresh model, so every version before it is that model too
        assert published[0].version <= first and published[0].learned == 0
        for before, after in zip(published, published[1:]):
            assert after.version == before.last_version + 1
        assert published[-1].last_version == END // P
        for w in published:
            for v in {w.version, w.last_version}:
                o = oracle(v)
                assert (w.terms, w.intercept, w.learned) == (o.terms, o.intercept, o.learned), v
        by_version.append({v: (w.terms, w.intercept, w.learned) for w in published
                           for v in range(w.version, w.last_version + 1)})
    # where the two runs' numbering starts differs with their marks; from the first label on
    # (and before it: the fresh model) they are the same
    for v in range(first, END // P + 1):
        assert by_version[0][v] == by_version[1][v]
    assert ma == mb
    # the metrics count each label in the minute it is learned, or that its horizon closes
    # (the marks reach END: what closes later waits for the input's end, below)
    at = (lambda l: l.made_ms + measured) if measured else learned_at
    per_minute: dict[int, int] = {}
    for l in everything:
        if at(l) < END:
            per_minute[at(l) // 60_000 * 60_000] = per_minute.get(at(l) // 60_000 * 60_000, 0) + 1
    assert {row[0]: int(row[3]) for row in ma if row[2] == "labels"} == per_minute


def test_a_score_uses_the_last_boundary_at_least_the_grace_before_it():
    grace = 5 * 60_000
    assert version_for(P + grace - 1, P, grace) == 0
    assert version_for(P + grace, P, grace) == 1
    assert version_for(10 * P, P, grace) == 9


def test_a_period_is_whole_minutes():
    import pytest

    with pytest.raises(ValueError, match="whole minutes"):
        Training("m", 1, 90_000)


def test_at_the_input_end_an_incomplete_cohort_is_learned_not_measured():
    """The stream ends at 6 h (its last label). Predictions made at 0 h have closed: measured.
    Those made at 5 h close at 7 h: only what resolved early came (a purchase's positives, or
    a churn model's negatives); they are learned, and left out of the metrics, which they would
    tilt. For a model learned at the close and one learned at once but measured at the close."""
    H = 2 * P
    early = [make_label(1, 0, P // 2, True, 1.0), make_label(2, 0, H, False, 0.0),
             make_label(3, 0, H, False, 0.5)]
    late = [make_label(4, 5 * P, 5 * P + P // 2, True, 1.0), make_label(5, 5 * P, 6 * P, True, 2.0)]
    for horizon, measured in ((H, 0), (0, H)):
        t = Training("m", 1, P, horizon_ms=horizon, measured_ms=measured)
        out = t.on_batch([LabelBatch(0, 6 * P + 1, early + late)])
        rows = out.metrics
        out = t.on_batch([LabelBatch(0, END_MS)])  # the input's end
        rows += out.metrics + t.finish().metrics
        assert sum(r[3] for r in rows if r[2] == "labels") == len(early), (horizon, rows)
        assert t.learner.learned == len(early) + len(late)
