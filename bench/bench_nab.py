"""Detector benchmark: NAB scores of the plain baseline and ours (with the ablation of ours),
the cost of one value for every detector class, memory per series, and 100,000 series at once.

    python -m bench.bench_nab                                  # everything (~3 min)
    python -m bench.bench_nab --skip-nab                       # cost and memory only
    python -m bench.bench_nab --series 20000 --rounds 2        # a smaller many-series run

NAB data: --data/--labels (default: /work/shared/data/nab). The NAB figures are computed by
alerts.nab and cross-checked with --scorer (an independent NAB scorer, when the file exists).
stdout gets one JSON object (also saved as bench/results/nab-<time>.json); progress to stderr.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from alerts import detectors as d, nab  # noqa: E402
from alerts.adaptive import AdaptiveGaussian  # noqa: E402
from alerts.ensemble import AdaptiveEnsemble  # noqa: E402

NAB_DIR = Path("/work/shared/data/nab")
MINUTE = 60_000

# Parts of ours switched off one at a time (0 = off): what each adds on NAB.
ABLATION = {
    "level baseline only": dict(max_slots=0, lik_window=0, cooldown=0),
    "level + cooldown": dict(max_slots=0, lik_window=0),
    "level + likelihood + cooldown": dict(max_slots=0),
    "level + seasonal + cooldown": dict(lik_window=0),
    "level + seasonal + likelihood (no cooldown)": dict(cooldown=0),
    "all (default)": {},
}

# Flow-sized configurations (a per-minute series, an hour or so of memory).
FLOW = {
    "WindowedGaussian(window=60)": lambda: d.WindowedGaussian(window=60),
    "EWGaussian(half_life=30)": lambda: d.EWGaussian(half_life=30),
    "RobustGaussian(window=60)": lambda: d.RobustGaussian(window=60),
    "SeasonalGaussian(slots=24)": lambda: d.SeasonalGaussian(slots=24),
    "BinomialRatio(half_life=24)": lambda: d.BinomialRatio(half_life=24),
    "AdaptiveGaussian(half_life=30, max_slots=24, cooldown=30)":
        lambda: AdaptiveGaussian(half_life=30, max_slots=24, cooldown=30, lik_warmup=60),
    "AdaptiveGaussian(half_life=30, max_slots=24, cooldown=30, no week, no cycle)":
        lambda: AdaptiveGaussian(half_life=30, max_slots=24, cooldown=30, lik_warmup=60,
                                 week_half_life=0, period_window=0),
    "AdaptiveEnsemble(half_life=30, max_slots=24, cooldown=30)":
        lambda: AdaptiveEnsemble(half_life=30, max_slots=24, cooldown=30, lik_warmup=60),
}
# The configurations the NAB run uses (cost only).
NAB_SIZED = {
    "NabWindowedGaussian(window=6400)": lambda: nab.NabWindowedGaussian(),
    "AdaptiveGaussian() (NAB defaults)": lambda: AdaptiveGaussian(),
    "AdaptiveEnsemble() (the default, surgeflow nab-eval)": lambda: AdaptiveEnsemble(),
}


def log(msg: str) -> None:
    print(f"[bench_nab] {msg}", file=sys.stderr, flush=True)


def feed(n: int, seed: int = 1) -> list[tuple[float, int, float]]:
    """(value, t, n) rows: a daily wave plus noise, one a minute, some spikes; n for ratios."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        x = 100 + 20 * ((i % 1440) / 1440) + rng.gauss(0, 3) + (40 if rng.random() < 0.002 else 0)
        rows.append((x, i * MINUTE, 0.0))
    return rows


def ratio_feed(n: int, seed: int = 2) -> list[tuple[float, int, float]]:
    rng = random.Random(seed)
    return [(rng.betavariate(5, 95), i * MINUTE, float(rng.randint(20, 2000))) for i in range(n)]


def cost_us(factory, rows) -> float:
    det = factory()
    score_one, learn_one = det.score_one, det.learn_one
    gc.collect()
    t0 = time.perf_counter()
    for x, t, n in rows:
        score_one(x, t, n)
        learn_one(x, t, n)
    return 1e6 * (time.perf_counter() - t0) / len(rows)


def bytes_per_series(factory, rows, count: int = 500) -> int:
    """tracemalloc: memory of ``count`` detectors after each has learned ``rows``."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    dets = [factory() for _ in range(count)]
    for det in dets:
        for x, t, n in rows:
            det.learn_one(x, t, n)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del dets
    return round(used / count)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def many_series(series: int, rounds: int, warm: int = 32) -> dict:
    """``series`` detectors (the flow-sized ours, warm after 10 values, likelihood after 20
    more) each fed ``warm`` values round-robin (memory measured then), then ``rounds`` more
    values each, timed: the per-value cost of a warm detector among many."""
    def factory():
        return AdaptiveGaussian(half_life=30, max_slots=24, cooldown=30, warmup=10, lik_warmup=20)

    rng = random.Random(5)
    noise = [rng.gauss(0, 3) for _ in range(4099)]

    def feed_round(dets, r):
        breaches = 0
        t = r * MINUTE
        for i, det in enumerate(dets):
            x = 100.0 + noise[(i + r) % 4099]
            breaches += det.score_one(x, t).breach
            det.learn_one(x, t)
        return breaches

    gc.collect()
    before = rss_bytes()  # tracemalloc would slow the warm-up ~10x: the process's growth instead
    dets = [factory() for _ in range(series)]
    for r in range(warm):
        feed_round(dets, r)
    memory = rss_bytes() - before
    t0 = time.perf_counter()
    breaches = sum(feed_round(dets, warm + r) for r in range(rounds))
    secs = time.perf_counter() - t0
    values = series * rounds
    return {"series": series, "warm_values_each": warm, "timed_rounds": rounds, "values": values,
            "memory_rss_growth_bytes": memory, "bytes_per_series": round(memory / series),
            "us_per_value": round(1e6 * secs / values, 2), "values_per_s": round(values / secs),
            "breaches": breaches}


def shared_score(scorer: Path, det_dir: Path, labels: Path) -> dict | None:
    if not scorer.exists():
        return None
    out = subprocess.run([sys.executable, str(scorer), str(det_dir), str(labels)],
                         capture_output=True, text=True, check=True).stdout
    res = json.loads(out)
    return {p: res[p]["score"] for p in nab.PROFILES}


def bench_nab(args) -> dict:
    labels = nab.read_labels(args.labels)
    series = nab.find_series(args.data, labels)
    out = Path(tempfile.mkdtemp(prefix="bench-nab-"))
    figures = {}
    for name in ("windowed_gaussian", "surgeflow"):
        log(f"NAB: {name}")
        r = nab.evaluate_detector(name, series, labels, out)
        ours = {p: r["nab"][p]["score"] for p in nab.PROFILES}
        shared = shared_score(args.scorer, out / name, args.labels)
        figures[name] = {
            "nab": ours, "nab_shared_scorer": shared,
            "scorers_agree": None if shared is None else all(
                abs(ours[p] - shared[p]) < 0.011 for p in nab.PROFILES),
            "threshold_standard": r["nab"]["standard"]["threshold"],
            "recall": r["recall"], "windows": r["windows"], "false_alarms": r["false_alarms"],
            "false_alarms_per_1000": r["false_alarms_per_1000"],
            "delay_rows_mean": r["delay_rows_mean"], "delay_rows_median": r["delay_rows_median"],
            "delay_hours_mean": r["delay_hours_mean"], "rows": r["rows"],
            "us_per_value": round(1e6 * r["seconds"] / r["rows"], 2),
        }
    ablation = {}
    for label, kw in ABLATION.items():
        log(f"ablation: {label}")
        r = nab.evaluate_detector("ablation", series, labels,
                                  factory=lambda kw=kw: AdaptiveGaussian(**kw))
        ablation[label] = {"params": kw, **{p: r["nab"][p]["score"] for p in nab.PROFILES},
                           "recall": r["recall"], "false_alarms_per_1000": r["false_alarms_per_1000"]}
    return {"detectors": figures, "ablation": ablation, "files": len(series)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=NAB_DIR / "data")
    ap.add_argument("--labels", type=Path, default=NAB_DIR / "labels.json")
    ap.add_argument("--scorer", type=Path, default=Path("/work/shared/tools/nab_score.py"))
    ap.add_argument("--values", type=int, default=50_000, help="values per detector for the cost")
    ap.add_argument("--series", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-nab", action="store_true")
    ap.add_argument("--cv-seeds", type=int, default=3,
                    help="generated series of each kind in the cross-validation (0: none)")
    args = ap.parse_args()

    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "load_average_at_start": os.getloadavg()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not args.skip_nab:
        result["nab"] = bench_nab(args)
        log("leave-one-category-out cross-validation")
        from alerts.nab_cv import evaluate_cv

        result["cross_validation"] = evaluate_cv(args.data, args.labels, args.cv_seeds)
    rows, ratios = feed(args.values), ratio_feed(args.values)
    log("cost per value")
    result["us_per_value"] = {name: round(cost_us(f, ratios if "Binomial" in name else rows), 2)
                              for name, f in {**FLOW, **NAB_SIZED}.items()}
    log("memory per series")
    warm = feed(120, seed=3)  # past every flow-sized window and warm-up
    result["bytes_per_series"] = {
        name: bytes_per_series(f, ratio_feed(120) if "Binomial" in name else warm)
        for name, f in FLOW.items()}
    # the NAB-sized ones on a 5-minute series, after a week (its week and cycle shapes built)
    week = [(x, i * 5 * MINUTE, n) for i, (x, _, n) in enumerate(feed(2016, seed=4))]
    result["bytes_per_series_nab_sized"] = {name: bytes_per_series(f, week, count=100)
                                            for name, f in NAB_SIZED.items()}
    log(f"{args.series:,} series")
    result["many_series"] = many_series(args.series, args.rounds)

    os.makedirs(PROJECT_ROOT / "bench" / "results", exist_ok=True)
    path = PROJECT_ROOT / "bench" / "results" / f"nab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    log(f"written {path}")


if __name__ == "__main__":
    main()
