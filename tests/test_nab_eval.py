"""NAB evaluation: the results layout and columns the CLI writes, labels, the summary figures
on a hand-made case, and the in-project NAB scorer against hand-computed values and a brute
force sweep. Generated data only (no dependency on a shared NAB copy)."""
import csv
import datetime as dt
import json
import math
import random

from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

from alerts import nab
from alerts.detectors import RobustGaussian
from surgeflow.cli import app

START = dt.datetime(2020, 1, 1)
STEP = dt.timedelta(minutes=5)


def stamp(i):
    return (START + i * STEP).strftime("%Y-%m-%d %H:%M:%S")


def write_corpus(root, files):
    """files: {"cat/name.csv": (values, [(first_row, last_row), ...])} -> data dir, labels path."""
    data = root / "data"
    labels = {}
    for name, (values, windows) in files.items():
        path = data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["timestamp", "value"])
            for i, v in enumerate(values):
                w.writerow([stamp(i), v])
        labels[name] = [[stamp(a) + ".000000", stamp(b) + ".000000"] for a, b in windows]
    (root / "labels.json").write_text(json.dumps(labels))
    return data, root / "labels.json"


def wavy(n, seed):
    rng = random.Random(seed)
    return [round(10 + (i % 5) * 0.1 + rng.gauss(0, 0.05), 4) for i in range(n)]


def test_cli_writes_nab_layout_labels_and_scores(tmp_path):
    a = wavy(600, 1)
    a[400] = 50.0
    b = wavy(500, 2)
    data, labels = write_corpus(tmp_path, {"synthA/one.csv": (a, [(380, 420)]),
                                           "synthB/two.csv": (b, [(300, 310), (450, 460)])})
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["nab-eval", "--data", str(data), "--labels", str(labels),
                                   "--out", str(out), "--detector", "windowed_gaussian,surgeflow",
                                   "--detector", "robust_gaussian", "--synthetic-seeds", "0"])
    assert res.exit_code == 0, res.output
    for det in ("windowed_gaussian", "surgeflow", "robust_gaussian"):
        for name, n, windows in (("synthA/one.csv", 600, [(380, 420)]),
                                 ("synthB/two.csv", 500, [(300, 310), (450, 460)])):
            cat, file = name.split("/")
            path = out / det / cat / f"{det}_{file}"
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            assert rows[0] == ["timestamp", "value", "anomaly_score", "label"]
            assert len(rows) == n + 1
            assert [r[0] for r in rows[1:4]] == [stamp(0), stamp(1), stamp(2)]
            expected = [int(any(lo <= i <= hi for lo, hi in windows)) for i in range(n)]
            assert [int(r[3]) for r in rows[1:]] == expected
            assert all(0.0 <= float(r[2]) <= 1.0 for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["detectors"]) == {"windowed_gaussian", "surgeflow", "robust_gaussian"}
    assert "ALL" in res.output and "surgeflow" in res.output
    assert summary["detectors"]["surgeflow"]["per_file"]["synthA/one.csv"]["recall"] == 1.0
    # the defaults cross-validated, leaving each category out (here: the two given ones)
    cv = summary["cross_validation"]
    assert set(cv["grid"]["by_category"]) == {"synthA", "synthB"} and cv["given"] == 2
    assert "cross-validated" in res.output
    assert all(isinstance(cv[w][k], float) for w in ("grid", "defaults") for k in ("cv", "in_sample"))


def test_cli_rejects_unknown_detector(tmp_path):
    data, labels = write_corpus(tmp_path, {"c/x.csv": (wavy(50, 3), [])})
    res = CliRunner().invoke(app, ["nab-eval", "--data", str(data), "--labels", str(labels),
                                   "--out", str(tmp_path / "o"), "--detector", "nope"])
    assert res.exit_code == 2


def test_summary_figures_on_a_hand_made_case(tmp_path):
    # 1,000 rows: probation 150. A spike at row 600 inside the window 550..650 (delay 50 rows,
    # 250 minutes), one at row 800 outside it (one false alarm), one at row 100 in probation.
    values = wavy(1000, 4)
    for i in (100, 600, 800):
        values[i] = 40.0
    data, labels = write_corpus(tmp_path, {"c/x.csv": (values, [(550, 650)])})
    lab = nab.read_labels(labels)
    series = nab.find_series(data, lab)
    r = nab.evaluate_detector("robust", series, lab,
                              factory=lambda: RobustGaussian(k=6, window=100, warmup=20))
    assert r["windows"] == 1 and r["found"] == 1 and r["recall"] == 1.0
    assert r["false_alarms"] == 1
    assert r["false_alarms_per_1000"] == round(1000 / 850, 3)
    assert r["delay_rows_mean"] == 50 and r["delay_rows_median"] == 50
    assert r["delay_hours_mean"] == round(250 / 60, 2)


def test_a_run_of_breaches_is_one_alarm():
    s = nab.Series("c/x.csv", [stamp(i) for i in range(200)], ["0"] * 200)
    breaches = [False] * 200
    for i in list(range(100, 110)) + [120, 121, 150]:
        breaches[i] = True
    f = nab.breach_figures(s, breaches, [(140, 160)])
    assert f["false_alarms"] == 2 and f["found"] == 1 and f["delays_rows"] == [10]


def sig(y):
    return 2 / (1 + math.exp(5 * y)) - 1


def test_nab_scorer_hand_computed():
    # 20 rows: probation floor(0.15 * 20) = 3. Window rows 10..14. Row 12 detects (y = -3/5),
    # row 17 is a false positive 3 rows after a 5-row window (y = 3/4), row 5 one before any
    # window (full cost), row 1 is in probation (ignored).
    scores = [0.0] * 20
    scores[1], scores[5], scores[12], scores[17] = 0.95, 0.7, 0.9, 0.8
    f = nab.file_scoring(scores, [(10, 14)])
    tp = sig(-0.6) / sig(-1.0)
    fp17 = 0.11 * sig(0.75)
    assert math.isclose(tp, math.tanh(1.5) / math.tanh(2.5))
    # thresholds: 0.9 -> -1 + 1 + tp; 0.8 adds fp17; 0.7 adds -0.11: best is 0.9
    r = nab.nab_score([f], "standard")
    assert r["threshold"] == 0.9 and math.isclose(r["raw"], round(tp, 4), abs_tol=1e-4)
    assert r["score"] == round(100 * (tp + 1) / 2, 2)
    low_fn = nab.nab_score([f], "reward_low_FN_rate")
    assert low_fn["score"] == round(100 * (tp + 2) / 3, 2)
    # an earlier, weaker detection pays once the false positives are cheaper than the gain
    scores[11] = 0.5
    scores[5] = scores[17] = 0.2
    r = nab.nab_score([nab.file_scoring(scores, [(10, 14)])], "standard")
    assert r["threshold"] == 0.5
    assert math.isclose(r["raw"], round(sig(-0.8) / sig(-1.0), 4), abs_tol=1e-4)


def brute_force(files, profile):
    """Every threshold tried directly: the definition, not the sweep."""
    a_tp, a_fp, a_fn = nab.PROFILES[profile]
    best = None
    candidates = {s for scores, _ in files for s in scores} | {2.0}
    for thr in candidates:
        total = 0.0
        for scores, spans in files:
            n = len(scores)
            start = nab.probation(n)
            label = nab.labels_of(n, spans)
            for a, b in spans:
                if b < start:
                    continue
                hits = [i for i in range(max(a, start), b + 1) if scores[i] >= thr]
                total += (a_tp * sig(-(b - hits[0] + 1) / (b - a + 1)) / sig(-1.0)) if hits else -a_fn
            for i in range(start, n):
                if scores[i] >= thr and not label[i]:
                    prev = [w for w in spans if w[1] < i]
                    if not prev:
                        total -= a_fp
                    else:
                        a, b = prev[-1]
                        y = (i - b) / max(b - a, 1)
                        total += a_fp * (-1.0 if y > 3 else sig(y))
        best = total if best is None else max(best, total)
    return best


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(20, 60), st.integers(0, 10**6)), min_size=1, max_size=3),
       st.sampled_from(list(nab.PROFILES)))
def test_nab_sweep_matches_brute_force(shapes, profile):
    files = []
    for n, seed in shapes:
        rng = random.Random(seed)
        scores = [rng.choice([0.0, 0.1, 0.5, 0.9, rng.random()]) for _ in range(n)]
        a = rng.randrange(0, n - 5)
        spans = [(a, a + rng.randrange(1, 5))]
        if a + 12 < n:
            spans.append((a + 9, min(n - 1, a + 12)))
        files.append((scores, spans))
    got = nab.nab_score([nab.file_scoring(s, w) for s, w in files], profile)
    assert math.isclose(got["raw"], brute_force(files, profile), abs_tol=1e-3)
