"""Throughput and CPU per event of `surgeflow run --processes N` (Bytewax cluster mode) for
N = 1, 2, 4 on one topic, in one run.

    .venv/bin/python -m bench.bench_cluster [--events 200000] [--partitions 4] [--processes 1,2,4]

Starts the services of bench/run_bench.py (a Kafka broker, an embedded Redis), fills one topic
with N partitions, then runs the whole command once per process count, as a user would, each
with a fresh Redis prefix and chDB directory (embedded ClickHouse is written by process 0).
CPU is the user + system time of every process of the run (the launcher and its processes,
from the kernel's accounting of waited-for children), divided by the events. Prints one JSON
object; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.run_bench import Bench, log, machine_info
from bench.run_bench import parse_args as bench_args

ROOT = Path(__file__).resolve().parents[1]


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_processes(bench: Bench, topic: str, processes: int, events: int) -> dict:
    name = f"c{processes}-{'e' if events == 0 else 'n'}"
    config = bench.tmp / f"{name}.yaml"
    out = {k: bench.broker.create_topic(f"{k}-{name}-{topic}") for k in ("dead", "actions", "alerts")}
    config.write_text(json.dumps({
        "source": {"kind": "kafka"}, "output": {"kind": "kafka"},
        "kafka": {"brokers": [bench.broker.bootstrap], "events_topic": topic, "tail": False,
                  "batch_size": bench.args.batch_size, "dead_letter_topic": out["dead"],
                  "actions_topic": out["actions"], "alerts_topic": out["alerts"]},
        "redis": {"url": bench.redis_url, "key_prefix": name},
        "clickhouse": {"dsn": f"chdb://{bench.tmp / ('chdb-' + name)}", "database": "sf",
                       "raw_events": not bench.args.no_raw_events,
                       "spool_dir": str(bench.tmp / f"spool-{name}")},
        "flow": {"shards": bench.args.shards, "max_clock_skew_s": None, "max_lookback_s": None,
                 "recovery_dir": None, "epoch_interval_s": bench.args.epoch_s},
        "metrics": {"enabled": False},
    }))
    summary = bench.tmp / f"{name}.json"
    env = {**os.environ, "SURGEFLOW_SUMMARY": str(summary)}
    log(f"{processes} process(es): surgeflow run --processes {processes}")
    cpu0, started = children_cpu_s(), time.monotonic()
    done = subprocess.run([sys.executable, "-m", "surgeflow", "run", "-c", str(config),
                           "--processes", str(processes)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds, cpu = time.monotonic() - started, children_cpu_s() - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"{processes} processes: exit {done.returncode}\n{done.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    if events and s["events_in"] != events:
        raise RuntimeError(f"{processes} processes read {s['events_in']} events, expected {events}")
    res = {"processes": processes, "seconds": round(seconds, 2),
           "events_per_s": round(events / seconds, 1) if events else None,
           "flow_events_per_s": s["events_per_s"],  # from the flow's own start (no imports, no joining)
           "cpu_s": round(cpu, 2),
           "cpu_us_per_event": round(cpu / events * 1e6, 1) if events else None,
           "aggregate_rows": s["aggregate_rows"], "users_with_features": s["users_with_features"]}
    log(f"  {res}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--no-raw-events", action="store_true",
                   help="clickhouse.raw_events off (no events_raw row per event to process 0)")
    a = p.parse_args(argv)
    args = bench_args(["--events", str(a.events), "--partitions", str(a.partitions),
                       "--users", str(a.users), "--no-live"])
    args.no_raw_events = a.no_raw_events
    bench = Bench(args)
    try:
        bench.start_services()
        topic, produced = bench.fill_topic()
        empty = bench.broker.create_topic(f"bench-empty-{topic}", partitions=a.partitions)
        runs = []
        for n in map(int, a.processes.split(",")):
            # the fixed cost of a run (imports, joining the cluster, chDB, the last epoch),
            # measured on an empty topic, so that the per-event figure does not depend on N
            fixed = run_processes(bench, empty, n, 0)["cpu_s"]
            r = run_processes(bench, topic, n, a.events)
            r["fixed_cpu_s"] = fixed
            r["net_cpu_us_per_event"] = round((r["cpu_s"] - fixed) / a.events * 1e6, 1)
            runs.append(r)
    finally:
        bench.stop_services()
    one = next((r for r in runs if r["processes"] == 1), None)
    ratios = {f"cpu_per_event_{r['processes']}p_to_1p": round(r["cpu_us_per_event"] / one["cpu_us_per_event"], 3)
              for r in runs if one and r is not one}
    ratios.update({f"net_cpu_per_event_{r['processes']}p_to_1p":
                   round(r["net_cpu_us_per_event"] / one["net_cpu_us_per_event"], 3)
                   for r in runs if one and r is not one})
    ratios.update({f"throughput_{r['processes']}p_to_1p": round(r["events_per_s"] / one["events_per_s"], 3)
                   for r in runs if one and r is not one})
    print(json.dumps({"machine": machine_info(), "events": a.events, "partitions": a.partitions,
                      "raw_events": not a.no_raw_events,
                      "produce": produced, "runs": runs, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
