"""Exact sliding-window sums in event time at minute granularity, without storing every event.

A profile's activity is a sorted array of (minute, metric) buckets holding integer sums (counts,
or amounts in cents), plus one running total per (metric, window) slot. Totals move
incrementally: when "now" advances, the buckets leaving each window (a bisect range) are
subtracted. The window ``w`` as of minute M holds the minutes in ``(M - w, M]``. Buckets older
than the longest window (plus a day, for the point-in-time values of :meth:`MinuteBuckets.total_at`)
are dropped; lifetime slots keep their sums.

>>> b = MinuteBuckets(slots=[(0, 60), (0, None)])          # metric 0: 1h and lifetime
>>> b.add(minute=0, metric=0, value=1); b.add(minute=59, metric=0, value=1)
>>> b.advance(59); list(b.totals)
[2, 2]
>>> b.next_expiry()                                       # minute 0 leaves the 1h window at 60
60
>>> b.advance(60); list(b.totals), len(b)                # (minute 0 is kept for a day more)
([1, 2], 2)
>>> b.advance(60 + 1440); len(b)                         # then it goes
1
"""
from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right

METRIC_BITS = 8
MAX_METRICS = 1 << METRIC_BITS
NEVER = -(2**62)
# Buckets are kept this long past the longest window, so that a window's total as of a minute up
# to a day before "now" is still exact (the models score as of an event's minute, a little later).
KEEP_PAST_LONGEST_MIN = 1440


class MinuteBuckets:
    __slots__ = ("keys", "vals", "totals", "now", "_plan", "dirty")

    def __init__(self, slots: list[tuple[int, int | None]] | None = None, plan: "SlotPlan | None" = None):
        self._plan = plan if plan is not None else SlotPlan(slots or [])
        self.keys = array("q")  # minute << 8 | metric, sorted
        self.vals = array("q")
        self.totals = array("q", bytes(8 * len(self._plan.slots)))
        self.now = NEVER  # the minute totals refer to
        self.dirty = 0  # bit mask of the slots whose total moved since the owner last looked

    def _put(self, key: int, value: int) -> None:
        keys = self.keys
        if keys and keys[-1] == key:  # the newest bucket, the usual case: no search
            self.vals[-1] += value
        elif not keys or keys[-1] < key:  # a new newest bucket: appended, nothing moves
            keys.append(key)
            self.vals.append(value)
        else:
            i = bisect_left(keys, key)
            if keys[i] == key:
                self.vals[i] += value
            else:
                keys.insert(i, key)
                self.vals.insert(i, value)

    def add(self, minute: int, metric: int, value: int) -> None:
        self._put((minute << METRIC_BITS) | metric, value)
        totals, now, plan = self.totals, self.now, self._plan
        if minute == now:  # the current minute is in every window of the metric (the usual case)
            for slot in plan.slots_of[metric]:
                totals[slot] += value
            self.dirty |= plan.mask_of[metric]
            return
        dirty = self.dirty
        for slot, window in plan.by_metric[metric]:
            if window is None or (now - window < minute <= now):
                totals[slot] += value
                dirty |= 1 << slot
        self.dirty = dirty

    def advance(self, minute: int) -> None:
        """Move "now" forward to ``minute``: buckets leave (and, after a merge, enter) windows."""
        old = self.now
        if minute <= old:
            return
        self.now = minute
        keys, vals, totals, plan = self.keys, self.vals, self.totals, self._plan
        if old == NEVER:
            self._rebuild()
        elif keys:
            # The oldest and newest minutes held let most windows skip their searches: nothing
            # leaves a window whose range starts before the oldest bucket, nothing enters when
            # no bucket is ahead of the old "now".
            first, last = keys[0] >> METRIC_BITS, keys[-1] >> METRIC_BITS
            dirty = self.dirty
            for window, slots in plan.by_window.items():
                upto = min(minute - window, old)
                if first <= upto:
                    lo = bisect_right(keys, ((old - window) << METRIC_BITS) | (MAX_METRICS - 1))
                    hi = bisect_right(keys, (upto << METRIC_BITS) | (MAX_METRICS - 1))
                    for i in range(lo, hi):  # leaving (buckets ahead of the old "now" never entered)
                        s = slots[keys[i] & (MAX_METRICS - 1)]
                        if s >= 0:
                            totals[s] -= vals[i]
                            dirty |= 1 << s
                if last > old:
                    lo = bisect_right(keys, (old << METRIC_BITS) | (MAX_METRICS - 1))
                    hi = bisect_right(keys, (minute << METRIC_BITS) | (MAX_METRICS - 1))
                    for i in range(lo, hi):  # entering (only buckets ahead of "now", after a merge)
                        m = keys[i] >> METRIC_BITS
                        s = slots[keys[i] & (MAX_METRICS - 1)]
                        if s >= 0 and m > minute - window:
                            totals[s] += vals[i]
                            dirty |= 1 << s
            self.dirty = dirty
        horizon = minute - plan.longest - KEEP_PAST_LONGEST_MIN
        if keys and keys[0] >> METRIC_BITS <= horizon:
            cut = bisect_right(keys, (horizon << METRIC_BITS) | (MAX_METRICS - 1))
            del keys[:cut]
            del vals[:cut]

    def _rebuild(self) -> None:
        """Windowed totals from the buckets (lifetime slots are kept: pruned buckets count there)."""
        plan, totals = self._plan, self.totals
        self.dirty = (1 << len(plan.slots)) - 1
        if not self.keys and not any(totals):
            return  # a new profile's first "now": nothing to count
        for slot in plan.windowed:
            totals[slot] = 0
        for key, value in zip(self.keys, self.vals):
            minute, metric = key >> METRIC_BITS, key & (MAX_METRICS - 1)
            for slot, window in plan.by_metric[metric]:
                if window is not None and self.now - window < minute <= self.now:
                    totals[slot] += value

    def merge(self, other: "MinuteBuckets") -> None:
        """Add another profile's buckets (identity stitching); lifetime sums add up."""
        lifetime = [(s, other.totals[s]) for s, (_, w) in enumerate(self._plan.slots) if w is None]
        for key, value in zip(other.keys, other.vals):
            self._put(key, value)
        for s, v in lifetime:
            self.totals[s] += v  # (_rebuild marks every slot dirty)
        self.now = max(self.now, other.now)
        self._rebuild()

    def sums(self, after: int, upto: int) -> dict[int, int]:
        """Per metric, its buckets in the minutes ``(after, upto]``."""
        keys, vals = self.keys, self.vals
        lo = bisect_right(keys, (after << METRIC_BITS) | (MAX_METRICS - 1))
        hi = bisect_right(keys, (upto << METRIC_BITS) | (MAX_METRICS - 1))
        out: dict[int, int] = {}
        for i in range(lo, hi):
            metric = keys[i] & (MAX_METRICS - 1)
            out[metric] = out.get(metric, 0) + vals[i]
        return out

    def _sum(self, metric: int, after: int, upto: int) -> int:
        return self.sums(after, upto).get(metric, 0)

    def total_at(self, slot: int, minute: int) -> int:
        """A slot's total as of an earlier ``minute`` (point in time: nothing after it counts),
        whatever came in since. Exact while ``minute`` is at most a day before "now".

        >>> b = MinuteBuckets(slots=[(0, 60), (0, None)])
        >>> for m in (0, 30, 70, 71): b.add(minute=m, metric=0, value=1)
        >>> b.advance(71); b.total_at(0, 59), b.total_at(1, 59), b.total_at(0, 70), list(b.totals)
        (2, 2, 2, [3, 4])
        """
        metric, window = self._plan.slots[slot]
        now = self.now
        if window is None:  # lifetime: what came after the minute leaves
            last = self.keys[-1] >> METRIC_BITS if self.keys else minute
            return self.totals[slot] - self._sum(metric, minute, max(now, last))
        if now == NEVER or now < minute or minute <= now - window:
            return self._sum(metric, minute - window, minute)
        # (now - w, now] -> (minute - w, minute]: the minutes after it leave, older ones enter
        return (self.totals[slot] - self._sum(metric, minute, now)
                + self._sum(metric, minute - window, now - window))

    def next_expiry(self) -> int | None:
        """The first minute after "now" at which a bucket leaves a window."""
        keys = self.keys
        if not keys:
            return None
        best = None
        first, now = keys[0] >> METRIC_BITS, self.now
        for window in self._plan.ascending:
            if best is not None and best <= first + window:
                break  # no bucket leaves a longer window before the oldest one would
            if first > now - window:  # the oldest bucket is still in this window: it leaves first
                leave = first + window
            else:
                i = bisect_right(keys, ((now - window) << METRIC_BITS) | (MAX_METRICS - 1))
                if i == len(keys):
                    continue
                leave = (keys[i] >> METRIC_BITS) + window
            if best is None or leave < best:
                best = leave
        return best

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):
        return (self.keys, self.vals, self.totals, self.now, self._plan)

    def __setstate__(self, state):
        self.keys, self.vals, self.totals, self.now, self._plan = state
        self.dirty = (1 << len(self._plan.slots)) - 1  # not kept: a restored profile writes in full


class SlotPlan:
    """Which total slot each (metric, window) pair uses; shared by all profiles of a flow."""

    def __init__(self, slots: list[tuple[int, int | None]]):
        self.slots = list(slots)
        n_metrics = max((m for m, _ in slots), default=-1) + 1
        if n_metrics > MAX_METRICS:
            raise ValueError(f"at most {MAX_METRICS} windowed metrics")
        self.by_metric: list[list[tuple[int, int | None]]] = [[] for _ in range(n_metrics)]
        self.by_window: dict[int, list[int]] = {}
        for slot, (metric, window) in enumerate(slots):
            self.by_metric[metric].append((slot, window))
            if window is not None:
                self.by_window.setdefault(window, [-1] * MAX_METRICS)[metric] = slot
        self.longest = max(self.by_window, default=0)
        # for MinuteBuckets' fast paths: each metric's slots and their dirty bits, windowed slots
        # (a window holds its current minute when it is at least one minute long)
        now_in = [[s for s, w in pairs if w is None or w > 0] for pairs in self.by_metric]
        self.slots_of = [tuple(slots) for slots in now_in]
        self.mask_of = [sum(1 << s for s in slots) for slots in now_in]
        self.windowed = tuple(s for s, (_, w) in enumerate(self.slots) if w is not None)
        self.ascending = tuple(sorted(self.by_window))

    def __reduce__(self):
        return (SlotPlan, (self.slots,))
