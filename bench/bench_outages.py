"""The long outage test: tests/outage_harness.py with a minute per outage (Redis hung, Redis
killed and restarted, ClickHouse tables detached, the Kafka broker killed and restarted), on a
topic a producer fills at ``--rate`` records/s the whole time. Prints one JSON object: the
differences against a calm run of the same input (all empty when nothing was lost or doubled),
the outage log lines, and the peak bytes of the ClickHouse queues against their bound.

    .venv/bin/python bench/bench_outages.py                 # 60 s per outage, ~8 minutes
    .venv/bin/python bench/bench_outages.py --outage-s 10   # quicker
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from bench.run_bench import log  # noqa: E402
from tests.outage_harness import scenario  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outage-s", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=300.0, help="records per second produced")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-outages-") as d:
        result = scenario(Path(d), a.outage_s, a.rate, log=log)
    ok = (not result["redis_differences"] and not result["table_differences"]
          and all(result["kafka_equal"].values()) and result["webhook_equal"]
          and result["queue_bytes_peak"] <= result["queue_bytes_bound"])
    result["redis_differences"] = len(result["redis_differences"])
    result["same_as_calm_run"] = ok
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
