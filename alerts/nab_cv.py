"""Leave-one-category-out cross-validation of a detector's defaults on NAB-format series
(issue 17): what a default scores on series it was not chosen on.

Each candidate (a named detector configuration) runs once over every series. Then, for each
category in turn, the candidate and NAB threshold that score best on all the *other*
categories are chosen, and the held-out category is scored with them. The cross-validated
score is NAB's normalised score of the whole corpus, each category scored with what was chosen
without it (NAB's totals add up over files, so this is one corpus score). The in-sample score
chooses once, on everything. A default that helps in-sample and hurts cross-validated shows as
a gap between the two.

>>> from alerts.nab import Series
>>> def series(name, spike):
...     x = [1.0, 2.0] * 200
...     x[spike] = 9.0
...     return Series(name, [""] * 400, [""] * 400, t=list(range(400)), x=x)
>>> data = [series(f"c{i}/f.csv", 300) for i in range(3)]
>>> labels = {s.name: [(290, 320)] for s in data}
>>> from alerts.detectors import WindowedGaussian
>>> cands = {"k3": lambda: WindowedGaussian(k=3, window=50)}
>>> r = cross_validate(cands, data, labels)
>>> r["cv"]["score"] == r["in_sample"]["score"] > 90, sorted(r["chosen"])
(True, ['c0', 'c1', 'c2'])
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

from alerts import detectors as d
from alerts.adaptive import AdaptiveGaussian
from alerts.ensemble import AdaptiveEnsemble
from alerts.nab import (FileScoring, Series, file_scoring, nab_score, nab_total, normalised,
                        run_detector, window_spans)


def category_of(name: str) -> str:
    return name.split("/", 1)[0]


def scorings(factory: Callable[[], d.Detector], series: list[Series],
             labels: dict) -> dict[str, FileScoring]:
    out = {}
    for s in series:
        scores, _ = run_detector(factory(), s)
        out[s.name] = file_scoring(scores, window_spans(s.t, labels.get(s.name, [])))
    return out


def _best(runs: dict[str, dict[str, FileScoring]], names: list[str], profile: str):
    """The candidate and threshold with the best NAB score on these files (ties: the first
    candidate in order, so the choice is deterministic)."""
    best = None
    for cand, files in runs.items():
        r = nab_score([files[n] for n in names], profile)
        if best is None or r["score"] > best[2]:
            best = (cand, r["threshold"], r["score"])
    return best


def cross_validate(candidates: dict[str, Callable[[], d.Detector]], series: list[Series],
                   labels: dict, profile: str = "standard",
                   runs: dict[str, dict[str, FileScoring]] | None = None) -> dict:
    """{"cv": {...}, "in_sample": {...}, "chosen": {category: (candidate, threshold, train
    score)}, "by_category": {category: {"cv": score, "in_sample": score}}}."""
    runs = runs if runs is not None else {c: scorings(f, series, labels) for c, f in candidates.items()}
    names = [s.name for s in series]
    categories = sorted({category_of(n) for n in names})
    chosen, totals, by_category = {}, [0.0, 0.0, 0.0], {}
    whole = _best(runs, names, profile)
    for cat in categories:
        held = [n for n in names if category_of(n) == cat]
        train = [n for n in names if category_of(n) != cat]
        cand, thr, score = _best(runs, train, profile) if train else whole
        chosen[cat] = (cand, thr, score)
        raw, null, perfect = nab_total([runs[cand][n] for n in held], thr, profile)
        totals = [totals[0] + raw, totals[1] + null, totals[2] + perfect]
        ins = nab_total([runs[whole[0]][n] for n in held], whole[1], profile)
        by_category[cat] = {"cv": normalised(raw, null, perfect), "in_sample": normalised(*ins),
                            "files": len(held), "totals": ((raw, null, perfect), ins)}
    return {"profile": profile, "cv": {"score": normalised(*totals)},
            "in_sample": {"candidate": whole[0], "threshold": whole[1], "score": whole[2]},
            "chosen": chosen, "by_category": by_category}


def subset_scores(result: dict, categories) -> dict:
    """The cross-validated and in-sample scores of some categories only (e.g. the shared NAB
    series among generated ones), from the totals of a :func:`cross_validate` result."""
    cv, ins = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    for cat in categories:
        a, b = result["by_category"][cat]["totals"]
        cv = [x + y for x, y in zip(cv, a)]
        ins = [x + y for x, y in zip(ins, b)]
    return {"cv": normalised(*cv), "in_sample": normalised(*ins)}


# The candidates the defaults are chosen among: the default composite (AdaptiveGaussian and a
# level-shift CUSUM), and AdaptiveGaussian alone with its level half-life, cooldown, seasonal
# baseline on or off, likelihood on or off (its defaults: hl1000_cd200_ms288_lw6).
GRID: dict[str, Callable[[], d.Detector]] = {"surgeflow": AdaptiveEnsemble, **{
    f"hl{hl}_cd{cd}_ms{ms}_lw{lw}": (lambda hl=hl, cd=cd, ms=ms, lw=lw: AdaptiveGaussian(
        half_life=hl, cooldown=cd, max_slots=ms, lik_window=lw))
    for hl, cd, ms, lw in itertools.product([300, 1000, 3000], [50, 200, 800], [0, 288], [0, 6])}}
DEFAULT = "surgeflow"


def with_generated(series: list[Series], labels: dict, seeds: int) -> tuple[list[Series], dict]:
    """The series plus ``seeds`` generated series of every kind (alerts/series_gen.py), each
    kind a category of its own."""
    from alerts.series_gen import corpus

    series, labels = list(series), dict(labels)
    for g in corpus(range(seeds)):
        series.append(g.series)
        labels[g.series.name] = list(g.windows)
    return series, labels


def evaluate_cv(data: Path, labels_path: Path, seeds: int = 3,
                candidates: dict[str, Callable[[], d.Detector]] | None = None) -> dict:
    """The cross-validation ``surgeflow nab-eval`` prints: over the series under ``data`` and
    generated ones, the candidates of :data:`GRID`; the scores overall and of the given
    series' categories alone, in sample and cross-validated, for the grid and for the
    defaults alone (only the threshold is chosen then)."""
    from alerts.nab import find_series, read_labels

    labels = read_labels(labels_path)
    given = find_series(Path(data), labels)
    series, labels = with_generated(given, labels, seeds)
    candidates = candidates or GRID
    runs = {c: scorings(f, series, labels) for c, f in candidates.items()}
    shared = sorted({category_of(s.name) for s in given})
    out = {"series": len(series), "given": len(given), "candidates": len(candidates)}
    for what, pick in (("grid", runs), ("defaults", {DEFAULT: runs[DEFAULT]} if DEFAULT in runs else runs)):
        r = cross_validate({}, series, labels, runs=pick)
        out[what] = {"cv": r["cv"]["score"], "in_sample": r["in_sample"]["score"],
                     "given_only": subset_scores(r, shared),
                     "by_category": {c: {k: v[k] for k in ("cv", "in_sample", "files")}
                                     for c, v in r["by_category"].items()},
                     "chosen": {c: v[0] for c, v in r["chosen"].items()}}
    return out


def format_cv(result: dict) -> str:
    lines = [f"leave-one-category-out cross-validation: {result['series']} series "
             f"({result['given']} given, the rest generated), {result['candidates']} candidates"]
    for what in ("defaults", "grid"):
        r = result[what]
        lines.append(f"  {what:<9} cross-validated {r['cv']:>6}  in sample {r['in_sample']:>6}   "
                     f"given series only: cross-validated {r['given_only']['cv']:>6}  "
                     f"in sample {r['given_only']['in_sample']:>6}")
    lines.append(f"  {'category':<28} {'cv':>7} {'in':>7}  chosen without it")
    for cat, v in result["grid"]["by_category"].items():
        lines.append(f"  {cat:<28} {v['cv']:>7} {v['in_sample']:>7}  {result['grid']['chosen'][cat]}")
    return "\n".join(lines)
