"""State under hostile cardinality: a million distinct random ids and names through the alert
rules, with caps (issue 12, point 5).

    .venv/bin/python -m bench.bench_state_bounds [--ids 1000000] [--entity-cap 10000]
                                                 [--series-cap 1000] [--no-trace]

* **entity rules** (``alerts.entities.EntityRules``, the shipped catalogue): every event from a
  new IP and a new user with a new country name ("login", "ad_click", "login_failed", "page" in
  turn); the watermark follows 60 s behind. An id is an IP or a user: ``--ids`` of them is
  ``--ids / 2`` events.
* **minute rules** (``alerts.minute_rules.MinuteRules``, the shipped catalogue): each minute
  2,000 new campaign names (an impression row and a click row each) and 200 new page paths;
  ``--ids`` names in all.

At 10 %, 50 % and 100 % of the ids: what the state holds (entities per rule; series per split
and detectors), the heap it takes (tracemalloc, from the start), and the events (or names) per
second of a separate run without tracing. The same figures without a cap, up to ``--uncapped``
ids, show what the caps save. Prints ONE JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import tracemalloc

from alerts.entities import EntityRules, Signal
from alerts.metrics import ip_cluster, normal_ip
from alerts.minute_rules import MinuteRules
from alerts.rules import load_rules
from flows.minutes import CompleteMinute
from surgeflow.stats import STATS

T0 = 1_795_392_000_000  # 2026-11-23T00:00:00Z
LATENESS = 60_000
NAMES = ("login", "ad_click", "login_failed", "page")
NAMES_PER_MINUTE = 2_000
PAGES_PER_MINUTE = 200
_START = time.monotonic()


def log(msg: str) -> None:
    print(f"[state-bounds {time.monotonic() - _START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def entity_stream(rules: EntityRules):
    """fn(i): the i-th event, from a new IP and a new user (a bijection of i: all distinct)."""
    def one(i: int) -> None:
        x = (i * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
        ip = f"{x >> 24 & 255}.{x >> 16 & 255}.{x >> 8 & 255}.{x & 255}"
        rules.observe(Signal(T0 + i * 10, NAMES[i & 3], f"user-{x:08x}", ip, f"C{x:08x}"))
        if i % 1000 == 999:
            rules.tick(T0 + i * 10 - LATENESS)
    return one


def minute_stream(rules: MinuteRules, seed: int):
    rng = random.Random(seed)

    def one(m: int) -> None:
        rows = []
        for _ in range(NAMES_PER_MINUTE):
            c = f"camp-{rng.getrandbits(64):x}"
            rows += [("ad", c, "", "ad_impression", 20, 0.0, 0.0, 0, []),
                     ("ad", c, "", "ad_click", 2, 0.0, 1.0, 0, [])]
        pages = {f"/p/{rng.getrandbits(64):x}": [2, 1] for _ in range(PAGES_PER_MINUTE)}
        rules.judge(CompleteMinute(m, rows, bounces=pages))
    return one


def run(fn, steps: int, checkpoints: dict[int, int], describe, trace: bool) -> tuple[list, float]:
    """fn(i) for i < steps; at each checkpoint step the state and (traced) heap."""
    gc.collect()
    if trace:
        tracemalloc.start()
    rows, start = [], time.perf_counter()
    try:
        for i in range(steps):
            fn(i)
            ids = checkpoints.get(i + 1)
            if ids is not None:
                normal_ip.cache_clear()  # bounded (65,536) caches of the address parser
                ip_cluster.cache_clear()
                row = {"ids": ids, "state": describe()}
                if trace:
                    row["heap_bytes"] = tracemalloc.get_traced_memory()[0]
                rows.append(row)
                log(f"  {ids:>9,} ids: {row}")
    finally:
        if trace:
            tracemalloc.stop()
    return rows, time.perf_counter() - start


def entity_figures(ids: int, cap: int, trace: bool) -> dict:
    events = ids // 2
    marks = {max(1, int(events * f)): int(ids * f) for f in (0.1, 0.5, 1.0)}
    out = {"events": events, "cap": cap}
    catalogue = load_rules().entity_rules
    rules = EntityRules(catalogue, max_entity_keys=cap)
    before = STATS.labeled("evictions").get("entity_key", 0)
    log(f"entity rules, cap {cap:,}: {events:,} events (speed, no tracing)")
    _, seconds = run(entity_stream(rules), events, {}, lambda: None, False)
    out["events_per_s"] = round(events / seconds)
    out["evictions"] = STATS.labeled("evictions").get("entity_key", 0) - before
    if trace:
        rules = EntityRules(catalogue, max_entity_keys=cap)
        log("entity rules: traced")
        out["checkpoints"], _ = run(entity_stream(rules), events, marks, rules.size, True)
    return out


def minute_figures(ids: int, cap: int, trace: bool) -> dict:
    per_minute = NAMES_PER_MINUTE + PAGES_PER_MINUTE
    minutes = max(1, ids // per_minute)
    marks = {max(1, int(minutes * f)): max(1, int(minutes * f)) * per_minute for f in (0.1, 0.5, 1.0)}
    out = {"minutes": minutes, "names": minutes * per_minute, "cap": cap}
    catalogue = load_rules()

    def describe(rules):
        return lambda: {"series": {k: len(v) for k, v in rules.series.recency.items()},
                        "detectors": len(rules.detectors)}
    rules = MinuteRules(catalogue, max_series=cap)
    before = STATS.labeled("evictions").get("minute_series", 0)
    log(f"minute rules, cap {cap:,}: {minutes:,} minutes of {per_minute:,} new names (speed)")
    _, seconds = run(minute_stream(rules, 1), minutes, {}, lambda: None, False)
    out["names_per_s"] = round(minutes * per_minute / seconds)
    out["evictions"] = STATS.labeled("evictions").get("minute_series", 0) - before
    if trace:
        rules = MinuteRules(catalogue, max_series=cap)
        log("minute rules: traced")
        out["checkpoints"], _ = run(minute_stream(rules, 1), minutes, marks, describe(rules), True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", type=int, default=1_000_000)
    ap.add_argument("--entity-cap", type=int, default=10_000)
    ap.add_argument("--series-cap", type=int, default=1_000)
    ap.add_argument("--uncapped", type=int, default=100_000,
                    help="ids for the run without caps (0: skip it)")
    ap.add_argument("--no-trace", action="store_true", help="speed only")
    args = ap.parse_args(argv)
    trace = not args.no_trace
    result = {"ids": args.ids,
              "entity_rules": entity_figures(args.ids, args.entity_cap, trace),
              "minute_rules": minute_figures(args.ids, args.series_cap, trace)}
    if args.uncapped and trace:
        result["uncapped"] = {"entity_rules": entity_figures(args.uncapped, 10**12, True),
                              "minute_rules": minute_figures(args.uncapped, 10**12, True)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
