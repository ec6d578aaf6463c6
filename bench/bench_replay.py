"""A backfill of sparse history, end to end: `surgeflow replay FILE` on a JSON-lines file of
about 76,000 events spread over 10 days (3,000 users), embedded Redis and chDB.

    .venv/bin/python -m bench.bench_replay [--days 10] [--users 3000] [--events 76000]
                                           [--block-minutes 60] [--also-one-minute]

Prints one JSON object: wall seconds of the whole command (start-up, reading, draining every
sink, final flush), events, minute blocks inserted, and with --also-one-minute the same replay
with one-minute blocks (the behaviour before multi-minute blocks) in the same run for a ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from connectors.synthetic import SyntheticSpec, expected_records, generate

PROJECT_ROOT = Path(__file__).resolve().parents[1]
START_MS = 1_794_528_000_000  # 2026-11-13T00:00:00Z: history, well before today


def write_file(path: Path, days: float, users: int, events: int, seed: int) -> int:
    span = days * 86_400
    unit = expected_records(SyntheticSpec(start_ms=START_MS, events_per_s=1.0, duration_s=span))
    spec = SyntheticSpec(seed=seed, users=users, start_ms=START_MS, events_per_s=events / unit,
                         duration_s=span)
    n = 0
    with path.open("wb") as f:
        for r in generate(spec):
            if b"\n" not in r.value:
                f.write(r.value + b"\n")
                n += 1
    return n


def replay(tmp: Path, data: Path, block_minutes: int) -> dict:
    work = tmp / f"run-{block_minutes}"
    work.mkdir()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "clickhouse": {"dsn": f"chdb://{work / 'chdb'}", "spool_dir": str(work / "spool"),
                       "catch_up_block_minutes": block_minutes},
        "redis": {"embedded_dir": str(work / "redis")},
        "output": {"kind": "files", "dir": str(work / "out")},
        "privacy": {"erasure": {"inbox": str(work / "inbox")}},
        "metrics": {"port": 0},
        "dashboard": {"in_demo": False},
    }))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "surgeflow.cli", "replay", str(data), "-c",
                           str(config)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
                               "SURGEFLOW_SUMMARY": str(work / "summary.json")})
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"replay failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((work / "summary.json").read_text())
    return {"block_minutes": block_minutes, "seconds": round(seconds, 1), "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=float, default=10)
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--events", type=int, default=76_000)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--block-minutes", type=int, default=60)
    p.add_argument("--also-one-minute", action="store_true",
                   help="also replay with one-minute blocks (slow: minutes of draining)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sf-bench-replay-") as d:
        tmp = Path(d)
        data = tmp / "history.jsonl"
        n = write_file(data, args.days, args.users, args.events, args.seed)
        print(f"[bench] {n:,} events over {args.days:g} days in {data}", file=sys.stderr)
        out = {"events": n, "days": args.days, "users": args.users,
               "runs": [replay(tmp, data, args.block_minutes)]}
        if args.also_one_minute:
            out["runs"].append(replay(tmp, data, 1))
            out["ratio_blocks_to_one_minute"] = round(
                out["runs"][0]["seconds"] / out["runs"][1]["seconds"], 3)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
