"""Detector, minute merging and alert lifecycle."""
import random

from hypothesis import given, settings, strategies as st

from alerts.detectors import RollingGaussian
from alerts.minute_metrics import EventsPerMinuteRule
from flows.minutes import MinuteCloser, MinutePart, series_of


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


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3),
                          st.dictionaries(st.integers(0, 3), st.integers(1, 9), max_size=3)),
                max_size=30))
def test_minutes_are_complete_only_when_all_shards_closed_them(steps):
    """Shards close minutes at their own pace (each minute once, as in the flow); every minute up
    to the slowest shard's is released exactly once, in order, with every shard's events."""
    closer = MinuteCloser(3)
    closed = {0: 99, 1: 99, 2: 99}  # minutes start at 100
    sent: dict[int, int] = {}
    released = []
    for shard, advance, counts in steps:
        through = closed[shard] + advance
        parts = {}
        for offset, n in counts.items():
            minute = closed[shard] + 1 + offset
            if minute <= through:
                parts[minute] = {("web", "c", "", "page_view"): [n, 0.0, 0.0, 0, {f"u{shard}"}]}
                sent[minute] = sent.get(minute, 0) + n
        closed[shard] = through
        released += closer.add(MinutePart(shard, through, parts))
    minutes = [m.minute for m in released]
    assert minutes == sorted(set(minutes))
    if released:
        assert minutes == list(range(minutes[0], min(closed.values()) + 1))
        assert minutes[0] == min(sent)
    for m in released:
        assert series_of(m.rows)["all"] == sent.get(m.minute, 0)
        assert not m.partial
