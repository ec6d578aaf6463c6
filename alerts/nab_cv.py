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

from typing import Callable

from alerts import detectors as d
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
                            "files": len(held)}
    return {"profile": profile, "cv": {"score": normalised(*totals)},
            "in_sample": {"candidate": whole[0], "threshold": whole[1], "score": whole[2]},
            "chosen": chosen, "by_category": by_category}
