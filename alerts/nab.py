"""Numenta Anomaly Benchmark (NAB) evaluation of the detectors.

Reads NAB-format series (``timestamp,value`` CSVs under ``<data>/<category>/``) and the labels
(``labels.json``: ``"<category>/<file>.csv" -> [[start, end], ...]``), runs a named detector over
each file (``score_one`` then ``learn_one`` per row, ``t`` = the row's time in epoch ms, UTC) and
writes NAB's results format, ``<out>/<detector>/<category>/<detector>_<file>.csv`` with the
columns ``timestamp,value,anomaly_score,label``, so NAB's own scorer can read it.

It also scores the run itself:

* NAB's normalised score for the three profiles, by :func:`nab_score` (this project's reading
  of NAB's published rules; ``bench/bench_nab.py`` checks it against an independent scorer);
* window recall (share of windows with a breach in them), false alarms per 1,000 rows and the
  detection delay, from the detector's own ``breach`` decisions (its ``k``), not from NAB's
  threshold. A false alarm is a breach *onset* outside every window: a run of consecutive
  breaching rows is one alarm (one page to a person), wherever the run ends. Only rows after
  NAB's probation period count, as in NAB, and "per 1,000 rows" is per 1,000 of those rows.

>>> spans = window_spans([0, 10, 20, 30, 40], [(10, 25)])
>>> spans, labels_of(5, spans)
([(1, 2)], [0, 1, 1, 0, 0])
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from alerts import detectors as d
from alerts.adaptive import AdaptiveGaussian
from alerts.ensemble import AdaptiveEnsemble

# Profile -> (A_TP, A_FP, A_FN), NAB's published cost matrices.
PROFILES = {"standard": (1.0, 0.11, 1.0), "reward_low_FP_rate": (1.0, 0.22, 1.0),
            "reward_low_FN_rate": (1.0, 0.11, 2.0)}
PROBATION_SHARE = 0.15  # NAB ignores detections in the first 15 % of a file ...
PROBATION_MAX = 750  # ... and at most 15 % of 5,000 rows

# name -> factory. Flow-sized defaults (a minute/5-minute series, a few hours of memory): the
# building blocks are here to be measured one by one, ``surgeflow`` is the composite.
DETECTORS: dict[str, Callable[[], d.Detector]] = {
    "windowed_gaussian": lambda: NabWindowedGaussian(),
    "ew_gaussian": lambda: d.EWGaussian(k=4.0, half_life=100, warmup=20),
    "robust_gaussian": lambda: d.RobustGaussian(k=4.0, window=200, warmup=20),
    "seasonal_gaussian": lambda: d.SeasonalGaussian(k=4.0, slots=24, half_life=4, warmup=3),
    "adaptive_gaussian": lambda: AdaptiveGaussian(),
    "surgeflow": lambda: AdaptiveEnsemble(),  # the Gaussian and a level-shift CUSUM (issue 17)
}


def register(name: str, factory: Callable[[], d.Detector]) -> None:
    DETECTORS[name] = factory


class NabWindowedGaussian(d.WindowedGaussian):
    """NAB's "Windowed Gaussian" baseline as NAB runs it: mean and standard deviation of the
    last 6,400 values, refreshed on every value until the window is full and then every 100
    values (the window slides by steps); ``score`` is the Gaussian probability of a value
    less extreme than this one, 1 - Q(|z|) (NAB's output, monotone in |z|), ``breach`` at
    ``k`` sigmas. Scores 0 before the first value.

    >>> g = NabWindowedGaussian(window=10, step=5, k=2)
    >>> for x in [1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0, 2.0]:
    ...     g.learn_one(x)
    >>> s = g.score_one(9.0)
    >>> round(s.mu, 2), s.breach, 0.99 < s.score <= 1.0, round(g.score_one(2.0).score, 2)
    (1.9, True, True, 0.56)
    """

    __slots__ = ("step", "pending", "mean", "std")

    def __init__(self, window: int = 6400, step: int = 100, k: float = 3.0, warmup: int = 1):
        super().__init__(k=k, window=window, warmup=warmup)
        self.step = int(step)
        self.pending: list[float] = []
        self.mean, self.std = 0.0, 1.0

    def learn_one(self, x: float, t: int | None = None, n: float | None = None) -> None:
        if len(self.values) < self.window:
            super().learn_one(x)
        else:
            self.pending.append(float(x))
            if len(self.pending) < self.step:
                return  # the published detector keeps its statistics between steps
            for v in self.pending:
                super().learn_one(v)
            self.pending.clear()
        size = len(self.values)
        self.mean = self.total / size
        std = math.sqrt(max(self.squares / size - self.mean ** 2, 0.0))  # population std, as NAB
        self.std = std if std > 0 else 1e-6

    def baseline(self, t: int | None = None, n: float | None = None) -> tuple[float, float, bool]:
        return self.mean, self.std, self.count >= max(self.warmup, 1)

    def judge(self, x: float, mu: float, sigma: float, warm: bool) -> d.Score:
        z = (x - mu) / sigma
        score = 0.5 + 0.5 * math.erf(abs(z) / math.sqrt(2.0)) if warm else 0.0
        return d.Score(x, mu, sigma, self.k, z, warm and abs(z) > self.k,
                       ("up" if z > 0 else "down") if warm and abs(z) > self.k else "", score, warm)


# --- reading ------------------------------------------------------------------------------

def epoch_ms(stamp: str) -> int:
    """NAB timestamps are naive UTC, ``YYYY-MM-DD HH:MM:SS[.ffffff]``.

    >>> epoch_ms("1970-01-01 00:00:01.500000")
    1500
    """
    dt = datetime.fromisoformat(stamp.strip()).replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1000))


@dataclass
class Series:
    name: str  # "<category>/<file>.csv", as in labels.json
    stamps: list[str]
    values: list[str]  # the text as read, written back unchanged
    t: list[int] = field(default_factory=list)
    x: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.t = self.t or [epoch_ms(s) for s in self.stamps]
        self.x = self.x or [float(v) for v in self.values]


def read_series(path: Path, name: str) -> Series:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return Series(name, [r["timestamp"] for r in rows], [r["value"] for r in rows])


def read_labels(path: Path) -> dict[str, list[tuple[int, int]]]:
    with open(path) as f:
        raw = json.load(f)
    return {name: [(epoch_ms(a), epoch_ms(b)) for a, b in wins] for name, wins in raw.items()}


def find_series(data: Path, labels: dict) -> list[Series]:
    """Every labelled file present under ``data`` (sorted by name); unlabelled CSVs are skipped:
    NAB scores only labelled files."""
    out = []
    for name in sorted(labels):
        path = data / name
        if path.exists():
            out.append(read_series(path, name))
    return out


def window_spans(t: list[int], windows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each window as (first row, last row) of the rows whose time is inside it (ends included);
    windows with no row are dropped."""
    spans = []
    for a, b in windows:
        rows = [i for i, ti in enumerate(t) if a <= ti <= b]
        if rows:
            spans.append((rows[0], rows[-1]))
    return sorted(spans)


def labels_of(n: int, spans: list[tuple[int, int]]) -> list[int]:
    label = [0] * n
    for a, b in spans:
        for i in range(a, b + 1):
            label[i] = 1
    return label


def probation(n: int) -> int:
    """Rows at the start of a file where NAB ignores detections."""
    return int(min(math.floor(PROBATION_SHARE * n), PROBATION_SHARE * 5000))


# --- running ------------------------------------------------------------------------------

def run_detector(det: d.Detector, s: Series) -> tuple[list[float], list[bool]]:
    """Score then learn each row; returns the anomaly scores and the breach flags."""
    scores, breaches = [], []
    score_one, learn_one = det.score_one, det.learn_one
    for t, x in zip(s.t, s.x):
        r = score_one(x, t)
        scores.append(r.score)
        breaches.append(r.breach)
        learn_one(x, t)
    return scores, breaches


def write_results(out: Path, detector: str, s: Series, scores: list[float], label: list[int]) -> Path:
    category, file = s.name.split("/", 1)
    path = out / detector / category / f"{detector}_{file}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "value", "anomaly_score", "label"])
        for row in zip(s.stamps, s.values, (repr(float(v)) for v in scores), label):
            w.writerow(row)
    return path


# --- NAB scoring --------------------------------------------------------------------------

def scaled_sigmoid(y: float) -> float:
    """NAB's weight of a detection at relative position ``y``: 1 well before a window's end,
    0 at it, towards -1 after it (exactly -1 from 3 window lengths on).

    >>> scaled_sigmoid(-1.0) > 0.98, scaled_sigmoid(0.0), scaled_sigmoid(3.5)
    (True, 0.0, -1.0)
    """
    return -1.0 if y > 3.0 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


@dataclass
class FileScoring:
    """One file reduced to what the threshold sweep needs: (score, change of the total) events.

    A row outside windows costs its FP weight at every threshold <= its score. Inside a window
    only the earliest detection counts, so only the rows that beat every earlier score of the
    window matter (its running records): lowering the threshold to a record moves the detection
    to that record's row."""

    fp: list[tuple[float, float]]  # (score, NAB FP weight at A_FP = 1, <= 0)
    windows: list[list[tuple[float, float]]]  # per scorable window: records (score, TP weight)
    labelled: int  # all labelled windows (the perfect score counts them all)


def file_scoring(scores: list[float], spans: list[tuple[int, int]]) -> FileScoring:
    n = len(scores)
    start = probation(n)
    top = scaled_sigmoid(-1.0)
    fp, windows = [], []
    prev = None  # the last window that ended before the row
    w = 0
    i = start
    while i < n:
        while w < len(spans) and spans[w][1] < i:
            prev = spans[w]
            w += 1
        if w < len(spans) and spans[w][0] <= i:
            a, b = spans[w]
            records, best = [], -math.inf
            for j in range(i, b + 1):
                if scores[j] > best:
                    best = scores[j]
                    records.append((best, scaled_sigmoid(-(b - j + 1) / (b - a + 1)) / top))
            windows.append(records)
            i = b + 1
            continue
        if prev is None:
            fp.append((scores[i], -1.0))
        else:
            fp.append((scores[i], scaled_sigmoid((i - prev[1]) / max(prev[1] - prev[0], 1))))
        i += 1
    return FileScoring(fp, windows, len(spans))


def nab_score(files: list[FileScoring], profile: str = "standard") -> dict:
    """NAB's score over a corpus with one threshold for all files, the best one: raw total,
    threshold, normalised score (0 = no detections, 100 = every window at its start)."""
    a_tp, a_fp, a_fn = PROFILES[profile]
    events: list[tuple[float, float]] = []
    scorable = labelled = 0
    for f in files:
        labelled += f.labelled
        events += [(s, a_fp * c) for s, c in f.fp]
        for records in f.windows:
            scorable += 1
            # The best record is reached first (highest score): window found, A_FN saved;
            # each lower record moves the detection earlier and changes its TP weight.
            later = None
            for s, tp in reversed(records):
                events.append((s, a_tp * tp + a_fn if later is None else a_tp * (tp - later)))
                later = tp
    events.sort(key=lambda e: -e[0])
    null = -a_fn * scorable
    total = best = null
    threshold = 1.1  # above every score: no detection
    i = 0
    while i < len(events):
        thr = events[i][0]
        while i < len(events) and events[i][0] == thr:
            total += events[i][1]
            i += 1
        if total > best:
            best, threshold = total, thr
    perfect = a_tp * labelled
    norm = 100.0 * (best - null) / (perfect - null) if perfect > null else 0.0
    return {"raw": round(best, 4), "threshold": threshold, "score": round(norm, 2)}


def nab_total(files: list[FileScoring], threshold: float, profile: str = "standard") -> tuple[float, float, float]:
    """NAB's raw total of these files at a given threshold (a detection: score >= threshold),
    with the null (no detection) and perfect totals: (raw, null, perfect). Totals add up over
    files, so a corpus scored with several thresholds is normalised as one.

    >>> f = file_scoring([0.1, 0.2, 0.9, 0.3] * 50, [(100, 110)])
    >>> raw, null, perfect = nab_total([f], 0.95)
    >>> (raw, null, perfect), nab_total([f], 0.85)[0] < raw  # 0.85: every 0.9 row fires
    ((-1.0, -1.0, 1.0), True)
    """
    a_tp, a_fp, a_fn = PROFILES[profile]
    raw = null = perfect = 0.0
    for f in files:
        perfect += a_tp * f.labelled
        raw += sum(a_fp * c for s, c in f.fp if s >= threshold)
        for records in f.windows:
            null -= a_fn
            hit = [tp for s, tp in records if s >= threshold]
            # the earliest detection is the first record at or above the threshold
            raw += a_tp * hit[0] if hit else -a_fn
    return raw, null, perfect


def normalised(raw: float, null: float, perfect: float) -> float:
    return round(100.0 * (raw - null) / (perfect - null), 2) if perfect > null else 0.0


# --- summary figures from the breach flags ------------------------------------------------

def breach_figures(s: Series, breaches: list[bool], spans: list[tuple[int, int]]) -> dict:
    n = len(breaches)
    start = probation(n)
    label = labels_of(n, spans)
    alarms = sum(1 for i in range(start, n)
                 if breaches[i] and not label[i] and (i == 0 or not breaches[i - 1]))
    found, delays_rows, delays_h = 0, [], []
    windows = 0
    for a, b in spans:
        if b < start:
            continue  # entirely in probation: not scored by NAB either
        windows += 1
        hit = next((i for i in range(max(a, start), b + 1) if breaches[i]), None)
        if hit is not None:
            found += 1
            delays_rows.append(hit - a)
            delays_h.append((s.t[hit] - s.t[a]) / 3_600_000)
    return {"rows": n, "scored_rows": n - start, "windows": windows, "found": found,
            "false_alarms": alarms, "delays_rows": delays_rows, "delays_h": delays_h}


def _rollup(parts: list[dict]) -> dict:
    rows = sum(p["scored_rows"] for p in parts)
    windows = sum(p["windows"] for p in parts)
    found = sum(p["found"] for p in parts)
    alarms = sum(p["false_alarms"] for p in parts)
    dr = [x for p in parts for x in p["delays_rows"]]
    dh = [x for p in parts for x in p["delays_h"]]
    return {
        "windows": windows, "found": found,
        "recall": round(found / windows, 4) if windows else None,
        "false_alarms": alarms,
        "false_alarms_per_1000": round(1000 * alarms / rows, 3) if rows else None,
        "delay_rows_mean": round(statistics.fmean(dr), 1) if dr else None,
        "delay_rows_median": statistics.median(dr) if dr else None,
        "delay_hours_mean": round(statistics.fmean(dh), 2) if dh else None,
        "delay_hours_median": round(statistics.median(dh), 2) if dh else None,
    }


# --- the whole evaluation -----------------------------------------------------------------

def evaluate_detector(name: str, series: list[Series], labels: dict, out: Path | None = None,
                      factory: Callable[[], d.Detector] | None = None) -> dict:
    """Run one detector over every series; writes the results files when ``out`` is given."""
    factory = factory or DETECTORS[name]
    scorings, per_file, rows = [], {}, 0
    t0 = time.perf_counter()
    for s in series:
        spans = window_spans(s.t, labels.get(s.name, []))
        scores, breaches = run_detector(factory(), s)
        rows += len(scores)
        if out is not None:
            write_results(out, name, s, scores, labels_of(len(scores), spans))
        scorings.append(file_scoring(scores, spans))
        figures = breach_figures(s, breaches, spans)
        per_file[s.name] = figures
    secs = time.perf_counter() - t0
    summary = {"detector": name, "files": len(series), "rows": rows,
               "nab": {p: nab_score(scorings, p) for p in PROFILES}, **_rollup(list(per_file.values())),
               "seconds": round(secs, 2),
               "per_file": {k: {**_rollup([v]), "rows": v["rows"]} for k, v in per_file.items()}}
    return summary


def evaluate(data: Path, labels_path: Path, out: Path, names: list[str]) -> dict:
    labels = read_labels(labels_path)
    series = find_series(Path(data), labels)
    if not series:
        raise FileNotFoundError(f"no labelled series under {data}")
    result = {"data": str(data), "labels": str(labels_path), "out": str(out),
              "detectors": {name: evaluate_detector(name, series, labels, Path(out)) for name in names}}
    os.makedirs(out, exist_ok=True)
    with open(Path(out) / "summary.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def format_table(result: dict) -> str:
    """The summary as a plain-text table: per file and overall, one block per detector."""
    lines = []
    head = (f"{'file':<48} {'std':>6} {'lowFP':>6} {'lowFN':>6} {'recall':>7} {'FA/1k':>6} "
            f"{'delay':>7} {'delay_h':>7}")
    for name, r in result["detectors"].items():
        lines += [f"== {name}: {r['files']} files, {r['rows']:,} rows, {r['seconds']} s", head]
        for fname, f in r["per_file"].items():
            lines.append(f"{fname:<48} {'':>6} {'':>6} {'':>6} {_f(f['recall']):>7} "
                         f"{_f(f['false_alarms_per_1000']):>6} {_f(f['delay_rows_mean']):>7} "
                         f"{_f(f['delay_hours_mean']):>7}")
        nab = r["nab"]
        lines.append(f"{'ALL':<48} {nab['standard']['score']:>6} {nab['reward_low_FP_rate']['score']:>6} "
                     f"{nab['reward_low_FN_rate']['score']:>6} {_f(r['recall']):>7} "
                     f"{_f(r['false_alarms_per_1000']):>6} {_f(r['delay_rows_mean']):>7} "
                     f"{_f(r['delay_hours_mean']):>7}")
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:g}"
