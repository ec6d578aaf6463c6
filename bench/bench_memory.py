"""Memory per active user: Redis feature hashes and the flow's keyed state.

    .venv/bin/python -m bench.bench_memory [--users 100000] [--days 2] [--tracemalloc]

Synthetic events (``connectors.synthetic.generate``) go through both keyed stages in process
(``tests/engine_harness.Harness``, no Bytewax) until ``--users`` profiles are active; every
batch's ``Write`` objects are written to a real Redis server (``EmbeddedRedis``) by the flow's
own writer (``connectors.redis_features``). Then:

* Redis: ``MEMORY USAGE <key> SAMPLES 0`` averaged over the user hashes, alias keys apart,
  and the ``INFO memory`` ``used_memory`` delta divided by the users (target <= 2 KB/user);
* flow state: the pickled snapshots (``_Logic.snapshot``) of all ingest and profile shards at
  the end of the input, divided by the profiles they hold, with a breakdown (target <= 4 KB/user);
* Python heap: RSS delta (and ``--tracemalloc``) per user, secondary.

Prints ONE JSON object on stdout; progress goes to stderr. See bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing as mp
import pickle
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import redis

from config.registry import load_registry
from config.settings import load_settings
from connectors.embedded_redis import EmbeddedRedis
from connectors.redis_features import RedisFeatureSink, write_registry
from connectors.synthetic import SyntheticSpec, generate
from features.layout import alias_key, user_key_pattern
from flows.events import Event, decode
from flows.pipeline import shard_config
from flows.shard import IngestLogic, ProfileLogic, ShardOut
from surgeflow.stats import STATS
from tests.engine_harness import Harness

REDIS_TARGET = 2048
STATE_TARGET = 4096
START_MS = 1_795_132_800_000  # 2026-11-20T00:00:00Z, as bench/run_bench.py
# The generator picks known users with a skew (low ids more often) from its population. A
# population of twice the target reaches it with a few episodes per user, which is closer to a
# real audience (many one-visit users, some regulars) than exhausting the whole population.
POPULATION_FACTOR = 2
# Records needed per active profile at that factor (measured); only sets the event rate so the
# stream spans about --days of event time. The run stops on the user count, not on this.
RECORDS_PER_USER = 5.8
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[memory {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def produce(spec: SyntheticSpec, batch: int, queue, stop) -> None:
    """Child process: the generator and its population (100k+ simulated users with cached JSON
    fragments) stay out of this process's heap, and it runs on the other core."""
    buf = []
    for rec in generate(spec):
        buf.append(rec.value)
        if len(buf) >= batch:
            if stop.is_set():
                break
            queue.put(buf)
            buf = []
    queue.put(None)


class RedisHarness(Harness):
    """The test harness, but results go to the real Redis writer instead of dicts: keeping
    actions, aggregates and a copy of every hash here would inflate the heap figures."""

    def __init__(self, config, sink):
        super().__init__(config)
        self.sink = sink
        self.pending: list = []

    def _collect(self, out: ShardOut) -> None:
        if out.features or out.aliases:
            self.pending.append((out.features, out.aliases))  # the pipeline's "feature_values"
        self.writes += len(out.features)
        self._route(out)

    def write(self) -> None:
        """One source batch -> one write_batch, as the Redis sink gets it in the flow."""
        if self.pending:
            self.sink.write_batch(self.pending)
            self.pending = []

    def stores(self):
        return [s.store for s in self.ingest] + [s.store for s in self.profiles.values()]

    def profiles_held(self) -> int:
        return sum(len(s.users) for s in self.stores())


def _size(obj) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def state_sizes(h: RedisHarness, cfg, plan) -> dict:
    """Bytes of every shard's snapshot as Bytewax would store it, plus a breakdown. The parts
    are pickled one by one, so shared objects (ids, the slot plan) count in each part."""
    totals = {"ingest": 0, "profile": 0}
    parts: dict[str, int] = {}
    for stage, logic_cls, shards in (("ingest", IngestLogic, h.ingest),
                                     ("profile", ProfileLogic, h.profiles.values())):
        for shard in shards:
            logic = logic_cls(cfg, plan, None)
            logic.state = shard
            totals[stage] += len(logic.snapshot())
            s = shard.store
            named = {"profiles": s.users, "timers": s.timers, "model_pending": s.model.pending,
                     "model_weights": s.model.model}
            if stage == "ingest":
                named |= {"dedupe_seen": shard.seen, "identity_links": shard.links,
                          "minute_aggregates": shard.minutes}
            for name, obj in named.items():
                key = f"{stage}.{name}"
                parts[key] = parts.get(key, 0) + _size(obj)
    return {"totals": totals, "parts": parts}


def redis_sizes(client: redis.Redis, prefix: str) -> dict:
    """MEMORY USAGE (SAMPLES 0: every field) and HLEN of each user hash; aliases apart."""
    def scan(pattern: str) -> list[bytes]:
        return list(client.scan_iter(match=pattern, count=5000))

    users = scan(user_key_pattern(prefix))
    aliases = scan(alias_key(prefix, "*"))
    hash_bytes = fields = 0
    encodings: dict[str, int] = {}
    for i in range(0, len(users), 2000):
        pipe = client.pipeline(transaction=False)
        for key in users[i:i + 2000]:
            pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
            pipe.hlen(key)
            pipe.object("encoding", key)
        res = pipe.execute()
        hash_bytes += sum(res[0::3])
        fields += sum(res[1::3])
        for enc in res[2::3]:
            enc = enc.decode() if isinstance(enc, bytes) else enc
            encodings[enc] = encodings.get(enc, 0) + 1
    alias_bytes = 0
    for i in range(0, len(aliases), 2000):
        pipe = client.pipeline(transaction=False)
        for key in aliases[i:i + 2000]:
            pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        alias_bytes += sum(pipe.execute())
    return {"hashes": len(users), "hash_bytes": hash_bytes, "fields": fields,
            "encodings": encodings, "aliases": len(aliases), "alias_bytes": alias_bytes}


def per(n: float, d: int) -> float | None:
    return round(n / d, 1) if d else None


def run(args: argparse.Namespace) -> dict:
    settings = load_settings()
    prefix, ttl_s = settings.redis.key_prefix, int(settings.redis.ttl_days * 86_400)
    # The flow's shard configuration; snapshots on so _Logic.snapshot pickles as with recovery.
    cfg = dataclasses.replace(shard_config(settings), snapshots=True)
    registry = load_registry()
    span_s = args.days * 86_400
    spec = SyntheticSpec(seed=args.seed, users=POPULATION_FACTOR * args.users, start_ms=START_MS,
                         events_per_s=RECORDS_PER_USER * args.users / span_s, duration_s=None,
                         malformed_share=0.001, duplicate_share=0.001, max_disorder_ms=2000)
    STATS.track_users = False  # the writer's set of every user is run statistics, not state

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        client = redis.Redis.from_url(url)
        try:
            write_registry(url, prefix, registry.to_dict())  # fixed cost, before the baseline
            sink = RedisFeatureSink(url, prefix, ttl_s).build("features_to_redis", 0, 1)
            h = RedisHarness(cfg, sink)
            ctx = mp.get_context("spawn")
            queue, stop = ctx.Queue(maxsize=8), ctx.Event()
            child = ctx.Process(target=produce, args=(spec, args.batch_size, queue, stop),
                                daemon=True)
            child.start()

            gc.collect()
            used0 = int(client.info("memory")["used_memory"])
            rss0 = rss_bytes()
            if args.tracemalloc:
                tracemalloc.start()
            records = events = dead = 0
            first_ts = last_ts = None
            t0 = next_log = time.monotonic()
            held, values = 0, []
            while held < args.users:
                values = queue.get(timeout=120)  # a dead child must not hang the run
                if values is None:
                    break
                batch = []
                for v in values:
                    e = decode(v)
                    if type(e) is Event:
                        batch.append(e)
                    else:
                        dead += 1
                records += len(values)
                events += len(batch)
                if batch:
                    lo, hi = min(e.ts_ms for e in batch), max(e.ts_ms for e in batch)
                    first_ts = lo if first_ts is None else min(first_ts, lo)
                    last_ts = hi if last_ts is None else max(last_ts, hi)
                h.feed(batch)
                h.write()
                held = h.profiles_held()
                if records > 50 * args.users:
                    log("giving up: the generator does not reach the user count")
                    break
                if time.monotonic() >= next_log:
                    next_log += 10
                    log(f"{records:,} records, {held:,} profiles held, "
                        f"{records / (time.monotonic() - t0):,.0f} records/s")
            feed_s = time.monotonic() - t0
            stop.set()
            while values is not None:  # drain so a child blocked on put() sees the stop
                values = queue.get(timeout=120)
            child.join()

            gc.collect()
            rss1 = rss_bytes()
            traced = tracemalloc.get_traced_memory()[0] if args.tracemalloc else None
            tracemalloc.stop()
            log(f"input done: {records:,} records, {held:,} profiles in {feed_s:.0f}s; "
                "pickling the state")
            state = state_sizes(h, cfg, h.plan)
            # end of input: every profile advanced to the end and written, as the flow's on_eof
            h.finish()
            h.write()
            after = state_sizes(h, cfg, h.plan)["totals"]
            held_after = h.profiles_held()
            log("measuring Redis")
            used1 = int(client.info("memory")["used_memory"])
            r = redis_sizes(client, prefix)
            version = client.info("server")["redis_version"]
        finally:
            client.close()
            server.stop()

    users = r["hashes"]
    state_total = sum(state["totals"].values())
    redis_per_user = per(r["hash_bytes"], users)
    state_per_user = per(state_total, held)
    return {
        "users": users,
        "records": records,
        "events": events,
        "dead_lettered": dead,
        "events_per_user": per(events, users),
        "event_time_days": round((last_ts - first_ts) / 86_400_000, 2) if events else 0,
        "event_source": (f"connectors.synthetic.generate (seed {args.seed}, population "
                         f"{spec.users:,}, stopped at {args.users:,} active profiles)"),
        "redis": {
            "bytes_per_user": redis_per_user,
            "target_bytes_per_user": REDIS_TARGET,
            "met": redis_per_user is not None and redis_per_user <= REDIS_TARGET,
            "used_memory_delta_per_user": per(used1 - used0, users),
            "met_by_used_memory_delta": users > 0 and (used1 - used0) / users <= REDIS_TARGET,
            "fields_per_hash_avg": per(r["fields"], users),
            "hash_encodings": r["encodings"],
            "alias_keys": r["aliases"],
            "alias_bytes_avg": per(r["alias_bytes"], r["aliases"]),
            "bytes_per_user_with_aliases": per(r["hash_bytes"] + r["alias_bytes"], users),
            "server_version": version,
        },
        "flow_state": {
            "bytes_per_user": state_per_user,
            "target_bytes_per_user": STATE_TARGET,
            "met": state_per_user is not None and state_per_user <= STATE_TARGET,
            "profiles_in_state": held,
            "ingest_bytes_per_user": per(state["totals"]["ingest"], held),
            "profile_bytes_per_user": per(state["totals"]["profile"], held),
            "breakdown_bytes_per_user": {k: per(v, held) for k, v in sorted(state["parts"].items())},
            "after_finish_bytes_per_user": per(sum(after.values()), held_after),
            "shards": {"ingest": cfg.ingest_shards, "profile": cfg.profile_shards},
        },
        "python_heap": {
            "rss_delta_bytes_per_user": per(rss1 - rss0, held),
            "tracemalloc_bytes_per_user": per(traced, held) if traced is not None else None,
        },
        "seconds": {"feed": round(feed_s, 1), "total": round(time.monotonic() - _T0, 1)},
        "settings": {"days": args.days, "seed": args.seed, "batch_size": args.batch_size,
                     "lateness_ms": cfg.lateness_ms, "redis_ttl_s": ttl_s, "prefix": prefix},
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_memory",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000, help="active profiles to reach")
    p.add_argument("--days", type=float, default=2.0, help="approximate event-time span")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=1000, help="records per source batch")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also trace Python allocations while feeding (slower)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
