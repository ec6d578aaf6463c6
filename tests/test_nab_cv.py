"""Leave-one-category-out cross-validation (alerts/nab_cv.py) and NAB's total at a fixed
threshold (alerts/nab.py): the threshold sweep's best is the best fixed threshold; a held-out
category is scored only with what was chosen without it."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from alerts.nab import file_scoring, nab_score, nab_total, normalised
from alerts.nab_cv import cross_validate

files_st = st.lists(
    st.tuples(st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9]), min_size=60, max_size=120),
              st.lists(st.tuples(st.integers(10, 100), st.integers(1, 15)), max_size=3)),
    min_size=1, max_size=4)


def scored(files):
    out = []
    for scores, wins in files:
        spans, last = [], -1
        for a, w in sorted(wins):
            if a > last + 1 and a + w < len(scores):
                spans.append((a, a + w))
                last = a + w
        out.append(file_scoring(scores, spans))
    return out


@settings(max_examples=200, deadline=None)
@given(files_st, st.sampled_from(["standard", "reward_low_FP_rate", "reward_low_FN_rate"]))
def test_the_sweep_finds_the_best_fixed_threshold(files, profile):
    fs = scored(files)
    swept = nab_score(fs, profile)
    candidates = [1.1] + sorted({s for scores, _ in files for s in scores})
    best = max(normalised(*nab_total(fs, thr, profile)) for thr in candidates)
    assert swept["score"] == best
    assert normalised(*nab_total(fs, swept["threshold"], profile)) == best


def test_a_held_out_category_is_scored_with_what_was_chosen_without_it():
    """Candidate "A" finds categories a and b early and misses c; "B" finds b and c late and
    misses a. In sample A wins. Held out, a gets B (better on b and c), b and c get A: the
    cross-validated score counts a and c as missed, b as found early."""
    from alerts.nab import Series

    def f(hit: int | None):
        scores = [0.0] * 200
        if hit is not None:
            scores[hit] = 0.9
        return file_scoring(scores, [(100, 120)])

    runs = {"A": {"a/1.csv": f(102), "b/1.csv": f(102), "c/1.csv": f(None)},
            "B": {"a/1.csv": f(None), "b/1.csv": f(118), "c/1.csv": f(118)}}
    series = [Series(n, [], [], t=[0], x=[0.0]) for n in ("a/1.csv", "b/1.csv", "c/1.csv")]
    r = cross_validate({}, series, {}, runs=runs)
    assert {c: v[0] for c, v in r["chosen"].items()} == {"a": "B", "b": "A", "c": "A"}
    assert r["in_sample"]["candidate"] == "A"
    parts = [nab_total([runs["B"]["a/1.csv"]], 0.9), nab_total([runs["A"]["b/1.csv"]], 0.9),
             nab_total([runs["A"]["c/1.csv"]], 0.9)]
    assert r["cv"]["score"] == normalised(*[sum(v) for v in zip(*parts)])
    assert r["cv"]["score"] < r["in_sample"]["score"]
    a = r["by_category"]["a"]
    assert (a["cv"], a["in_sample"], a["files"]) == (0.0, normalised(*parts[1]), 1)
    from alerts.nab_cv import subset_scores

    assert subset_scores(r, ["a", "b", "c"])["cv"] == r["cv"]["score"]
    assert subset_scores(r, ["b"]) == {"cv": normalised(*parts[1]), "in_sample": normalised(*parts[1])}
