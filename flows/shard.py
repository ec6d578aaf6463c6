"""One shard of users: dedupe, features, sessions, the trigger rule, the model, minute aggregates.

Users are hashed into a fixed number of shards (configuration, not the worker count). A shard is
the key of the dataflow's main stateful step; its state is this plain class, tested without the
engine (``ShardState``), wrapped for Bytewax by ``ShardLogic``.

Time. Every source batch reaches every shard as a :class:`Chunk`, carrying that batch's events for
the shard and the highest event time per source partition. The stream clock is the minimum over
all source partitions of their highest event time; the watermark is the clock minus the allowed
lateness. The watermark is "now" for every user of the shard, whether or not they send anything:
it fires timers (a bucket leaving a window, a model label whose horizon passed) and closes
minutes. An event older than the watermark is late: dead-lettered with reason ``late_event``.
At the end of a bounded input the watermark moves up to the clock (no later event can come).
Nothing here reads the wall clock, so a replay of days of history gives the live run's results.
"""
from __future__ import annotations

import heapq
import pickle
import zlib
from dataclasses import dataclass, field

import orjson
from bytewax.operators import StatefulBatchLogic

from features.windows import MINUTE_MS, MinuteBuckets, minute_of
from flows.events import DeadLetter, Event
from models.propensity import PurchasePropensity
from triggers.rules import VIEW_EVENTS, SessionPageViews, idempotency_key

END_OF_TIME = 2**62


def shard_of(user: str, shards: int) -> int:
    """Stable across processes and runs (Python's hash() is salted per process).

    >>> shard_of("u00042", 16) == shard_of("u00042", 16)
    True
    """
    return zlib.crc32(user.encode("utf-8")) % shards


def window_label(minutes: int) -> str:
    """Feature-name suffix of a window.

    >>> [window_label(m) for m in (60, 1440, 10080, 45)]
    ['1h', '24h', '7d', '45m']
    """
    if minutes % 1440 == 0 and minutes >= 10080:
        return f"{minutes // 1440}d"
    if minutes % 60 == 0:
        return f"{minutes // 60}h"
    return f"{minutes}m"


@dataclass(slots=True)
class Chunk:
    """What a shard receives per source batch: its events and the partitions' event-time progress."""

    shard: int
    events: list[Event]
    clocks: dict[int, int]  # source partition -> highest event time in the batch
    partitions: int  # number of source partitions


@dataclass(frozen=True)
class ShardConfig:
    windows_min: tuple[int, ...] = (60, 1440)
    # (feature name, event names, property to sum or None to count)
    counters: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
        ("views", ("page_view", "product_viewed"), None),
        ("add_to_cart", ("add_to_cart",), None),
        ("orders", ("order_completed",), None),
        ("revenue", ("order_completed",), "revenue"),
    )
    lateness_ms: int = 60_000
    session_gap_ms: int = 30 * 60_000
    horizon_ms: int = 24 * 3_600_000
    learning_rate: float = 0.05
    trigger_pages: int = 3
    trigger_channel: str = "push"
    # Snapshots are only worth their cost when a recovery store keeps them.
    snapshots: bool = False


@dataclass
class ShardOut:
    """Everything one shard step produces; empty lists when nothing happened."""

    shard: int
    features: list[tuple[str, dict[str, str], int]] = field(default_factory=list)  # + arrival
    actions: list[dict] = field(default_factory=list)  # "_"-prefixed keys are not published
    aggregates: list[tuple] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    # (shard, closed_through_minute, {minute: {series: count}}) for the metric detectors
    report: tuple[int, int, dict[int, dict[str, int]]] | None = None
    events: int = 0
    duplicates: int = 0

    def __bool__(self) -> bool:
        return bool(self.features or self.actions or self.aggregates or self.dead or self.report)


class UserState:
    __slots__ = ("buckets", "last_seen", "as_of", "session_id", "session_last",
                 "session_pages", "campaign", "next_due", "arrival_ms")

    def __init__(self, n_metrics: int):
        self.buckets = MinuteBuckets(n_metrics)
        self.last_seen = 0
        self.as_of = 0  # event time the written values refer to; never moves back
        self.session_id = ""
        self.session_last = -END_OF_TIME
        self.session_pages = 0
        self.campaign = ""
        self.next_due: int | None = None
        self.arrival_ms = 0  # latest arrival among unflushed events (latency figures only)


class ShardState:
    def __init__(self, shard: int, config: ShardConfig):
        self.shard = shard
        self.config = config
        self.windows = list(config.windows_min)
        self.longest = max(self.windows)
        self.metric_of: dict[str, list[tuple[int, str | None]]] = {}
        for i, (_, names, prop) in enumerate(config.counters):
            for name in names:
                self.metric_of.setdefault(name, []).append((i, prop))
        # Flat names matching MinuteBuckets.window_totals: every counter of window 0, then 1...
        self.feature_names = [f"{c[0]}_{window_label(w)}" for w in self.windows
                              for c in config.counters]
        self.is_count = [c[2] is None for w in self.windows for c in config.counters]
        self.rule = SessionPageViews(config.trigger_pages, config.trigger_channel)
        self.model = PurchasePropensity(config.horizon_ms, config.learning_rate)
        self.users: dict[str, UserState] = {}
        self.seen: dict[str, int] = {}  # event_id -> ts, kept while a duplicate could be on time
        self.part_max: dict[int, int] = {}
        self.partitions = 1
        self.watermark = -END_OF_TIME
        self.timers: list[tuple[int, str]] = []
        # minute -> (channel, campaign, event name) -> [events, revenue, cost, users]
        self.minutes: dict[int, dict[tuple[str, str, str], list]] = {}
        self.closed_through = -END_OF_TIME  # last minute reported to the detectors
        self.dirty: set[str] = set()
        self.late_events = 0

    # -- input ---------------------------------------------------------------------------
    def ingest(self, chunk: Chunk, out: ShardOut) -> None:
        for event in chunk.events:
            self._event(event, out)
        for part, ts in chunk.clocks.items():
            if ts > self.part_max.get(part, -END_OF_TIME):
                self.part_max[part] = ts
        self.partitions = max(self.partitions, chunk.partitions)
        if len(self.part_max) >= self.partitions:
            clock = min(self.part_max.values())
            self.advance(clock - self.config.lateness_ms, out)

    def _event(self, e: Event, out: ShardOut) -> None:
        ts = e.ts_ms
        if ts < self.watermark:
            self.late_events += 1
            out.dead.append(DeadLetter("late_event", f"event time {ts} < watermark {self.watermark}",
                                       e.raw or _event_bytes(e), e.user.encode(), "shard", ts))
            return
        if e.event_id in self.seen:
            out.duplicates += 1
            return
        self.seen[e.event_id] = ts
        out.events += 1
        user = self.users.get(e.user)
        if user is None:
            user = self.users[e.user] = UserState(len(self.config.counters))
        minute = ts // MINUTE_MS
        for idx, prop in self.metric_of.get(e.name, ()):
            user.buckets.add(minute, idx, 1.0 if prop is None else _prop(e, prop))
        if ts > user.last_seen:
            user.last_seen = ts
        if ts > user.as_of:
            user.as_of = ts
        if e.campaign:
            user.campaign = e.campaign
        if e.arrival_ms > user.arrival_ms:
            user.arrival_ms = e.arrival_ms
        if ts - user.session_last > self.config.session_gap_ms:
            user.session_id = idempotency_key("session", e.user, str(ts))
            user.session_pages = 0
        if ts > user.session_last:
            user.session_last = ts
        if e.name in VIEW_EVENTS:
            user.session_pages += 1
            if user.session_pages == 1:
                self.model.remember(e.user, ts, self._model_x(user))
            action = self.rule.action(e.user, user.session_id, user.session_pages, user.campaign, ts)
            if action is not None:
                out.actions.append({**action.to_dict(), "_arrival_ms": e.arrival_ms})
        elif e.name == "order_completed":
            self.model.on_order(e.user, ts)
        row = self.minutes.setdefault(minute, {}).get((e.channel, e.campaign, e.name))
        if row is None:
            row = self.minutes[minute][(e.channel, e.campaign, e.name)] = [0, 0.0, 0.0, set()]
        row[0] += 1
        row[1] += e.revenue
        row[2] += e.cost
        row[3].add(e.user)
        self.dirty.add(e.user)

    # -- time ----------------------------------------------------------------------------
    def advance(self, watermark: int, out: ShardOut, *, final: bool = False) -> None:
        """Move "now" forward: fire due timers, close minutes, forget what can no longer matter."""
        if watermark <= self.watermark and not final:
            return
        previous_minute = minute_of(self.watermark) if self.watermark > -END_OF_TIME else None
        self.watermark = max(self.watermark, watermark)
        while self.timers and self.timers[0][0] <= self.watermark:
            due, name = heapq.heappop(self.timers)
            user = self.users.get(name)
            if user is None or user.next_due != due:
                continue  # superseded by a later schedule
            user.next_due = None
            if due > user.as_of:
                user.as_of = due
            self.model.expire(name, due)
            self.dirty.add(name)
        closed = minute_of(self.watermark) - 1  # minutes ending at or before the watermark
        if final:
            closed_rows = sorted(self.minutes)  # end of input: flush even partial minutes
        else:
            closed_rows = sorted(m for m in self.minutes if m <= closed)
        report: dict[int, dict[str, int]] = {}
        for m in closed_rows:
            rows = self.minutes.pop(m)
            series: dict[str, int] = {}
            for (channel, campaign, name), (n, revenue, cost, users) in rows.items():
                out.aggregates.append((m * MINUTE_MS, channel, campaign, name, self.shard, n,
                                       revenue, cost, sorted(users)))
                series["all"] = series.get("all", 0) + n
                key = f"channel={channel}"
                series[key] = series.get(key, 0) + n
            if m <= closed:
                report[m] = series
        if closed > self.closed_through:
            self.closed_through = closed
            out.report = (self.shard, closed, report)
        if previous_minute is None or minute_of(self.watermark) != previous_minute:
            self.seen = {k: v for k, v in self.seen.items() if v >= self.watermark}

    def finish(self, out: ShardOut) -> None:
        """End of a bounded input: no event can be late any more, so now = the clock."""
        clock = min(self.part_max.values()) if self.part_max else self.watermark
        self.advance(max(clock, self.watermark), out, final=True)
        # Every user's features as of the end of the input (a replay ends "now" there).
        for name, user in self.users.items():
            if self.watermark > user.as_of:
                user.as_of = self.watermark
                self.dirty.add(name)
        self.flush(out)

    # -- output --------------------------------------------------------------------------
    def _model_x(self, user: UserState, totals: list[float] | None = None) -> dict[str, float]:
        if totals is None:
            totals = user.buckets.window_totals(self.windows, minute_of(user.as_of))
        x = dict(zip(self.feature_names, totals))
        x["session_pages"] = float(user.session_pages)
        return x

    def flush(self, out: ShardOut) -> None:
        """Feature values of every user touched since the last flush, as absolute values."""
        for name in sorted(self.dirty):
            user = self.users.get(name)
            if user is None:
                continue
            as_of_min = minute_of(user.as_of)
            user.buckets.prune(self.longest, as_of_min)
            totals = user.buckets.window_totals(self.windows, as_of_min)
            x = self._model_x(user, totals)
            values = {name: (str(int(v)) if count else f"{v:.2f}")
                      for name, v, count in zip(self.feature_names, totals, self.is_count)}
            values["last_seen"] = str(user.last_seen)
            values["session_id"] = user.session_id
            values["session_pages"] = str(user.session_pages)
            values["p_purchase_24h"] = f"{self.model.predict_one(x):.6f}"
            values["as_of"] = str(user.as_of)
            out.features.append((name, values, user.arrival_ms))
            user.arrival_ms = 0
            self._schedule(name, user, as_of_min)
            if (not user.buckets and user.next_due is None
                    and self.watermark - user.session_last > self.config.session_gap_ms):
                del self.users[name]  # nothing left that time can change: free the state
        self.dirty.clear()

    def _schedule(self, name: str, user: UserState, as_of_min: int) -> None:
        expiry = user.buckets.next_expiry(self.windows, as_of_min)
        due = expiry * MINUTE_MS if expiry is not None else None
        label_due = self.model.next_due(name)
        if label_due is not None and (due is None or label_due < due):
            due = label_due
        if due != user.next_due:
            user.next_due = due
            if due is not None:
                heapq.heappush(self.timers, (due, name))


def _prop(e: Event, prop: str) -> float:
    if prop == "revenue":
        return e.revenue
    if prop == "cost":
        return e.cost
    value = e.properties.get(prop)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _event_bytes(e: Event) -> bytes:
    """Fallback when an event was built without its raw bytes (tests): its decoded core."""
    return orjson.dumps({"event_id": e.event_id, "user": e.user, "event": e.name,
                         "timestamp": e.ts_ms, "channel": e.channel})


class ShardLogic(StatefulBatchLogic):
    """Bytewax adapter around one ShardState. The builder does not get the key, so the state is
    created from the first chunk (which names its shard). Snapshots are pickled bytes: immutable
    and cheaper than a deep copy."""

    def __init__(self, config: ShardConfig, resume: bytes | None):
        self.config = config
        self.state: ShardState | None = pickle.loads(resume) if resume is not None else None

    def on_batch(self, chunks: list[Chunk]):
        if self.state is None:
            self.state = ShardState(chunks[0].shard, self.config)
        out = ShardOut(self.state.shard)
        for chunk in chunks:
            self.state.ingest(chunk, out)
        self.state.flush(out)
        return ([out] if out or out.events or out.duplicates else []), False

    def on_eof(self):
        if self.state is None:
            return [], False
        out = ShardOut(self.state.shard)
        self.state.finish(out)
        return ([out] if out else []), False

    def snapshot(self) -> bytes | None:
        if self.state is None or not self.config.snapshots:
            return None  # no recovery store: pickling every shard each epoch would be wasted
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
