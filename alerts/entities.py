"""Entity rules: counts per IP, IP cluster or user over an event-time window, judged on every
event, so an abuse burst alerts at the event that crosses the threshold (seconds into it), not
when a minute closes.

Each rule (a static threshold on an :data:`alerts.metrics.ENTITY_METRICS` metric) keeps, per
entity, its counts in buckets of one sixtieth of the window; a window of a minute or less is one
bucket, so "1s" counts each calendar second. An event judges every window that holds it (events
of two source partitions arrive interleaved, an earlier one after a later one), so the order of
arrival does not decide whether a burst is seen. :meth:`EntityRules.tick` moves "now" to the
stream's watermark: an alert resolves at the event time its window emptied (the last breach plus
the window, plus ``resolve_after``), which does not depend on how the input was batched; idle
entities are forgotten.

>>> from alerts.rules import load_rules
>>> rules = EntityRules(load_rules().entity_rules)
>>> alerts = []
>>> for i in range(120):  # 120 page views within one second from one IP
...     alerts += rules.observe(Signal(1_000_000 + i * 8, "page", "anon-1", "198.51.100.23", "NL"))
>>> [(a.rule, a.series, a.status, a.value, a.detail) for a in alerts]
[('ip_request_flood', 'ip=198.51.100.23', 'firing', 101.0, '198.51.100.23')]
>>> [(a.status, a.value, a.at_ms) for a in rules.tick(1_000_000 + 20_000)]
[('resolved', 0.0, 1001000)]
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
    ip: str  # canonical (alerts.metrics.normal_ip), "" when absent or not an IP
    country: str
    scope: int = BY_IP | BY_USER
    event_id: str = ""  # duplicates (a producer's retries) count once


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

    def peak(self, bucket: int, window: int) -> tuple[int, int]:
        """The largest count of a window holding ``bucket`` (windows end at a bucket at or after
        it, less than a window later) and where that window ends."""
        if window <= 60_000:  # one bucket per window: its own count
            i = len(self.starts) - 1
            while self.starts[i] != bucket:
                i -= 1
            return self.counts[i], bucket
        best, at = 0, bucket
        for end in self.starts:
            if bucket <= end < bucket + window:
                n = self.total(end - window, end)
                if n > best:
                    best, at = n, end
        return best, at

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
    """Distinct values (e.g. countries) of one entity, each with the times it was seen."""

    __slots__ = ("seen",)

    def __init__(self):
        self.seen: dict[str, list[int]] = {}

    def add(self, value: str, ts: int) -> None:
        self.seen.setdefault(value, []).append(ts)

    def total(self, since: int, until: int) -> int:
        return sum(1 for times in self.seen.values() if any(since < t <= until for t in times))

    def peak(self, ts: int, window: int) -> tuple[int, int]:
        best, at = 0, ts
        for end in sorted({t for times in self.seen.values() for t in times if ts <= t < ts + window}):
            n = self.total(end - window, end)
            if n > best:
                best, at = n, end
        return best, at

    def prune(self, before: int) -> None:
        for v in list(self.seen):
            times = [t for t in self.seen[v] if t > before]
            if times:
                self.seen[v] = times
            else:
                del self.seen[v]

    def last(self) -> int:
        return max((max(t) for t in self.seen.values()), default=-1)


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
        self.breached: dict[str, int] = {}  # open series -> end of its latest breaching window


class EntityRules:
    def __init__(self, rules: list[RuleSpec]):
        self.rules = [_Rule(r) for r in rules]
        self.by_event: dict[str, list[_Rule]] = {}
        self.every_event: list[_Rule] = []
        self._index()
        self.watermark = -1
        self.pruned_minute = -1  # idle entities are forgotten once per minute of watermark

    def retuned(self, rules: list[RuleSpec]) -> "EntityRules":
        """These rules, keeping the state of every rule whose declaration did not change (after
        a restart with an edited catalogue); a changed or new rule starts afresh."""
        old = {r.spec.name: r for r in self.rules}
        fresh = EntityRules(rules)
        fresh.rules = [old[r.spec.name] if r.spec.name in old and old[r.spec.name].spec == r.spec
                       else r for r in fresh.rules]
        fresh._index()
        fresh.watermark, fresh.pruned_minute = self.watermark, self.pruned_minute
        return fresh

    def _index(self) -> None:
        self.by_event, self.every_event = {}, []
        for r in self.rules:
            if r.metric.events is None:
                self.every_event.append(r)
            else:
                for name in r.metric.events:
                    self.by_event.setdefault(name, []).append(r)

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
                count, end = state.peak(s.ts_ms, r.window)
            else:
                if state is None:
                    state = r.entities[entity] = _Counts()
                bucket = s.ts_ms - s.ts_ms % r.bucket
                state.add(bucket)
                count, end = state.peak(bucket, r.window)
            verdict = r.limit.verdict(float(count), None)
            if verdict.breach:
                series = f"{kind}={entity}"
                r.breached[series] = max(r.breached.get(series, end), end)
                detail = s.user if kind == "user" else s.ip
                alerts += r.life.step(series, s.ts_ms, s.ts_ms, replace(verdict, detail=detail))
        return alerts

    def tick(self, watermark: int) -> list[Alert]:
        """"Now" is the watermark. An open alert resolves once its latest breaching window has
        ended (plus ``resolve_after``) and the watermark is past that, at that event time; idle
        entities are forgotten once per minute."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        alerts: list[Alert] = []
        for r in self.rules:
            for series in sorted(r.life.open):
                last = r.breached.get(series)
                if last is None:
                    continue
                emptied = last + r.window  # the first window without the last breach
                if watermark < emptied + r.life.resolve_ms:
                    continue
                entity = series.split("=", 1)[1]
                state = r.entities.get(entity)
                count = state.total(emptied - r.window, emptied) if state is not None else 0
                verdict = r.limit.verdict(float(count), None)
                if verdict.breach:  # breaches by the bucket: look again one bucket later
                    r.breached[series] = last + r.bucket
                    continue
                out = r.life.step(series, emptied + r.life.resolve_ms, emptied, verdict)
                if out:
                    del r.breached[series]
                alerts += out
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
