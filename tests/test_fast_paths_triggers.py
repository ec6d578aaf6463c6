"""The trigger engine's fast paths give what the plain code gives, on random streams.

The engine visits only the rules indexed under an event's name (with their ``exit_on`` test
decided once per name), and skips work it can prove useless (no pending send to end, no cap that
can be full, one match per drip, ...). Here a plain engine visits every rule on every event, tests
every exit, and runs the straightforward versions of those steps; both see the same streams and
must produce the same actions, the same audit and the same state, timers included."""
from __future__ import annotations

from zoneinfo import ZoneInfo

import copy
import heapq

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from config.settings import CONFIG_DIR
from triggers import guards as g
from surgeflow.stats import STATS
from triggers.engine import (FALLBACK_STEP, MAX_HISTORY, MAX_PENDING_SENDS, NEVER, Collected,
                             CompiledBook, Send, TriggerEngine, _first_due, idempotency_key)
from triggers.rules import (MAX_MATCHES_PER_RULE, NOT_DONE_BY_USER, AbsenceRule, ConditionRule,
                            CountRule, DripRule, Match, Rule, ScheduleRule, SequenceRule,
                            UserTriggers, _Demo, holds)
from triggers.spec import Cap, duration_ms, parse_trigger_rules

MIN, DAY = 60_000, 86_400_000
T0 = 1_795_428_000_000  # 2026-11-23 10:00:00 UTC


# -- the plain rules: every open match looked at, nothing skipped ---------------------------------
class _Plain:
    def _evict_oldest(self, st, limit):
        open_ = self._open(st)
        if len(open_) > limit:
            oldest = min(open_, key=lambda x: (x.start, x.key))
            del st.matches[(self.slot, oldest.key)]


def _schedule_on_event(self, st, e, ctx):
    if self.retired or not self.entry(e, ctx) or not self.eligible(st, e.ts_ms, ctx):
        return []
    key = self._key(e)
    if key in [m.key for m in self._open(st)]:
        return []
    self.mark(st, e.ts_ms, ctx)
    st.matches[(self.slot, key)] = Match(self, key, self.due_of(0, e.ts_ms, ctx), e.ts_ms,
                                         e.event_id, 0)
    self._evict_oldest(st, MAX_MATCHES_PER_RULE)
    return []


class PlainAbsence(_Plain, AbsenceRule):
    def on_event(self, st, e, ctx):
        if self.stop(e, ctx):
            key = self.corr(e)
            for m in self._open(st):
                if key is None or m.key == key:
                    del st.matches[(self.slot, m.key)]
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
            if all(holds(c, e, ctx) for c in conds):
                timeout = ms
                break
        st.matches[k] = Match(self, key, e.ts_ms + timeout, e.ts_ms, e.event_id,
                              data=dict(zip(self.correlate, key)) or None)
        self._evict_oldest(st, self.spec.max_open)
        return []


class PlainSchedule(_Plain, ScheduleRule):
    on_event = _schedule_on_event


class PlainDrip(_Plain, DripRule):
    def exit_matches(self, st, e, ctx):
        m = st.matches.get((self.slot, ()))
        if m is not None and m.step == 0 and self.entry(e, ctx):
            return []
        return Rule.exit_matches(self, st, e, ctx)

    def on_event(self, st, e, ctx):
        m = st.matches.get((self.slot, ()))
        if m is not None and m.step == 0 and self.entry(e, ctx) and self.exit is not None \
                and self.exit(e, ctx):
            m.due = self.due_of(0, e.ts_ms, ctx)
            m.start, m.trigger = e.ts_ms, e.event_id
            return []
        return _schedule_on_event(self, st, e, ctx)


PLAIN = {"count": type("PlainCount", (_Plain, CountRule), {}),
         "sequence": type("PlainSequence", (_Plain, SequenceRule), {}),
         "absence": PlainAbsence, "schedule": PlainSchedule, "drip": PlainDrip,
         "condition": type("PlainCondition", (_Plain, ConditionRule), {})}


class PlainBook(CompiledBook):
    """The same rule file, compiled to the plain rules."""

    def __init__(self, spec, version=1):
        super().__init__(spec, version)
        self.rules = sorted((PLAIN[r.kind](r) for r in spec.rules if r.enabled),
                            key=lambda r: (-r.priority, r.name))
        self.by_name = {r.name: r for r in self.rules}


# -- the plain engine: every rule on every event, the straightforward bookkeeping ------------------
class PlainEngine(TriggerEngine):
    def on_event(self, user, e, ctx, out, arrival_ms=0):
        rules = self.book.rules  # no index: a rule ignores what it does not read
        st = self.users.get(user)
        if st is None:
            st = self.users[user] = UserTriggers()
        elif st.heap_due is not None and st.heap_due <= e.ts_ms:
            self._due(user, st, e.ts_ms, ctx, out)
        if self.retired and st.matches:
            retired = {id(m.rule): m.rule for m in st.matches.values()
                       if getattr(m.rule, "retired", False)}
            if retired:
                rules = list(retired.values()) + rules
        fires = []
        for rule in rules:
            if rule.exit is not None and rule.exit(e, ctx):
                self._exit(st, user, rule, e, ctx, out)
            fires += rule.on_event(st, e, ctx)
        if st.sends and e.name not in NOT_DONE_BY_USER:
            self._opened(st, user, e, out)
        if fires:
            self._decide(st, user, fires, e.ts_ms, ctx, out, getattr(e, "campaign", ""),
                         {"_arrival_ms": arrival_ms} if arrival_ms else {})
        self._settle(user, st, e.ts_ms)

    def _exit(self, st, user, rule, e, ctx, out):
        for m in rule.exit_matches(st, e, ctx):
            if m.step > 0 and rule.kind in ("schedule", "drip"):
                self._audit(out, e.ts_ms, user, rule, "", m.step, "", "", "exited",
                            f"{e.name} ended it after step {m.step}")
        keep = []
        for s in st.sends:
            if s.rule.name == rule.name:
                self._audit(out, e.ts_ms, user, s.rule, s.action_id, s.step, s.channel,
                            s.message, "exited", f"{e.name} before the pending send")
            else:
                keep.append(s)
        st.sends = keep

    def _opened(self, st, user, e, out):
        keep = []
        ref = e.properties.get("action_id") if isinstance(e.properties, dict) else None
        for s in st.sends:
            if s.awaits and e.name in s.unless and (ref is None or ref == s.awaits):
                self._audit(out, e.ts_ms, user, s.rule, s.action_id, s.step, s.channel,
                            s.message, "fallback_cancelled", f"{e.name} within the wait")
            else:
                keep.append(s)
        st.sends = keep

    def _due(self, user, st, now, ctx, out):
        extra = {"_timer_ms": self.wall_ms} if self.wall_ms else {}
        while True:
            first = _first_due(st)
            if first > now:
                return
            for m in sorted((m for m in st.matches.values() if m.due == first),
                            key=lambda m: (m.rule.name, m.key)):
                for f in m.rule.on_due(st, m, ctx):
                    self._decide(st, user, [f], f.ts, ctx, out, "", extra)
            ready = sorted((s for s in st.sends if s.due == first),
                           key=lambda s: (s.rule.name, s.action_id))
            if ready:
                st.sends = [s for s in st.sends if s.due != first]
                for s in ready:
                    self._offer(st, user, s, s.due, ctx, out, extra)

    def _settle(self, user, st, now):
        if st.history:
            cut = now - self.book.horizon_ms
            st.history = [h for h in st.history if h[0] > cut]
        for name in [n for n, (until, _) in st.marks.items() if until <= now]:
            del st.marks[name]
        if st.empty():
            del self.users[user]
            return
        due = _first_due(st)
        if st.history:
            due = min(due, st.history[0][0] + self.book.horizon_ms + 1)
        for until, _ in st.marks.values():
            due = min(due, until)
        if due == NEVER:
            return
        if st.heap_due is None or due < st.heap_due:
            st.heap_due = due
            heapq.heappush(self.timers, (due, user))
            if len(self.timers) > 2 * len(self.users) + 1024:
                self.timers = [(s.heap_due, u) for u, s in self.users.items()
                               if s.heap_due is not None]
                heapq.heapify(self.timers)

    def _decide(self, st, user, fires, now, ctx, out, campaign, extra):
        live = sorted((f for f in fires if not f.rule.shadow),
                      key=lambda f: (-f.rule.priority, f.rule.name))
        cap = self.book.guards.max_actions_per_event
        for i, f in enumerate(live + [f for f in fires if f.rule.shadow]):
            s = Send(f.rule, f.trigger, f.step, f.rule.action.channel, f.message, f.props,
                     idempotency_key(f.rule.name, user, f.trigger, str(f.step)), campaign)
            if i >= cap and not f.rule.shadow:
                self._audit(out, now, user, f.rule, s.action_id, s.step, s.channel, s.message,
                            "lower_priority", f"{live[0].rule.name} fired on the same event")
                continue
            self._offer(st, user, s, now, ctx, out, extra)

    def _offer(self, st, user, s, now, ctx, out, extra, note=""):
        """Every cap asked, the time zone read first."""
        guards = self.book.guards
        rule = s.rule
        if s.awaits:  # a channel fallback's wait is over: it is a send of its own now
            s.awaits, s.unless = "", frozenset()
        if not ctx.marketing_ok(guards.consent):
            self._audit(out, now, user, rule, s.action_id, s.step, s.channel, s.message,
                        "no_consent", f"marketing consent ({guards.consent})")
            return
        if s.deferred:
            s.channel = s.planned
        tz = ctx.zone()
        q = guards.quiet_hours
        if q is not None and s.channel in q.channels:
            until = g.quiet_until(q, now, tz)
            if until is not None:
                if q.policy == "drop":
                    self._audit(out, now, user, rule, s.action_id, s.step, s.channel, s.message,
                                "quiet_hours", f"quiet hours {q.start}-{q.end} (drop)")
                    return
                self._defer(st, user, s, until, "quiet_hours", now, out,
                            f"quiet hours {q.start}-{q.end}: released at {until}")
                return
        tags = tuple(rule.action.tags)
        for cap in guards.caps:
            frees = g.cap_breach(cap, st.history, now, s.channel, s.message, tags, tz)
            if frees is None:
                continue
            if cap.over_cap == "defer":
                self._defer(st, user, s, frees, "capped", now, out,
                            f"cap {cap.name} ({cap.max} per {cap.window}): released at {frees}")
                return
            if cap.over_cap == "fallback" and s.channel != cap.fallback_channel:
                was, s.channel = s.channel, cap.fallback_channel
                self._offer(st, user, s, now, ctx, out, extra,
                            note=f"cap {cap.name} on {was}: fell back to {s.channel}")
                return
            self._audit(out, now, user, rule, s.action_id, s.step, s.channel, s.message,
                        "capped", f"cap {cap.name} ({cap.max} per {cap.window})")
            return
        if rule.shadow:
            self._audit(out, now, user, rule, s.action_id, s.step, s.channel, s.message, "shadow",
                        note or "would send")
            return
        st.history.append((now, s.channel, s.message, tags))
        if len(st.history) > 1 and st.history[-2][0] > now:
            st.history.sort(key=lambda h: h[0])
        if len(st.history) > MAX_HISTORY:
            del st.history[:-MAX_HISTORY]
        action = {
            "action_id": s.action_id, "rule": rule.name, "rule_version": rule.version,
            "user_id": user, "channel": s.channel, "message": s.message,
            "campaign": s.campaign or "", "session_id": ctx.session_id(now), "step": s.step,
            "trigger": s.trigger, "tags": list(tags),
            "properties": s.props or {}, "event_ts_ms": now, **extra}
        if s.deferred and self.book.interval_ms.get(s.channel):
            # rate-limited release: the engine's watermark gives it its slot
            heapq.heappush(self.to_slot, (now, user, rule.name, s.action_id, action,
                                          note or "all guards passed"))
        else:
            out.actions.append(action)
            self._audit(out, now, user, rule, s.action_id, s.step, s.channel, s.message, "sent",
                        note or "all guards passed")
            STATS.add_labeled("trigger_actions", rule.name)
        fb = rule.action.fallback
        if fb is not None and s.step < FALLBACK_STEP:
            f = Send(rule, s.trigger, s.step + FALLBACK_STEP, fb.channel, fb.message or s.message,
                     s.props, idempotency_key(rule.name, user, s.trigger,
                                              str(s.step + FALLBACK_STEP)), s.campaign)
            f.due = now + duration_ms(fb.after)
            f.unless, f.awaits = frozenset(fb.unless), s.action_id
            if len(st.sends) < MAX_PENDING_SENDS:
                st.sends.append(f)


# -- the streams -----------------------------------------------------------------------------------
class Ctx:
    """A user's context: fixed features, consent and zone; ten-minute sessions."""

    state_ttl_ms = 90 * DAY
    session_gap_ms = 30 * MIN

    def __init__(self, user: dict):
        self.u = user

    def feature(self, name):
        return self.u["features"].get(name)

    def zone(self):
        return ZoneInfo(self.u["tz"])

    def session_start(self, ts):
        return ts - ts % (10 * MIN)

    def session_span(self):
        return None

    def session_id(self, ts):
        return str(self.session_start(ts))

    def marketing_ok(self, policy):
        return self.u["consent"]


# Two sets of guards: a cap's fallback and a deferral are never combined here (a deferred send
# whose channel is capped with a fallback re-enters the guards without end: a known bug, not a
# fast path's).
GUARDS = {
    "fallback": {"consent": "opt_in", "max_actions_per_event": 1,
                 "quiet_hours": {"start": "22:00", "end": "07:00", "channels": ["sms"],
                                 "policy": "drop"},
                 "caps": [{"name": "push_hour", "channel": "push", "max": 2, "window": "1h",
                           "over_cap": "fallback", "fallback_channel": "email"},
                          {"name": "same_day", "per": "message", "max": 2,
                           "window": "calendar_day"}]},
    "defer": {"consent": "opt_in", "max_actions_per_event": 2,
              "quiet_hours": {"start": "22:00", "end": "07:00", "channels": ["sms", "email"]},
              "release_rate_per_s": {"push": 1, "email": 1},
              "caps": [{"name": "push_hour", "channel": "push", "max": 2, "window": "1h",
                        "over_cap": "defer"},
                       {"name": "coupons", "tag": "coupon", "max": 3, "window": "24h"},
                       {"name": "same_day", "per": "message", "max": 2,
                        "window": "calendar_day"}]}}
EXTRA_RULES = {
    "rules": [
        {"name": "view_then_cart", "kind": "sequence", "within": "30m", "correlate": ["product_id"],
         "steps": [{"events": ["product_viewed"]}, {"events": ["add_to_cart"]}],
         "priority": 7, "action": {"channel": "push", "message": "seq"}},
        {"name": "carts_in_hour", "kind": "count", "events": ["add_to_cart"], "count": 2,
         "within": "1h", "priority": 9, "action": {"channel": "push", "message": "cnt"}},
        {"name": "cart_left", "kind": "absence", "start": {"events": ["add_to_cart"]},
         "stop": {"events": ["order_completed"]}, "correlate": ["cart_id"], "timeout": "20m",
         "max_open": 1, "exit_on": ["signup"], "priority": 8,
         "action": {"channel": "push", "message": "cart", "tags": ["coupon"],
                    "fallback": {"channel": "sms", "after": "1h", "unless": ["push_opened"]}}},
        {"name": "shadow_views", "kind": "condition", "mode": "shadow", "priority": 50,
         "start": {"events": ["page_view", "add_to_cart"],
                   "where": [{"property": "dwell_ms", "op": ">", "value": 1000}]},
         "action": {"channel": "push", "message": "shadow"}},
        {"name": "quiet_drip", "kind": "drip", "enter": {"events": ["login"]},
         "exit_on": ["order_completed", "push_opened"],
         "steps": [{"after": "2h", "message": "d1"}, {"after": "1d", "message": "d2"}],
         "priority": 3, "action": {"channel": "sms", "message": "drip"}},
        {"name": "order_steps", "kind": "schedule", "start": {"events": ["order_completed"]},
         "exit_on": ["*"], "steps": [{"after": "3h"}, {"after_days": 1, "at_local": "10:00"}],
         "action": {"channel": "email", "message": "sched"}}]}

NAMES = ["page_view", "product_viewed", "screen", "add_to_cart", "checkout_started",
         "order_completed", "login", "signup", "push_opened", "sms_clicked", "push_sent",
         "something_else"]
USERS = st.fixed_dictionaries({
    "features": st.fixed_dictionaries({
        "p_purchase_24h": st.sampled_from([0.2, 0.9]), "rfm_m": st.sampled_from(["high", "low"]),
        "lifecycle": st.sampled_from(["decline", "active"]),
        "account_age_days": st.sampled_from([1, 30])}),
    "consent": st.sampled_from([True, True, True, False]),
    "tz": st.sampled_from(["UTC", "Asia/Tokyo", "America/New_York"])})
STEPS = st.lists(st.tuples(  # mostly minutes apart (caps fill up), now and then days
    st.sampled_from([0, 0, 0, 1, 2, 3]),
    st.sampled_from(NAMES + ["add_to_cart", "add_to_cart", "push_opened", "page_view"]),
    st.sampled_from([0, 1, 2, 5, 5, 10, 20, 20, 45, 120, 1500, 3 * 1440, 31 * 1440]),
    st.sampled_from([None, "c1", "c2"]), st.sampled_from([None, "p1", "p2"]),
    st.sampled_from([0, 4000]), st.booleans(), st.booleans()), min_size=30, max_size=80)


def _book(doc: dict, cls):
    return cls(parse_trigger_rules(doc))


def _state(engine: TriggerEngine):
    """Every user's trigger state, as plain values (rules by name and version)."""
    def send(s):
        return tuple((s.rule.name, s.rule.version) if k == "rule" else getattr(s, k)
                     for k in Send.__slots__)
    return copy.deepcopy((  # a copy: the engine goes on changing its lists in place
        {u: ({k: (m.rule.name, m.rule.version, m.key, m.due, m.start, m.trigger, m.step, m.data)
              for k, m in s.matches.items()},
             [send(x) for x in s.sends], s.history, s.marks, s.heap_due)
         for u, s in engine.users.items()}, engine.timers, engine.slots, engine.to_slot,
        engine.slotted))


def _run(docs: list[dict], users: list[dict], steps: list, plain: bool):
    engine = PlainEngine() if plain else TriggerEngine()
    books = [_book(d, PlainBook if plain else CompiledBook) for d in docs]
    engine.use(books[0])
    out, ts, n = Collected(), T0, 0
    for i, (u, name, later, cart, product, dwell, near, advance) in enumerate(steps):
        if i == len(steps) // 2 and len(books) > 1:
            engine.use(books[1])  # a reload mid-stream: matches of a changed rule are retired
        ts += later * MIN
        props = {k: v for k, v in (("cart_id", cart), ("product_id", product),
                                   ("dwell_ms", dwell)) if v is not None}
        user = f"u{u}"
        engine.on_event(user, _Demo(name, ts, f"e{n}", props, (52.52, 13.405) if near else None),
                        Ctx(users[u]), out, arrival_ms=n)
        n += 1
        if advance:
            engine.advance(ts - 5 * MIN, lambda user: Ctx(users[int(user[1:])]), out)
    before = _state(engine)
    engine.advance(ts + 200 * DAY, lambda user: Ctx(users[int(user[1:])]), out)
    return out.actions, out.audit, before, _state(engine)


def _production() -> dict:
    return yaml.safe_load((CONFIG_DIR / "trigger_rules.yaml").read_text())


def _reloaded(doc: dict) -> dict:
    """The same file with one rule changed (a new version of it)."""
    doc = yaml.safe_load(yaml.safe_dump(doc))
    for r in doc["rules"]:
        if r["kind"] == "absence":
            r["timeout"] = "45m"
            break
    return doc


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(users=st.lists(USERS, min_size=4, max_size=4), steps=STEPS,
       rules=st.sampled_from(["production", "fallback", "defer"]), reload=st.booleans())
def test_the_indexed_engine_does_what_the_plain_engine_does(users, steps, rules, reload):
    doc = _production() if rules == "production" else {**EXTRA_RULES, "guards": GUARDS[rules]}
    docs = [doc, _reloaded(doc)] if reload else [doc]
    fast = _run(docs, users, steps, plain=False)
    assert fast == _run(docs, users, steps, plain=True)


@given(history=st.lists(st.tuples(st.integers(0, 3 * DAY), st.sampled_from(["push", "sms"]),
                                  st.sampled_from(["a", "b"]),
                                  st.sampled_from([(), ("coupon",)])), max_size=4),
       cap=st.builds(Cap, name=st.just("c"), max=st.integers(1, 5),
                     window=st.sampled_from(["calendar_day", "1h", "24h"]),
                     channel=st.sampled_from([None, "push"]), tag=st.sampled_from([None, "coupon"]),
                     per=st.sampled_from(["all", "message"])),
       now=st.integers(0, 3 * DAY))
def test_a_cap_is_never_full_with_fewer_sends_in_the_history_than_its_max(history, cap, now):
    """Why the engine asks no cap whose max exceeds the user's history."""
    if len(history) < cap.max:
        assert g.cap_breach(cap, sorted(history), now, "push", "a", ("coupon",),
                            ZoneInfo("Asia/Tokyo")) is None
