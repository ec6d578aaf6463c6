"""One profile's state and the feature values computed from it, as the registry declares them.

:class:`FeaturePlan` compiles the registry once per flow: which windowed metric each event name
feeds, which time features it moves, and one small function per feature. :class:`Profile` is the
per-user state (minute buckets, first/last times, the recent session's events, the open cart,
campaign touches). Everything is order-independent where the definition allows it (sums, minima,
maxima, event-time sessions), so a replay or another worker count gives the same values.

>>> from config.registry import load_registry
>>> plan = FeaturePlan(load_registry())
>>> p = plan.new_profile()
>>> t0 = 1_790_000_000_000
>>> for i, name in enumerate(["page_view", "add_to_cart", "order_completed"]):
...     plan.apply(p, _demo_event(name, t0 + i * 60_000))
>>> values, _ = plan.values("u1", p)
>>> values["views_1h"], values["orders_30d"], values["revenue_30d"], values["aov_30d"]
('1', '1', '25.00', '25.0000')
>>> values["session_pages"], values["cart_updated_at"] == str(t0 + 120_000), "cart_items" in values
('1', True, False)
>>> values["lifecycle"], values["activity"], values["rfm_tier"]
('new', 'highly_active', 'general-develop')

Bounded state: the cart keeps at most ``max_cart_items`` lines (adds and removals since the
latest order); beyond, the oldest line goes (smallest (time, quantity, cents)), counted as
``evictions{cart_item}``, so the cart is the newest lines whatever the arrival order. The other
per-profile collections are bounded by time: minute buckets by the longest window, sessions by
that window plus the session gap (sessions are more than a gap apart), touches are two.

>>> plan = FeaturePlan(load_registry(), max_cart_items=2)
>>> p = plan.new_profile()
>>> for i in range(3):  # three adds of one item at 25.00; the first goes
...     plan.apply(p, _demo_event("add_to_cart", t0 + i * 1000))
>>> sorted(p.cart), plan.values("u1", p)[0]["cart_items"]
([(1790000001000, 1, 2500), (1790000002000, 1, 2500)], '2')
"""
from __future__ import annotations

import heapq
from array import array
from bisect import bisect_right
from typing import Callable

from config.registry import Registry
from features.buckets import MAX_METRICS, METRIC_BITS, MinuteBuckets
from surgeflow.stats import STATS
from triggers.rules import idempotency_key

MINUTE_MS = 60_000
DAY_MS = 86_400_000
CART_ADD, CART_REMOVE, ORDER, CHECKOUT = "add_to_cart", "remove_from_cart", "order_completed", "checkout_started"
# Inputs a feature may read besides the window totals (Profile.changed bits, see FeaturePlan.delta)
IN_SESSION, IN_CART, IN_TOUCH, IN_TIME0 = 1, 2, 4, 8  # then one bit per first/last time
FULL_EVERY_MS = DAY_MS  # a profile is written in full at least once per event-time day
MAX_CART_ITEMS = 100  # default cap on cart lines per profile (config: limits.max_cart_items)


def cents(value) -> int:
    """Amounts are summed exactly, in cents.

    >>> cents(129.99), cents(0.1) + cents(0.2), cents(True), cents("12")
    (12999, 30, 0, 0)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return 0
    return round(value * 100)


def money(c: int) -> str:
    """Cents as a decimal amount.

    >>> money(12999), money(-5), money(0)
    ('129.99', '-0.05', '0.00')
    """
    sign = "-" if c < 0 else ""
    c = abs(c)
    return f"{sign}{c // 100}.{c % 100:02d}"


def quantity(props: dict) -> int:
    q = props.get("quantity")
    return q if isinstance(q, int) and not isinstance(q, bool) and q >= 1 else 1


def join_session(sess: array, start: int, end: int, views: int, gap_ms: int) -> None:
    """Add the events spanning [start, end] (``views`` page views, one chain) to the sessions.

    Sessions are kept as sorted (start, end, views) triples more than ``gap_ms`` apart. Two
    chains of events whose spans overlap or come within the gap form one chain, so adding an event
    (a point) or merging another profile's sessions is interval merging: exact, and in any order.

    >>> s = array("q")
    >>> for ts, v in [(0, 1), (10, 1), (100, 0), (55, 1)]:  # gap 50: 55 bridges 10 and 100
    ...     join_session(s, ts, ts, v, 50)
    ...     print(list(s))
    [0, 0, 1]
    [0, 10, 2]
    [0, 10, 2, 100, 100, 0]
    [0, 100, 3]
    """
    i = len(sess) // 3
    while i and sess[3 * i - 2] + gap_ms >= start:  # back to the first session ending near enough
        i -= 1
    j = i
    n = len(sess) // 3
    while j < n and sess[3 * j] - gap_ms <= end:  # every session within the gap of the span joins
        start, end, views = min(start, sess[3 * j]), max(end, sess[3 * j + 1]), views + sess[3 * j + 2]
        j += 1
    sess[3 * i:3 * j] = array("q", (start, end, views))


class Profile:
    __slots__ = ("buckets", "times", "sess", "cart", "last_order", "last_checkout", "cart_updated",
                 "first_touch", "last_touch", "as_of", "next_due", "arrival_ms", "written",
                 "active", "last_event", "pending_examples", "changed", "sent_as_of",
                 "marketing", "tz", "moving_triggers")

    def __init__(self, buckets: MinuteBuckets, n_times: int):
        self.buckets = buckets
        self.times: list[int | None] = [None] * n_times
        self.sess = array("q")  # sessions as flat (start, end, views) triples, see join_session
        # (ts, +/- quantity, +/- cents) after the last order; a min-heap: the oldest line first
        self.cart: list[tuple[int, int, int]] = []
        self.last_order: int | None = None
        self.last_checkout: int | None = None
        self.cart_updated: int | None = None
        self.first_touch: tuple[int, str] | None = None
        self.last_touch: tuple[int, str] | None = None
        self.as_of = 0  # event time the values refer to; never moves back
        self.next_due: int | None = None
        self.arrival_ms = 0  # latest arrival among unflushed events (latency figures only)
        self.written = 0  # bit mask of the fields stored in Redis
        self.active = False  # an event since the last write: refresh the key's TTL
        self.last_event = 0  # latest event time (state eviction)
        self.pending_examples = None  # the models' state of the user (open predictions, scores), while the profile moves
        self.changed = 0  # inputs other than the window totals moved since the last write (IN_*)
        self.sent_as_of: int | None = None  # as_of of the last write; None: write in full next
        # Contact facts for trigger actions, from the latest event (in event time) carrying
        # them: (ts, context.consent.marketing) and context.timezone.
        self.marketing: tuple[int, bool] | None = None
        self.tz: tuple[int, str] | None = None
        self.moving_triggers = None  # the trigger state, while the profile moves shards

    def __setstate__(self, state) -> None:
        self.marketing = self.tz = self.moving_triggers = None  # snapshots from before them
        for name, value in state[1].items():
            setattr(self, name, value)
        heapq.heapify(self.cart)  # a snapshot from before the cap kept it in arrival order


def _max(a, b):
    return b if a is None else a if b is None else max(a, b)


def _min(a, b):
    return b if a is None else a if b is None else min(a, b)


class FeaturePlan:
    """The registry compiled for the flow: event routing into state, and value functions."""

    def __init__(self, registry: Registry, max_cart_items: int = MAX_CART_ITEMS):
        if max_cart_items < 1:
            raise ValueError("max_cart_items must be >= 1")
        self.registry = registry
        self.max_cart_items = max_cart_items
        params = registry.params
        self.gap_ms = int(params["session_gap_min"] * MINUTE_MS)
        self.session_horizon_ms = max(registry.windows.values()) * MINUTE_MS + self.gap_ms
        metrics: dict[tuple, int] = {}
        slots: list[tuple[int, int | None]] = []
        self.slot_of: dict[str, int] = {}
        self.times: list[tuple[str, tuple, tuple, bool]] = []
        self.view_events: frozenset[str] = frozenset()
        for f in registry.features:
            if f.aggregation in ("count", "sum"):
                key = (f.events, f.exclude, f.prop if f.aggregation == "sum" else None)
                metric = metrics.setdefault(key, len(metrics))
                self.slot_of[f.name] = len(slots)
                slots.append((metric, f.window_min))
            elif f.aggregation in ("first_time", "last_time"):
                self.times.append((f.name, f.events, f.exclude, f.aggregation == "first_time"))
            elif f.aggregation == "session" and f.part == "pages":
                self.view_events = frozenset(f.events)
        self.metrics = list(metrics)
        self.first_mask = tuple(t[3] for t in self.times)
        self._slots = MinuteBuckets(slots).__getstate__()[4]
        self._routes: dict[str, tuple] = {}  # event name -> what it moves, see _route
        self.fields = registry.names
        self.bit = {name: 1 << i for i, name in enumerate(self.fields)}
        time_index = {t[0]: i for i, t in enumerate(self.times)}
        for f in registry.features:
            if f.aggregation == "days_since" and any(o not in time_index for o in f.of):
                raise ValueError(f"{f.name}: days_since needs first_time / last_time features")
        self.computes = [(f, _COMPUTE[f.aggregation](self, f)) for f in registry.features]
        self._compute_of = {f.name: c for f, c in self.computes}
        self._init_inputs(registry, time_index)
        # features with a value as of an earlier time (values_at)
        self.point_in_time = frozenset(f.name for f in registry.features
                                       if point_in_time_error(registry, f.name) is None)
        # last_time features -> the count metric of the same events (their point-in-time value)
        self.time_metric = [metrics.get((events, exclude, None)) for _, events, exclude, _ in self.times]
        # scores and versions the profile shards' models write (models/runtime.py), not computed
        self.model_fields = frozenset(f.name for f in registry.features if f.aggregation == "model")

    def new_profile(self) -> Profile:
        return Profile(MinuteBuckets(plan=self._slots), len(self.times))

    def _route(self, name: str) -> tuple:
        """What an event of this name moves: (metrics as (index, prop), time features as
        (index, first), page views it adds to its session, whether it touches the cart).
        Memoised per name; bounded, as names come from the input."""
        if len(self._routes) >= 4096:
            self._routes.clear()
        route = self._routes[name] = (
            tuple((i, prop) for i, (events, exclude, prop) in enumerate(self.metrics)
                  if name not in exclude and ("*" in events or name in events)),
            tuple((i, first) for i, (_, events, exclude, first) in enumerate(self.times)
                  if name not in exclude and ("*" in events or name in events)),
            int(name in self.view_events),
            name in (CART_ADD, CART_REMOVE, ORDER, CHECKOUT))
        return route

    # -- state -----------------------------------------------------------------------------
    def apply(self, p: Profile, e) -> None:
        """Add one event (deduplicated, on time, with consent) to a profile."""
        ts, name = e.ts_ms, e.name
        if ts > p.as_of:
            p.as_of = ts
        if ts > p.last_event:
            p.last_event = ts
        route = self._routes.get(name)
        if route is None:
            route = self._route(name)
        metrics, time_features, views, cart = route
        b = p.buckets
        b.advance(p.as_of // MINUTE_MS)
        if metrics:
            minute = ts // MINUTE_MS
            for metric, prop in metrics:
                value = 1 if prop is None else cents(e.revenue if prop == "revenue" else
                                                     e.cost if prop == "cost" else e.properties.get(prop))
                if value:
                    b.add(minute, metric, value)
        changed = p.changed | IN_SESSION
        if time_features:
            times = p.times
            for i, first in time_features:
                t = times[i]
                if t is None or (ts < t if first else ts > t):
                    times[i] = ts
                    changed |= IN_TIME0 << i
        # join_session's usual cases without its search: an event at or after the latest
        # session's last one extends that session (within the gap) or starts the next one
        sess = p.sess
        if not sess:
            sess.extend((ts, ts, views))
        elif ts >= sess[-2]:
            if ts - sess[-2] <= self.gap_ms:
                sess[-2] = ts
                sess[-1] += views
            else:
                sess.extend((ts, ts, views))
        else:
            join_session(sess, ts, ts, views, self.gap_ms)
        if cart:
            self._cart(p, e, ts, name)
            changed |= IN_CART
        if e.campaign:
            touch = (ts, e.campaign)
            if p.first_touch is None or touch < p.first_touch:
                p.first_touch = touch
                changed |= IN_TOUCH
            if p.last_touch is None or touch > p.last_touch:
                p.last_touch = touch
                changed |= IN_TOUCH
        p.changed = changed
        if e.arrival_ms > p.arrival_ms:
            p.arrival_ms = e.arrival_ms
        p.active = True

    def _cart(self, p: Profile, e, ts: int, name: str) -> None:
        if name == CHECKOUT:
            p.last_checkout = _max(p.last_checkout, ts)
            return
        p.cart_updated = _max(p.cart_updated, ts)
        if name == ORDER:
            if p.last_order is None or ts > p.last_order:
                p.last_order = ts
                p.cart = [c for c in p.cart if c[0] > ts]
                heapq.heapify(p.cart)
            return
        if p.last_order is not None and ts <= p.last_order:
            return  # a cart change from before the latest order: that cart is gone
        q = quantity(e.properties)
        line = cents(e.properties.get("price")) * q
        sign = 1 if name == CART_ADD else -1
        heapq.heappush(p.cart, (ts, sign * q, sign * line))
        self._cap_cart(p.cart)

    def _cap_cart(self, cart: list) -> None:
        """At most max_cart_items lines: the oldest go (O(log n) each)."""
        while len(cart) > self.max_cart_items:
            heapq.heappop(cart)
            STATS.add_labeled("evictions", "cart_item")

    def advance(self, p: Profile, now_ms: int) -> None:
        """A timer fired: "now" for this profile moved without an event."""
        if now_ms > p.as_of:
            p.as_of = now_ms
        p.buckets.advance(p.as_of // MINUTE_MS)

    def merge(self, p: Profile, other: Profile) -> None:
        """Absorb another profile into ``p`` (an anonymous visitor who logged in)."""
        p.buckets.merge(other.buckets)
        for i, b in enumerate(other.times):
            if b is not None:
                a = p.times[i]
                p.times[i] = b if a is None else min(a, b) if self.first_mask[i] else max(a, b)
        o = other.sess
        for k in range(0, len(o), 3):
            join_session(p.sess, o[k], o[k + 1], o[k + 2], self.gap_ms)
        orders = [t for t in (p.last_order, other.last_order) if t is not None]
        p.last_order = max(orders) if orders else None
        p.cart = sorted(c for c in p.cart + other.cart if p.last_order is None or c[0] > p.last_order)
        self._cap_cart(p.cart)  # (a sorted list is a heap)
        p.last_checkout = _max(p.last_checkout, other.last_checkout)
        p.cart_updated = _max(p.cart_updated, other.cart_updated)
        p.first_touch = _min(p.first_touch, other.first_touch)
        p.last_touch = _max(p.last_touch, other.last_touch)
        p.marketing = _max(p.marketing, other.marketing)
        p.tz = _max(p.tz, other.tz)
        p.as_of = max(p.as_of, other.as_of)
        p.last_event = max(p.last_event, other.last_event)
        p.arrival_ms = max(p.arrival_ms, other.arrival_ms)
        p.active = True
        p.sent_as_of = None  # anything may have moved: the next write is a full one

    @staticmethod
    def session(p: Profile) -> tuple[int, int, int] | None:
        """(start, last, views) of the latest session, in event time."""
        sess = p.sess
        return (sess[-3], sess[-2], sess[-1]) if sess else None

    def values_at(self, user: str, p: Profile, at_ms: int) -> Callable[[str], object]:
        """The profile's values *as of the start of the minute of* ``at_ms`` (point in time),
        whatever came in since: nothing at or after that minute counts. For the features
        :func:`point_in_time_error` accepts (windows, lifetime sums, their ratios, first times,
        last times to the minute and within the longest window, days since); the models read their inputs so, which makes a score
        independent of when the events of the same minutes arrived."""
        return _Num(_Ctx(user, _PointInTime(self, p, at_ms // MINUTE_MS), self)).__getitem__

    def inputs_at(self, names: tuple[str, ...]) -> Callable[[str, Profile, int], list]:
        """A reader of these features' point-in-time values (:meth:`values_at`), compiled once
        for a model's inputs: counts, sums and ratios of counts straight from the slots, the
        rest through the generic path."""
        floor = self.registry.params["min_denominator"]
        by_name = self.registry.by_name
        time_index = {t[0]: i for i, t in enumerate(self.times)}
        steps: list[tuple] = []
        for name in names:
            f = by_name[name]
            if f.aggregation in ("count", "sum"):
                steps.append((0, self.slot_of[name], f.aggregation == "sum"))
            elif f.aggregation == "ratio" and all(by_name[o].aggregation == "count" for o in f.of):
                steps.append((1, self.slot_of[f.of[0]], self.slot_of[f.of[1]], floor))
            elif f.aggregation == "days_since" and all(o in time_index for o in f.of):
                steps.append((3, tuple(time_index[o] for o in f.of)))
            else:
                steps.append((2, name))

        slot_of = self._slots.slots  # slot -> (metric, window)
        used = sorted({s for step in steps if step[0] < 2
                       for s in (step[1:3] if step[0] == 1 else step[1:2])})
        windows = sorted({slot_of[s][1] for s in used if slot_of[s][1] is not None})
        shortest = windows[0] if windows else 1 << 62
        adjust = [(s, *slot_of[s]) for s in used]

        def totals_at(b: MinuteBuckets, minute: int):
            """The used slots' totals as of ``minute``, as _SlotsAt gives them, all at once: the
            running total, minus the buckets after the minute, plus, per window, those that were
            still in it. None when that is not the usual case (_SlotsAt then)."""
            now, keys = b.now, b.keys
            if not keys or now < minute or now - minute >= shortest \
                    or keys[-1] >> METRIC_BITS > now:
                return None
            if now == minute:
                return b.totals
            after = b.sums(minute, now)
            entering = {w: b.sums(minute - w, now - w) for w in windows}
            totals = b.totals
            return {slot: totals[slot] - after.get(metric, 0)
                    + (entering[window].get(metric, 0) if window is not None else 0)
                    for slot, metric, window in adjust}

        def read(user: str, p: Profile, at_ms: int) -> list:
            minute = at_ms // MINUTE_MS
            totals = totals_at(p.buckets, minute - 1)
            if totals is None:
                totals = _SlotsAt(p.buckets, minute - 1)
            times = num = None
            out = []
            for step in steps:
                if step[0] == 0:
                    v = totals[step[1]]
                    out.append(v / 100 if step[2] else v)
                elif step[0] == 1:
                    den = totals[step[2]]
                    out.append(totals[step[1]] / den if den and den > 0 and den >= step[3] else None)
                elif step[0] == 3:  # days since the first of its anchors that is set
                    if times is None:
                        times = _TimesAt(self, p, minute)
                    days = None
                    for i in step[1]:
                        anchor = times[i]
                        if anchor is not None:
                            days = (minute * MINUTE_MS - anchor) // DAY_MS
                            break
                    out.append(days)
                else:
                    if num is None:
                        num = _Num(_Ctx(user, _PointInTime(self, p, minute), self))
                    out.append(num[step[1]])
            return out
        return read

    def prune_sessions(self, p: Profile, watermark: int) -> None:
        """Forget sessions ended more than the longest window before "now" (keep the latest).

        Not at the lateness horizon: a visitor's profile merged later may hold older events that
        bridge two of the user's sessions, and the result must not depend on when the merge
        arrives. A chain bridging that far back would need events every gap for the window."""
        sess = p.sess
        limit = watermark - self.session_horizon_ms
        cut = 0
        while cut < len(sess) - 3 and sess[cut + 1] < limit:
            cut += 3
        if cut:
            del sess[:cut]

    # -- values ----------------------------------------------------------------------------
    def values(self, user: str, p: Profile) -> tuple[dict[str, str], dict[str, float]]:
        """(stored values, numeric values by name)."""
        out: dict[str, str] = {}
        ctx = _Ctx(user, p, self)
        num = _Num(ctx)
        for f, compute in self.computes:
            value, text = compute(ctx, num)
            num[f.name] = value
            if text is not None:
                out[f.name] = text
        out["as_of"] = str(p.as_of)
        return out, num

    def feature_value(self, user: str, p: Profile, name: str, cache: dict | None = None):
        """One feature's value as of the profile's state, as the reader sees it in Redis (the
        text: "high", "decline", "3"), else its number; None when there is no such feature
        or it has no value."""
        compute = self._compute_of.get(name)
        if compute is None:
            return None
        num = _Num(_Ctx(user, p, self)) if cache is None else cache
        value, text = compute(num.ctx, num)
        return text if text is not None else value

    def _init_inputs(self, registry: Registry, time_index: dict[str, int]) -> None:
        """Which inputs each feature reads, as one bit mask: the window slots (bits of
        MinuteBuckets.dirty), then Profile.changed bits, then one bit per days_since feature
        (its whole-day count moved); derived features read what their ``of`` features read."""
        n = len(self._slots.slots)
        day_bit = (IN_TIME0 << len(self.times)) << n
        self._day_bits: list[tuple[int, list[int]]] = []
        reads: dict[str, int] = {}
        by_name = registry.by_name

        def of(name: str) -> int:  # (the registry rejects features derived from themselves)
            nonlocal day_bit
            if name in reads:
                return reads[name]
            f = by_name[name]
            a = f.aggregation
            if a in ("count", "sum"):
                r = 1 << self.slot_of[name]
            elif a in ("first_time", "last_time"):
                r = (IN_TIME0 << time_index[name]) << n
            elif a in ("session", "cart", "touch"):
                r = {"session": IN_SESSION, "cart": IN_CART, "touch": IN_TOUCH}[a] << n
            elif a == "model":
                r = 0  # scored by the shard on every write
            else:
                r = 0
                for o in f.of:
                    r |= of(o)
                if a == "days_since":
                    r |= day_bit
                    self._day_bits.append((day_bit, [time_index[o] for o in f.of]))
                    day_bit <<= 1
            reads[name] = r
            return r

        for f in registry.features:
            of(f.name)
        reads_list = [reads[f.name] for f in registry.features]
        width = max((r.bit_length() for r in reads_list), default=0)
        self._readers = [sum(1 << i for i, r in enumerate(reads_list) if r >> b & 1)
                         for b in range(width)]  # input bit -> features reading it
        self._todo: dict[int, list] = {}

    def delta(self, user: str, p: Profile) -> tuple[dict[str, str], list[str]]:
        """What changed in the stored hash since this profile's last write: (fields to set,
        fields to remove). Only features whose inputs moved are computed. The first write, the
        first after a merge or a restart, and one per event-time day are full: every field, and
        every field not set is removed if it was written (``written``), so a hash that lost a
        write heals."""
        b = p.buckets
        as_of, sent = p.as_of, p.sent_as_of
        if sent is None or as_of // FULL_EVERY_MS != sent // FULL_EVERY_MS:
            changed = -1
        else:
            changed = b.dirty | (p.changed << len(b.totals))
            if as_of != sent:
                times = p.times
                for bit, anchors in self._day_bits:
                    for i in anchors:  # the first anchor set
                        t = times[i]
                        if t is not None:
                            if (as_of - t) // DAY_MS != (sent - t) // DAY_MS:
                                changed |= bit
                            break
        b.dirty = 0
        p.changed = 0
        todo = self._todo.get(changed)
        if todo is None:
            todo = self._todo_for(changed)
        runs, inputs = todo
        out: dict[str, str] = {}
        removed: list[str] = []
        written = p.written
        totals = b.totals
        ctx = num = None
        if inputs is not None:  # derived features to compute
            ctx = _Ctx(user, p, self)
            num = _Num(ctx)
            for name, slot, money_ in inputs:  # the window totals they read, as _count gives them
                v = totals[slot]
                num[name] = (v / 100 if money_ else v) if v else 0
        for totals_run, computes_run in runs:
            for bit, name, slot, money_ in totals_run:  # as _count computes them, inline
                v = totals[slot]
                if v:
                    out[name] = money(v) if money_ else str(v)
                    written |= bit
                elif written & bit:
                    removed.append(name)
                    written ^= bit
            for bit, name, compute in computes_run:
                value, text = compute(ctx, num)
                num[name] = value
                if text is not None:
                    out[name] = text
                    written |= bit
                elif written & bit:
                    removed.append(name)
                    written ^= bit
        p.written = written
        if as_of != sent:
            out["as_of"] = str(as_of)
        p.sent_as_of = as_of
        return out, removed

    def _todo_for(self, changed: int) -> tuple:
        """The features to compute when these inputs moved (-1: all), memoised per mask:
        (runs, inputs). The features in registry order, as runs of window totals, which delta
        reads inline, each followed by a run of other features, computed; ``inputs``: the
        window totals the latter read (put in ``num`` first), None when there are none."""
        if changed == -1:
            features = -1
        else:
            features, m = 0, changed
            while m:
                low = m & -m
                features |= self._readers[low.bit_length() - 1]
                m ^= low
        runs: list[tuple[list, list]] = []
        inputs: dict[str, tuple] = {}
        for i, (f, compute) in enumerate(self.computes):
            if not features >> i & 1 or f.aggregation == "model":
                continue
            window_total = f.aggregation in ("count", "sum")
            if not runs or (window_total and runs[-1][1]):
                runs.append(([], []))
            if window_total:
                runs[-1][0].append((self.bit[f.name], f.name, self.slot_of[f.name],
                                    f.aggregation == "sum"))
                continue
            runs[-1][1].append((self.bit[f.name], f.name, compute))
            for o in f.of:
                if o in self.slot_of:
                    inputs[o] = (o, self.slot_of[o], self.registry.by_name[o].aggregation == "sum")
        derived = any(computes_run for _, computes_run in runs)
        todo = (runs, tuple(inputs.values()) if derived else None)
        if len(self._todo) > 4096:
            self._todo.clear()  # bounded: the masks seen in practice are a few hundred
        self._todo[changed] = todo
        return todo

    def day_due(self, p: Profile) -> int | None:
        """The next time a "days since" value changes (a timer, so silent users age too)."""
        best = None
        times, as_of = p.times, p.as_of
        for _, anchors in self._day_bits:
            for i in anchors:  # the first anchor set
                t = times[i]
                if t is not None:
                    due = t + ((as_of - t) // DAY_MS + 1) * DAY_MS
                    if best is None or due < best:
                        best = due
                    break
        return best


POINT_IN_TIME = ("count", "sum", "ratio", "first_time", "last_time", "days_since", "at_least")


def point_in_time_error(registry: Registry, name: str) -> str | None:
    """Why a feature has no point-in-time value (:meth:`FeaturePlan.values_at`), or None."""
    f = registry.by_name[name]
    if f.aggregation not in POINT_IN_TIME:
        return f"{name} is a {f.aggregation} feature: it has no value as of an earlier time"
    if f.aggregation == "last_time" and not any(
            g.aggregation == "count" and g.events == f.events and g.exclude == f.exclude
            for g in registry.features):
        return f"{name}: a last_time needs a count of the same events for its earlier values"
    for of in f.of or ():
        if of in registry.by_name and (error := point_in_time_error(registry, of)):
            return error
    return None


class _PointInTime:
    """A profile as it stood at the start of ``minute`` (what :func:`_COMPUTE` reads of one)."""

    __slots__ = ("buckets", "times", "as_of")

    def __init__(self, plan: FeaturePlan, p: Profile, minute: int):
        self.buckets = _TotalsAt(p.buckets, minute - 1)
        self.as_of = minute * MINUTE_MS
        self.times = _TimesAt(plan, p, minute)


class _TimesAt:
    """``times[i]`` as of the start of ``minute``, computed when read. A first time is exact; a
    last time is the latest such event before the minute and within the longest window, to the
    minute: the same whatever came since (the count's buckets hold it when the time itself moved
    on; older buckets may be gone)."""

    __slots__ = ("plan", "p", "minute")

    def __init__(self, plan: FeaturePlan, p: Profile, minute: int):
        self.plan, self.p, self.minute = plan, p, minute

    def __getitem__(self, i: int) -> int | None:
        p, minute = self.p, self.minute
        t, as_of = p.times[i], minute * MINUTE_MS
        if t is None or self.plan.times[i][3]:
            return t if t is not None and t < as_of else None
        b = p.buckets
        oldest = minute - 1 - b._plan.longest  # minutes after this one
        if t < as_of:
            return t // MINUTE_MS * MINUTE_MS if t // MINUTE_MS > oldest else None
        metric = self.plan.time_metric[i]
        if metric is None:
            return None
        keys, vals = b.keys, b.vals
        for k in range(bisect_right(keys, ((minute - 1) << METRIC_BITS) | (MAX_METRICS - 1)) - 1, -1, -1):
            if keys[k] >> METRIC_BITS <= oldest:
                break
            if keys[k] & (MAX_METRICS - 1) == metric and vals[k]:
                return (keys[k] >> METRIC_BITS) * MINUTE_MS
        return None


class _TotalsAt:
    """``totals[slot]`` as of an earlier minute (MinuteBuckets.total_at), computed when read."""

    __slots__ = ("totals",)

    def __init__(self, buckets: MinuteBuckets, minute: int):
        self.totals = _SlotsAt(buckets, minute)


class _SlotsAt:
    """Each slot's total as of ``minute`` = its running total (as of the buckets' "now") minus
    the buckets after ``minute``, plus those that were still in its window then: both short
    ranges (a score comes about a minute after its event), summed once per metric and window."""

    __slots__ = ("b", "minute", "after", "entering")

    def __init__(self, buckets: MinuteBuckets, minute: int):
        self.b, self.minute = buckets, minute
        self.after: dict[int, int] | None = None
        self.entering: dict[int, dict[int, int]] = {}

    def __getitem__(self, slot: int) -> int:
        b, minute = self.b, self.minute
        metric, window = b._plan.slots[slot]
        now = b.now
        keys = b.keys
        last = keys[-1] >> METRIC_BITS if keys else now
        if window is not None and (now < minute or minute <= now - window or last > now):
            return b.total_at(slot, minute)  # (not the usual case)
        if self.after is None:
            self.after = b.sums(minute, max(now, last))
        if window is None:
            return b.totals[slot] - self.after.get(metric, 0)
        entering = self.entering.get(window)
        if entering is None:
            entering = self.entering[window] = b.sums(minute - window, now - window)
        return b.totals[slot] - self.after.get(metric, 0) + entering.get(metric, 0)



class _Num(dict):
    """Numeric values by feature name; one not computed in this pass is computed on first use
    (a write computes only the features whose inputs moved, a derived one may need the rest)."""
    __slots__ = ("ctx",)

    def __init__(self, ctx):
        self.ctx = ctx

    def __missing__(self, name):
        value = self[name] = self.ctx.plan._compute_of[name](self.ctx, self)[0]
        return value


class _Ctx:
    __slots__ = ("user", "p", "plan", "_session")

    def __init__(self, user: str, p: Profile, plan: FeaturePlan):
        self.user, self.p, self.plan = user, p, plan
        self._session = False

    @property
    def session(self):
        if self._session is False:
            self._session = self.plan.session(self.p)
        return self._session


# -- one compile function per aggregation: returns compute(ctx, num) -> (number, text | None) ----
def _count(plan: FeaturePlan, f):
    slot = plan.slot_of[f.name]
    money_ = f.aggregation == "sum"

    def compute(ctx, num):
        v = ctx.p.buckets.totals[slot]
        if not v:
            return 0, None
        return (v / 100, money(v)) if money_ else (v, str(v))
    return compute


def _ratio(plan, f):
    a, b = f.of
    floor = plan.registry.params["min_denominator"]

    def compute(ctx, num):
        den = num[b]
        if not den or den <= 0 or den < floor:
            return None, None
        v = (num[a] or 0) / den
        return v, f"{v:.4f}"
    return compute


def _time(plan, f):
    i = next(i for i, t in enumerate(plan.times) if t[0] == f.name)

    def compute(ctx, num):
        t = ctx.p.times[i]
        return (t, str(t)) if t is not None else (None, None)
    return compute


def _days_since(plan, f):
    of = f.of

    def compute(ctx, num):
        for o in of:  # the first anchor set
            anchor = num[o]
            if anchor is not None:
                days = (ctx.p.as_of - anchor) // DAY_MS
                return days, str(days)
        return None, None
    return compute


def _rfm(plan, f):
    ds, orders, spend = f.of
    part = f.part
    p = plan.registry.params  # (read once: the plan is compiled per flow)
    recency, frequency, monetary = p["rfm_recency_days"], p["rfm_frequency_orders"], p["rfm_monetary"]

    def compute(ctx, num):
        n_orders = num[orders]
        if not n_orders:
            return None, None
        days = num[ds]
        r = days is not None and days < recency
        fr = n_orders >= frequency
        m = (num[spend] or 0) >= monetary
        if part != "tier":
            high = r if part == "r" else fr if part == "f" else m  # (the registry checks parts)
            return high, "high" if high else "low"
        kind = "value" if r and fr else "develop" if r else "retain" if fr else "winback"
        return None, f"{'important' if m else 'general'}-{kind}"
    return compute


def _lifecycle(plan, f):
    i7, i30, age = f.of
    p = plan.registry.params
    new_days, decline, growth_days = p["new_user_days"], p["decline_ratio"], p["growth_days"]

    def compute(ctx, num):
        a7, a30, days = num[i7] or 0, num[i30] or 0, num[age] or 0
        if a30 == 0:
            stage = "churned"
        elif days < new_days:
            stage = "new"
        elif 30 * a7 < decline * 7 * a30:
            stage = "decline"
        elif days < growth_days:
            stage = "growth"
        else:
            stage = "mature"
        return None, stage
    return compute


def _activity(plan, f):
    i7, i30 = f.of
    highly = plan.registry.params["interactions_highly_active"]

    def compute(ctx, num):
        a7, a30 = num[i7] or 0, num[i30] or 0
        level = "silent" if a30 == 0 else "highly_active" if a7 >= highly else "active"
        return None, level
    return compute


def _at_least(plan, f):
    (of,), cut = f.of, plan.registry.params[f.param]

    def compute(ctx, num):
        flag = int((num[of] or 0) >= cut)
        return flag, str(flag)
    return compute


def _session(plan, f):
    # one function per part: (start, last event, page views) of the latest session
    def session_id(ctx, num):
        s = ctx.session
        return (None, None) if s is None else (None, idempotency_key("session", ctx.user, str(s[0])))

    def pages(ctx, num):
        s = ctx.session
        return (None, None) if s is None else (s[2], str(s[2]))

    def started_at(ctx, num):
        s = ctx.session
        return (None, None) if s is None else (s[0], str(s[0]))

    def duration_s(ctx, num):
        s = ctx.session
        if s is None:
            return None, None
        v = (s[1] - s[0]) // 1000
        return v, str(v)
    return {"id": session_id, "pages": pages, "started_at": started_at,
            "duration_s": duration_s}[f.part]


def _cart(plan, f):
    # one function per part
    def items(ctx, num):
        cart = ctx.p.cart
        if not cart:  # most profiles
            return 0, None
        v = max(0, sum(c[1] for c in cart))
        return v, (str(v) if v else None)

    def value(ctx, num):
        cart = ctx.p.cart
        if not cart:
            return 0.0, None  # (0 / 100)
        v = max(0, sum(c[2] for c in cart))
        return v / 100, (money(v) if v else None)

    def updated_at(ctx, num):
        t = ctx.p.cart_updated
        return t, (str(t) if t is not None else None)

    def checkout_pending(ctx, num):
        p = ctx.p
        pending = int(p.last_checkout is not None
                      and (p.last_order is None or p.last_checkout > p.last_order))
        return pending, str(pending)
    return {"items": items, "value": value, "updated_at": updated_at}.get(f.part, checkout_pending)


def _argmax(plan, f):
    def compute(ctx, num):
        best = None
        for name, label in zip(f.of, f.labels):
            v = num[name]
            if v is not None and (best is None or v > best[0]):
                best = (v, label)
        return (None, best[1]) if best else (None, None)
    return compute


def _touch(plan, f):
    first = f.part == "first"

    def compute(ctx, num):
        t = ctx.p.first_touch if first else ctx.p.last_touch
        return (None, t[1]) if t else (None, None)
    return compute


def _model(plan, f):
    return lambda ctx, num: (None, None)  # scored by the shard's model after the other values


_COMPUTE: dict[str, Callable] = {
    "count": _count, "sum": _count, "ratio": _ratio, "first_time": _time, "last_time": _time,
    "days_since": _days_since, "rfm": _rfm, "lifecycle": _lifecycle, "activity": _activity,
    "at_least": _at_least, "session": _session, "cart": _cart, "argmax": _argmax,
    "touch": _touch, "model": _model,
}


def _demo_event(name: str, ts: int):
    from flows.events import Event
    props = {"price": 25.0} if name == "add_to_cart" else {}
    return Event(event_id=f"{name}-{ts}", type="track", name=name, user="u1", ts_ms=ts,
                 channel="web", campaign="", revenue=25.0 if name == "order_completed" else 0.0,
                 cost=0.0, ip="", properties=props)
