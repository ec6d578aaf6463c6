"""Per-minute metric series merged from the shards, judged by dynamic-threshold detectors.

Each shard reports, as its watermark passes, the minutes it has closed and its counts per series
(``all``, ``channel=<name>``). A minute is complete once every shard has closed it; missing
counts are zeros. Complete minutes are judged in order, so the alerts do not depend on how
shards are spread over workers.

>>> m = MinuteMetrics(shards=2, detector=lambda: RollingGaussian(k=3, window=10, warmup=3))
>>> m.report(0, 10, {10: {"all": 5}})
[]
>>> [minute for minute, _ in m.report(1, 10, {10: {"all": 7}})]
[10]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from alerts.detectors import RollingGaussian, Score
from features.profile import MINUTE_MS


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str
    rule: str
    series: str
    status: str  # "firing" or "resolved"
    minute_ms: int
    value: float
    mu: float
    sigma: float
    k: float
    z: float
    window: int
    severity: str
    first_seen_ms: int
    response: str

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class MinuteMetrics:
    """Merges shard reports into complete minutes: ``[(minute, {series: total})]``."""

    def __init__(self, shards: int, detector: Callable[[], RollingGaussian]):
        self.shards = shards
        self.new_detector = detector
        self.closed: dict[int, int] = {}
        self.pending: dict[int, dict[str, int]] = {}
        self.done_through: int | None = None
        self.known_series: set[str] = {"all"}

    def report(self, shard: int, closed_through: int, counts: dict[int, dict[str, int]]):
        for minute, series in counts.items():
            into = self.pending.setdefault(minute, {})
            for name, n in series.items():
                into[name] = into.get(name, 0) + n
                self.known_series.add(name)
        self.closed[shard] = max(closed_through, self.closed.get(shard, closed_through))
        if len(self.closed) < self.shards:
            return []
        complete = min(self.closed.values())
        if self.done_through is None:
            if not self.pending:
                return []
            self.done_through = min(self.pending) - 1
        ready = []
        for minute in range(self.done_through + 1, complete + 1):
            series = self.pending.pop(minute, {})
            ready.append((minute, {name: series.get(name, 0) for name in sorted(self.known_series)}))
        self.done_through = max(self.done_through, complete)
        return ready


class EventsPerMinuteRule:
    """Events per minute (overall and per channel) outside mu +/- k*sigma of recent minutes."""

    name = "events_per_minute"
    severity = "II"
    response = "check ingest and campaign traffic sources; look for bots or an outage"

    def __init__(self, detector: Callable[[], RollingGaussian], per_channel: bool = True):
        self.new_detector = detector
        self.per_channel = per_channel
        self.detectors: dict[str, RollingGaussian] = {}
        self.firing: dict[str, Alert] = {}

    def judge(self, minute: int, series: dict[str, int]) -> list[Alert]:
        alerts = []
        for name, value in series.items():
            if name != "all" and not self.per_channel:
                continue
            det = self.detectors.get(name)
            if det is None:
                det = self.detectors[name] = self.new_detector()
            score = det.score_one(value)
            alert = self._lifecycle(name, minute, score, det)
            if alert is not None:
                alerts.append(alert)
            if not score.breach:
                det.learn_one(value)  # breaches stay out of the baseline
        return alerts

    def _lifecycle(self, name: str, minute: int, s: Score, det: RollingGaussian) -> Alert | None:
        current = self.firing.get(name)
        if s.breach and current is None:
            first = minute * MINUTE_MS
            alert = Alert(f"{self.name}|{name}|{first}", self.name, name, "firing", first, s.value,
                          s.mu, s.sigma, det.k, s.z, det.window, self.severity, first, self.response)
            self.firing[name] = alert
            return alert
        if not s.breach and current is not None:
            del self.firing[name]
            return Alert(current.alert_id, self.name, name, "resolved", minute * MINUTE_MS, s.value,
                         s.mu, s.sigma, det.k, s.z, det.window, self.severity, current.first_seen_ms,
                         self.response)
        return None
