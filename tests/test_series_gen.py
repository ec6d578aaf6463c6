"""The labelled series generator (alerts/series_gen.py, issue 17): NAB's window rule, anomalies
after the probation and inside their windows, each kind planting what it says, seeded, and the
NAB layout read back by the evaluation's own reader."""
from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings, strategies as st

from alerts import nab
from alerts.series_gen import DAY_ROWS, KINDS, clean, generate, nab_spans, write_nab


@settings(max_examples=300, deadline=None)
@given(st.integers(50, 20_000), st.data())
def test_nab_windows_share_a_tenth_of_the_rows_centred_on_each_anomaly(n, data):
    starts = sorted(set(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=5))))
    spans = nab_spans(n, starts)
    size = int(0.10 * n / len(starts))
    assert all(a < b for a, b in spans) and all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    assert sum(b - a for a, b in spans) <= size * len(starts)
    for s in starts:  # inside a window that reaches half a window on each side (unless clipped)
        (a, b), = [(a, b) for a, b in spans if a <= s < b] if size else [(s, s + 1)]
        assert a <= max(0, s - size // 2) and b >= min(n, s - size // 2 + size)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_seeded_and_its_anomalies_are_in_windows_after_the_probation(kind):
    for seed in range(4):
        g = generate(kind, seed)
        n = len(g.series.x)
        assert g.series.x == generate(kind, seed).series.x
        assert 1 <= len(g.anomalies) <= 3
        assert all(s >= int(0.15 * n) for s in g.anomalies)
        assert all(any(a <= s < b for a, b in g.spans) for s in g.anomalies)
        assert clean(kind, seed).anomalies == ()


def _before_after(x, s, rows):
    return x[s - rows:s], x[s:s + rows]


@pytest.mark.parametrize("seed", range(5))
def test_the_simple_kinds_plant_what_they_say(seed):
    g = generate("level_shift", seed, anomalies=1)
    before, after = _before_after(g.series.x, g.anomalies[0], DAY_ROWS // 2)
    assert abs(statistics.mean(after) - statistics.mean(before)) > 3 * statistics.stdev(before)

    g = generate("variance_change", seed, anomalies=1)
    before, after = _before_after(g.series.x, g.anomalies[0], DAY_ROWS // 2)
    assert statistics.stdev(after) > 2 * statistics.stdev(before)

    g = generate("drift", seed, anomalies=1)
    s = g.anomalies[0]
    before, later = g.series.x[s - DAY_ROWS // 2:s], g.series.x[s + 260:s + 260 + DAY_ROWS // 2]
    assert abs(statistics.mean(later) - statistics.mean(before)) > 4 * statistics.stdev(before)
    assert abs(g.series.x[s + 5] - statistics.mean(before)) < 3 * statistics.stdev(before)  # slow

    g = generate("flatline", seed, anomalies=1)
    s = g.anomalies[0]
    assert len(set(g.series.x[s:s + 100])) == 1 and len(set(g.series.x[s - 100:s])) > 50

    g = generate("weekly_cycle", seed, anomalies=1)
    s = g.anomalies[0]
    week = 7 * DAY_ROWS  # the same hours a week before, or after
    other = s - week if s >= week else s + week
    n = min(DAY_ROWS // 2, len(g.series.x) - max(s, other))
    if n >= 36:
        assert statistics.mean(g.series.x[s:s + n]) < 0.6 * statistics.mean(g.series.x[other:other + n])

    g = generate("low_counts", seed)
    assert all(v >= 0 and v == int(v) for v in g.series.x)  # counts
    assert sum(v == 0 for v in g.series.x) > len(g.series.x) * 0.2  # near zero at night


def test_the_nab_layout_reads_back_with_the_evaluation_reader(tmp_path):
    made = [generate(kind, 7) for kind in KINDS]
    write_nab(tmp_path, made)
    labels = nab.read_labels(tmp_path / "labels.json")
    read = {s.name: s for s in nab.find_series(tmp_path / "data", labels)}
    assert sorted(read) == sorted(g.series.name for g in made)
    for g in made:
        s = read[g.series.name]
        assert s.t == g.series.t and s.x == g.series.x
        assert nab.window_spans(s.t, labels[g.series.name]) == [(a, b - 1) for a, b in g.spans]
