"""Complete minutes: the ingest shards' partial minute aggregates, merged once every shard has
closed the minute.

Each ingest shard counts its own events per (minute, channel, campaign, creative, event name) and,
as its watermark passes, sends the minutes it closed as a :class:`MinutePart`. A minute is
complete once every shard has closed it (a shard with no events in it simply has no rows). The
merged minute goes to ClickHouse as one insert block (deduplicated by the minute) and to the
detectors, in minute order, so neither depends on how shards are spread over workers.

>>> c = MinuteCloser(shards=2)
>>> row = {("web", "c1", "", "page_view"): [2, 0.0, 0.0, 0, {"u1"}]}
>>> c.add(MinutePart(0, 10, {10: row}))
[]
>>> [(m.minute, m.rows) for m in c.add(MinutePart(1, 10, {10: row}))]
[(10, [('web', 'c1', '', 'page_view', 4, 0.0, 0.0, 0, ['u1'])])]
>>> c.add(MinutePart(0, 11, {}))
[]
>>> empty = c.add(MinutePart(1, 11, {}))[0]  # a minute without events is complete too
>>> empty.minute, empty.rows
(11, [])
"""
from __future__ import annotations

from dataclasses import dataclass, field

# (channel, campaign, creative, event name, events, revenue, cost, orders, sorted user ids)
Row = tuple[str, str, str, str, int, float, float, int, list[str]]


@dataclass(slots=True)
class MinutePart:
    """One ingest shard's closed minutes: minute -> key -> [events, revenue, cost, orders, users]."""

    shard: int
    closed_through: int  # every minute up to this one is closed in this shard
    minutes: dict[int, dict[tuple[str, str, str, str], list]]
    final: bool = False  # end of input: the shard also sent its open minutes
    # minute -> ingest-delay histogram (alerts.metrics.delay_bucket -> events)
    delays: dict[int, dict[int, int]] = field(default_factory=dict)
    # minute -> page -> [views, bounces] decided in that minute (flows.shard: bounces)
    bounces: dict[int, dict[str, list[int]]] = field(default_factory=dict)


@dataclass(slots=True)
class CompleteMinute:
    minute: int  # minutes since the epoch
    rows: list[Row] = field(default_factory=list)
    partial: bool = False  # forced out at the end of a bounded input; not judged by detectors
    closed_at_ms: int = 0  # wall time it became complete: for latency figures only
    delays: dict[int, int] = field(default_factory=dict)  # ingest-delay histogram of the minute
    bounces: dict[str, list[int]] = field(default_factory=dict)  # page -> [views, bounces]

    @property
    def minute_ms(self) -> int:
        return self.minute * 60_000


class MinuteCloser:
    """Gathers :class:`MinutePart`\\ s and releases :class:`CompleteMinute`\\ s in order."""

    def __init__(self, shards: int):
        self.shards = shards
        self.closed: dict[int, int] = {}
        self.final: set[int] = set()
        self.pending: dict[int, dict[int, dict]] = {}  # minute -> shard -> rows
        self.delays: dict[int, dict[int, int]] = {}  # minute -> merged delay histogram
        self.bounces: dict[int, dict[str, list[int]]] = {}  # minute -> merged page tallies
        self.done_through: int | None = None

    def __setstate__(self, state: dict) -> None:
        # a snapshot from before ingest delays and bounces resumes with them empty
        self.__dict__.update({"delays": {}, "bounces": {}, **state})

    def _open(self, by_minute: dict):
        done = self.done_through
        return [(m, v) for m, v in by_minute.items() if done is None or m > done]

    def scrub(self, covers) -> int:
        """Drop from the minutes still waiting for a shard the users ``covers(user, minute_ms)``
        says were erased since (a part sent before its shard saw the erasure); returns how many."""
        dropped = 0
        for minute, by_shard in self.pending.items():
            at = minute * 60_000
            for rows in by_shard.values():
                for row in rows.values():
                    kept = [u for u in row[4] if not covers(u, at)]
                    if len(kept) != len(row[4]):
                        dropped += len(row[4]) - len(kept)
                        row[4] = type(row[4])(kept)
        return dropped

    def add(self, part: MinutePart) -> list[CompleteMinute]:
        # Minutes already released are skipped: a replayed part of them changes nothing.
        for minute, rows in self._open(part.minutes):
            self.pending.setdefault(minute, {})[part.shard] = rows
        for minute, hist in self._open(part.delays):
            merged = self.delays.setdefault(minute, {})
            for bucket, n in hist.items():
                merged[bucket] = merged.get(bucket, 0) + n
        for minute, pages in self._open(part.bounces):
            merged = self.bounces.setdefault(minute, {})
            for page, (views, bounced) in pages.items():
                t = merged.setdefault(page, [0, 0])
                t[0] += views
                t[1] += bounced
        self.closed[part.shard] = max(part.closed_through, self.closed.get(part.shard, part.closed_through))
        if part.final:
            self.final.add(part.shard)
        if len(self.closed) < self.shards:
            return []
        complete = min(self.closed.values())
        last = complete
        if len(self.final) == self.shards and self.pending:
            last = max(last, max(self.pending))
        if self.done_through is None:
            # Start at the first minute with events, once no shard can still send an earlier one.
            if not self.pending or min(self.pending) > last:
                return []
            self.done_through = min(self.pending) - 1
        ready = []
        for minute in range(self.done_through + 1, last + 1):
            ready.append(CompleteMinute(minute, merge(self.pending.pop(minute, {})), minute > complete,
                                        delays=self.delays.pop(minute, {}),
                                        bounces=self.bounces.pop(minute, {})))
        self.done_through = max(self.done_through, last)
        return ready


def merge(by_shard: dict[int, dict]) -> list[Row]:
    """Sum the shards' rows key by key, in shard order (float sums come out the same every run)."""
    merged: dict[tuple, list] = {}
    for shard in sorted(by_shard):
        for key, (events, revenue, cost, orders, users) in by_shard[shard].items():
            row = merged.get(key)
            if row is None:
                merged[key] = [events, revenue, cost, orders, set(users)]
            else:
                row[0] += events
                row[1] += revenue
                row[2] += cost
                row[3] += orders
                row[4].update(users)
    return [(*key, n, revenue, cost, orders, sorted(users))
            for key, (n, revenue, cost, orders, users) in sorted(merged.items())]



@dataclass(slots=True)
class MinuteBlock:
    """Complete minutes written to ClickHouse as one insert, deduplicated as one unit.

    Its token names exactly the minutes it covers: ``minute-<m>`` for one minute (as every block
    was before), ``minutes-<first>-<last>`` for a run of them."""

    minutes: list[CompleteMinute]

    @property
    def token(self) -> str:
        first, last = self.minutes[0].minute, self.minutes[-1].minute
        return f"minute-{first}" if first == last else f"minutes-{first}-{last}"

    @property
    def rows(self) -> int:
        return sum(len(m.rows) for m in self.minutes)


class BlockGrouper:
    """Groups complete minutes into ClickHouse blocks: one minute per block while the stream is
    live, whole aligned windows of ``block_minutes`` when it is behind.

    A minute's window is "behind" when the window ended ``hold_after_ms`` or more before the
    wall clock: a replay of history, or a consumer far behind its topic. Its minutes are held
    until the window's last minute comes (or ``max_rows`` rows wait, or the input ends), then go
    as one block: a 10-day replay costs 240 inserts instead of 14,400. Live minutes (their window
    is not over yet by the wall clock) go at once, each its own block, so a complete minute still
    reaches ClickHouse within seconds. The wall clock only chooses the grouping; a replay that
    groups the same minutes differently is reconciled by the sink against the ``minute_blocks``
    ledger (connectors/clickhouse.py), so nothing is counted twice.

    >>> g = BlockGrouper(block_minutes=60, max_rows=1000, hold_after_ms=0)
    >>> row = ("web", "", "", "page_view", 1, 0.0, 0.0, 0, ["u1"])
    >>> old = [CompleteMinute(m, [row]) for m in range(60, 120)]  # an hour long past
    >>> g.add(old[:30], now_ms=10**12)  # held until the hour is complete
    []
    >>> [b.token for b in g.add(old[30:], now_ms=10**12)]
    ['minutes-60-119']
    >>> live = CompleteMinute(10**12 // 60_000, [row])  # the current minute: written at once
    >>> [b.token for b in g.add([live], now_ms=10**12)]
    ['minute-16666666']
    """

    def __init__(self, block_minutes: int = 60, max_rows: int = 50_000,
                 hold_after_ms: int = 300_000):
        if block_minutes < 1 or 1440 % block_minutes:
            raise ValueError("block_minutes must divide a day (1440 minutes)")
        self.block_minutes = block_minutes
        self.max_rows = max_rows
        self.hold_after_ms = hold_after_ms
        self.held: list[CompleteMinute] = []
        self.held_rows = 0

    def scrub(self, covers) -> int:
        """Drop from the held minutes the users ``covers(user, minute_ms)`` says were erased
        since; returns how many."""
        dropped = 0
        for m in self.held:
            at = m.minute_ms
            for i, row in enumerate(m.rows):
                kept = [u for u in row[-1] if not covers(u, at)]
                if len(kept) != len(row[-1]):
                    dropped += len(row[-1]) - len(kept)
                    m.rows[i] = (*row[:-1], kept)
        return dropped

    def add(self, minutes: list[CompleteMinute], now_ms: int) -> list[MinuteBlock]:
        out: list[MinuteBlock] = []
        width = self.block_minutes
        for m in minutes:
            window = m.minute // width
            if self.held and self.held[-1].minute // width != window:
                out += self.flush()  # a window cut short (input resumed elsewhere): as it is
            window_end_ms = (window + 1) * width * 60_000
            if width == 1 or window_end_ms > now_ms - self.hold_after_ms:
                out += self.flush()
                out.append(MinuteBlock([m]))
                continue
            self.held.append(m)
            self.held_rows += len(m.rows)
            if m.minute % width == width - 1 or self.held_rows >= self.max_rows:
                out += self.flush()
        return out

    def flush(self) -> list[MinuteBlock]:
        """The held minutes as one block (at the input's end, or when a window is cut short)."""
        if not self.held:
            return []
        block = MinuteBlock(self.held)
        self.held, self.held_rows = [], 0
        return [block]
