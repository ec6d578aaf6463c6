"""The long crash test: `surgeflow run` (Kafka in and out, tail: true, recovery, webhook,
ClickHouse) once cleanly and once killed with SIGKILL at ``--kills`` random moments, then every
output compared (tests/crash_harness.py). Prints, per output, how many keys differ.

    .venv/bin/python bench/bench_crash.py --kills 10 --hours 6 --partitions 1
    .venv/bin/python bench/bench_crash.py --kills 3 --partitions 2 --clean-twice

``--clean-twice`` also compares two clean runs: what differs between them is the engine's
dependence on how partitions interleave, not the crashes'.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from bench.run_bench import _load_test_services, log  # noqa: E402
from connectors.embedded_redis import EmbeddedRedis  # noqa: E402
from connectors.kafka import produce  # noqa: E402
from connectors.synthetic import Anomaly, SyntheticSpec, generate  # noqa: E402
from tests.crash_harness import (Run, Webhook, clickhouse_tables, delivered, differences,  # noqa: E402
                                 end_offsets, redis_contents, write_config)


def clean_run(tmp, name, args, ends) -> None:
    run = Run(write_config(tmp, name, *args))
    run.wait(lambda: run.read_through(ends), timeout=3600)
    log(f"{name}: read through; SIGTERM took {run.stop():.1f} s")


def compare(a: str, b: str, tmp: Path, redis_url: str, bootstrap: str, hook: Webhook) -> dict:
    out = {"redis_keys_differing": len(differences(redis_contents(redis_url, a),
                                                   redis_contents(redis_url, b)))}
    tables = clickhouse_tables(tmp / "chdb", a, b)
    out["clickhouse_rows_differing"] = {t: len(set(rows) ^ set(tables[b][t]))
                                        for t, rows in tables[a].items()}
    da, db = delivered(bootstrap, a), delivered(bootstrap, b)
    for kind in da:
        out[f"kafka_{kind}_keys_differing"] = len(da[kind].keys() ^ db[kind].keys())
        out[f"kafka_{kind}_redelivered"] = sum(len(v) > 1 for v in db[kind].values())
    ha, hb = hook.by_key(f"/{a}"), hook.by_key(f"/{b}")
    out["webhook_keys_differing"] = len(ha.keys() ^ hb.keys())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--hours", type=float, default=6.0, help="event-time span of the input")
    p.add_argument("--rate", type=float, default=10.0, help="events per event-time second")
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--seed", type=int, default=41)
    p.add_argument("--clean-twice", action="store_true")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    broker = _load_test_services().KafkaBroker().start()
    server = EmbeddedRedis(tmp / "redis")
    redis_url = server.start()
    hook = Webhook()
    try:
        spec = SyntheticSpec(seed=a.seed, users=3000, start_ms=1_795_392_000_000,
                             events_per_s=a.rate, duration_s=a.hours * 3600, malformed_share=0.01,
                             duplicate_share=0.03, max_disorder_ms=3000,
                             anomalies=(Anomaly("click_fraud", 3000, 300),
                                        Anomaly("request_flood", 4200, 60),
                                        Anomaly("traffic_spike", 5400, 600, 5.0)))
        topic = broker.create_topic("events", partitions=a.partitions)
        n = produce([broker.bootstrap], topic, ((r.key, r.value, r.sent_ms) for r in generate(spec)))
        log(f"{n:,} records in {a.partitions} partition(s)")
        ends = end_offsets(broker.bootstrap, topic)
        args = (broker.bootstrap, topic, redis_url, hook.url)
        clean_run(tmp, "clean", args, ends)
        if a.clean_twice:
            clean_run(tmp, "clean2", args, ends)
        config = write_config(tmp, "crash", *args)
        rng = random.Random(a.seed)
        started = time.monotonic()
        for i in range(a.kills):
            run = Run(config)
            run.wait(run.running, timeout=600)
            time.sleep(rng.uniform(0.5, 6.0))
            if run.read_through(ends):
                log(f"kill {i + 1}: the input was read through already; stopping the kills")
                run.kill()
                break
            run.kill()
            log(f"kill {i + 1} after {time.monotonic() - run.started:.1f} s")
        last = Run(config)
        last.wait(lambda: last.read_through(ends), timeout=3600)
        last.stop()
        result = {"records": n, "partitions": a.partitions, "kills": a.kills,
                  "crash_seconds": round(time.monotonic() - started, 1),
                  "crash_vs_clean": compare("clean", "crash", tmp, redis_url, broker.bootstrap, hook)}
        if a.clean_twice:
            result["clean_vs_clean"] = compare("clean", "clean2", tmp, redis_url, broker.bootstrap, hook)
        print(json.dumps(result, indent=2))
    finally:
        hook.close()
        server.stop()
        broker.stop()


if __name__ == "__main__":
    main()
