"""The long fuzz: a million hostile records (tests/hostile_records.py) through the whole flow
(decode, both keyed stages, entity and minute rules, Redis, ClickHouse in process, dead letters),
then the invariants of tests/test_fuzz_flow.py: no crash, every bad record dead-lettered with its
bytes and a reason, every good record's effects present.

    .venv/bin/python bench/bench_fuzz.py --records 1000000

The records come from an in-process source (two partitions), so a million of them (about 0.6 GB
with the oversized ones) need no broker storage; the CI version goes through Kafka.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import redis  # noqa: E402
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition  # noqa: E402

from config.settings import load_settings  # noqa: E402
from connectors.clickhouse import connect  # noqa: E402
from connectors.embedded_redis import EmbeddedRedis  # noqa: E402
from connectors.records import RawRecord  # noqa: E402
from flows.runner import run  # noqa: E402
from privacy.secrets import clickhouse_dsn  # noqa: E402
from surgeflow.stats import STATS  # noqa: E402
from tests.hostile_records import hostile_records  # noqa: E402
from tests.test_fuzz_flow import check_outcome  # noqa: E402


class _Part(StatefulSourcePartition):
    def __init__(self, records: list, index: int):
        self.records, self.index, self.pos = records, index, 0

    def next_batch(self):
        if self.pos >= len(self.records):
            raise StopIteration()
        now = int(time.time() * 1000)
        batch = [RawRecord(raw, b"k", self.index, self.pos + j, "fuzz", now)
                 for j, raw in enumerate(self.records[self.pos:self.pos + 1000])]
        self.pos += len(batch)
        return batch

    def snapshot(self):
        return self.pos


class ListSource(FixedPartitionedSource):
    def __init__(self, parts: list[list[bytes]]):
        self.parts = parts

    def list_parts(self):
        return [str(i) for i in range(len(self.parts))]

    def build_part(self, step_id, for_part, resume_state):
        return _Part(self.parts[int(for_part)], int(for_part))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    started = time.monotonic()
    records = list(hostile_records(a.records, seed=a.seed,
                                   base_ms=int(time.time() * 1000) - 24 * 3_600_000))
    generated = time.monotonic() - started
    parts = [[raw for i, (_, raw, _) in enumerate(records) if i % 2 == p] for p in range(2)]
    server = EmbeddedRedis(tmp / "redis")
    url = server.start()
    try:
        settings = load_settings(None, env={}, redis__url=url, redis__key_prefix="fz",
                                 clickhouse__dsn=f"chdb://{tmp / 'chdb'}", clickhouse__database="fuzz",
                                 clickhouse__spool_dir=str(tmp / "spool"), output__dir=str(tmp / "out"),
                                 flow__recovery_dir=None)
        STATS.reset()
        print(f"{a.records:,} hostile records generated in {generated:.1f} s; running the flow",
              file=sys.stderr)
        result = run(settings, url, source=ListSource(parts), partitions=2)
        with open(tmp / "out" / "dead_letters.jsonl", "rb") as f:  # streamed: ~3 GB at 1M records
            dead = [json.loads(x) for x in f]
        client, lock = connect(clickhouse_dsn(settings.clickhouse))
        with lock:
            reasons = check_outcome(records, dead, client, "fuzz", redis.Redis.from_url(url), "fz")
    finally:
        server.stop()
    print(json.dumps({
        "records": a.records, "seed": a.seed, "flow_seconds": round(result.seconds, 1),
        "records_per_s": round(a.records / result.seconds),
        "accepted": STATS.get("events_unique"), "duplicates": STATS.get("duplicates"),
        "dead_letters": sum(reasons.values()), "reasons": dict(sorted(reasons.items())),
        "step_errors": STATS.labeled("dead_letters").get("step_error", 0),
        "invariants": "hold",
    }, indent=2))


if __name__ == "__main__":
    main()
