"""The events-per-minute rule: complete minutes (flows/minutes.py) judged per series by
dynamic-threshold detectors, with the alert lifecycle (firing, then resolved).

>>> rule = EventsPerMinuteRule(lambda: RollingGaussian(k=3, window=10, warmup=3), per_channel=False)
>>> [a.status for m, v in enumerate([10, 11, 9, 10, 10, 90, 10]) for a in rule.judge(m, {"all": v})]
['firing', 'resolved']
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
