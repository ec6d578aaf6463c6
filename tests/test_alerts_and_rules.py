"""Detector, minute merging and alert lifecycle."""
import random

from hypothesis import given, settings, strategies as st

from alerts.detectors import RollingGaussian
from alerts.minute_metrics import EventsPerMinuteRule, MinuteMetrics


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=50), st.integers(2, 20))
def test_no_breach_during_warmup_and_scores_in_unit_interval(values, warmup):
    d = RollingGaussian(k=3, window=30, warmup=warmup)
    for i, x in enumerate(values):
        s = d.score_one(x)
        assert 0.0 <= s.score <= 1.0
        if i < warmup:
            assert not s.breach
        d.learn_one(x)


def test_spike_fires_then_resolves_and_noise_stays_quiet():
    rng = random.Random(1)
    rule = EventsPerMinuteRule(lambda: RollingGaussian(k=4, window=30, warmup=10), per_channel=False)
    alerts = []
    for minute in range(120):
        value = rng.gauss(1000, 30) + (800 if 60 <= minute < 65 else 0)
        alerts += rule.judge(minute, {"all": value})
    assert [(a.status, a.minute_ms // 60000) for a in alerts] == [("firing", 60), ("resolved", 65)]
    assert alerts[0].alert_id == alerts[1].alert_id and alerts[0].z > 4


def test_direction_down_only():
    d = RollingGaussian(k=3, window=10, warmup=5, direction="down")
    for x in [10, 11, 9, 10, 10]:
        d.learn_one(x)
    assert not d.score_one(100).breach and d.score_one(-50).breach


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), st.integers(0, 9)), max_size=40))
def test_minutes_are_complete_only_when_all_shards_closed_them(reports):
    m = MinuteMetrics(3, lambda: RollingGaussian())
    closed = {}
    done = []
    totals = {}
    for shard, minute, n in reports:
        through = max(closed.get(shard, -1), minute)
        closed[shard] = through
        counts = {minute: {"all": n}}
        if minute <= through:
            totals[minute] = totals.get(minute, 0) + n
        done += m.report(shard, through, counts)
    minutes = [mi for mi, _ in done]
    assert minutes == sorted(set(minutes))  # each once, in order
    if len(closed) == 3 and done:
        assert minutes[-1] == min(closed.values())
