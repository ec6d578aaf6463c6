"""Trigger rules: one small class per kind of rule, one protocol.

A rule is compiled from its typed spec (:mod:`triggers.spec`). It sees one user's events
(``on_event``) and its own timers (``on_due``), keeps what it waits for as :class:`Match` objects
in the user's trigger state, and returns :class:`Fire` s. It never sends: the engine
(:mod:`triggers.engine`) checks re-entry already done here, then the guards at the moment of
sending, and audits every decision. A match keeps the rule object it started with, so a reload of
the rule file never changes a match in progress.

>>> from triggers.spec import CountRule
>>> rule = compile_rule(CountRule(name="three_views", kind="count", events=["page_view"], count=3,
...                               action={"channel": "push", "message": "m"}))
>>> st, ctx = UserTriggers(), SimpleContext(session_start=0)
>>> fired = [bool(rule.on_event(st, _Demo("page_view", t, f"e{t}"), ctx)) for t in (1, 2, 3, 4)]
>>> fired, st.matches[(rule.slot, ())].step
([False, False, True, False], 4)
>>> rule.kind, rule.reentry
('count', 'once_per_session')
"""
from __future__ import annotations

import datetime as dt
import hashlib
import math
import zlib
from typing import Any

import orjson

from triggers.spec import Condition, EventMatch, Step, clock_minutes, duration_ms

ANY = "*"
NOT_DONE_BY_USER = frozenset({"push_sent", "sms_sent", "email_sent", "ad_impression",
                              "push_delivered"})  # sends and impressions: not the user's doing
SESSION_GAP_MS = 30 * 60_000
MAX_MATCHES_PER_RULE = 20  # schedules, sequences per user and rule (e.g. one per order)


def idempotency_key(*parts: str) -> str:
    """The action id: the same (rule, user, trigger, step) always gives the same key.

    >>> idempotency_key("abandoned_cart", "u1", "t1795428000000", "0")
    'bf7b42004c3ee4cca8abc0e3'
    """
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


class Match:
    """What one rule waits for, for one user and correlation key."""

    __slots__ = ("rule", "key", "due", "start", "trigger", "step", "data")

    def __init__(self, rule, key: tuple, due: int | None, start: int, trigger: str,
                 step: int = 0, data: Any = None):
        self.rule, self.key, self.due, self.start = rule, key, due, start
        self.trigger, self.step, self.data = trigger, step, data

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for s, v in zip(self.__slots__, state):
            setattr(self, s, v)


class Fire:
    """A rule fired: the engine turns it into a send (guards, audit, action)."""

    __slots__ = ("rule", "trigger", "step", "ts", "message", "props")

    def __init__(self, rule, trigger: str, step: int, ts: int, message: str, props: dict):
        self.rule, self.trigger, self.step, self.ts = rule, trigger, step, ts
        self.message, self.props = message, props


class UserTriggers:
    """One user's trigger state: open matches, pending sends (deferred, awaiting a fallback),
    recent sends (for caps) and re-entry marks. Empty = deleted: a user with nothing pending
    holds nothing."""

    __slots__ = ("matches", "sends", "history", "marks", "heap_due")

    def __init__(self):
        self.matches: dict[tuple, Match] = {}
        self.sends: list = []  # triggers.engine.Send
        self.history: list[tuple] = []  # (ts, channel, message, tags) of sends, oldest first
        self.marks: dict[str, tuple[int, int]] = {}  # rule -> (until, session start)
        self.heap_due: int | None = None  # the engine's timer for this user

    def __getstate__(self):
        return (self.matches, self.sends, self.history, self.marks, self.heap_due)

    def __setstate__(self, state):
        self.matches, self.sends, self.history, self.marks, self.heap_due = state

    def empty(self) -> bool:
        return not (self.matches or self.sends or self.history or self.marks)


class SimpleContext:
    """A stand-in context for examples and unit tests of rules alone: features from a dict."""

    def __init__(self, features: dict | None = None, session_start: int | None = None,
                 tz: str = "UTC", state_ttl_ms: int = 90 * 86_400_000):
        self.features = features or {}
        self._session = session_start
        self.tz, self.state_ttl_ms = tz, state_ttl_ms

    def feature(self, name: str):
        return self.features.get(name)

    def zone(self):
        from zoneinfo import ZoneInfo
        return ZoneInfo(self.tz)

    def session_start(self, ts: int) -> int | None:
        return self._session

    def session_span(self):
        return None if self._session is None else (self._session, self._session)

    def session_id(self, ts: int) -> str:
        return "" if self._session is None else idempotency_key("session", str(self._session))

    def marketing_ok(self, policy: str) -> bool:
        return True


class _Demo:
    """A minimal event for the examples."""

    def __init__(self, name, ts, event_id, properties=None, latlon=None):
        self.name, self.ts_ms, self.event_id = name, ts, event_id
        self.properties, self.latlon = properties or {}, latlon


# -- conditions --------------------------------------------------------------------------------
def _compare(got, op: str, want) -> bool:
    if op == "exists":
        return got is not None and got != ""
    if got is None:
        return op == "not_in" or op == "!="
    if op in ("<", "<=", ">", ">="):
        try:
            x = float(got)
        except (TypeError, ValueError):
            return False
        return x < want if op == "<" else x <= want if op == "<=" else x > want if op == ">" \
            else x >= want
    if op in ("==", "!="):
        same = got == want or (isinstance(want, (int, float)) and _num(got) == want) \
            or str(got) == str(want)
        return same if op == "==" else not same
    inside = got in want or str(got) in [str(w) for w in want]
    return inside if op == "in" else not inside


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance.

    >>> round(haversine_km((52.52, 13.405), (48.8566, 2.3522)))
    877
    """
    la1, lo1, la2, lo2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(h)))


def holds(cond: Condition, e, ctx) -> bool:
    """One condition against an event (may be None at a timer) and the user's context."""
    if cond.geo_within is not None:
        where = getattr(e, "latlon", None) if e is not None else None
        if where is None:
            return False
        g = cond.geo_within
        return any(haversine_km(where, s) <= g.radius_km for s in g.stores)
    if cond.feature is not None:
        return _compare(ctx.feature(cond.feature), cond.op, cond.value)
    props = e.properties if e is not None else {}
    return _compare(props.get(cond.property), cond.op, cond.value)


def all_hold(conds, e, ctx) -> bool:
    for c in conds:  # in order, the first that fails ends it (a loop: no generator per call)
        if not holds(c, e, ctx):
            return False
    return True


class _Events:
    """Compiled :class:`EventMatch`: names (``*`` = any event the user did) and conditions."""

    __slots__ = ("names", "any", "where", "session_start")

    def __init__(self, em: EventMatch):
        self.any = ANY in em.events
        self.names = frozenset(n for n in em.events if n != ANY)
        self.where = tuple(em.where)
        self.session_start = em.session_start

    def takes(self, name: str) -> bool:
        """The name test alone: all there is to an ``exit_on`` matcher (no conditions)."""
        return name in self.names or (self.any and name not in NOT_DONE_BY_USER)

    def __call__(self, e, ctx) -> bool:
        if not (e.name in self.names or (self.any and e.name not in NOT_DONE_BY_USER)):
            return False  # (the test of takes(), inline: this runs several times per event)
        if self.session_start and ctx.session_start(e.ts_ms) != e.ts_ms:
            return False
        return all_hold(self.where, e, ctx) if self.where else True


def _events_of(names) -> _Events:
    return _Events(EventMatch(events=list(names)))


# -- the rules ---------------------------------------------------------------------------------
class Rule:
    """The protocol. ``interest`` names the events the rule reads (``None``: every event)."""

    kind = ""

    def __init__(self, spec):
        self.spec = spec
        self.name = spec.name
        self.version = zlib.crc32(orjson.dumps(spec.model_dump(mode="json"),
                                               option=orjson.OPT_SORT_KEYS))
        self.slot = f"{self.name}@{self.version}"  # its matches: versions never mix
        self.retired = False  # a newer version of the rule is live: finish, start nothing
        self.priority = spec.priority
        self.shadow = spec.mode == "shadow"
        self.action = spec.action
        self.when = tuple(spec.when)
        # names only, no conditions: the engine decides it once per event name (reacting)
        self.exit = _events_of(spec.exit_on) if spec.exit_on else None
        self.correlate = tuple(getattr(spec, "correlate", ()) or ())
        self.reentry = spec.reentry if spec.reentry is not None else self._default_reentry()
        self.cooldown_ms = duration_ms(self.reentry) if self.reentry not in (
            "once", "once_per_session", "always") else 0
        names: set[str] = set(spec.exit_on)
        for em in self._matches():
            names |= set(em.events)
        self.interest = None if ANY in names else frozenset(names)
        # the profile features its tests read (a model score's rule is decided when the models
        # play the event: see TriggerEngine.on_event)
        self.features = frozenset(_features_in(spec.model_dump(mode="json")))

    def __getstate__(self):
        return self.spec  # a snapshot keeps the definition; the rule is compiled again on load

    def __setstate__(self, spec):
        self.__init__(spec)

    def _default_reentry(self) -> str:
        return "always"

    def _matches(self) -> list[EventMatch]:
        return []

    # -- protocol
    def on_event(self, st: UserTriggers, e, ctx) -> list[Fire]:
        raise NotImplementedError

    def on_due(self, st: UserTriggers, m: Match, ctx) -> list[Fire]:
        """``m.due`` has passed (the watermark is at or after it)."""
        del st.matches[(self.slot, m.key)]
        return []

    # -- shared
    def corr(self, e, start: bool = False) -> tuple | None:
        """The event's correlation key. A stop event without a field concerns every open match
        of the rule (None: an order without a cart id ends every cart); a start event without
        one opens the match of the empty value (the user's one cart)."""
        if not self.correlate:
            return ()
        props = e.properties
        key = []
        for f in self.correlate:
            v = props.get(f)
            if v is None or v == "":
                if not start:
                    return None
                v = ""
            key.append(str(v)[:128])
        return tuple(key)

    def eligible(self, st: UserTriggers, ts: int, ctx) -> bool:
        """The re-entry policy: may the rule start or fire again for this user now?"""
        mark = st.marks.get(self.name)
        if mark is None or self.reentry == "always":
            return True
        until, session = mark
        if self.reentry == "once_per_session":
            return session != ctx.session_start(ts) or ts >= until
        return ts >= until

    def mark(self, st: UserTriggers, ts: int, ctx) -> None:
        if self.reentry == "always":
            return
        if self.reentry == "once":
            until = ts + ctx.state_ttl_ms  # once while the user's state lives
        elif self.reentry == "once_per_session":
            until = ts + 24 * 3_600_000
        else:
            until = ts + self.cooldown_ms
        session = ctx.session_start(ts) if self.reentry == "once_per_session" else 0
        st.marks[self.name] = (until, session if session is not None else 0)

    def fire(self, st, trigger: str, step: int, ts: int, ctx, e=None, message: str | None = None,
             props: dict | None = None) -> list[Fire]:
        if self.when and not all_hold(self.when, e, ctx):
            return []
        self.mark(st, ts, ctx)
        return [Fire(self, trigger, step, ts, message or self.action.message, props or {})]

    def exit_matches(self, st: UserTriggers, e, ctx) -> list[Match]:
        """An ``exit_on`` event: the rule's open matches end (returned, for the audit)."""
        gone = self._open(st)
        for m in gone:
            del st.matches[(self.slot, m.key)]
        return gone

    def _evict_oldest(self, st: UserTriggers, limit: int) -> None:
        """Bounded whatever the input: beyond ``limit`` open matches, the oldest goes."""
        if len(st.matches) <= limit:
            return  # fewer matches of all rules than the limit: none to count
        open_ = self._open(st)
        if len(open_) > limit:
            oldest = min(open_, key=lambda x: (x.start, x.key))
            del st.matches[(self.slot, oldest.key)]

    def _open(self, st: UserTriggers) -> list[Match]:
        return [m for k, m in st.matches.items() if k[0] == self.slot]


class CountRule(Rule):
    """``count`` matching events within the session (once per session by default) or within a
    rolling window (then, by default, not again until the window has passed)."""

    kind = "count"

    def __init__(self, spec):
        self.events = _Events(EventMatch(events=spec.events, where=spec.where))
        self.n = spec.count
        self.window_ms = None if spec.within == "session" else duration_ms(spec.within)
        super().__init__(spec)

    def _default_reentry(self) -> str:
        return "once_per_session" if self.window_ms is None else self.spec.within

    def on_due(self, st, m, ctx):
        """The counted events stopped: forget the count once the session is over (other events
        than the counted ones may keep it going)."""
        if self.window_ms is None:
            span = ctx.session_span()
            gap = getattr(ctx, "session_gap_ms", SESSION_GAP_MS)
            if span is not None and span[0] == m.start and span[1] + gap > m.due:
                m.due = span[1] + gap
                return []
        return super().on_due(st, m, ctx)

    def _matches(self):
        return [EventMatch(events=self.spec.events)]

    def on_event(self, st, e, ctx):
        if not self.events(e, ctx):
            return []
        k = (self.slot, ())
        m = st.matches.get(k)
        ts = e.ts_ms
        if self.window_ms is None:
            # The events of the user's current session (sessions can join when a late event
            # bridges a gap: the count is over what the session holds, not since a reset).
            session = ctx.session_start(ts)
            if session is None:
                return []
            if m is None:
                if self.retired:
                    return []
                m = st.matches[k] = Match(self, (), None, session, e.event_id, 0, [])
            times = m.data
            times.append(ts)
            if len(times) > 1 and times[-2] > ts:  # a late event: keep the times in order
                times.sort()
            while times and times[0] < session:
                times.pop(0)
            del times[:-(4 * self.n + 16)]  # bounded; only "the n-th" matters
            m.start, m.step = session, len(times)
            m.due = max(m.due or 0, ts + getattr(ctx, "session_gap_ms", SESSION_GAP_MS))  # then forget it
            if m.step == self.n and self.eligible(st, ts, ctx):
                return self.fire(st, e.event_id, 0, ts, ctx, e)
            return []
        if m is None:
            if self.retired:
                return []
            m = st.matches[k] = Match(self, (), None, ts, e.event_id, 0, [])
        times = m.data
        times.append(ts)
        if len(times) > 1 and times[-2] > ts:  # a late event: keep the times in order
            times.sort()
        cut = ts - self.window_ms
        while times and times[0] <= cut:
            times.pop(0)
        del times[:-self.n]
        m.due = max(times) + self.window_ms
        if len(times) >= self.n and self.eligible(st, ts, ctx):
            return self.fire(st, e.event_id, 0, ts, ctx, e)
        return []


class SequenceRule(Rule):
    """``steps`` in order (A then B ...) within ``within`` of the first, joined on
    ``correlate``; fires on the last step."""

    kind = "sequence"

    def __init__(self, spec):
        self.steps = [_Events(s) for s in spec.steps]
        self.within_ms = duration_ms(spec.within)
        super().__init__(spec)

    def _matches(self):
        return list(self.spec.steps)

    def on_event(self, st, e, ctx):
        key = self.corr(e)
        fires: list[Fire] = []
        advanced = False
        for m in self._open(st):
            if key is not None and m.key != key:
                continue
            if e.ts_ms <= m.start + self.within_ms and self.steps[m.step](e, ctx):
                m.step += 1
                advanced = True
                if m.step == len(self.steps):
                    del st.matches[(self.slot, m.key)]
                    fires += self.fire(st, e.event_id, 0, e.ts_ms, ctx, e)
        key = self.corr(e, start=True)
        if not advanced and not self.retired and (self.slot, key) not in st.matches \
                and self.steps[0](e, ctx) and self.eligible(st, e.ts_ms, ctx):
            st.matches[(self.slot, key)] = Match(self, key, e.ts_ms + self.within_ms, e.ts_ms,
                                                 e.event_id, 1)
            self._evict_oldest(st, MAX_MATCHES_PER_RULE)
        return fires


class AbsenceRule(Rule):
    """A ``start`` event, then no ``stop`` event of the same correlation for ``timeout``: fires
    when the timer passes (the user may have sent nothing since)."""

    kind = "absence"

    def __init__(self, spec):
        self.start = _Events(spec.start)
        self.stop = _Events(spec.stop)
        self.timeout_ms = duration_ms(spec.timeout)
        self.timeouts = [(tuple(o.when), duration_ms(o.timeout)) for o in spec.timeouts]
        super().__init__(spec)

    def _matches(self):
        return [self.spec.start, self.spec.stop]

    def on_event(self, st, e, ctx):
        if self.stop(e, ctx):
            key = self.corr(e)
            if key is None:  # no correlation value: every open match of the rule ends
                for m in self._open(st):
                    del st.matches[(self.slot, m.key)]
            else:  # the one match of that key (matches are keyed by (slot, key))
                st.matches.pop((self.slot, key), None)
        if self.retired or not self.start(e, ctx):
            return []
        key = self.corr(e, start=True)
        k = (self.slot, key)
        m = st.matches.get(k)
        if m is not None and not self.spec.restart:
            return []
        if m is None and not self.eligible(st, e.ts_ms, ctx):
            return []
        timeout = self.timeout_ms
        for conds, ms in self.timeouts:
            if all_hold(conds, e, ctx):
                timeout = ms
                break
        st.matches[k] = Match(self, key, e.ts_ms + timeout, e.ts_ms, e.event_id,
                              data=dict(zip(self.correlate, key)) or None)
        self._evict_oldest(st, self.spec.max_open)
        return []

    def on_due(self, st, m, ctx):
        del st.matches[(self.slot, m.key)]
        if not self.eligible(st, m.due, ctx):
            return []
        return self.fire(st, f"t{m.due}", 0, m.due, ctx, props=m.data)


def local_at(ts_ms: int, days: int, minutes: int, tz) -> int:
    """The instant of ``minutes`` after local midnight, ``days`` local days after the local date
    of ``ts_ms``: correct across daylight-saving changes (a local day may be 23 or 25 hours).

    >>> from zoneinfo import ZoneInfo
    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> start = int(dt.datetime(2026, 3, 28, 12, tzinfo=berlin).timestamp() * 1000)
    >>> dt.datetime.fromtimestamp(local_at(start, 1, 540, berlin) / 1000, berlin).isoformat()
    '2026-03-29T09:00:00+02:00'
    """
    day = dt.datetime.fromtimestamp(ts_ms / 1000, tz).date() + dt.timedelta(days=days)
    local = dt.datetime(day.year, day.month, day.day, minutes // 60, minutes % 60, tzinfo=tz)
    return int(local.timestamp() * 1000)


class ScheduleRule(Rule):
    """``steps`` at offsets from the ``start`` event (``after``, or ``after_days`` at a user-local
    time of day), until an ``exit_on`` event. One schedule per start event."""

    kind = "schedule"
    chained = False  # drips: each step's offset counts from the previous step

    def __init__(self, spec):
        self.entry = _Events(spec.start if self.kind == "schedule" else spec.enter)
        self.steps: list[Step] = list(spec.steps)
        # (offset ms, or None: after_days at a local time of day -> (days, minutes))
        self._offsets = [(duration_ms(s.after), None) if s.after is not None else
                         (None, (s.after_days, clock_minutes(s.at_local)) if s.at_local else
                          (s.after_days, None)) for s in self.steps]
        super().__init__(spec)

    def _matches(self):
        return [self.spec.start]

    def due_of(self, step: int, base: int, ctx) -> int:
        offset, local = self._offsets[step]
        if offset is not None:
            return base + offset
        days, minutes = local
        return base + days * 86_400_000 if minutes is None else \
            local_at(base, days, minutes, ctx.zone())

    def on_event(self, st, e, ctx):
        if self.retired or not self.entry(e, ctx) or not self.eligible(st, e.ts_ms, ctx):
            return []
        key = self._key(e)
        if (self.slot, key) in st.matches:  # (a match is kept under (slot, its key))
            return []
        self.mark(st, e.ts_ms, ctx)
        st.matches[(self.slot, key)] = Match(self, key, self.due_of(0, e.ts_ms, ctx), e.ts_ms,
                                             e.event_id, 0)
        self._evict_oldest(st, MAX_MATCHES_PER_RULE)
        return []

    def _key(self, e) -> tuple:
        return (e.event_id,)

    def on_due(self, st, m, ctx):
        due, step = m.due, m.step
        fires = []
        if not self.when or all_hold(self.when, None, ctx):
            fires = [Fire(self, f"t{due}", step, due, self.steps[step].message or
                          self.action.message, {})]
        if step + 1 < len(self.steps):
            m.step += 1
            # strictly later: a step may not be due again at the same instant (or earlier)
            m.due = max(self.due_of(m.step, due if self.chained else m.start, ctx), due + 1)
        else:
            del st.matches[(self.slot, m.key)]
        return fires

class DripRule(ScheduleRule):
    """A per-user state machine: entered on ``enter`` events, each step an offset after the
    previous one, left on an ``exit_on`` event. "Silent 30 days" is a drip entered and left on
    any event: every event the user does starts the 30 days again."""

    kind = "drip"
    chained = True

    def _matches(self):
        return [self.spec.enter]

    def _key(self, e) -> tuple:
        return ()

    def exit_matches(self, st, e, ctx):
        m = st.matches.get((self.slot, ()))
        if m is None:
            return []  # a drip has one match per user, under the key (): none is open
        if m.step == 0 and self.entry(e, ctx):
            return []  # still waiting for its first step: on_event starts the wait again
        return super().exit_matches(st, e, ctx)

    def on_event(self, st, e, ctx):
        m = st.matches.get((self.slot, ()))
        if m is not None and m.step == 0 and self.entry(e, ctx) and self.exit is not None \
                and self.exit(e, ctx):
            # the common case, on every event of a "silent N days" drip: start the wait again
            m.due = self.due_of(0, e.ts_ms, ctx)
            m.start, m.trigger = e.ts_ms, e.event_id
            return []
        return super().on_event(st, e, ctx)


class ConditionRule(Rule):
    """A ``start`` event for which the ``when`` conditions hold (features, scores, the event's
    properties or place)."""

    kind = "condition"

    def __init__(self, spec):
        self.on = _Events(spec.start)
        super().__init__(spec)

    def _matches(self):
        return [self.spec.start]

    def on_event(self, st, e, ctx):
        if self.retired or not self.on(e, ctx) or not self.eligible(st, e.ts_ms, ctx):
            return []
        return self.fire(st, e.event_id, 0, e.ts_ms, ctx, e)


KINDS: dict[str, type[Rule]] = {c.kind: c for c in (CountRule, SequenceRule, AbsenceRule,
                                                    ScheduleRule, DripRule, ConditionRule)}


def compile_rule(spec) -> Rule:
    return KINDS[spec.kind](spec)


def _features_in(doc) -> set[str]:
    """Every ``feature`` a rule's tests name, wherever they sit in its definition."""
    found: set[str] = set()
    if isinstance(doc, dict):
        if isinstance(doc.get("feature"), str):
            found.add(doc["feature"])
        for value in doc.values():
            found |= _features_in(value)
    elif isinstance(doc, list):
        for value in doc:
            found |= _features_in(value)
    return found
