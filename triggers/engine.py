"""The trigger engine of one shard: every user's trigger state, their event-time timers, the
guards at the moment of sending, the actions and the audit.

Time. Timers are in event time, in keyed state: :meth:`TriggerEngine.advance` is called with
the stream watermark, so a user who sends nothing still gets their timer, and a replay of days of
history fires the same timers as the live run. A restart resumes the state of the last snapshot
and replays the input after it: each timer fires again with the same idempotency key
(rule, user, ``t<due time>``, step), so a consumer that keeps keys sees it once.

Decisions (the ``trigger_audit`` table): ``sent``; ``shadow`` (a shadow rule would have sent);
``deferred`` (quiet hours or a cap with the defer policy; released later, every guard checked
again); ``quiet_hours`` / ``capped`` (dropped by that guard); ``no_consent``; ``exited`` (an
exit event or a withdrawal ended a pending send or a drip under way); ``lower_priority``
(another rule won the event); ``fallback_cancelled`` (the awaited open came).

>>> from triggers.spec import parse_trigger_rules
>>> from triggers.rules import SimpleContext, _Demo
>>> book = CompiledBook(parse_trigger_rules({"guards": {"consent": "opt_out",
...     "quiet_hours": None}, "rules": [{"name": "cart", "kind": "absence",
...     "start": {"events": ["add_to_cart"]}, "stop": {"events": ["order_completed"]},
...     "timeout": "30m", "action": {"channel": "push", "message": "coupon"}}]}))
>>> engine, out, ctx = TriggerEngine(), Collected(), SimpleContext()
>>> engine.use(book)
>>> engine.on_event("u1", _Demo("add_to_cart", 0, "e1"), ctx, out)
>>> engine.advance(29 * 60_000, lambda user: ctx, out)
>>> out.actions
[]
>>> engine.advance(30 * 60_000, lambda user: ctx, out)
>>> [(a["rule"], a["event_ts_ms"], a["channel"]) for a in out.actions]
[('cart', 1800000, 'push')]
>>> len(engine.users)  # nothing pending any more: no state (a cap history would stay a while)
0
"""
from __future__ import annotations

import heapq
import time

from surgeflow.stats import STATS
from triggers import guards as g
from triggers.rules import (NOT_DONE_BY_USER, Fire, Match, Rule, UserTriggers, compile_rule,
                            idempotency_key)
from triggers.spec import TriggerBook, duration_ms

FALLBACK_STEP = 1000  # a channel fallback's step: the step it falls back from + 1000
NEVER = 2**62
MAX_PENDING_SENDS = 50  # per user: beyond, a new deferral is refused (bounded whatever the input)
MAX_HISTORY = 1000  # sends remembered per user for the caps (the newest)


class Collected:
    """Where the engine puts what it produces (the flow's ShardOut has the same two lists)."""

    def __init__(self):
        self.actions: list[dict] = []
        self.audit: list[dict] = []


class Send:
    """A send waiting in the user's state: deferred by a guard, or a channel fallback waiting
    for its ``unless`` events."""

    __slots__ = ("rule", "trigger", "step", "channel", "message", "props", "due", "reason",
                 "action_id", "deferred", "slotted", "unless", "awaits", "campaign", "planned")

    def __init__(self, rule: Rule, trigger: str, step: int, channel: str, message: str,
                 props: dict, action_id: str, campaign: str = ""):
        self.rule, self.trigger, self.step = rule, trigger, step
        self.channel, self.message, self.props = channel, message, props
        self.planned = channel  # a release starts from it again (a fallback is chosen anew)
        self.action_id, self.campaign = action_id, campaign
        self.due = 0
        self.reason = ""
        self.deferred = False  # released from a guard: a rate limit gives it a slot
        self.slotted = False  # (unused: kept for snapshots of an earlier release)
        self.unless: frozenset = frozenset()
        self.awaits = ""  # the action id whose open cancels this fallback

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for s, v in zip(self.__slots__, state):
            setattr(self, s, v)


class CompiledBook:
    """A validated rule file, compiled: rules, an index by event name, the guards."""

    def __init__(self, spec: TriggerBook, version: int = 1):
        self.spec = spec
        self.version = version
        self.guards = spec.guards
        self.rules: list[Rule] = sorted((compile_rule(r) for r in spec.rules if r.enabled),
                                        key=lambda r: (-r.priority, r.name))
        self.by_name = {r.name: r for r in self.rules}
        self.every = [r for r in self.rules if r.interest is None]
        self._index: dict[str, list[Rule]] = {}
        self._reacting: dict[str, list[tuple[Rule, bool]]] = {}
        self.horizon_ms = g.history_horizon(list(spec.guards.caps))
        self.interval_ms = {ch: 1000.0 / rate for ch, rate in spec.guards.release_rate_per_s.items()
                            if rate > 0}

    def interested(self, name: str) -> list[Rule]:
        rules = self._index.get(name)
        if rules is None:
            rules = [r for r in self.rules if r.interest is None or name in r.interest]
            if len(self._index) < 10_000:  # event names are input: the cache stays bounded
                self._index[name] = rules
        return rules

    def reacting(self, name: str, deferred: frozenset[str] = frozenset(),
                 played: bool = False) -> list[tuple[Rule, bool]]:
        """:meth:`interested`, each rule with whether ``name`` is one of its ``exit_on`` events.
        An exit test reads the event's name only, so it is decided once per name here instead
        of on every event (a "silent N days" drip exits on every event). Rules reading one of
        the ``deferred`` features (model scores) react when the event is played, the others
        when it is applied."""
        key = (name, played)
        pairs = self._reacting.get(key)
        if pairs is None:
            pairs = [(r, r.exit is not None and r.exit.takes(name)) for r in self.interested(name)
                     if bool(r.features & deferred) == played]
            if len(self._reacting) < 10_000:
                self._reacting[key] = pairs
        return pairs


class TriggerEngine:
    """Trigger state of one shard's users and the heap of their next timers."""

    def __init__(self, shard: int = 0):
        self.shard = shard
        self.users: dict[str, UserTriggers] = {}
        self.timers: list[tuple[int, str]] = []
        self.slots: dict[str, float] = {}  # channel -> last release slot (rate limit)
        # Releases decided (every guard passed at their release time, in their user's own
        # order) waiting for a rate-limit slot, and those with a slot waiting for it (heaps).
        # The slots are shared by the shard's users, so they are given only as the watermark
        # passes: in the order (release time, user, rule, action), never in the order the
        # users' events happen to arrive, so a restart or a replay gives the same slots.
        self.to_slot: list[tuple] = []  # (due, user, rule, action_id, action, note)
        self.slotted: list[tuple] = []  # (slot, user, rule, action_id, action, note)
        self.watermark = -NEVER
        self.book: CompiledBook | None = None
        self.wall_ms = 0  # wall time of the current batch: latency figures only
        self.retired = False  # some match runs on a rule version no longer in the file
        self.deferred: frozenset[str] = frozenset()  # model scores: their rules react when played

    def __getstate__(self):
        state = dict(self.__dict__)
        state["book"] = None  # the rule file is read again, not restored
        return state

    def __setstate__(self, state):
        self.__dict__.update({"deferred": frozenset(), "to_slot": [], "slotted": [], **state})

    # -- the rule file -----------------------------------------------------------------------
    def use(self, book: CompiledBook) -> None:
        """The current rule file. Matches of a rule whose definition changed keep their version
        (marked retired: it finishes them and starts nothing new)."""
        if book is self.book:
            return
        self.book = book
        self.retired = False
        for st in self.users.values():
            for k, m in st.matches.items():
                cur = book.by_name.get(m.rule.name)
                if cur is not None and cur.version == m.rule.version:
                    m.rule = cur
                else:
                    m.rule.retired = self.retired = True
            for s in st.sends:
                cur = book.by_name.get(s.rule.name)
                if cur is not None and cur.version == s.rule.version:
                    s.rule = cur

    # -- events --------------------------------------------------------------------------------
    def defers(self, name: str) -> bool:
        """Does a rule reading a model score react to this event (once the models play it)?"""
        return bool(self.deferred) and bool(self.book.reacting(name, self.deferred, True))

    def on_event(self, user: str, e, ctx, out, arrival_ms: int = 0, played: bool = False) -> None:
        """An event of the user's, as it is applied; or (``played``) as the online models play
        it, in event time once the watermark has passed it, for the rules that read a model
        score: the score is then the same whatever the order of arrival (models/runtime.py)."""
        ts = e.ts_ms
        rules = self.book.reacting(e.name, self.deferred, played)
        st = self.users.get(user)
        if st is None:
            if not rules:
                return  # no rule reads this event and the user has no state: nothing to do
            st = self.users[user] = UserTriggers()
        elif played:
            pass  # (what was due before it fired when it was applied)
        elif st.heap_due is not None and st.heap_due <= ts:
            # The user's own later event shows these timers elapsed (event time) before it:
            # they fire first, whether or not the watermark has passed them yet, so a stop
            # event after the deadline never cancels what was due before it.
            self._due(user, st, ts, ctx, out)
        if self.retired and st.matches and not played:
            retired = {id(m.rule): m.rule for m in st.matches.values()
                       if getattr(m.rule, "retired", False)}
            if retired:
                rules = [(r, r.exit is not None and r.exit(e, ctx))
                         for r in retired.values()] + rules
        fires: list[Fire] = []
        for rule, exits in rules:
            if exits:
                self._exit(st, user, rule, e, ctx, out)
            fired = rule.on_event(st, e, ctx)
            if fired:
                fires += fired
        if st.sends and e.name not in NOT_DONE_BY_USER and not played:
            self._opened(st, user, e, out)
        if fires:
            self._decide(st, user, fires, ts, ctx, out, getattr(e, "campaign", ""),
                         {"_arrival_ms": arrival_ms} if arrival_ms else {})
        self._settle(user, st, ts)

    def _exit(self, st: UserTriggers, user: str, rule: Rule, e, ctx, out) -> None:
        for m in rule.exit_matches(st, e, ctx):
            if m.step > 0 and rule.kind in ("schedule", "drip"):
                self._audit(out, e.ts_ms, user, rule, "", m.step, "", "", "exited",
                            f"{e.name} ended it after step {m.step}")
        name = rule.name
        if not st.sends or not any(s.rule.name == name for s in st.sends):
            return  # the usual case (a drip's exit on every event): no pending send to end
        keep = []
        for s in st.sends:
            if s.rule.name == name:
                self._audit(out, e.ts_ms, user, s.rule, s.action_id, s.step, s.channel, s.message,
                            "exited", f"{e.name} before the pending send")
            else:
                keep.append(s)
        st.sends = keep

    def _opened(self, st: UserTriggers, user: str, e, out) -> None:
        """A channel fallback waits for an open (or click...): this event may be it."""
        name = e.name
        if not any(s.awaits and name in s.unless for s in st.sends):
            return  # no fallback waits for this event (most events, most pending sends)
        keep = []
        ref = e.properties.get("action_id") if isinstance(e.properties, dict) else None
        for s in st.sends:
            if s.awaits and name in s.unless and (ref is None or ref == s.awaits):
                self._audit(out, e.ts_ms, user, s.rule, s.action_id, s.step, s.channel,
                            s.message, "fallback_cancelled", f"{e.name} within the wait")
            else:
                keep.append(s)
        st.sends = keep

    def elapse(self, user: str, ts: int, ctx, out) -> None:
        """Fire what of the user was due before ``ts`` (their event at ``ts`` is next)."""
        st = self.users.get(user)
        if st is not None and st.heap_due is not None and st.heap_due <= ts:
            self._due(user, st, ts, ctx, out)
            self._settle(user, st, ts)

    def revoke(self, user: str, ts: int, out) -> None:
        """Marketing consent withdrawn (or profiling): every pending send and scheduled step
        is cancelled. What was sent stays remembered (caps, re-entry): a grant soon after does
        not make the same message go again."""
        st = self.users.get(user)
        if st is None:
            return
        for s in st.sends:
            self._audit(out, ts, user, s.rule, s.action_id, s.step, s.channel, s.message,
                        "no_consent", "consent withdrawn: pending send cancelled")
        for m in st.matches.values():
            if m.rule.kind in ("absence", "schedule", "drip") and m.due is not None:
                self._audit(out, ts, user, m.rule, "", m.step, m.rule.action.channel, "",
                            "no_consent", f"consent withdrawn: timer due {m.due} cancelled")
        st.sends, st.matches = [], {}
        self._settle(user, st, ts)

    def drop(self, user: str) -> None:
        """The profile is gone (time to live, eviction): so is its trigger state."""
        self.users.pop(user, None)

    def erase(self, user: str) -> None:
        """Erasure: the user's state goes, history and timer entries included (a snapshot must
        not keep the id in a stale heap entry)."""
        self.users.pop(user, None)
        if any(u == user for _, u in self.timers):
            self.timers = [t for t in self.timers if t[1] != user]
            heapq.heapify(self.timers)
        for name in ("to_slot", "slotted"):  # releases waiting for a slot name the user too
            queue = getattr(self, name)
            if any(r[1] == user for r in queue):
                setattr(self, name, [r for r in queue if r[1] != user])
                heapq.heapify(getattr(self, name))

    def take(self, user: str) -> UserTriggers | None:
        """The user's state leaves this shard (a visitor's profile merges into a user's)."""
        return self.users.pop(user, None)

    def adopt(self, user: str, other: UserTriggers | None, ts: int) -> None:
        """A visitor's trigger state joins the user's: matches the user does not have yet,
        pending sends, sends (for caps) and re-entry marks."""
        if other is None:
            return
        st = self.users.get(user)
        if st is None:
            st = self.users[user] = other
            other.heap_due = None
        else:
            for k, m in other.matches.items():
                st.matches.setdefault(k, m)
            st.sends += other.sends
            st.history = sorted(st.history + other.history, key=lambda h: h[0])
            for name, mark in other.marks.items():
                if name not in st.marks or st.marks[name][0] < mark[0]:
                    st.marks[name] = mark
        self._settle(user, st, ts)

    # -- time ------------------------------------------------------------------------------------
    def advance(self, watermark: int, ctx_of, out) -> None:
        """The watermark moved: fire every timer due at or before it, and give the releases
        decided by then their rate-limit slots, all in time order (at one instant: the timers
        first, so every release of that instant is decided before the slots are given)."""
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        while True:  # (self.timers is read each time: a reschedule may rebuild it)
            timers, to_slot, slotted = self.timers, self.to_slot, self.slotted
            t_timer = timers[0][0] if timers else NEVER
            t_slot = to_slot[0][0] if to_slot else NEVER
            t_send = slotted[0][0] if slotted else NEVER
            if min(t_timer, t_slot, t_send) > watermark:
                return
            if t_timer <= t_slot and t_timer <= t_send:
                due, user = heapq.heappop(timers)
                st = self.users.get(user)
                if st is None or st.heap_due != due:
                    continue  # superseded by an earlier reschedule, or the user is gone
                st.heap_due = None
                self._due(user, st, due, ctx_of(user), out)
                self._settle(user, st, due)
            elif t_slot <= t_send:
                self._take_slot(*heapq.heappop(to_slot))
            else:
                self._send_at_slot(out, *heapq.heappop(slotted))

    def _take_slot(self, due: int, user: str, rule: str, action_id: str, action: dict,
                   note: str) -> None:
        """A release decided at ``due`` takes the channel's next slot; its send counts for the
        caps at that slot, and a channel fallback waits from it."""
        channel = action["channel"]
        slot = max(float(due), self.slots.get(channel, -1e18) + self.book.interval_ms.get(channel, 0.0))
        self.slots[channel] = slot
        at = int(slot)
        heapq.heappush(self.slotted, (at, user, rule, action_id, action, note))
        st = self.users.get(user)
        if st is None or at == due:
            return
        for i, (ts, ch, message, tags) in enumerate(st.history):
            if ts == due and ch == channel and message == action["message"]:
                st.history[i] = (at, ch, message, tags)
                st.history.sort(key=lambda h: h[0])
                break
        for f in st.sends:
            if f.awaits == action_id:
                f.due += at - due
        self._settle(user, st, due)

    def _send_at_slot(self, out, slot: int, user: str, rule: str, action_id: str, action: dict,
                      note: str) -> None:
        action["event_ts_ms"] = slot
        out.actions.append(action)
        self._audit_row(out, slot, user, rule, action["rule_version"], "live", action_id,
                        action["step"], action["channel"], action["message"], "sent", note)
        STATS.add_labeled("trigger_actions", rule)

    def _due(self, user: str, st: UserTriggers, now: int, ctx, out) -> None:
        """Everything of the user due at or before ``now``, earliest first, each at its own
        due time (a schedule's next step may be due before ``now`` too)."""
        first = _first_due(st)
        if first > now:
            return  # the timer moved later since it was set (a session went on): nothing yet
        extra = {"_timer_ms": self.wall_ms} if self.wall_ms else {}
        while first <= now:
            matches = [m for m in st.matches.values() if m.due == first]
            if len(matches) > 1:
                matches.sort(key=_match_order)
            for m in matches:
                for f in m.rule.on_due(st, m, ctx):
                    self._decide(st, user, [f], f.ts, ctx, out, "", extra)
            if st.sends:
                ready = [s for s in st.sends if s.due == first]
                if ready:
                    st.sends = [s for s in st.sends if s.due != first]
                    if len(ready) > 1:
                        ready.sort(key=_send_order)
                    for s in ready:
                        self._offer(st, user, s, s.due, ctx, out, extra)
            first = _first_due(st)

    def _settle(self, user: str, st: UserTriggers, now: int) -> None:
        """Forget what no longer matters, drop an empty state, schedule the next timer."""
        horizon = self.book.horizon_ms if self.book is not None else 0
        if st.history and st.history[0][0] <= now - horizon:
            st.history = [h for h in st.history if h[0] > now - horizon]
        marks = st.marks
        soonest = _soonest_mark(marks) if marks else NEVER
        if soonest <= now:
            for name in [n for n, (until, _) in marks.items() if until <= now]:
                del marks[name]
            soonest = _soonest_mark(marks)
        if st.empty():
            del self.users[user]
            return
        due = min(_first_due(st), soonest)
        if st.history:
            due = min(due, st.history[0][0] + horizon + 1)
        if due == NEVER:
            return
        if st.heap_due is None or due < st.heap_due:
            st.heap_due = due
            heapq.heappush(self.timers, (due, user))
            if len(self.timers) > 2 * len(self.users) + 1024:
                self.timers = [(s.heap_due, u) for u, s in self.users.items()
                               if s.heap_due is not None]
                heapq.heapify(self.timers)

    # -- sending -----------------------------------------------------------------------------
    def _decide(self, st: UserTriggers, user: str, fires: list[Fire], now: int, ctx, out,
                campaign: str, extra: dict) -> None:
        """Rules that fired on one event: the highest priority ones are offered for sending."""
        if len(fires) == 1:
            ranked = fires  # the usual case (every timer): nothing to rank
        else:  # live ones by priority, then the shadow ones (they never take a live one's place)
            live = [f for f in fires if not f.rule.shadow]
            live.sort(key=lambda f: (-f.rule.priority, f.rule.name))
            ranked = live + [f for f in fires if f.rule.shadow]
        cap = self.book.guards.max_actions_per_event
        for i, f in enumerate(ranked):
            s = Send(f.rule, f.trigger, f.step, f.rule.action.channel, f.message, f.props,
                     idempotency_key(f.rule.name, user, f.trigger, str(f.step)), campaign)
            if i >= cap and not f.rule.shadow:  # (then ranked[0] is the live winner)
                self._audit(out, now, user, f.rule, s.action_id, s.step, s.channel, s.message,
                            "lower_priority", f"{ranked[0].rule.name} fired on the same event")
                continue
            self._offer(st, user, s, now, ctx, out, extra)

    def _offer(self, st: UserTriggers, user: str, s: Send, now: int, ctx, out, extra: dict,
               note: str = "") -> None:
        """The guards, at the moment of sending; then the action, or the reason there is none."""
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
        tz = None  # the user's time zone: read only when a guard needs it
        q = guards.quiet_hours
        if q is not None and s.channel in q.channels:
            tz = ctx.zone()
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
            if len(st.history) < cap.max:
                continue  # it counts sends of the history: fewer than max sends never fill it
            if tz is None:
                tz = ctx.zone()
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
            "campaign": s.campaign or "", "session_id": ctx.session_id(now), "step": s.step, "trigger": s.trigger, "tags": list(tags),
            "properties": s.props or {}, "event_ts_ms": now, **extra}
        if s.deferred and s.channel in self.book.interval_ms:
            # a release under the channel's rate limit: decided now, sent at its slot
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

    def _defer(self, st: UserTriggers, user: str, s: Send, until: int, reason: str, now: int,
               out, detail: str) -> None:
        if len(st.sends) >= MAX_PENDING_SENDS:
            self._audit(out, now, user, s.rule, s.action_id, s.step, s.channel, s.message,
                        "capped", f"{MAX_PENDING_SENDS} sends already wait for this user")
            return
        s.due, s.reason, s.deferred = until, reason, True
        st.sends.append(s)
        self._audit(out, now, user, s.rule, s.action_id, s.step, s.channel, s.message,
                    "deferred", f"{reason}: {detail}")

    def _audit(self, out, ts: int, user: str, rule: Rule, action_id: str, step: int,
               channel: str, message: str, decision: str, reason: str) -> None:
        self._audit_row(out, ts, user, rule.name, rule.version, "shadow" if rule.shadow else "live",
                        action_id, step, channel, message, decision, reason)

    @staticmethod
    def _audit_row(out, ts: int, user: str, rule: str, version, mode: str, action_id: str,
                   step: int, channel: str, message: str, decision: str, reason: str) -> None:
        out.audit.append({"time_ms": ts, "rule": rule, "rule_version": version,
                          "user_id": user, "action_id": action_id, "step": step,
                          "channel": channel, "message": message, "decision": decision,
                          "reason": reason, "mode": mode})
        STATS.add_labeled("trigger_decisions", decision)

    # -- figures ---------------------------------------------------------------------------------
    def pending_timers(self) -> int:
        return sum(1 for st in self.users.values() if st.heap_due is not None)


def _match_order(m: Match) -> tuple:
    return (m.rule.name, m.key)


def _send_order(s: Send) -> tuple:
    return (s.rule.name, s.action_id)


def _soonest_mark(marks: dict[str, tuple[int, int]]) -> int:
    """When the first re-entry mark expires (NEVER: none)."""
    soonest = NEVER
    for until, _ in marks.values():
        if until < soonest:
            soonest = until
    return soonest


def _first_due(st: UserTriggers) -> int:
    """The earliest due time of the user's matches and pending sends (NEVER: none)."""
    due = NEVER
    for m in st.matches.values():
        if m.due is not None and m.due < due:
            due = m.due
    for s in st.sends:
        if s.due < due:
            due = s.due
    return due


def wall_ms() -> int:
    return int(time.time() * 1000)
