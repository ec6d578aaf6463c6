"""The minute rules: every complete minute (in minute order), each enabled minute rule judges
each of its series and the lifecycle turns breaches into alerts.

A series is judged first, then learned, so a value never judges itself; breaching values stay
out of the baseline unless the rule says ``learn_breaches`` (so an incident does not become
the new normal while it lasts). A series that goes quiet (a channel without events) is judged
as zero, so a drop to nothing is seen; a ratio without any sample is not judged.

>>> from alerts.rules import RuleCatalogue
>>> from flows.minutes import CompleteMinute
>>> rules = MinuteRules(RuleCatalogue.model_validate({"rules": [{
...     "name": "traffic", "area": "ops", "metric": "events", "by": "all", "severity": "II",
...     "response": "look", "detector": {"kind": "ew_gaussian",
...     "params": {"k": 4, "half_life": 30, "warmup": 5, "min_sigma": 5}}}]}))
>>> def minute(m, n):
...     return CompleteMinute(m, [("web", "", "", "page_view", n, 0.0, 0.0, 0, [])])
>>> out = [(a.status, a.at_ms // 60_000 - 1) for m in range(40)
...        for a in rules.judge(minute(m, 900 if m == 30 else 100 + m % 3))]
>>> out
[('firing', 30), ('resolved', 31)]

Series are bounded: at most ``max_series`` keys per split (channel, campaign, page; see
:class:`alerts.metrics.MinuteSeries`), evicting the least recently active first and a series
with an open alert only when every series has one. An evicted series' detectors go with it,
except in a rule where its alert is open: that alert is still judged every minute (as a quiet
series: zero, or no sample for a ratio) until it resolves, then forgotten when idle.
"""
from __future__ import annotations

import datetime as dt
import math
import zoneinfo

from alerts.lifecycle import Alert, Verdict
from alerts.metrics import MAX_SERIES, RATIOS, MinuteSeries
from alerts.rules import RuleCatalogue, RuleSpec

MINUTE_MS = 60_000
IDLE_MINUTES = 2 * 1440


class MinuteRules:
    def __init__(self, catalogue: RuleCatalogue, timezone: str = "UTC",
                 max_series: int = MAX_SERIES):
        self.rules: list[RuleSpec] = catalogue.minute_rules
        windows = {r.window_ms // MINUTE_MS for r in self.rules if r.metric in RATIOS}
        self.timezone = timezone
        self.series = MinuteSeries(windows, max_series=max_series)
        self.lifecycles = {r.name: r.lifecycle() for r in self.rules}
        self.factories = {r.name: r.detector.factory() for r in self.rules if r.detector is not None}
        self.detectors: dict[tuple[str, str], object] = {}
        self.last_judged: dict[tuple[str, str], int] = {}  # (rule, series) -> minute with data

    def retuned(self, catalogue: RuleCatalogue, max_series: int | None = None) -> "MinuteRules":
        """These rules with the current catalogue (after a restart): a rule whose declaration
        did not change keeps its detectors and open alerts; a changed or new one starts afresh.
        A new cap on series (None: keep the current one) applies from the next minute."""
        max_series = max_series or self.series.max_series
        fresh = MinuteRules(catalogue, self.timezone, max_series)
        before = {r.name: r for r in self.rules}
        for r in fresh.rules:
            if before.get(r.name) == r:
                fresh.lifecycles[r.name] = self.lifecycles[r.name]
                for key, det in self.detectors.items():
                    if key[0] == r.name:
                        fresh.detectors[key] = det
                        fresh.last_judged[key] = self.last_judged.get(key, 0)
        if set(fresh.series.windows) <= set(self.series.windows):
            fresh.series = self.series  # the sliding windows it needs are all there
            fresh.series.max_series = max_series
        return fresh

    def judge(self, m) -> list[Alert]:
        """One complete minute: update the series, judge every rule's series, learn."""
        self.series.day_offset_min = _offset_min(self.timezone, m.minute)
        self.series.add(m, {key for life in self.lifecycles.values() for key in life.open})
        if self.series.evicted:
            self._evicted(self.series.evicted)
        start, end = m.minute * MINUTE_MS, (m.minute + 1) * MINUTE_MS
        alerts: list[Alert] = []
        for rule in self.rules:
            life = self.lifecycles[rule.name]
            values = self.series.series(rule.metric, rule.by, rule.window_ms // MINUTE_MS)
            for key in sorted(values.keys() | life.open.keys()):
                if key in values:
                    self.last_judged[rule.name, key] = m.minute
                value, n = values.get(key, (0.0, 0.0 if rule.metric in RATIOS else None))
                verdict, learn = self._verdict(rule, key, value, n, start)
                alerts += life.step(key, end, start, verdict)
                if learn is not None and self._learns(rule, key, verdict.breach, end):
                    learn.learn_one(value, t=start, n=n)
            if m.minute % 60 == 0:
                life.expire_quiet(end)
        if m.minute % 60 == 0:
            self._forget_idle(m.minute)
        return alerts

    def _evicted(self, keys: list[str]) -> None:
        """Series evicted from the sums: their detectors go, unless their alert is open."""
        by_split: dict[str, list[str]] = {}
        for rule in self.rules:
            by_split.setdefault(rule.by, []).append(rule.name)
        for key in keys:
            for name in by_split.get(key.split("=", 1)[0], ()):
                if key not in self.lifecycles[name].open:
                    self.detectors.pop((name, key), None)
                    self.last_judged.pop((name, key), None)

    def _forget_idle(self, minute: int) -> None:
        """Series without data for IDLE_MINUTES (a campaign that ended, a page gone): their
        detectors are dropped, so state does not grow with every key ever seen."""
        for key in [k for k, last in self.last_judged.items() if minute - last > IDLE_MINUTES]:
            if key[1] not in self.lifecycles[key[0]].open:
                del self.last_judged[key]
                self.detectors.pop(key, None)
        self.series.forget_idle(minute - IDLE_MINUTES)

    def _learns(self, rule: RuleSpec, key: str, breach: bool, now: int) -> bool:
        if not breach or rule.learn_breaches:
            return True
        since = self.lifecycles[rule.name].firing_since(key)
        adapt = rule.adapt_after_ms
        return adapt > 0 and since is not None and now - since >= adapt

    def _verdict(self, rule: RuleSpec, key: str, value: float, n: float | None, t: int):
        if rule.threshold is not None:
            return rule.threshold.verdict(value, n), None
        det = self.detectors.get((rule.name, key))
        if det is None:
            det = self.detectors[rule.name, key] = self.factories[rule.name]()
        if n is not None and n <= 0:  # a ratio without samples: nothing to judge or learn
            return Verdict(value, math.nan, math.nan, det.k, math.nan, False, 0.0, n), None
        s = det.score_one(value, t=t, n=n)
        return Verdict(value, s.mu, s.sigma, s.k, s.z, s.breach, s.score, n,
                       baseline=s.baseline), det


def _offset_min(timezone: str, minute: int) -> int:
    """Minutes the reporting time zone is ahead of UTC at that minute (days start at local
    midnight for DAU pace).

    >>> _offset_min("Asia/Shanghai", 0), _offset_min("UTC", 0)
    (480, 0)
    """
    if timezone == "UTC":
        return 0
    when = dt.datetime.fromtimestamp(minute * 60, dt.timezone.utc)
    offset = when.astimezone(zoneinfo.ZoneInfo(timezone)).utcoffset()
    return int(offset.total_seconds() // 60) if offset else 0
