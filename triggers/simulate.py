"""Replay events through trigger rules on a simulated clock: what `surgeflow triggers test`
runs, so a marketer can check a rule file before shipping it.

The clock is the events' own time: after each event "now" is the latest event time seen (no
allowed lateness: the file is complete), and after the last event it runs on by ``run_on_ms``
so the timers still pending fire (or up to ``until_ms``, when that is later than the last
event: the clock never goes back). The events go through the flow's own
profile store (features, sessions, the model, the trigger engine), one profile per user id (or
anonymous id); no identity stitching, no sharding. Every decision comes back, sent or not.

>>> import orjson
>>> lines = [orjson.dumps({"event_id": "e1", "user_id": "u1", "event": "add_to_cart",
...          "timestamp": 1795428000000, "context": {"consent": {"marketing": True},
...          "timezone": "Europe/Paris"}})]
>>> result = replay(lines, run_on_ms=3_600_000)
>>> [(a["rule"], a["event_ts_ms"] - 1795428000000) for a in result.actions]
[('abandoned_cart', 1800000)]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from config.registry import load_registry
from features.profile import FeaturePlan
from flows.events import DeadLetter, decode
from flows.shard import ProfileStore, ShardConfig, ShardOut
from models.learner import Learner
from models.runtime import ShardModels
from models.spec import load_models
from triggers.engine import CompiledBook
from triggers.spec import RULES_FILE, load_trigger_rules

DAY_MS = 86_400_000


@dataclass
class Replayed:
    actions: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    events: int = 0
    first_ms: int | None = None
    end_ms: int | None = None


def fresh_models() -> ShardModels:
    """The declared models, untrained, for every event time: a rule that reads a score sees
    what a fresh model gives (0.5). The simulation has no learner; the flow's scores come from
    the versions its learners publish (models/training.py)."""
    specs = load_models()
    models = ShardModels(specs, shard=0, period_ms=3_600_000, grace_ms=0)
    for name in specs:
        models.receive(Learner(name).publish(0, 2**62 // 3_600_000))
    return models


class Simulation:
    """The replay step by step: ``feed`` raw records, ``run_to`` a time, ``result``. Its
    ``store`` pickles (tests take snapshots of it, as the flow's recovery does)."""

    def __init__(self, rules: Path | str = RULES_FILE, plan: FeaturePlan | None = None):
        self.plan = plan or FeaturePlan(load_registry())
        self.store = ProfileStore(self.plan, ShardConfig(trigger_rules=str(rules),
                                                         raw_events=False))
        self.book = CompiledBook(load_trigger_rules(rules))  # read now: a test edits the file
        self.store.triggers.use(self.book)
        self.store.models = fresh_models()
        self.store.triggers.deferred = self.plan.model_fields  # as ProfileStore.refresh_rules
        self.out = ShardOut(0)
        self.result = Replayed(actions=self.out.actions, audit=self.out.audit)
        self.seen: set[str] = set()
        self.now: int | None = None
        self.offset = 0

    def snapshot(self) -> bytes:
        """The state as the flow's recovery store would keep it."""
        import pickle

        plan, self.store.plan = self.store.plan, None
        try:
            return pickle.dumps((self.store, self.seen, self.now, self.offset))
        finally:
            self.store.plan = plan

    @classmethod
    def resume(cls, snapshot: bytes, rules: Path | str = RULES_FILE,
               plan: FeaturePlan | None = None) -> "Simulation":
        import pickle

        sim = cls(rules, plan)
        sim.store, sim.seen, sim.now, sim.offset = pickle.loads(snapshot)
        sim.store.plan = sim.plan
        sim.store.triggers.use(sim.book)
        return sim

    def feed(self, raw: bytes) -> None:
        e = decode(raw)
        result = self.result
        if isinstance(e, DeadLetter):
            result.dead.append(e)
            return
        if e.event_id in self.seen:
            return
        self.seen.add(e.event_id)
        now, store, out = self.now, self.store, self.out
        if now is not None and e.ts_ms < now:
            # older than the clock: late. The flow would dead-letter it past its lateness;
            # here the file is taken as it is written, so it is applied (and said so).
            result.dead.append(DeadLetter("out_of_order", f"event time {e.ts_ms} < {now}", raw,
                                          e.user.encode(), "file", e.ts_ms, "triggers_test"))
        e.offset = self.offset
        self.offset += 1
        if e.consent is False:
            store.forget(e.user, out, e.ts_ms)
        else:
            store.apply(e, out)
        result.events += 1
        result.first_ms = e.ts_ms if result.first_ms is None else min(result.first_ms, e.ts_ms)
        self.now = e.ts_ms if now is None else max(now, e.ts_ms)
        store.advance(self.now, out)
        store.play_models(self.now + 1, out)  # the file's order is the stream's: nothing is late
        self._flush()

    def _flush(self) -> None:
        """As the flow does after each batch: profiles are written (here: dropped) and their
        timers scheduled (windows decay, days pass, the time to live ends)."""
        self.store.flush(self.out)
        self.out.features.clear()

    def run_to(self, ts_ms: int) -> None:
        """Let the clock run to ``ts_ms`` with no events: the timers due by then fire."""
        self.now = ts_ms if self.now is None else max(self.now, ts_ms)
        self.store.advance(self.now, self.out)
        self.store.play_models(self.now + 1, self.out)
        self._flush()
        self.result.end_ms = self.now


def replay(records: Iterable[bytes], rules: Path | str = RULES_FILE, run_on_ms: int = 60 * DAY_MS,
           until_ms: int | None = None, plan: FeaturePlan | None = None) -> Replayed:
    sim = Simulation(rules, plan)
    for raw in records:
        sim.feed(raw)
    if sim.now is not None:
        sim.run_to(until_ms if until_ms is not None else sim.now + run_on_ms)
    return sim.result
