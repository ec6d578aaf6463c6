"""Entity rules: counts per IP, IP cluster or user over a sliding event-time window, judged on
every event, so an abuse burst alerts at the event that crosses the threshold (seconds into it),
not when a minute closes.

Each rule (a static threshold on an :data:`alerts.metrics.ENTITY_METRICS` metric) keeps, per
entity, its counts in buckets of one sixtieth of the window (the whole window when it is a minute
or less: "per second" counts each second). :meth:`EntityRules.tick` moves "now" to the stream's
watermark: it resolves alerts whose window has emptied and forgets idle entities.

>>> from alerts.rules import load_rules
>>> rules = EntityRules(load_rules().entity_rules)
>>> alerts = []
>>> for i in range(120):  # 120 page views within one second from one IP
...     alerts += rules.observe(Signal(1_000_000 + i * 8, "page", "anon-1", "198.51.100.23", "NL"))
>>> [(a.rule, a.series, a.status, a.value, a.detail) for a in alerts]
[('ip_request_flood', 'ip=198.51.100.23', 'firing', 101.0, '198.51.100.23')]
>>> [(a.status, a.value) for a in rules.tick(1_000_000 + 20_000)]
[('resolved', 0.0)]
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from alerts.lifecycle import Alert, Lifecycle
from alerts.metrics import ENTITY_METRICS, ip_cluster
from alerts.rules import RuleSpec


BY_IP, BY_USER = 1, 2  # Signal.scope bits: which entities' rules judge the signal


class Signal(NamedTuple):
    """What the entity rules need of one event."""

    ts_ms: int
    name: str
    user: str
    ip: str
    country: str
    scope: int = BY_IP | BY_USER


class _Counts:
    """Event counts of one entity in time buckets (start, count), oldest first."""

    __slots__ = ("starts", "counts")

    def __init__(self):
        self.starts: list[int] = []
        self.counts: list[int] = []

    def add(self, bucket: int) -> None:
        if self.starts and self.starts[-1] == bucket:
            self.counts[-1] += 1
            return
        i = len(self.starts)
        while i and self.starts[i - 1] > bucket:  # out of order: rare, and a few buckets back
            i -= 1
        if i and self.starts[i - 1] == bucket:
            self.counts[i - 1] += 1
        else:
            self.starts.insert(i, bucket)
            self.counts.insert(i, 1)

    def total(self, since: int, until: int) -> int:
        """Events in buckets starting in (since, until]."""
        return sum(c for s, c in zip(self.starts, self.counts) if since < s <= until)

    def prune(self, before: int) -> None:
        """Forget buckets starting at or before ``before`` (only the watermark may say so: an
        event of an earlier second can still arrive from a slower source partition)."""
        drop = 0
        while drop < len(self.starts) and self.starts[drop] <= before:
            drop += 1
        if drop:
            del self.starts[:drop], self.counts[:drop]

    def last(self) -> int:
        return self.starts[-1] if self.starts else -1


class _Distinct:
    """Distinct values (e.g. countries) of one entity, each with the last time it was seen."""

    __slots__ = ("seen",)

    def __init__(self):
        self.seen: dict[str, int] = {}

    def add(self, value: str, ts: int) -> None:
        if ts > self.seen.get(value, -1):
            self.seen[value] = ts

    def total(self, since: int, until: int) -> int:
        return sum(1 for t in self.seen.values() if since < t <= until)

    def prune(self, before: int) -> None:
        for v in [v for v, t in self.seen.items() if t <= before]:
            del self.seen[v]

    def last(self) -> int:
        return max(self.seen.values(), default=-1)


class _Rule:
    __slots__ = ("spec", "metric", "window", "bucket", "limit", "life", "entities", "breached")

    def __init__(self, spec: RuleSpec):
        self.spec = spec
        self.metric = ENTITY_METRICS[spec.metric]
        self.window = spec.window_ms
        self.bucket = self.window if self.window <= 60_000 else max(self.window // 60, 1000)
        self.limit = spec.threshold
        self.life: Lifecycle = spec.lifecycle()
        self.entities: dict[str, _Counts | _Distinct] = {}
        self.breached: dict[str, int] = {}  # series -> event time of its last breaching event


class EntityRules:
    def __init__(self, rules: list[RuleSpec]):
        self.rules = [_Rule(r) for r in rules]
        self.by_event: dict[str, list[_Rule]] = {}
        self.every_event: list[_Rule] = []
        for r in self.rules:
            if r.metric.events is None:
                self.every_event.append(r)
            else:
                for name in r.metric.events:
                    self.by_event.setdefault(name, []).append(r)
        self.watermark = -1
        self.pruned_minute = -1  # idle entities are forgotten once per minute of watermark

    @property
    def event_names(self) -> frozenset[str] | None:
        """The event names any rule counts (None: every event counts)."""
        return None if self.every_event else frozenset(self.by_event)

    def observe(self, s: Signal) -> list[Alert]:
        alerts: list[Alert] = []
        for r in (*self.every_event, *self.by_event.get(s.name, ())):
            kind = r.metric.entity
            if not s.scope & (BY_USER if kind == "user" else BY_IP):
                continue
            if kind == "user":
                entity = s.user
            elif kind == "ip":
                entity = s.ip
            else:
                entity = ip_cluster(s.ip) if s.ip else ""
            if not entity:
                continue
            state = r.entities.get(entity)
            if r.metric.distinct is not None:
                value = getattr(s, r.metric.distinct)
                if not value:
                    continue
                if state is None:
                    state = r.entities[entity] = _Distinct()
                state.add(value, s.ts_ms)
            else:
                if state is None:
                    state = r.entities[entity] = _Counts()
                state.add(s.ts_ms - s.ts_ms % r.bucket)
            count = state.total(s.ts_ms - r.window, s.ts_ms)
            verdict = r.limit.verdict(float(count), None)
            if verdict.breach:
                series = f"{kind}={entity}"
                r.breached[series] = max(r.breached.get(series, s.ts_ms), s.ts_ms)
                detail = s.ip if kind != "user" else s.user
                alerts += r.life.step(series, s.ts_ms, s.ts_ms, replace(verdict, detail=detail))
        return alerts

    def tick(self, watermark: int) -> list[Alert]:
        """"Now" is the watermark: resolve alerts whose window has no breach any more (only once
        the watermark is past the last breaching event, since events before it may still come),
        and forget entities idle for a whole window."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        alerts: list[Alert] = []
        for r in self.rules:
            for series in sorted(r.life.open):
                if watermark < r.breached.get(series, watermark) + r.window:
                    continue
                entity = series.split("=", 1)[1]
                state = r.entities.get(entity)
                count = state.total(watermark - r.window, watermark) if state is not None else 0
                verdict = r.limit.verdict(float(count), None)
                if not verdict.breach:
                    r.breached.pop(series, None)
                alerts += r.life.step(series, watermark, watermark, verdict)
            if watermark // 60_000 == self.pruned_minute:
                continue
            horizon = watermark - r.window - r.bucket
            idle = []
            for e, st in r.entities.items():
                st.prune(horizon)
                if st.last() <= horizon and f"{r.metric.entity}={e}" not in r.life.open:
                    idle.append(e)
            for e in idle:
                del r.entities[e]
            r.life.expire_quiet(watermark)
        self.pruned_minute = watermark // 60_000
        return alerts

