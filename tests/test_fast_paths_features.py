"""The feature code's fast paths give what the plain code gives, on random streams.

MinuteBuckets skips searches it can prove empty (nothing leaves a window whose range is older
than the oldest bucket, nothing enters when no bucket is ahead of "now") and adds to the current
minute without testing windows; FeaturePlan.apply extends the latest session without searching;
FeaturePlan.delta reads window totals inline and puts in ``num`` only those a derived feature
reads. Here the plain versions (the code before those paths) run side by side with the real
ones on the same input: same totals, dirty bits, buckets, sessions, written fields (in the same
order), bit for bit."""
from __future__ import annotations

import pickle
from array import array
from bisect import bisect_left, bisect_right

from hypothesis import given, settings, strategies as st

from config.registry import load_registry
from features.buckets import KEEP_PAST_LONGEST_MIN, MAX_METRICS, METRIC_BITS, NEVER, MinuteBuckets
from features.profile import (CART_ADD, CART_REMOVE, CHECKOUT, DAY_MS, FULL_EVERY_MS, IN_CART,
                              IN_SESSION, IN_TIME0, IN_TOUCH, MINUTE_MS, ORDER, FeaturePlan,
                              Profile, _Ctx, _Num, cents, join_session)
from flows.events import Event

PLAN = FeaturePlan(load_registry(), max_cart_items=3)
T0 = 1_795_392_000_000  # 2026-11-23T00:00Z


# -- the plain buckets: every window searched, every add tested against every window -------------
class PlainBuckets(MinuteBuckets):
    __slots__ = ()

    def _put(self, key: int, value: int) -> None:
        i = bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            self.vals[i] += value
        else:
            self.keys.insert(i, key)
            self.vals.insert(i, value)

    def add(self, minute: int, metric: int, value: int) -> None:
        self._put((minute << METRIC_BITS) | metric, value)
        totals, dirty = self.totals, self.dirty
        for slot, window in self._plan.by_metric[metric]:
            if window is None or (self.now - window < minute <= self.now):
                totals[slot] += value
                dirty |= 1 << slot
        self.dirty = dirty

    def advance(self, minute: int) -> None:
        old = self.now
        if minute <= old:
            return
        self.now = minute
        keys, vals, totals, plan = self.keys, self.vals, self.totals, self._plan
        if old == NEVER:
            self._rebuild()
        else:
            dirty = self.dirty
            for window, slots in plan.by_window.items():
                lo = bisect_right(keys, ((old - window) << METRIC_BITS) | (MAX_METRICS - 1))
                hi = bisect_right(keys, (min(minute - window, old) << METRIC_BITS) | (MAX_METRICS - 1))
                for i in range(lo, hi):
                    s = slots[keys[i] & (MAX_METRICS - 1)]
                    if s >= 0:
                        totals[s] -= vals[i]
                        dirty |= 1 << s
                lo = bisect_right(keys, (old << METRIC_BITS) | (MAX_METRICS - 1))
                hi = bisect_right(keys, (minute << METRIC_BITS) | (MAX_METRICS - 1))
                for i in range(lo, hi):
                    m = keys[i] >> METRIC_BITS
                    s = slots[keys[i] & (MAX_METRICS - 1)]
                    if s >= 0 and m > minute - window:
                        totals[s] += vals[i]
                        dirty |= 1 << s
            self.dirty = dirty
        cut = bisect_right(keys, ((minute - plan.longest - KEEP_PAST_LONGEST_MIN) << METRIC_BITS) | (MAX_METRICS - 1))
        if cut:
            del keys[:cut]
            del vals[:cut]

    def next_expiry(self) -> int | None:
        best = None
        keys = self.keys
        for window in self._plan.by_window:
            i = bisect_right(keys, ((self.now - window) << METRIC_BITS) | (MAX_METRICS - 1))
            if i < len(keys):
                leave = (keys[i] >> METRIC_BITS) + window
                if best is None or leave < best:
                    best = leave
        return best


def same_buckets(a: MinuteBuckets, b: MinuteBuckets) -> None:
    assert (list(a.keys), list(a.vals), list(a.totals), a.now, a.dirty) == \
        (list(b.keys), list(b.vals), list(b.totals), b.now, b.dirty)
    assert a.next_expiry() == b.next_expiry()


SLOTS = [(m, w) for m in range(3) for w in (1, 5, 60, None)]
bucket_op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 400), st.integers(0, 2), st.integers(-3, 5)),
    st.tuples(st.just("advance"), st.integers(0, 40)),  # forward by this many minutes
    st.tuples(st.just("merge"), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 2),
                                                   st.integers(1, 5)), max_size=5),
              st.integers(0, 400)),
    st.tuples(st.just("look")),  # the owner reads the dirty bits
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.lists(bucket_op, max_size=50))
def test_buckets_equal_the_plain_buckets(start, ops):
    fast, plain = MinuteBuckets(SLOTS), PlainBuckets(SLOTS)
    for b in (fast, plain):
        b.advance(start)
    for op in ops:
        if op[0] == "add":
            _, minute, metric, value = op
            minute = min(minute, fast.now) if minute % 3 else minute  # mostly at or before now
            for b in (fast, plain):
                b.add(minute, metric, value)
        elif op[0] == "advance":
            for b in (fast, plain):
                b.advance(b.now + op[1])
        elif op[0] == "merge":
            _, adds, now = op
            for b in (fast, plain):
                other = type(b)(SLOTS)
                other.advance(now)
                for minute, metric, value in adds:
                    other.add(minute, metric, value)
                b.merge(other)
        else:
            fast.dirty = plain.dirty = 0
        same_buckets(fast, plain)


# -- the plain plan: join_session for every event, every feature through its compute ------------
def plain_apply(plan: FeaturePlan, p: Profile, e: Event) -> None:
    ts, name = e.ts_ms, e.name
    p.as_of = max(p.as_of, ts)
    p.last_event = max(p.last_event, ts)
    minute = ts // MINUTE_MS
    b = p.buckets
    b.advance(p.as_of // MINUTE_MS)
    for metric, (events, exclude, prop) in enumerate(plan.metrics):
        if name in exclude or not ("*" in events or name in events):
            continue
        value = 1 if prop is None else cents(e.revenue if prop == "revenue" else
                                             e.cost if prop == "cost" else e.properties.get(prop))
        if value:
            b.add(minute, metric, value)
    changed = p.changed | IN_SESSION
    for i, (_, events, exclude, first) in enumerate(plan.times):
        if name in exclude or not ("*" in events or name in events):
            continue
        t = p.times[i]
        if t is None or (ts < t if first else ts > t):
            p.times[i] = ts
            changed |= IN_TIME0 << i
    join_session(p.sess, ts, ts, name in plan.view_events, plan.gap_ms)
    if name in (CART_ADD, CART_REMOVE, ORDER, CHECKOUT):
        plan._cart(p, e, ts, name)
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
    p.arrival_ms = max(p.arrival_ms, e.arrival_ms)
    p.active = True


def plain_delta(plan: FeaturePlan, user: str, p: Profile) -> tuple[dict, list]:
    b = p.buckets
    as_of, sent = p.as_of, p.sent_as_of
    if sent is None or as_of // FULL_EVERY_MS != sent // FULL_EVERY_MS:
        features = -1
    else:
        changed = b.dirty | (p.changed << len(b.totals))
        if as_of != sent:
            for bit, anchors in plan._day_bits:
                t = next((p.times[i] for i in anchors if p.times[i] is not None), None)
                if t is not None and (as_of - t) // DAY_MS != (sent - t) // DAY_MS:
                    changed |= bit
        features = 0
        for i in range(changed.bit_length()):
            if changed >> i & 1:
                features |= plan._readers[i]
    b.dirty = 0
    p.changed = 0
    out, removed, written = {}, [], p.written
    ctx = _Ctx(user, p, plan)
    num = _Num(ctx)
    for i, (f, compute) in enumerate(plan.computes):
        if not features >> i & 1 or f.aggregation == "model":
            continue
        value, text = compute(ctx, num)
        num[f.name] = value
        bit = plan.bit[f.name]
        if text is not None:
            out[f.name] = text
            written |= bit
        elif written & bit:
            removed.append(f.name)
            written ^= bit
    p.written = written
    if as_of != sent:
        out["as_of"] = str(as_of)
    p.sent_as_of = as_of
    return out, removed


def plain_day_due(plan: FeaturePlan, p: Profile) -> int | None:
    best = None
    for _, anchors in plan._day_bits:
        t = next((p.times[i] for i in anchors if p.times[i] is not None), None)
        if t is not None:
            due = t + ((p.as_of - t) // DAY_MS + 1) * DAY_MS
            if best is None or due < best:
                best = due
    return best


def same_profiles(a: Profile, b: Profile) -> None:
    same_buckets(a.buckets, b.buckets)
    for name in Profile.__slots__:
        if name != "buckets":
            va, vb = getattr(a, name), getattr(b, name)
            assert (list(va) if isinstance(va, array) else va) == \
                (list(vb) if isinstance(vb, array) else vb), name


GAP = PLAN.gap_ms  # events this far apart are one session, one more ms: two
NAMES = ["page_view", "product_viewed", "search", "add_to_cart", "remove_from_cart",
         "checkout_started", "order_completed", "login", "push_sent", "push_opened",
         "email_sent", "email_opened", "sms_sent", "sms_clicked", "ad_click", "signup", "mystery"]
step = st.one_of(
    st.tuples(st.just("event"), st.sampled_from(NAMES),
              st.sampled_from([0, 1_000, 30_000, 60_000, 20 * 60_000, GAP, GAP + 1, 3_600_000,
                               DAY_MS, 8 * DAY_MS]),  # forward in event time
              st.sampled_from([0, 0, 0, 50_000, 40 * 60_000]),  # back: out of order
              st.floats(0, 300).map(lambda x: round(x, 2)), st.integers(1, 3),
              st.sampled_from(["", "", "c1", "c2"])),
    st.tuples(st.just("write")),
    st.tuples(st.just("timer"), st.sampled_from([60_000, 3_600_000, DAY_MS, 31 * DAY_MS])),
    st.tuples(st.just("restart")),  # a snapshot restored: the next write is a full one
)


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=60), st.booleans())
def test_plan_equals_the_plain_plan(steps, resumed):
    fast = PLAN.new_profile()
    plain = Profile(PlainBuckets(plan=PLAN._slots), len(PLAN.times))
    if resumed:  # a restart wrote every field before: the first write removes the unset ones
        fast.written = plain.written = sum(PLAN.bit.values())
    t = T0
    for i, s in enumerate(steps):
        if s[0] == "event":
            _, name, forward, back, price, qty, campaign = s
            t += forward
            e = Event(f"e{i}", "track", name, "u1", t - back, "web", campaign,
                      price if name == ORDER else 0.0, 0.0, "",
                      properties={"price": price, "quantity": qty})
            PLAN.apply(fast, e)
            plain_apply(PLAN, plain, e)
        elif s[0] == "write":
            assert list(PLAN.delta("u1", fast)[0].items()) == list(plain_delta(PLAN, "u1", plain)[0].items())
        elif s[0] == "timer":
            t += s[1]
            PLAN.advance(fast, t)
            PLAN.advance(plain, t)
        else:
            fast = pickle.loads(pickle.dumps(fast))
            plain = pickle.loads(pickle.dumps(plain))
            fast.sent_as_of = plain.sent_as_of = None
        same_profiles(fast, plain)
        assert PLAN.day_due(fast) == plain_day_due(PLAN, plain)
    fast_out, fast_removed = PLAN.delta("u1", fast)
    plain_out, plain_removed = plain_delta(PLAN, "u1", plain)
    assert (list(fast_out.items()), fast_removed) == (list(plain_out.items()), plain_removed)
    same_profiles(fast, plain)
