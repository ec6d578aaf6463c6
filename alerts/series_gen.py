"""Labelled metric series of the kinds marketing and operations see, NAB-style (issue 17).

NAB's 22 shared series are too few to tune on and tell nothing about series never seen. This
generator adds, seeded, the kinds the hold-out shows missing, each with labelled anomalies and
NAB's windows, so that every default can be chosen by leave-one-category-out cross-validation
(a kind is a category):

==================  ===========================================  ============================
kind                the series                                   its anomalies
==================  ===========================================  ============================
level_shift         noise around a level                         the level moves and stays
variance_change     noise around a level                         the noise grows and stays
drift               noise around a level                         a slow ramp, then a new level
daily_cycle         a daily cycle with noise                     a missing peak, a peak at night
weekly_cycle        weekdays high, weekends low                  a weekday at weekend level
sparse_spikes       noise with small spikes now and then         a spike far above the usual
flatline            a noisy metric                               the collector dies: flat
low_counts          Poisson counts, near zero at night           a burst at night, a dead day
odd_period          a cycle of 3 to 17 hours                     the cycle stops, or jumps
==================  ===========================================  ============================

Rows are 5 minutes apart (4,032 rows: two weeks). A series has one to three anomalies, none in
NAB's probation period (the first 15 %). Windows follow NAB's labelling rule: 10 % of the rows,
shared among the anomalies, centred on each anomaly's first row.

>>> g = generate("level_shift", seed=1)
>>> len(g.series.x), len(g.windows) == len(g.anomalies) >= 1, g.series.name
(4032, True, 'synthetic_level_shift/level_shift_1.csv')
>>> generate("level_shift", seed=1).series.x == g.series.x  # seeded
True
>>> c = clean("drift", 3)
>>> c.anomalies, c.spans, len(c.series.x)
((), (), 4032)
"""
from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from alerts.nab import Series

STEP_MS = 300_000
ROWS = 4032
START_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a Monday
DAY_ROWS = 86_400_000 // STEP_MS
KINDS = ("level_shift", "variance_change", "drift", "daily_cycle", "weekly_cycle",
         "sparse_spikes", "flatline", "low_counts", "odd_period")
PROBATION = 0.15  # NAB: no detection counts in the first 15 % of a file


@dataclass(frozen=True)
class Generated:
    series: Series
    anomalies: tuple[int, ...]  # the first row of each anomaly
    spans: tuple[tuple[int, int], ...]  # NAB windows as rows [start, end)
    windows: tuple[tuple[int, int], ...]  # the same in epoch ms (first and last row's time)


def nab_spans(n: int, starts: list[int]) -> list[tuple[int, int]]:
    """NAB's windows: 10 % of the rows shared among the anomalies, each centred on its first
    row, clipped to the series, merged where they touch.

    >>> nab_spans(1000, [500]), nab_spans(1000, [300, 700])
    ([(450, 550)], [(275, 325), (675, 725)])
    """
    if not starts:
        return []
    size = int(0.10 * n / len(starts))
    spans: list[tuple[int, int]] = []
    for s in sorted(starts):
        a, b = max(0, s - size // 2), min(n, s - size // 2 + size)
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
        else:
            spans.append((a, b))
    return spans


def _stamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _rng(kind: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(kind.encode()) * 1_000_003 + seed)


def _starts(rnd: random.Random, n: int, count: int, gap: int) -> list[int]:
    """Anomaly starts after the probation, at least ``gap`` rows apart."""
    lo, hi = int(n * PROBATION) + gap // 2, n - gap // 2
    out: list[int] = []
    while len(out) < count:
        s = rnd.randrange(lo, hi)
        if all(abs(s - o) >= gap for o in out):
            out.append(s)
        elif len(out) and rnd.random() < 0.01:  # crowded: fewer anomalies
            break
    return sorted(out)


def _base(kind: str, rnd: random.Random, n: int) -> tuple[list[float], float]:
    """(values without anomalies, the noise's scale)."""
    level = 10 ** rnd.uniform(0.5, 3.5)
    sd = level * rnd.uniform(0.02, 0.08)
    gauss = rnd.gauss
    if kind == "daily_cycle":
        amp = level * rnd.uniform(0.3, 0.7)
        phase = rnd.uniform(0, 2 * math.pi)
        return [level + amp * math.sin(2 * math.pi * i / DAY_ROWS + phase) + gauss(0, sd)
                for i in range(n)], sd
    if kind == "weekly_cycle":
        low = rnd.uniform(0.3, 0.6)
        return [level * (low if (i // DAY_ROWS) % 7 >= 5 else 1.0)
                * (1 + 0.3 * math.sin(2 * math.pi * i / DAY_ROWS)) + gauss(0, sd)
                for i in range(n)], sd
    if kind == "odd_period":
        period = rnd.uniform(3, 17) * 12  # 3 to 17 hours, in rows
        amp = level * rnd.uniform(0.3, 0.6)
        return [level + amp * math.sin(2 * math.pi * i / period) + gauss(0, sd)
                for i in range(n)], sd
    if kind == "low_counts":
        peak = rnd.uniform(3, 15)
        rates = [max(0.05, peak * (0.5 - 0.5 * math.cos(2 * math.pi * (i % DAY_ROWS) / DAY_ROWS)) ** 2)
                 for i in range(n)]
        return [float(_poisson(rnd, r)) for r in rates], math.sqrt(peak)
    if kind == "sparse_spikes":
        xs = [level + gauss(0, sd) for _ in range(n)]
        for i in range(n):
            if rnd.random() < 0.01:  # usual spikes: part of normal life
                xs[i] += level * rnd.uniform(0.2, 0.5)
        return xs, sd
    return [level + gauss(0, sd) for _ in range(n)], sd


def _poisson(rnd: random.Random, lam: float) -> int:
    if lam > 30:
        return max(0, int(round(rnd.gauss(lam, math.sqrt(lam)))))
    limit, k, p = math.exp(-lam), 0, rnd.random()
    while p > limit:
        k += 1
        p *= rnd.random()
    return k


def _inject(kind: str, rnd: random.Random, xs: list[float], sd: float, s: int) -> int:
    """Plants one anomaly at about row ``s``; returns the row it really starts at."""
    n = len(xs)
    level = sum(xs[max(0, s - DAY_ROWS):s]) / max(1, len(xs[max(0, s - DAY_ROWS):s]))
    sign = 1 if rnd.random() < 0.5 else -1
    if kind == "level_shift":
        shift = sign * sd * rnd.uniform(4, 8)
        for i in range(s, n):
            xs[i] += shift
    elif kind == "variance_change":
        grow = rnd.uniform(3, 5)
        for i in range(s, n):
            xs[i] = level + (xs[i] - level) * grow
    elif kind == "drift":
        total, ramp = sign * sd * rnd.uniform(6, 12), rnd.randrange(100, 250)
        for i in range(s, n):
            xs[i] += total * min(1.0, (i - s) / ramp)
    elif kind in ("daily_cycle", "odd_period"):
        if rnd.random() < 0.5:  # the cycle stops: a flat stretch at the mean
            for i in range(s, min(n, s + rnd.randrange(48, 96))):
                xs[i] = level + rnd.gauss(0, sd)
        else:  # a peak out of place
            for i in range(s, min(n, s + 12)):
                xs[i] += abs(level) * rnd.uniform(0.5, 0.8)
    elif kind == "weekly_cycle":
        for i in range(s, min(n, s + DAY_ROWS)):
            xs[i] *= 0.45
    elif kind == "sparse_spikes":
        for i in range(s, min(n, s + rnd.randrange(1, 4))):
            xs[i] += abs(level) * rnd.uniform(1.5, 3.0)
    elif kind == "flatline":
        value = xs[s - 1] if rnd.random() < 0.5 else 0.0
        for i in range(s, min(n, s + rnd.randrange(100, 300))):
            xs[i] = value
    elif kind == "low_counts":
        if rnd.random() < 0.5:  # a burst at night
            night = s - s % DAY_ROWS + int(DAY_ROWS * 0.05)
            s = night if night > int(n * PROBATION) else s
            for i in range(s, min(n, s + 6)):
                xs[i] = float(_poisson(rnd, 12.0))
        else:  # nothing counted for three hours of the day
            noon = s - s % DAY_ROWS + DAY_ROWS // 2 - 18
            s = noon if noon > int(n * PROBATION) else s
            for i in range(s, min(n, s + 36)):
                xs[i] = 0.0
    return s


def generate(kind: str, seed: int, rows: int = ROWS, anomalies: int | None = None) -> Generated:
    """One labelled series of ``kind`` (seeded): ``anomalies`` of them (default: 1 to 3)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    rnd = _rng(kind, seed)
    xs, sd = _base(kind, rnd, rows)
    count = rnd.randint(1, 3) if anomalies is None else anomalies
    starts = _starts(rnd, rows, count, gap=int(0.10 * rows / max(1, count)) + DAY_ROWS) if count else []
    starts = sorted(_inject(kind, rnd, xs, sd, s) for s in starts)
    t = [START_MS + i * STEP_MS for i in range(rows)]
    series = Series(f"synthetic_{kind}/{kind}_{seed}.csv", [_stamp(v) for v in t],
                    [repr(round(v, 4)) for v in xs], t=t, x=[round(v, 4) for v in xs])
    spans = nab_spans(rows, starts)
    return Generated(series, tuple(starts), tuple(spans),
                     tuple((t[a], t[b - 1]) for a, b in spans))


def clean(kind: str, seed: int, rows: int = ROWS) -> Generated:
    """A series of ``kind`` without anomalies (for false alarms)."""
    return generate(kind, seed, rows, anomalies=0)


def corpus(seeds: range = range(3), kinds: tuple[str, ...] = KINDS) -> list[Generated]:
    return [generate(kind, seed) for kind in kinds for seed in seeds]


def write_nab(out: Path, generated: list[Generated]) -> Path:
    """The series in NAB's layout: ``<out>/data/<category>/<file>.csv`` and
    ``<out>/labels.json``; returns ``out``."""
    labels = {}
    for g in generated:
        path = out / "data" / g.series.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write("timestamp,value\n")
            for stamp, value in zip(g.series.stamps, g.series.values):
                f.write(f"{stamp},{value}\n")
        labels[g.series.name] = [[_stamp(a) + ".000000", _stamp(b) + ".000000"] for a, b in g.windows]
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return out
