"""Exact sliding-window sums in event time, at minute granularity, without storing every event.

A user's activity is kept as sparse minute buckets (only minutes with events exist), each holding
one value per metric. The window ``w`` minutes "as of" time T covers the minute of T and the
``w - 1`` minutes before it. Buckets older than the longest window are dropped.

>>> b = MinuteBuckets(n_metrics=2)
>>> b.add(minute_of(0), 0, 1.0); b.add(minute_of(59 * 60_000), 0, 1.0); b.add(minute_of(0), 1, 9.5)
>>> b.total(0, window_min=60, as_of_minute=59), b.total(0, window_min=60, as_of_minute=60)
(2.0, 1.0)
>>> b.next_expiry([60], as_of_minute=59)   # the minute-0 bucket leaves the 1h window at minute 60
60
"""
from __future__ import annotations

MINUTE_MS = 60_000


def minute_of(ts_ms: int) -> int:
    """Minute index (minutes since the epoch) of an epoch-ms timestamp."""
    return ts_ms // MINUTE_MS


class MinuteBuckets:
    """Sparse per-minute metric vectors for one user."""

    __slots__ = ("n_metrics", "buckets")

    def __init__(self, n_metrics: int):
        self.n_metrics = n_metrics
        self.buckets: dict[int, list[float]] = {}

    def add(self, minute: int, metric: int, value: float) -> None:
        bucket = self.buckets.get(minute)
        if bucket is None:
            bucket = self.buckets[minute] = [0.0] * self.n_metrics
        bucket[metric] += value

    def total(self, metric: int, window_min: int, as_of_minute: int) -> float:
        low = as_of_minute - window_min
        return sum(v[metric] for m, v in self.buckets.items() if low < m <= as_of_minute)

    def window_totals(self, windows_min: list[int], as_of_minute: int) -> list[float]:
        """All metrics over all windows in one pass: [w0 m0, w0 m1, ..., w1 m0, ...].

        >>> b = MinuteBuckets(2); b.add(10, 0, 1.0); b.add(50, 1, 2.0)
        >>> b.window_totals([30, 60], as_of_minute=60)
        [0.0, 2.0, 1.0, 2.0]
        """
        n = self.n_metrics
        out = [0.0] * (n * len(windows_min))
        lows = [(i * n, as_of_minute - w) for i, w in enumerate(windows_min)]
        for m, v in self.buckets.items():
            if m > as_of_minute:
                continue
            for base, low in lows:
                if m > low:
                    for i in range(n):
                        out[base + i] += v[i]
        return out

    def next_expiry(self, windows_min: list[int], as_of_minute: int) -> int | None:
        """The first minute after ``as_of_minute`` at which some bucket leaves some window."""
        best = None
        for m in self.buckets:
            for w in windows_min:
                leave = m + w
                if leave > as_of_minute and (best is None or leave < best):
                    best = leave
        return best

    def prune(self, longest_window_min: int, as_of_minute: int) -> None:
        """Drop buckets outside every window."""
        low = as_of_minute - longest_window_min
        for m in [m for m in self.buckets if m <= low]:
            del self.buckets[m]

    def __len__(self) -> int:
        return len(self.buckets)
