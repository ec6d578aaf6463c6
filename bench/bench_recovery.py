"""The cost of isolation and recovery, in one run on this machine:

1. throughput of the full flow (flows.runner.run, Kafka -> shards -> Redis / ClickHouse / Kafka)
   without and with the recovery store (snapshots every ``--epoch-s``), alternated ``--repeat``
   times on the same topic; the ratio is the figure (the machine is shared and noisy);
2. the isolation: decode with and without the limits' shape walk, and the per-event
   ``try`` of every step (zero-cost in Python 3.11 until something raises);
3. snapshot size and time for ``--users`` users: the last snapshot of every keyed step, read
   back from the recovery store (SQLite), and the time to pickle all of it again;
4. restart to the first new event: the flow restarted on its recovery store (tail: true), one
   new event produced; seconds from ``run()`` to that user's hash in Redis.

    .venv/bin/python bench/bench_recovery.py --events 300000 --users 100000
"""
from __future__ import annotations

import argparse
import json
import pickle
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import orjson  # noqa: E402
import redis  # noqa: E402

from bench.run_bench import Bench, flush_redis, log  # noqa: E402
from connectors import kafka  # noqa: E402
from flows import events as events_module  # noqa: E402
from flows import runner  # noqa: E402
from surgeflow import shutdown  # noqa: E402
from surgeflow.stats import STATS  # noqa: E402


def with_recovery(settings, path: Path):
    return settings.model_copy(update={"flow": settings.flow.model_copy(update={"recovery_dir": path})})


def timed_run(settings, url: str) -> float:
    flush_redis(url)
    STATS.reset()
    result = runner.run(settings, url, settings.flow.workers)
    return STATS.get("events_in") / result.seconds


def snapshot_figures(recovery: Path) -> dict:
    """The newest snapshot of each (step, key) in the store: bytes, and the time to pickle the
    unpickled states again (what the flow pays each epoch for every key that changed)."""
    sizes, states = {}, []
    for db in recovery.glob("part-*.sqlite3"):
        con = sqlite3.connect(db)
        rows = con.execute(
            "SELECT step_id, state_key, ser_change FROM snaps s WHERE snap_epoch = "
            "(SELECT max(snap_epoch) FROM snaps t WHERE t.step_id = s.step_id "
            "AND t.state_key = s.state_key)").fetchall()
        con.close()
        for step, _, blob in rows:
            if blob is None:
                continue
            sizes[step] = sizes.get(step, 0) + len(blob)
            states.append(blob)
    started = time.perf_counter()
    objects = []
    for blob in states:  # Bytewax's own envelope, and inside it the bytes our steps pickled
        state = pickle.loads(blob)
        objects.append(pickle.loads(state) if isinstance(state, bytes) else state)
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    for o in objects:
        pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)
    dumped = time.perf_counter() - started
    return {"bytes_by_step": sizes, "bytes_total": sum(sizes.values()),
            "store_file_bytes": sum(p.stat().st_size for p in recovery.glob("part-*.sqlite3")),
            "unpickle_s": round(loaded, 3), "pickle_s": round(dumped, 3)}


def isolation_figures(n: int = 200_000) -> dict:
    """Decode of valid events with the limits' walk, and with it replaced by a no-op."""
    from connectors.synthetic import SyntheticSpec, generate
    import itertools

    raws = [r.value for r in itertools.islice(generate(SyntheticSpec(seed=3, malformed_share=0)), n)]
    walk = events_module._check_shape

    def cost() -> float:
        started = time.perf_counter()
        for raw in raws:
            events_module.decode(raw)
        return (time.perf_counter() - started) / n * 1e6

    with_walk, without = [], []
    for _ in range(3):
        with_walk.append(cost())
        events_module._check_shape = lambda doc, limits: None
        try:
            without.append(cost())
        finally:
            events_module._check_shape = walk
    return {"decode_us_with_limits": round(min(with_walk), 2),
            "decode_us_without_limits": round(min(without), 2),
            "limits_us_per_event": round(min(with_walk) - min(without), 2)}


def restart_to_first_event(bench: Bench, settings, topic: str) -> float:
    """Restart on the recovery store, following the topic; one new event; seconds until its
    user's hash is in Redis (recovery load, flow build and the event's way through)."""
    live = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"tail": True})})
    user = f"restart-{uuid.uuid4().hex[:8]}"
    doc = {"event_id": user, "user_id": user, "event": "page_view", "timestamp": int(time.time() * 1000)}
    client = redis.Redis.from_url(bench.redis_url)
    shutdown.STOP.clear()
    started = time.monotonic()
    thread = threading.Thread(target=runner.run, args=(live, bench.redis_url, live.flow.workers))
    thread.start()
    kafka.produce([bench.broker.bootstrap], topic, [(user.encode(), orjson.dumps(doc))])
    while not client.exists(f"{live.redis.key_prefix}:v2:user:{user}"):
        if time.monotonic() - started > 300:
            raise RuntimeError("the restarted flow never wrote the new event")
        time.sleep(0.01)
    took = time.monotonic() - started
    shutdown.STOP.set()
    thread.join()
    shutdown.STOP.clear()
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=300_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--span-hours", type=float, default=6.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--epoch-s", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    bench = Bench(a)
    bench.start_services()
    out: dict = {"args": vars(a)}
    try:
        out["isolation"] = isolation_figures()
        log(f"isolation: {out['isolation']}")
        topic, _ = bench.fill_topic()
        plain = bench.settings(topic, tail=False, database="bench_recovery")
        recovery = Path(tempfile.mkdtemp(prefix="recovery-", dir=bench.tmp))
        runs: dict[str, list[float]] = {"without_recovery": [], "with_recovery": []}
        for i in range(a.repeat):
            for label in runs:
                s = plain
                if label == "with_recovery":
                    s = with_recovery(plain, recovery / f"run{i}")
                rate = timed_run(s, bench.redis_url)
                runs[label].append(rate)
                log(f"{label} #{i + 1}: {rate:,.0f} events/s")
        out["throughput_events_per_s"] = {k: [round(r) for r in v] for k, v in runs.items()}
        best = {k: max(v) for k, v in runs.items()}
        out["recovery_over_plain"] = round(best["with_recovery"] / best["without_recovery"], 3)
        last = recovery / f"run{a.repeat - 1}"
        out["snapshot"] = snapshot_figures(last)
        log(f"snapshot: {out['snapshot']}")
        s = with_recovery(plain, last)
        out["restart_to_first_new_event_s"] = round(restart_to_first_event(bench, s, topic), 2)
        log(f"restart to the first new event: {out['restart_to_first_new_event_s']} s")
    finally:
        bench.stop_services()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
