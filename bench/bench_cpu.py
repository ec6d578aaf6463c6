"""CPU per event of the flow's own steps, in process, without Bytewax or any service.

    .venv/bin/python -m bench.bench_cpu [--events 100000] [--users 100000] [--profile]

Feeds deterministic synthetic records (the same generator as bench/run_bench.py) through the
steps of flows/pipeline.py in the order the dataflow runs them: decode_and_route, the ingest
shards, the profile shards, the entity rules and the minute closer, plus the sinks' encoding
(Redis commands, ClickHouse rows) without the network. Prints one JSON object: CPU seconds per
step and microseconds per event. It isolates the project's code from the engine and the
services, so a change to a step shows here even on a noisy machine; bench/run_bench.py measures
the real thing.
"""
from __future__ import annotations

import argparse
import hashlib
import gc
import itertools
import json
import sys
import time
from collections import defaultdict

from bench.run_bench import REPLAY_START_MS
from config.registry import load_registry
from config.settings import load_settings
from connectors.synthetic import SyntheticSpec, expected_records, generate
from flows import gc_pacing
from features.profile import FeaturePlan
from flows.entity_alerts import EntityLogic, SignalRouter
from flows.pipeline import DEAD, DecodeAndRoute, MinuteLogic, shard_config
from flows.model_learning import ModelLoop
from flows.shard import Chunk, IngestLogic, ProfileLogic, VersionFor
from alerts.rules import load_rules


WALL_CLOCK = {"decided_at", "created_at", "sent_at", "stored_at"}  # not part of the digest
WALL_CLOCK_RAW = 0  # events_raw rows: compared whole


class _Msg:
    """What the Kafka source hands the flow: value, key, topic, partition, offset, timestamp."""

    __slots__ = ("value", "key", "topic", "partition", "offset", "timestamp")

    def __init__(self, value, key, offset, ts):
        self.value, self.key, self.topic, self.partition = value, key, "events", 0
        self.offset, self.timestamp = offset, (1, ts)


def _plain(x):
    """A value with its sets and dicts sorted (their order varies between processes)."""
    if isinstance(x, dict):
        return sorted((repr(k), _plain(v)) for k, v in x.items())
    if isinstance(x, (set, frozenset)):
        return sorted(repr(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def records(events: int, users: int, span_hours: float, seed: int) -> list[_Msg]:
    # the stream of bench/run_bench.py: same rate, shares of bad records and disorder
    unit = expected_records(SyntheticSpec(start_ms=REPLAY_START_MS, events_per_s=1.0,
                                          duration_s=span_hours * 3600))
    spec = SyntheticSpec(seed=seed, users=users, start_ms=REPLAY_START_MS,
                         events_per_s=events / unit, duration_s=None, malformed_share=0.001,
                         duplicate_share=0.001, max_disorder_ms=2000)
    now_ms = int(time.time() * 1000)
    return [_Msg(r.value, r.key, i, now_ms)
            for i, r in enumerate(itertools.islice(generate(spec), events))]


class Steps:
    """The flow's steps wired by hand, keyed as Bytewax keys them, timed per step."""

    def __init__(self, batch_size: int, digest: bool = False):
        # as bench/run_bench.py runs it: a replay of history, no wall-clock caps
        settings = load_settings(None, env={}, flow__max_clock_skew_s=None,
                                 flow__max_lookback_s=None)
        self.settings = settings
        self.batch_size = batch_size
        cfg = shard_config(settings)
        plan = FeaturePlan(load_registry(settings.features.registry),
                           max_cart_items=settings.limits.max_cart_items)
        catalogue = load_rules(settings.alerts.rules)
        router = SignalRouter(catalogue.entity_rules, settings.flow.shards)
        self.route = DecodeAndRoute(settings.flow.shards, 1, settings.flow.max_event_bytes, None,
                                    router)
        self.ingest = defaultdict(lambda: IngestLogic(cfg, plan, None))
        self.profile = defaultdict(lambda: ProfileLogic(cfg, plan, None))
        self.entities = defaultdict(lambda: EntityLogic(
            catalogue.entity_rules, int(settings.flow.allowed_lateness_s * 1000), None, False,
            max_entity_keys=settings.limits.max_entity_keys))
        self.minutes = MinuteLogic(settings.flow.shards, None)
        # the learners, and the versions they published for the profile shards' next batch
        self.cfg = cfg
        self.loop = ModelLoop(cfg) if cfg.models else None
        self.versions: list = []
        self.digest = hashlib.sha256() if digest else None
        self.cpu: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def _timed(self, name: str, fn, *args):
        t = time.process_time()
        try:
            return fn(*args)
        finally:
            self.cpu[name] += time.process_time() - t

    def batch(self, msgs: list) -> None:
        self._timed("gc_between_batches", gc_pacing.between_batches)  # as the flow's source does
        routed = self._timed("decode_and_route", self.route, msgs)
        ingest_in, entity_in = defaultdict(list), defaultdict(list)
        for key, item in routed:
            if key == DEAD:
                self.counts["dead"] += len(item)
            elif type(item) is Chunk:
                ingest_in[key].append(item)
            else:
                entity_in[key].append(item)
        results = []
        for key, chunks in ingest_in.items():
            outs, _ = self._timed("ingest_shards", self.ingest[key].on_batch, chunks)
            results += outs
        handovers = defaultdict(list)
        for o in results:
            for key, h in o.handovers:
                handovers[key].append(h)
        results += self._profiles(handovers)
        for key, chunks in entity_in.items():
            self._timed("entity_rules", self.entities[key].on_batch, chunks)
        self._collect(results)

    def _profiles(self, handovers: dict) -> list:
        """The profile shards' batch (with the versions published since the last one), then
        the learners on their labels."""
        if self.versions:
            for j in range(self.cfg.profile_shards):
                handovers[f"profiles-{j:04d}"] += [VersionFor(j, w) for w in self.versions]
            self.versions = []
        results = []
        for key, hs in handovers.items():
            outs, _ = self._timed("profile_shards", self.profile[key].on_batch, hs)
            results += outs
        if self.loop is not None:
            self.versions = self._timed("model_learners", self.loop.feed, results)
        return results

    def run(self, msgs: list) -> None:
        for i in range(0, len(msgs), self.batch_size):
            self.batch(msgs[i:i + self.batch_size])
        self.finish()

    def finish(self) -> None:
        """The input's end: every step's on_eof, in the flow's order."""
        results = []
        for logic in self.ingest.values():
            results += self._timed("ingest_shards", logic.on_eof)[0]
        handovers = defaultdict(list)
        for o in results:
            for key, h in o.handovers:
                handovers[key].append(h)
        results += self._profiles(handovers)
        while self.versions:  # the shards may hold events for a version: until none comes
            results += self._profiles(defaultdict(list))
        for logic in self.profile.values():
            results += self._timed("profile_shards", logic.on_eof)[0]
        if self.loop is not None:
            self.loop.feed(results)
            self._timed("model_learners", self.loop.finish)
        self._collect(results)

    def _collect(self, results: list) -> None:
        parts = [o.minutes for o in results if o.minutes]
        if parts:
            self._timed("close_minutes", self.minutes.on_batch, parts)
        for o in results:
            self.counts["feature_writes"] += len(o.features)
            self.counts["actions"] += len(o.actions)
            self.counts["raw_rows"] += len(o.raw)
            if self.digest is not None:
                self._digest(o)

    def _digest(self, o) -> None:
        """What the sinks would store, in order per shard, minus wall-clock fields: two runs of
        the same input must give the same digest, whatever the code's speed."""
        h = self.digest
        for w in o.features:
            h.update(repr((w.user, sorted((w.values or {}).items()), w.removed, w.anonymous))
                     .encode())
        for a in o.actions + o.audit:
            h.update(repr(sorted((k, v) for k, v in a.items()
                                 if not k.startswith("_") and k not in WALL_CLOCK)).encode())
        for row in o.raw:
            h.update(repr(row[:WALL_CLOCK_RAW]).encode() if WALL_CLOCK_RAW else repr(row).encode())
        for d in o.dead:
            h.update(repr((d.reason, d.raw)).encode())
        if o.minutes is not None:
            h.update(repr(_plain(o.minutes.minutes)).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--span-hours", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--digest", action="store_true",
                   help="print a digest of every output (equal digests: equal outputs)")
    p.add_argument("--profile", action="store_true", help="pyinstrument the run (to stderr)")
    args = p.parse_args(argv)
    msgs = records(args.events, args.users, args.span_hours, args.seed)
    steps = Steps(args.batch_size, args.digest)
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    started = time.process_time()
    with gc_pacing.paced():  # as flows/runner.py runs the flow (the GC between batches)
        steps.run(msgs)
    total = time.process_time() - started
    if profiler is not None:
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False), file=sys.stderr)
    n = len(msgs)
    print(json.dumps({
        "events": n,
        "cpu_s": round(total, 3),
        "us_per_event": round(total / n * 1e6, 1),
        "us_per_event_by_step": {k: round(v / n * 1e6, 1) for k, v in sorted(steps.cpu.items())},
        "counts": dict(steps.counts),
        **({"digest": steps.digest.hexdigest()} if steps.digest is not None else {}),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
