"""The online models' cost: predict and learn per model, their share of the flow's CPU, and the
snapshot of their state at 100,000 users.

    .venv/bin/python -m bench.bench_models [--events 200000] [--users 20000] [--span-hours 24]
                                           [--snapshot-users 100000]

1. The flow's steps in process (bench/bench_cpu.py's harness, no engine, no services) on
   synthetic history, with timers on the models' parts: noting events, playing them (point-in-
   time inputs, scoring, labels), the learners (River's learn_one, the metrics); River's own
   share is its learn_one alone (scoring uses the published weights, not River).
2. Per model, on the profiles that run left: the cost of one prediction (the point-in-time
   inputs, the vector, the weights) and of one learned label (River's StandardScaler |
   LogisticRegression).
3. The models' state of a profile shard and the learners' envelopes with 100,000 users holding
   an open prediction of each model: pickled size, save and restore time.

Prints one JSON object. Timers add their own overhead (about half a microsecond a call), so the
share is an upper bound.
"""
from __future__ import annotations

import argparse
import json
import pickle
import random
import time

from bench.bench_cpu import Steps, records
from flows import gc_pacing
from models.envelope import pack
from models.learner import Learner
from models.runtime import ShardModels

TARGETS = {"predict_us": 15.0, "learn_us": 50.0, "river_share": 0.10}


class Timer:
    """Wraps methods to add their CPU time to one account."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.depth = 0

    def wrap(self, owner, name: str, account: str) -> None:
        original = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            if timer.depth:  # nested in a timed call: counted there
                return original(*args, **kwargs)
            timer.depth += 1
            t = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                timer.cpu[account] = timer.cpu.get(account, 0.0) + time.process_time() - t
                timer.depth -= 1
        setattr(owner, name, timed)


def flow_share(events: int, users: int, span_hours: float, seed: int) -> tuple[dict, Steps]:
    timer = Timer()
    timer.wrap(ShardModels, "note", "models_note")
    timer.wrap(ShardModels, "advance", "models_play")
    timer.wrap(Learner, "learn_one", "river_learn")
    msgs = records(events, users, span_hours, seed)
    steps = Steps(1000)
    started = time.process_time()
    with gc_pacing.paced():
        steps.run(msgs)
    total = time.process_time() - started
    n = len(msgs)
    learners = steps.cpu.get("model_learners", 0.0)
    river = timer.cpu.get("river_learn", 0.0)
    models = timer.cpu.get("models_note", 0.0) + timer.cpu.get("models_play", 0.0) + learners
    return {
        "events": n, "cpu_s": round(total, 2), "us_per_event": round(total / n * 1e6, 1),
        "models_us_per_event": {"note": round(timer.cpu.get("models_note", 0.0) / n * 1e6, 2),
                                "play": round(timer.cpu.get("models_play", 0.0) / n * 1e6, 2),
                                "learners": round(learners / n * 1e6, 2),
                                "of_which_river_learn_one": round(river / n * 1e6, 2)},
        "models_share": round(models / total, 4),
        "river_share": round(river / total, 4),
    }, steps


def per_model(steps: Steps, samples: int, seed: int) -> dict:
    """Predict and learn per model on the profiles of the run."""
    rnd = random.Random(seed)
    shards = [logic.state for logic in steps.profile.values() if logic.state is not None]
    plan = shards[0].store.plan
    users = [(s, u) for s in shards for u in s.store.users]
    rnd.shuffle(users)
    users = users[:samples]
    out = {}
    for name, spec in shards[0].store.models.specs.items():
        w = next((s.store.models.versions[name][-1] for s in shards
                  if s.store.models.versions[name]), None) or Learner(name).publish(0, 0)
        event = sorted(spec.predict_on)[0] if "*" not in spec.predict_on else "page_view"
        read = plan.inputs_at(tuple(n for n, _, _ in spec.inputs))
        rows, names = [], spec.input_names
        t = time.process_time()
        for shard, user in users:  # as models/runtime.py scores
            p = shard.store.users[user]
            row = spec.row_of(read(user, p, p.as_of), event)
            w.predict_row(names, row)
            rows.append(row)
        predict = (time.process_time() - t) / len(users)
        xs = [dict(zip(names, row)) for row in rows]  # the learner's input, as the learner's step builds it
        learner = Learner(name, spec.learning_rate, spec.intercept_lr, spec.l2)
        ys = [rnd.random() < 0.2 for _ in xs]
        t = time.process_time()
        for x, y in zip(xs, ys):
            learner.learn_one(x, y)
        learn = (time.process_time() - t) / len(xs)
        out[name] = {"inputs": len(spec.input_names), "predict_us": round(predict * 1e6, 2),
                     "learn_us": round(learn * 1e6, 2)}
    return out


def snapshot(steps: Steps, n_users: int, seed: int) -> dict:
    """A profile shard's models holding an open prediction of every model for n users (the
    worst case: the flow spreads them over its profile shards), and the learners' envelopes."""
    rnd = random.Random(seed)
    shard = next(logic.state for logic in steps.profile.values() if logic.state is not None)
    specs = shard.store.models.specs
    m = ShardModels(specs, 0, shard.store.models.period_ms, shard.store.models.grace_ms)
    for model, spec in specs.items():
        for w in shard.store.models.versions[model][-2:]:
            m.receive(w)
    t0 = 1_795_392_000_000
    for i in range(n_users):
        user = f"u{i:06d}"
        for model, spec in specs.items():
            x = tuple(float(rnd.randrange(5)) for _ in spec.input_names)
            m.book.open(user, model, t0 + i, x, 498720, rnd.random())
            m.last.setdefault(user, {})[model] = (rnd.random(), 498720)
        m.once[user] = {model: t0 // 86_400_000 for model in specs}
        m.seen[user] = m.session[user] = t0 + i
    t = time.perf_counter()
    blob = pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)
    save = time.perf_counter() - t
    t = time.perf_counter()
    pickle.loads(blob)
    restore = time.perf_counter() - t
    learners = {name: len(pack(specs[name], logic.training))
                for name, logic in steps.loop.learners.items()}
    return {"users": n_users, "open_predictions": len(m.book), "shard_models_bytes": len(blob),
            "bytes_per_user": round(len(blob) / n_users, 1), "save_s": round(save, 3),
            "restore_s": round(restore, 3), "learner_envelope_bytes": learners}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--span-hours", type=float, default=24.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--snapshot-users", type=int, default=100_000)
    args = p.parse_args(argv)
    share, steps = flow_share(args.events, args.users, args.span_hours, args.seed)
    models = per_model(steps, args.samples, args.seed)
    snap = snapshot(steps, args.snapshot_users, args.seed)
    print(json.dumps({"flow": share, "per_model": models, "snapshot": snap, "targets": TARGETS},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
