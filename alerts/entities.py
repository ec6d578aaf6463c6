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

Bounded state. Each rule keeps at most ``max_entity_keys`` entities (per shard). Beyond, the
entity seen least recently in event time is evicted (ties: the smallest key), whether or not it
has an open alert, so which entities are kept depends on the events alone, not on when the
watermark moved; each eviction counts ``evictions{entity_key}``. An open alert is not lost with
its entity: the windows after its last breach are judged at the eviction from what the state
holds (as an idle entity's are when it is forgotten), so it resolves at the event time, and
with the value, it would have had; only the entity's events after the eviction count from zero
(for it, windows holding events from both sides of the eviction see only the later ones). Per
event the cost is O(log n) in the entity's own state (its buckets, or its distinct values).

>>> from alerts.rules import load_rules
>>> rules = EntityRules(load_rules().entity_rules)
>>> alerts = []
>>> for i in range(120):  # 120 page views within one second from one IP
...     alerts += rules.observe(Signal(1_000_000 + i * 8, "page", "anon-1", "198.51.100.23", "NL"))
>>> [(a.rule, a.series[:16], a.status, a.value, a.detail == a.series[3:]) for a in alerts]
[('ip_request_flood', 'ip=198.51.100.0#', 'firing', 101.0, True)]
>>> [(a.status, a.value, a.at_ms) for a in rules.tick(1_000_000 + 20_000)]
[('resolved', 0.0, 1001000)]
"""
from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from dataclasses import replace
from typing import NamedTuple

from alerts.lifecycle import Alert, Lifecycle
from alerts.metrics import ENTITY_METRICS, ip_cluster
from alerts.rules import RuleSpec
from flows.eviction import OldestFirst
from privacy.pii import mask_ip
from privacy.subjects import pii_key, subject_hash
from surgeflow.stats import STATS

BY_IP, BY_USER = 1, 2  # Signal.scope bits: which entities' rules judge the signal
MAX_ENTITY_KEYS = 200_000  # default cap per rule and shard (config: limits.max_entity_keys)
_NEVER = -(2**62)


class Signal(NamedTuple):
    """What the entity rules need of one event."""

    ts_ms: int
    name: str
    user: str
    ip: str  # canonical (alerts.metrics.normal_ip), "" when absent or not an IP
    country: str
    scope: int = BY_IP | BY_USER
    event_id: str = ""  # duplicates (a producer's retries) count once


# -- what the alert messages say of an entity ------------------------------------------------------

_KEY: list[bytes | None] = []  # the PII key, read once per process (reset_key for tests)


def reset_key() -> None:
    _KEY.clear()


def public_entity(kind: str, entity: str, key: bytes | None = None) -> str:
    """An entity as alert messages name it: a user's subject hash, an IP's masked form with 8
    hex of its subject hash; an IP cluster (a /24 or /48) as it is. ``key`` defaults to the PII
    key of the environment, read once.

    >>> public_entity("ip", "203.0.113.77", b"k"), public_entity("ip", "203.0.113.78", b"k")
    ('203.0.113.0#b84d0efc', '203.0.113.0#4467780a')
    >>> public_entity("user", "u1", b"k") == subject_hash("u1", b"k")
    True
    """
    if key is None:
        if not _KEY:
            _KEY.append(pii_key())
        key = _KEY[0]
    if kind == "user":
        return subject_hash(entity, key)
    if kind == "ip":
        return f"{mask_ip(entity) or '?'}#{subject_hash(entity, key)[2:10]}"
    return entity


def _published(alerts: list[Alert]) -> list[Alert]:
    """The messages of a rule as they leave: series, alert_id and detail pseudonymised. The
    lifecycle keeps the internal series (its state); the public one is a function of it."""
    out = []
    for a in alerts:
        kind, _, entity = a.series.partition("=")
        series = f"{kind}={public_entity(kind, entity)}"
        detail = public_entity("user" if kind == "user" else "ip", a.detail) if a.detail else ""
        out.append(replace(a, series=series, alert_id=f"{a.rule}|{series}|{a.first_seen_ms}",
                           detail=detail))
    return out


# -- an ordered map of time -> delta, answering window counts in O(log n) ------------------------
#
# A window (e - W, e] of an entity holds a count D(e). Every event (or distinct value) covers the
# window ends [t, t + W): as a step function D is the running sum of +1 at t and -1 at t + W. A
# treap keyed by time holds those deltas, each node with its subtree's sum, its best (largest)
# running sum and where that is first reached, so D(e) is one descent and the largest D over the
# ends [a, b) (every window holding the event at a) is three. Priorities are a fixed hash of the
# key: the tree's shape depends only on what it holds, not on the order it came in.

_MASK = (1 << 64) - 1


def _priority(key: int) -> int:
    z = (key + 0x9E3779B97F4A7C15) & _MASK  # splitmix64: a bijection, so no two keys tie
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class _Node:
    __slots__ = ("key", "pri", "left", "right", "delta", "sum", "best", "arg")

    def __init__(self, key: int, delta: int):
        self.key, self.pri = key, _priority(key)
        self.left = self.right = None
        self.delta = self.sum = self.best = delta
        self.arg = key

    def __getstate__(self):  # compact: the aggregates are recomputed on load
        return (self.key, self.pri, self.left, self.right, self.delta)

    def __setstate__(self, state) -> None:
        self.key, self.pri, self.left, self.right, self.delta = state
        _pull(self)


def _pull(t: _Node) -> None:
    """Recompute a node's aggregates from its children (leftmost best on ties)."""
    left, right = t.left, t.right
    if left is None:
        s = best = t.delta
        arg = t.key
    else:
        s = left.sum + t.delta
        best, arg = left.best, left.arg
        if s > best:
            best, arg = s, t.key
    if right is not None:
        if s + right.best > best:
            best, arg = s + right.best, right.arg
        s += right.sum
    t.sum, t.best, t.arg = s, best, arg


def _split(t: _Node | None, x: int) -> tuple[_Node | None, _Node | None]:
    """(keys <= x, keys > x)."""
    if t is None:
        return None, None
    if t.key <= x:
        a, b = _split(t.right, x)
        t.right = a
        _pull(t)
        return t, b
    a, b = _split(t.left, x)
    t.left = b
    _pull(t)
    return a, t


def _merge(a: _Node | None, b: _Node | None) -> _Node | None:
    """Join two trees, every key of ``a`` below every key of ``b``."""
    if a is None:
        return b
    if b is None:
        return a
    if a.pri > b.pri:
        a.right = _merge(a.right, b)
        _pull(a)
        return a
    b.left = _merge(a, b.left)
    _pull(b)
    return b


def _cat(a, b):
    """Aggregates (sum, best, arg) of two consecutive runs of keys; None is an empty run."""
    if a is None:
        return b
    if b is None:
        return a
    s, best, arg = a
    if s + b[1] > best:
        best, arg = s + b[1], b[2]
    return s + b[0], best, arg


def _whole(t: _Node | None):
    return None if t is None else (t.sum, t.best, t.arg)


def _from(t: _Node | None, lo: int):
    """Aggregates of the keys >= lo."""
    if t is None:
        return None
    if t.key < lo:
        return _from(t.right, lo)
    return _cat(_from(t.left, lo), _cat((t.delta, t.delta, t.key), _whole(t.right)))


def _below(t: _Node | None, hi: int):
    """Aggregates of the keys < hi."""
    if t is None:
        return None
    if t.key >= hi:
        return _below(t.left, hi)
    return _cat(_cat(_whole(t.left), (t.delta, t.delta, t.key)), _below(t.right, hi))


class _Timeline:
    """Deltas at points in time; ``at(e)`` is their sum up to e (plus what was folded away).

    >>> line = _Timeline()
    >>> for t in (10, 12, 30):  # three events, each counted in the windows ending in [t, t + 20)
    ...     line.add(t, 1); line.add(t + 20, -1)
    >>> [line.at(e) for e in (9, 10, 12, 29, 30, 32, 50)]
    [0, 1, 2, 2, 2, 1, 0]
    >>> line.peak(12, 32)  # the largest count of a window ending in [12, 32), and its first end
    (2, 12)
    """

    __slots__ = ("root", "base")

    def __init__(self):
        self.root: _Node | None = None
        self.base = 0  # the deltas folded away by drop_through

    def add(self, x: int, d: int) -> None:
        """Add ``d`` at time ``x``: O(log n)."""
        path: list[_Node] = []
        t = self.root
        while t is not None and t.key != x:
            path.append(t)
            t = t.left if x < t.key else t.right
        if t is not None:
            t.delta += d
            if t.delta == 0:  # nothing left there: the node goes
                new = _merge(t.left, t.right)
            else:
                _pull(t)
                new = t
            old = t
        else:
            new = _Node(x, d)
            i = 0
            while i < len(path) and path[i].pri > new.pri:
                i += 1
            old = path[i] if i < len(path) else None
            new.left, new.right = _split(old, x)
            _pull(new)
            del path[i:]
        if path:
            parent = path[-1]
            if x < parent.key:
                parent.left = new
            else:
                parent.right = new
        else:
            self.root = new
        for node in reversed(path):
            _pull(node)

    def at(self, x: int) -> int:
        """The sum of the deltas at or before ``x``."""
        s, t = self.base, self.root
        while t is not None:
            if t.key <= x:
                s += t.delta + (t.left.sum if t.left is not None else 0)
                t = t.right
            else:
                t = t.left
        return s

    def peak(self, a: int, b: int) -> tuple[int, int]:
        """The largest ``at(e)`` for e in [a, b), and the first e where it is reached."""
        at_a = self.at(a)
        t = self.root
        while t is not None:  # the keys in (a, b): a + 1 .. b - 1
            if t.key <= a:
                t = t.right
            elif t.key >= b:
                t = t.left
            else:
                rest = _cat(_cat(_from(t.left, a + 1), (t.delta, t.delta, t.key)), _below(t.right, b))
                if rest[1] > 0:
                    return at_a + rest[1], rest[2]
                break
        return at_a, a

    def drop_through(self, x: int) -> None:
        """Fold the deltas at or before ``x`` into the base: ``at(e)`` for e > x is unchanged."""
        gone, self.root = _split(self.root, x)
        if gone is not None:
            self.base += gone.sum

    def __len__(self) -> int:
        n, stack = 0, [self.root]
        while stack:
            t = stack.pop()
            if t is not None:
                n += 1
                stack += (t.left, t.right)
        return n

    def items(self) -> list[tuple[int, int]]:
        """(time, delta) in time order (tests and figures)."""
        out, stack, t = [], [], self.root
        while stack or t is not None:
            while t is not None:
                stack.append(t)
                t = t.left
            t = stack.pop()
            out.append((t.key, t.delta))
            t = t.right
        return out


# -- per-entity state ---------------------------------------------------------------------------

class _Counts:
    """Event counts of one entity for a window of one bucket (a minute or less): buckets
    (start, count) in time order. A window holding an event is its bucket."""

    __slots__ = ("starts", "counts")

    def __init__(self):
        self.starts: list[int] = []
        self.counts: list[int] = []

    def add(self, bucket: int, window: int) -> None:
        starts = self.starts
        if starts and starts[-1] == bucket:
            self.counts[-1] += 1
        elif not starts or starts[-1] < bucket:
            starts.append(bucket)
            self.counts.append(1)
        else:  # out of order
            i = bisect_left(starts, bucket)
            if starts[i] == bucket:
                self.counts[i] += 1
            else:
                starts.insert(i, bucket)
                self.counts.insert(i, 1)

    def peak(self, bucket: int, window: int) -> tuple[int, int]:
        i = len(self.starts) - 1
        if self.starts[i] != bucket:
            i = bisect_left(self.starts, bucket)
        return self.counts[i], bucket

    def count(self, end: int, window: int) -> int:
        """Events of the window ending at ``end`` (buckets starting in (end - window, end])."""
        return sum(self.counts[bisect_right(self.starts, end - window):bisect_right(self.starts, end)])

    def prune(self, before: int, window: int) -> None:
        """Forget buckets starting at or before ``before`` (only the watermark may say so)."""
        drop = bisect_right(self.starts, before)
        if drop:
            del self.starts[:drop], self.counts[:drop]

    def last(self) -> int:
        return self.starts[-1] if self.starts else -1

    def size(self) -> int:
        return len(self.starts)


class _Windowed(_Timeline):
    """Event counts of one entity for a window of several buckets: +1 at a bucket's start, -1 a
    window later, so a window's count is the running sum at its end.

    >>> c = _Windowed()
    >>> for bucket in (0, 60, 60, 3_600):  # window 3,600: the last bucket leaves the first out
    ...     c.add(bucket, 3_600)
    >>> c.peak(60, 3_600), c.count(3_599, 3_600), c.count(3_600, 3_600)
    ((3, 60), 3, 3)
    """

    __slots__ = ("latest", "floor")

    def __init__(self):
        super().__init__()
        self.latest = -1
        self.floor = _NEVER  # buckets at or before it are forgotten

    def add(self, bucket: int, window: int) -> None:
        self.add_n(bucket, 1, window)

    def add_n(self, bucket: int, n: int, window: int) -> None:
        _Timeline.add(self, bucket, n)
        _Timeline.add(self, bucket + window, -n)
        if bucket > self.latest:
            self.latest = bucket

    def peak(self, bucket: int, window: int) -> tuple[int, int]:
        return _Timeline.peak(self, bucket, bucket + window)

    def count(self, end: int, window: int) -> int:
        return self.at(end)

    def prune(self, before: int, window: int) -> None:
        if before > self.floor:
            self.floor = before
            # a bucket at or before `before` counts only in windows ending before before + window
            self.drop_through(before + window - 1)

    def last(self) -> int:
        return self.latest

    def size(self) -> int:
        return len(self)


class _Distinct(_Timeline):
    """Distinct values (e.g. countries) of one entity. A value seen at t counts in the windows
    ending in [t, t + window); each value keeps the union of those ranges (disjoint intervals,
    each at least a window long, flat [start, end, start, end, ...]), and an event adds only the
    part of its range the value did not cover yet (+1 where it starts, -1 where it ends): so a
    window's count of distinct values is the running sum at its end, whatever the arrival order.

    >>> d = _Distinct()
    >>> for country, ts in [("CN", 500), ("US", 300), ("CN", 100), ("DE", 1_200)]:
    ...     d.add(country, ts, 1_000)
    >>> d.peak(100, 1_000), d.count(1_099, 1_000), d.count(1_299, 1_000), d.cover["CN"]
    ((2, 300), 2, 3, [100, 1500])
    """

    __slots__ = ("cover", "ends", "latest", "floor")

    def __init__(self):
        super().__init__()
        self.cover: dict[str, list[int]] = {}
        self.ends: list[tuple[int, str]] = []  # (a value's last end, value), lazily: see prune
        self.latest = -1
        self.floor = _NEVER  # intervals ending at or before it count in no window still judged

    def __setstate__(self, state) -> None:
        slots = state[1] if isinstance(state, tuple) else state
        if "seen" in slots:  # a snapshot from before: value -> times; EntityRules rebuilds it
            _Timeline.__init__(self)
            self.cover, self.ends, self.latest, self.floor = None, slots["seen"], -1, _NEVER
            return
        for name, value in slots.items():
            setattr(self, name, value)

    @classmethod
    def from_times(cls, seen: dict[str, list[int]], window: int) -> "_Distinct":
        d = cls()
        for value in sorted(seen):
            for ts in sorted(seen[value]):
                d.add(value, ts, window)
        return d

    def add(self, value: str, ts: int, window: int) -> None:
        end = ts + window
        if ts > self.latest:
            self.latest = ts
        cov = self.cover.get(value)
        if cov is None:
            self.cover[value] = [ts, end]
            self._covered(ts, end, value, end)
            return
        if cov[1] <= self.floor:  # intervals no window still judged holds
            keep = bisect_right(cov, self.floor)
            del cov[:keep - keep % 2]
            if not cov:
                cov += (ts, end)
                self._covered(ts, end, value, end)
                return
        last_end = cov[-1]
        i = bisect_right(cov, ts)
        if i % 2:  # ts inside [cov[i - 1], cov[i]): only the part past cov[i] is new
            lo = cov[i]
            if end <= lo:
                return
            if i + 1 < len(cov) and cov[i + 1] <= end:  # reaches the next interval: join them
                hi = cov[i + 1]
                del cov[i:i + 2]
            else:
                hi = end
                cov[i] = end
        else:  # ts in a gap (or past the last interval)
            lo = ts
            if i < len(cov) and cov[i] <= end:  # reaches the next interval: it starts earlier
                hi = cov[i]
                cov[i] = ts
            else:
                hi = end
                cov[i:i] = (ts, end)
            if i and cov[i - 1] == ts:  # touches the previous one: join them
                del cov[i - 1:i + 1]
        self._covered(lo, hi, value, cov[-1] if cov[-1] != last_end else None)

    def _covered(self, lo: int, hi: int, value: str, new_end: int | None) -> None:
        _Timeline.add(self, lo, 1)
        _Timeline.add(self, hi, -1)
        if new_end is not None:
            heapq.heappush(self.ends, (new_end, value))
            if len(self.ends) > 2 * len(self.cover) + 16:
                self.ends = [(c[-1], v) for v, c in self.cover.items()]
                heapq.heapify(self.ends)

    def peak(self, ts: int, window: int) -> tuple[int, int]:
        return _Timeline.peak(self, ts, ts + window)

    def count(self, end: int, window: int) -> int:
        return self.at(end)

    def prune(self, before: int, window: int) -> None:
        """Forget what only times at or before ``before`` made: values not seen since go."""
        floor = before + window
        if floor <= self.floor:
            return
        self.floor = floor
        self.drop_through(floor - 1)
        ends, cover = self.ends, self.cover
        while ends and ends[0][0] <= floor:
            end, value = heapq.heappop(ends)
            cov = cover.get(value)
            if cov is not None and cov[-1] == end:
                del cover[value]

    def last(self) -> int:
        return self.latest

    def size(self) -> int:
        return len(self) + sum(len(c) for c in self.cover.values())


class _Rule:
    __slots__ = ("spec", "metric", "window", "bucket", "limit", "life", "entities", "breached",
                 "seen", "settled")

    def __init__(self, spec: RuleSpec):
        self.spec = spec
        self.metric = ENTITY_METRICS[spec.metric]
        self.window = spec.window_ms
        self.bucket = self.window if self.window <= 60_000 else max(self.window // 60, 1000)
        self.limit = spec.threshold
        self.life: Lifecycle = spec.lifecycle()
        self.entities: dict[str, _Counts | _Windowed | _Distinct] = {}
        self.breached: dict[str, int] = {}  # open series -> end of its latest breaching window
        self.seen = OldestFirst()  # entity -> latest event time: who goes first
        # open series whose entity was forgotten -> (window end, count of its events there)
        self.settled: dict[str, tuple[int, int]] = {}

    def new_state(self):
        if self.metric.distinct is not None:
            return _Distinct()
        return _Counts() if self.window <= 60_000 else _Windowed()

    def __setstate__(self, state) -> None:
        slots = state[1] if isinstance(state, tuple) else state
        for name, value in slots.items():
            setattr(self, name, value)
        if "seen" not in slots:  # a snapshot from before the caps: rebuild what they need
            self.seen, self.settled = OldestFirst(), {}
            for entity, st in list(self.entities.items()):
                if isinstance(st, _Distinct) and st.cover is None:
                    st = self.entities[entity] = _Distinct.from_times(st.ends, self.window)
                elif isinstance(st, _Counts) and self.window > 60_000:
                    wide = _Windowed()
                    for start, n in zip(st.starts, st.counts):
                        wide.add_n(start, n, self.window)
                    st = self.entities[entity] = wide
                self.seen.touch(entity, st.last())
            for series in [s for s in self.breached if s not in self.life.open]:
                del self.breached[series]

    def count(self, series: str, state, emptied: int) -> int:
        """The count of the window ending at ``emptied``: the entity's events kept, plus those
        of a forgotten state of the same entity (settled)."""
        n = state.count(emptied, self.window) if state is not None else 0
        settled = self.settled.get(series)
        return n + settled[1] if settled is not None and settled[0] == emptied else n


class EntityRules:
    def __init__(self, rules: list[RuleSpec], max_entity_keys: int = MAX_ENTITY_KEYS):
        if max_entity_keys < 1:
            raise ValueError("max_entity_keys must be >= 1")
        self.rules = [_Rule(r) for r in rules]
        self.max_entity_keys = max_entity_keys
        self.by_event: dict[str, list[_Rule]] = {}
        self.every_event: list[_Rule] = []
        self._index()
        self.watermark = -1
        self.pruned_minute = -1  # idle entities are forgotten once per minute of watermark
        self.swept = _NEVER  # the watermark of that sweep: touched entities prune up to it

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"max_entity_keys": MAX_ENTITY_KEYS, "swept": _NEVER, **state})

    def erase(self, idents: set[str]) -> int:
        """Erasure: the entities named (user ids) leave every rule's state, their open series
        included. Returns how many entity states were removed."""
        removed = 0
        for r in self.rules:
            for ident in idents:
                removed += r.entities.pop(ident, None) is not None
                r.seen.purge(ident)
                series = f"{r.metric.entity}={ident}"
                r.breached.pop(series, None)
                r.settled.pop(series, None)
                r.life.open.pop(series, None)
        return removed

    def retuned(self, rules: list[RuleSpec], max_entity_keys: int | None = None) -> "EntityRules":
        """These rules, keeping the state of every rule whose declaration did not change (after
        a restart with an edited catalogue); a changed or new rule starts afresh. A lower cap
        (None: keep the current one) evicts at once, as usual."""
        old = {r.spec.name: r for r in self.rules}
        fresh = EntityRules(rules, max_entity_keys or self.max_entity_keys)
        fresh.rules = [old[r.spec.name] if r.spec.name in old and old[r.spec.name].spec == r.spec
                       else r for r in fresh.rules]
        fresh._index()
        fresh.watermark, fresh.pruned_minute, fresh.swept = self.watermark, self.pruned_minute, self.swept
        for r in fresh.rules:
            fresh._evict(r)
        return fresh

    def _index(self) -> None:
        self.by_event, self.every_event = {}, []
        for r in self.rules:
            if r.metric.events is None:
                self.every_event.append(r)
            else:
                for name in r.metric.events:
                    self.by_event.setdefault(name, []).append(r)

    def size(self) -> dict[str, int]:
        """Entities kept per rule (figures, gauges)."""
        return {r.spec.name: len(r.entities) for r in self.rules}

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
            distinct = r.metric.distinct
            value = getattr(s, distinct) if distinct is not None else None
            if distinct is not None and not value:
                continue
            state = r.entities.get(entity)
            created = state is None
            if created:
                state = r.entities[entity] = r.new_state()
            elif self.swept != _NEVER:  # forget what no window still to be judged holds
                state.prune(self.swept - r.window - r.bucket - r.life.resolve_ms, r.window)
            if distinct is not None:
                state.add(value, s.ts_ms, r.window)
                count, end = state.peak(s.ts_ms, r.window)
            else:
                bucket = s.ts_ms - s.ts_ms % r.bucket
                state.add(bucket, r.window)
                count, end = state.peak(bucket, r.window)
            r.seen.touch(entity, state.last())
            verdict = r.limit.verdict(float(count), None)
            if verdict.breach:
                series = f"{kind}={entity}"
                r.breached[series] = max(r.breached.get(series, end), end)
                detail = s.user if kind == "user" else s.ip
                alerts += _published(r.life.step(series, s.ts_ms, s.ts_ms,
                                                 replace(verdict, detail=detail)))
            if created and len(r.entities) > self.max_entity_keys:
                self._evict(r)
        return alerts

    def _evict(self, r: _Rule) -> None:
        """Down to the cap: the entity seen least recently goes (ties: the smallest key)."""
        while len(r.entities) > self.max_entity_keys:
            self._forget(r, r.seen.pop_oldest())
            STATS.add_labeled("evictions", "entity_key")

    def _forget(self, r: _Rule, entity: str) -> None:
        """Drop an entity's state (evicted, or idle). An open alert of it is settled first: the
        windows after its last breach are judged now, as tick would (what they hold of its
        events is known: only events to come could add to it), so the alert resolves at the
        same event time as if the state had been kept, and with the same value."""
        state = r.entities.pop(entity)
        series = f"{r.metric.entity}={entity}"
        last = r.breached.get(series)
        if last is None:
            return
        end = state.last() + r.window  # past this, windows hold none of its events
        while True:
            emptied = last + r.window
            count = r.count(series, state, emptied)
            if emptied > end or not r.limit.verdict(float(count), None).breach:
                break
            last += r.bucket
        r.breached[series] = last
        r.settled[series] = (emptied, count)

    def tick(self, watermark: int) -> list[Alert]:
        """"Now" is the watermark. An open alert resolves once its latest breaching window has
        ended (plus ``resolve_after``) and the watermark is past that, at that event time; idle
        entities are forgotten once per minute."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        sweep = watermark // 60_000 != self.pruned_minute
        alerts: list[Alert] = []
        for r in self.rules:
            life = r.life
            for series in sorted(life.open):
                last = r.breached.get(series)
                if last is None:
                    continue
                state = r.entities.get(series.split("=", 1)[1])
                end = (state.last() if state is not None else last) + r.window
                while True:
                    emptied = last + r.window  # the first window without the last breach
                    if watermark < emptied + life.resolve_ms:
                        break
                    count = r.count(series, state, emptied)
                    verdict = r.limit.verdict(float(count), None)
                    if verdict.breach:  # breaches by the bucket: look one bucket later
                        if emptied > end:
                            break  # (an empty window breaching: a "below" rule stays open)
                        last += r.bucket
                        continue
                    alerts += _published(life.step(series, emptied + life.resolve_ms, emptied, verdict))
                    break
                if series in life.open:
                    r.breached[series] = last
                else:
                    del r.breached[series]
                    r.settled.pop(series, None)
            if not sweep:
                continue
            horizon = watermark - r.window - r.bucket
            while (idle := r.seen.pop_older_than(horizon + 1)) is not None:
                self._forget(r, idle)  # nothing of it is in a window still to be judged
            life.expire_quiet(watermark)
        if sweep:
            self.pruned_minute = watermark // 60_000
            self.swept = watermark
        return alerts
