"""Brute-force reference for the per-user Redis hashes, computed by definition.

This module is deliberately independent of the streaming engine (``flows/shard.py``,
``features/profile.py``, ``features/buckets.py`` are neither read nor imported). It takes the raw
records of a bounded input, keeps the whole event list in memory and evaluates every registry
feature straight from its definition: no buckets, no timers, no incremental state. It is slow
and obviously correct, which is what a reference for checking the engine should be.

Only two things are borrowed from the project:

* ``config.registry`` -- the feature declarations (what to compute, not how);
* ``flows.events.decode`` -- only to decide whether a raw record is a valid event, and for the
  event name, the event time and the campaign of a valid one.

``expected_profiles(records, registry, late_ids=..., end_ms=...)`` returns
``(profiles, aliases)``: ``profiles[profile_id]`` is the exact hash content (field -> text) the
engine must write, without ``updated_at`` (wall clock) and model scores (``p_purchase_24h``);
``aliases[anonymous_id] = user_id``.

Resolved ambiguities (the engine must match these; see also the test module):

1.  Invalid records (``decode`` returns a DeadLetter) are dropped before anything else; they take
    no part in dedupe, in the end time, in identity links. A later *valid* record with the same
    event_id as an earlier invalid one is therefore counted.
2.  Dedupe is global (all partitions, all profiles) over valid records, in processing order, for
    the whole input (no dedupe horizon). The first valid record of an event_id wins even if its
    content differs from later copies.
3.  ``late_ids`` removes every record with that event_id (so the set must only name ids whose
    first valid record is the one the engine dead-lettered as late). Late events take no part in
    the end time, links or consent.
4.  "Counted" events = valid, first of their id, not late. The default ``end_ms`` is the minimum,
    over the partitions holding at least one counted event, of the partition's max counted event
    time. Consent-withdrawing events (rule 4) ARE counted for the end time (they are stream
    events; they only stay out of profiles). No counted event at all -> no profiles.
5.  Consent: only ``context.consent.profiling is False`` (JSON ``false``) withdraws. A consent
    object that is not an object, a missing key, ``"false"`` (string), ``0``, ``null``: counts.
    A withdrawing event creates NO identity link, enters no profile, and deletes every earlier
    event of the profile it belongs to AT THAT MOMENT: resolved with the links made by earlier
    events (processing order), and only the earlier events that resolved to that profile with the
    same links. So an anonymous visitor's withdrawal before they log in as U deletes only the
    visitor's own events, never U's; after the link it deletes U's whole profile (the visitor's
    merged events included). Aliases are not deleted.
6.  Identity: profile id = user_id if the JSON has a non-null user_id, else anonymous_id (what
    ``decode`` puts in ``Event.user``). A link A -> U is made by a counted, non-withdrawing event
    with user_id U and an anonymous_id A that is a valid id (non-empty printable string of at most
    128 characters) with A != U. The first link of A in processing order wins. Resolution is one
    hop and applies only to anonymous-only events (no user_id): events that carry user_id X stay
    in profile X even if X is itself a linked anonymous id. ``aliases`` holds every link, whether
    or not A ever had anonymous-only events and whether or not U's profile survives consent.
    Profile ids share one namespace: an unlinked anonymous id equal to some user_id is the same
    profile.
7.  A profile exists iff at least one counted event survives consent deletion for it.
8.  Numeric values used by derived features: count -> int (0 when absent); sum / cart value ->
    ``cents / 100`` as a Python float (0.0 when absent); ratio -> the unrounded float ``a / b``
    (undefined when not written; an undefined ratio used as a number counts as 0); time / days ->
    int or undefined. Comparisons with params are float comparisons (``cents / 100 >= 5000.0``).
    ``argmax`` compares the unrounded floats; strict ``>`` so the earlier feature wins ties.
9.  Ratio text is ``f"{a / b:.4f}"`` of those floats (Python float formatting, round-half-even on
    the binary value).
10. Sum: ``round(v * 100)`` (Python ``round``: half-to-even on the float product, e.g. 0.125 ->
    12 cents, 19.99 -> 1999 cents) for int/float non-bool values, else 0. Note ``decode`` itself
    rejects the whole record when ``properties.revenue`` is not a number (or is a bool).
11. Cart quantity: an ``int`` (not bool, not float: ``2.0`` -> 1) >= 1, else 1. Cart events are
    those with ts strictly after the latest order (an add at the order's exact ms is cleared).
12. Session: all counted events of the profile (any name, including sends and impressions),
    sorted by (ts, event_id); a gap strictly greater than ``session_gap_min`` minutes splits.
    The hash uses the resolved profile id. All four parts are always written.
13. Touch: over all counted events of the profile (no window) with a non-empty ``ev.campaign``.
14. lifecycle / activity with a missing age: age 0 (cannot happen with the shipped registry,
    since ``first_seen`` exists for every profile).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from flows.events import Event, decode

MIN_MS = 60_000
DAY_MS = 86_400_000
MAX_ID_CHARS = 128


@dataclass(frozen=True)
class Ev:
    """One counted event, as the reference needs it."""

    seq: int  # position in processing order
    partition: int
    event_id: str
    name: str
    ts: int
    user_id: str | None
    anon_id: str | None
    props: dict
    campaign: str
    withdraws: bool  # context.consent.profiling is exactly false
    consent: bool | None = None  # context.consent.profiling when a JSON boolean

    @property
    def anonymous_only(self) -> bool:
        return self.user_id is None

    @property
    def pid(self) -> str:
        return self.user_id if self.user_id is not None else self.anon_id  # type: ignore[return-value]


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def money(cents: int) -> str:
    """Exact money text from integer cents: 1234 -> '12.34', -50 -> '-0.50'."""
    sign = "-" if cents < 0 else ""
    c = abs(cents)
    return f"{sign}{c // 100}.{c % 100:02d}"


def session_hash(profile_id: str, start_ts: int) -> str:
    return hashlib.blake2b("\x1f".join(["session", profile_id, str(start_ts)]).encode(),
                           digest_size=12).hexdigest()


def counted_events(records: Iterable[tuple[int, bytes]], late_ids=frozenset()) -> list[Ev]:
    """Valid, first-of-their-id, not-late events in processing order."""
    seen: set[str] = set()
    out: list[Ev] = []
    for seq, (partition, raw) in enumerate(records):
        ev = decode(raw)
        if not isinstance(ev, Event):
            continue
        if ev.event_id in seen:
            continue
        seen.add(ev.event_id)
        if ev.event_id in late_ids:
            continue
        doc = orjson.loads(raw)
        user_id = doc.get("user_id")
        anon_id = doc.get("anonymous_id")
        props = doc.get("properties") or {}
        ctx = doc.get("context") or {}
        consent = ctx.get("consent")
        withdraws = isinstance(consent, dict) and consent.get("profiling") is False
        given = consent.get("profiling") if isinstance(consent, dict) else None
        assert (user_id if user_id is not None else anon_id) == ev.user
        out.append(Ev(seq, partition, ev.event_id, ev.name, ev.ts_ms, user_id, anon_id, props,
                      ev.campaign, withdraws, given if isinstance(given, bool) else None))
    return out


def default_end_ms(events: list[Ev]) -> int | None:
    per_partition: dict[int, int] = {}
    for e in events:
        per_partition[e.partition] = max(per_partition.get(e.partition, e.ts), e.ts)
    return min(per_partition.values()) if per_partition else None


def expected_profiles(records, registry, *, late_ids=frozenset(), end_ms=None, link_events=None,
                      profiling="opt_out", max_users_per_anonymous=1, namespaced=False):
    """``(profiles, aliases)`` the engine must produce for ``records`` (see the module doc).

    Privacy (issue 14), written from the rules, not from the engine: ``link_events`` (None: any
    event) are the event names that may link an anonymous id to a user; ``profiling`` is what an
    event without a statement means when its identity never stated one; consent statements are
    per identity (a user id, or an unlinked anonymous id), the latest by event time wins; an
    anonymous-only event of a linked visitor neither states nor deletes for the user (it follows
    the user's consent and its own refusal); a merged visitor's statement counts for the user only
    when the user made none, and a user who refused does not receive the visitor's events."""
    events = counted_events(records, late_ids)
    if end_ms is None:
        end_ms = default_end_ms(events)
    default = profiling == "opt_out"

    aliases: dict[str, str] = {}  # grows in processing order: anonymous id -> latest user
    linked_users: dict[str, list[str]] = {}
    stated: dict[tuple[str, str], tuple[int, bool]] = {}  # ("user"|"anon", id) -> latest

    def who(e: Ev) -> tuple[str, str]:
        return ("user", e.user_id) if e.user_id is not None else ("anon", e.anon_id)

    home: dict[int, tuple[str, str]] = {}  # event seq -> the profile it went to

    def consent_of(k) -> bool:
        return stated[k][1] if k in stated else default

    kept: list[Ev] = []
    for e in events:
        statement = e.consent
        if e.anonymous_only and e.anon_id in aliases:  # a linked device: the user's consent
            k = ("user", aliases[e.anon_id])  # (or, while the user stated none, the device's)
            device = stated.get(("anon", e.anon_id))
            base = (stated[k][1] if k in stated else statement if statement is not None
                    else device[1] if device else default)
            if base and statement is not False:
                home[e.seq] = k
                kept.append(e)
            continue
        k = who(e)
        if statement is False:  # a refusal deletes what this identity's profile holds
            if k not in stated or e.ts >= stated[k][0]:
                stated[k] = (e.ts, statement)
            kept = [x for x in kept if home[x.seq] != k]
            continue
        # (the merge a link sets off comes before the link event's own statement)
        if e.user_id is not None and _valid_id(e.anon_id) and e.anon_id != e.user_id and (
                link_events is None or e.name in link_events):
            a, u = e.anon_id, e.user_id
            if a not in aliases:
                aliases[a] = u
                linked_users[a] = [u]
                visitor = ("anon", a)
                moving = [x for x in kept if home[x.seq] == visitor]
                if moving and k not in stated and visitor in stated:  # travels with the profile
                    stated[k] = stated[visitor]
                kept = [x for x in kept if home[x.seq] != visitor]
                if consent_of(k):
                    for x in moving:
                        home[x.seq] = k
                    kept += moving
            elif aliases[a] != u and (u in linked_users[a]
                                      or len(linked_users[a]) < max_users_per_anonymous):
                if u not in linked_users[a]:
                    linked_users[a].append(u)
                aliases[a] = u
        if statement is not None and (k not in stated or e.ts >= stated[k][0]):
            stated[k] = (e.ts, statement)
        if (statement if statement is not None and stated.get(k, (None,))[0] == e.ts
                else consent_of(k)):
            home[e.seq] = k
            kept.append(e)

    members: dict = {}  # (namespaced: ("user" | "anon", id), else the id) -> events
    for e in sorted(kept, key=lambda x: x.seq):  # every surviving event under its profile
        members.setdefault(home[e.seq] if namespaced else home[e.seq][1], []).append(e)
    if namespaced:
        return {k: compute_profile(k[1], evs, registry, end_ms) for k, evs in members.items()}, aliases
    profiles = {pid: compute_profile(pid, evs, registry, end_ms) for pid, evs in members.items()}
    return profiles, aliases


# -- per-profile evaluation ----------------------------------------------------------------------

class _Profile:
    def __init__(self, pid: str, events: list[Ev], registry, end_ms: int | None):
        self.pid = pid
        self.events = events
        self.reg = registry
        self.params = registry.params
        max_ts = max(e.ts for e in events)
        self.as_of = max_ts if end_ms is None else max(end_ms, max_ts)
        self.now_min = self.as_of // MIN_MS
        self.out: dict[str, str] = {}
        self.value: dict[str, Any] = {}  # numeric / label value, None = undefined
        self._busy: set[str] = set()

    # numeric value of a referenced feature (None = undefined)
    def num(self, name: str):
        return self.get(name)

    def num0(self, name: str):
        v = self.get(name)
        return 0 if v is None else v

    def get(self, name: str):
        if name not in self.value:
            if name in self._busy:
                raise ValueError(f"cyclic feature reference through {name!r}")
            self._busy.add(name)
            f = self.reg.feature(name)
            text, value = getattr(self, "_" + f.aggregation)(f)
            self._busy.discard(name)
            self.value[name] = value
            if text is not None:
                self.out[name] = text
        return self.value[name]

    def _in_window(self, f, ts: int) -> bool:
        if f.window_min is None:  # lifetime
            return True
        return ts // MIN_MS > self.now_min - f.window_min

    def _matching(self, f):
        return [e for e in self.events if f.matches(e.name)]

    # -- aggregations: each returns (text or None, value or None)
    def _count(self, f):
        n = sum(1 for e in self._matching(f) if self._in_window(f, e.ts))
        return (str(n) if n else None), n

    def _sum(self, f):
        cents = 0
        for e in self._matching(f):
            if self._in_window(f, e.ts):
                v = e.props.get(f.prop) if isinstance(e.props, dict) else None
                if _is_number(v):
                    cents += round(v * 100)
        return (money(cents) if cents else None), cents / 100

    def _ratio(self, f):
        a, b = self.num0(f.of[0]), self.num(f.of[1])
        if b is None or b <= 0 or b < self.params["min_denominator"]:
            return None, None
        r = a / b
        return f"{r:.4f}", r

    def _first_time(self, f):
        ts = [e.ts for e in self._matching(f)]
        return (str(min(ts)), min(ts)) if ts else (None, None)

    def _last_time(self, f):
        ts = [e.ts for e in self._matching(f)]
        return (str(max(ts)), max(ts)) if ts else (None, None)

    def _days_since(self, f):
        for ref in f.of:
            t = self.num(ref)
            if t is not None:
                d = (self.as_of - t) // DAY_MS
                return str(d), d
        return None, None

    def _rfm(self, f):
        days, orders, revenue = self.num(f.of[0]), self.num0(f.of[1]), self.num0(f.of[2])
        if orders < 1:
            return None, None
        p = self.params
        r = days is not None and days < p["rfm_recency_days"]
        fr = orders >= p["rfm_frequency_orders"]
        m = revenue >= p["rfm_monetary"]
        if f.part == "r":
            label = "high" if r else "low"
        elif f.part == "f":
            label = "high" if fr else "low"
        elif f.part == "m":
            label = "high" if m else "low"
        else:
            kind = "value" if r and fr else "develop" if r else "retain" if fr else "winback"
            label = ("important" if m else "general") + "-" + kind
        return label, label

    def _lifecycle(self, f):
        i7, i30, age = self.num0(f.of[0]), self.num0(f.of[1]), self.num0(f.of[2])
        p = self.params
        if i30 == 0:
            label = "churned"
        elif age < p["new_user_days"]:
            label = "new"
        elif 30 * i7 < p["decline_ratio"] * 7 * i30:
            label = "decline"
        elif age < p["growth_days"]:
            label = "growth"
        else:
            label = "mature"
        return label, label

    def _activity(self, f):
        i7, i30 = self.num0(f.of[0]), self.num0(f.of[1])
        if i30 == 0:
            label = "silent"
        elif i7 >= self.params["interactions_highly_active"]:
            label = "highly_active"
        else:
            label = "active"
        return label, label

    def _at_least(self, f):
        flag = 1 if self.num0(f.of[0]) >= self.params[f.param] else 0
        return str(flag), flag

    def _session(self, f):
        gap_ms = self.params["session_gap_min"] * MIN_MS
        ordered = sorted(self.events, key=lambda e: (e.ts, e.event_id))
        start = 0
        for i in range(1, len(ordered)):
            if ordered[i].ts - ordered[i - 1].ts > gap_ms:
                start = i
        latest = ordered[start:]
        first, last = latest[0].ts, latest[-1].ts
        if f.part == "id":
            v = session_hash(self.pid, first)
            return v, v
        if f.part == "pages":
            n = sum(1 for e in latest if f.matches(e.name))
            return str(n), n
        if f.part == "started_at":
            return str(first), first
        d = (last - first) // 1000
        return str(d), d

    def _cart(self, f):
        orders = [e.ts for e in self.events if e.name == "order_completed"]
        last_order = max(orders) if orders else None

        def after(e):
            return last_order is None or e.ts > last_order

        if f.part == "updated_at":
            ts = [e.ts for e in self.events
                  if e.name in ("add_to_cart", "remove_from_cart", "order_completed")]
            return (str(max(ts)), max(ts)) if ts else (None, None)
        if f.part == "checkout_pending":
            flag = int(any(e.name == "checkout_started" and after(e) for e in self.events))
            return str(flag), flag
        items = cents = 0
        for e in self.events:
            if e.name not in ("add_to_cart", "remove_from_cart") or not after(e):
                continue
            sign = 1 if e.name == "add_to_cart" else -1
            props = e.props if isinstance(e.props, dict) else {}
            q = props.get("quantity")
            q = q if isinstance(q, int) and not isinstance(q, bool) and q >= 1 else 1
            price = props.get("price")
            price_cents = round(price * 100) if _is_number(price) else 0
            items += sign * q
            cents += sign * price_cents * q
        items, cents = max(0, items), max(0, cents)
        if f.part == "items":
            return (str(items) if items else None), items
        return (money(cents) if cents else None), cents / 100

    def _argmax(self, f):
        best = None
        for ref, label in zip(f.of, f.labels):
            v = self.num(ref)
            if v is not None and (best is None or v > best[0]):
                best = (v, label)
        return (best[1], best[1]) if best else (None, None)

    def _touch(self, f):
        touches = [(e.ts, e.campaign) for e in self.events if e.campaign]
        if not touches:
            return None, None
        v = (min(touches) if f.part == "first" else max(touches))[1]
        return v, v

    def _model(self, f):
        return None, None  # model scores are not reproducible by definition


def compute_profile(pid: str, events: list[Ev], registry, end_ms: int | None) -> dict[str, str]:
    p = _Profile(pid, events, registry, end_ms)
    for f in registry.features:
        p.get(f.name)
    out = dict(p.out)
    out["as_of"] = str(p.as_of)
    return out
