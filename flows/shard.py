"""The two keyed stages of the flow: ingest shards, then profile shards.

Ingest shards (key: crc32 of the anonymous id, else the user id) deduplicate by event_id, check
lateness, count minute aggregates, keep the identity links (anonymous id -> user id) and the
profiles of anonymous visitors, and drop profiling for events without consent. Events of
identified users go on to the profile shards (key: crc32 of the user id) in a :class:`Handover`.
When a visitor logs in, its anonymous profile travels in the handover and is merged into the
user's profile: a DAG, no cycle, so it runs unchanged in Bytewax cluster mode.

Time. Every source batch reaches every ingest shard as a :class:`Chunk` with the highest event
time per source partition. An ingest shard's clock is the minimum over the partitions of their
highest event time (:mod:`flows.stream_clock`: idle partitions aside); its watermark is the clock
minus the allowed lateness. Profile shards take
the minimum of the ingest shards' clocks, which travel in the handovers. The watermark is "now"
for every profile, whether or not it sends anything: it fires timers (a bucket leaving a window,
a day passing for "days since" features, a model label horizon, the state's time to live) and
closes minutes. An event older than the watermark is late: dead-lettered with reason
``late_event``. At the end of a bounded input the watermark moves up to the clock. Nothing here
reads the wall clock, so a replay of days of history gives the live run's results.
"""
from __future__ import annotations

import hashlib
import heapq
import operator
import pickle
import time
import zlib
from dataclasses import dataclass, field

import orjson
from bytewax.operators import StatefulBatchLogic

from features.profile import MINUTE_MS, FeaturePlan, Profile
from flows.events import DeadLetter, Event, step_failure
from alerts.metrics import delay_bucket
from flows.eviction import OldestFirst
from flows.minutes import MinutePart
from flows.stream_clock import END_OF_TIME, StreamClock
from surgeflow.shutdown import stopping
from surgeflow.stats import STATS
from models.learner import Weights
from models.runtime import ShardModels
from privacy.consent import ConsentBook
from privacy.erasure import PROCESS_LEDGER, ErasedLedger, ErasureReport, ErasureRequest
from triggers import guards as trigger_guards
from triggers.book import rule_file
from triggers.engine import TriggerEngine
from triggers.rules import idempotency_key
from warehouse.raw_events import raw_row

PAGE_VIEWS = frozenset({"page", "page_view"})
BOUNCE_MINUTES = 10  # a view with no interaction of its visitor this long after it bounced
BOUNCE_MS = BOUNCE_MINUTES * MINUTE_MS
# Sent by the system to the visitor, not done by them: they do not save a view from bouncing.
NOT_INTERACTIONS = frozenset({"push_sent", "sms_sent", "email_sent", "ad_impression",
                              "push_delivered", "identify"})
MAX_PAGE_CHARS = 200
OTHER = "(other)"  # where aggregates beyond a cardinality cap are counted


def shard_of(user: str, shards: int) -> int:
    """Stable across processes and runs (Python's hash() is salted per process).

    >>> shard_of("u00042", 16) == shard_of("u00042", 16)
    True
    """
    return zlib.crc32(user.encode("utf-8")) % shards


def minute_of(ts_ms: int) -> int:
    return ts_ms // MINUTE_MS


@dataclass(slots=True)
class Chunk:
    """What an ingest shard receives per source batch: its events and the partitions' progress."""

    shard: int
    events: list[Event]
    clocks: dict[int, int]  # source partition -> highest event time in the batch
    partitions: int  # number of source partitions
    wall_ms: int = 0  # wall time the batch was read: how long partitions have been silent
    # source partition -> highest offset read (None: tests without positions, nothing waits)
    progress: dict[int, int] | None = None
    erasures: list[ErasureRequest] | None = None  # erasure requests (sent to every ingest shard)


@dataclass(slots=True)
class Handover:
    """Ingest shard -> profile shard: events, anonymous profiles to merge, consent withdrawals,
    each with the source position of the event it came from, and the ingest shard's clock and
    how far it has read each source partition (every ingest shard sends every profile shard one
    per batch, so the profile shard knows when nothing earlier can still come)."""

    shard: int
    source: int
    # (partition, offset, ts, Event | ("merge", user, Profile, consent) | ("erase", user, request))
    ops: list
    clock: int | None
    progress: dict[int, int]
    final: bool = False


@dataclass(slots=True)
class Write:
    """One profile's Redis write: absolute values (None: delete the key), fields to remove."""

    user: str
    values: dict[str, str] | None
    removed: tuple[str, ...] = ()
    refresh_ttl: bool = False  # the user was active: the key's time to live starts again
    arrival_ms: int = 0
    anonymous: bool = False  # an anonymous visitor's hash (its own namespace), else a user's


@dataclass(frozen=True, slots=True)
class VersionFor:
    """A model version on its way to one profile shard (the versions channel's broadcast)."""

    shard: int
    weights: Weights


@dataclass(frozen=True)
class ShardConfig:
    lateness_ms: int = 60_000
    # The online models (models.spec.ModelSpec), scored in the profile shards; none: no model.
    models: tuple = ()
    model_period_ms: int = 3_600_000  # version k: the labels before k periods
    model_grace_ms: int = 300_000  # an event at t scores with the version of (t - grace)
    trigger_rules: str | None = None  # the trigger rule file (None: no trigger rules)
    trigger_reload_s: float = 5.0  # how often the rule file is checked for changes (wall)
    state_ttl_ms: int = 90 * 86_400_000  # a profile silent this long is forgotten (Redis TTL)
    profile_shards: int = 16
    ingest_shards: int = 8
    # Snapshots are only worth their cost when a recovery store keeps them.
    snapshots: bool = False
    raw_events: bool = True  # keep a masked copy of each accepted event for events_raw
    pii_key: bytes | None = None  # keyed hash of e-mail / phone in events_raw (None: dropped)
    idle_ms: int | None = 60_000  # a partition silent this long (wall) stops holding the clock
    lookback_ms: int | None = None  # the first watermark is at least wall time minus this
    max_anonymous: int = 200_000  # anonymous profiles per ingest shard
    max_links: int = 500_000  # identity links per ingest shard
    max_minute_rows: int = 50_000  # distinct aggregate keys per open minute and shard
    # Privacy (privacy.* settings). These defaults keep the engine's unit tests short; the
    # product's defaults are config.settings' (opt-in consent, links only from login events).
    profiling_consent: str = "opt_out"
    marketing_consent: str = "opt_out"  # opt_in: every action needs a marketing grant
    consent_ttl_ms: int = 400 * 86_400_000
    link_events: frozenset[str] | None = None  # events that may link identities (None: any)
    link_sources: frozenset[str] = frozenset()  # context.source values trusted to link (empty: any)
    max_users_per_anonymous: int = 1
    subject_key: bytes | None = None  # key of the subject hashes (erasure ledger)
    erased: tuple[tuple[str, int], ...] = ()  # the erasure ledger read at start-up


@dataclass
class ShardOut:
    """Everything one shard step produces; empty lists when nothing happened."""

    shard: int
    features: list[Write] = field(default_factory=list)
    aliases: list[tuple[str, str | None]] = field(default_factory=list)  # anon -> user (None: delete)
    erasures: list[ErasureReport] = field(default_factory=list)
    actions: list[dict] = field(default_factory=list)  # "_"-prefixed keys are not published
    audit: list[dict] = field(default_factory=list)  # trigger decisions (trigger_audit)
    dead: list[DeadLetter] = field(default_factory=list)
    # The minutes this ingest shard closed: a MinutePart for flows.minutes.MinuteCloser
    minutes: MinutePart | None = None
    raw: list[tuple] = field(default_factory=list)  # events_raw rows
    handovers: list[tuple[str, Handover]] = field(default_factory=list)
    handover_to: dict[int, Handover] = field(default_factory=dict)  # profile shard -> its one
    labels: list = field(default_factory=list)  # (model, LabelBatch): to the model learners
    events: int = 0
    duplicates: int = 0
    consent_denied: int = 0

    def __bool__(self) -> bool:
        return bool(self.features or self.aliases or self.actions or self.audit or self.minutes
                    or self.dead or self.erasures
                    or self.raw or self.handovers or self.events or self.duplicates
                    or self.consent_denied or self.labels)


class TriggerContext:
    """What a trigger rule may read of a user: features and model scores (as of the profile's
    state), the session, the time zone and the marketing consent."""

    __slots__ = ("store", "user", "p", "_num")

    def __init__(self, store: "ProfileStore", user: str, p: Profile | None):
        self.store, self.user, self.p, self._num = store, user, p, None

    @property
    def state_ttl_ms(self) -> int:
        return self.store.config.state_ttl_ms

    @property
    def session_gap_ms(self) -> int:
        return self.store.plan.gap_ms

    def feature(self, name: str):
        p, plan = self.p, self.store.plan
        if p is None:
            return None
        if name in plan.model_fields:  # the last score the profile shard's models gave
            models = self.store.models
            return models.score(self.user, name) if models is not None else None
        if self._num is None:
            from features.profile import _Ctx, _Num
            self._num = _Num(_Ctx(self.user, p, plan))
        return plan.feature_value(self.user, p, name, self._num)

    def session_start(self, ts: int) -> int | None:
        """The start of the session holding ``ts``: not always the latest (a send released
        later, by a timer or a rate-limit slot, reads it after the user went on)."""
        sess = self.p.sess if self.p is not None else ()
        n = len(sess)
        if n and sess[n - 3] <= ts <= sess[n - 2]:
            return sess[n - 3]  # the latest, the usual case
        for k in range(n - 6, -1, -3):
            if sess[k] <= ts <= sess[k + 1]:
                return sess[k]
        return None

    def session_span(self) -> tuple[int, int] | None:
        """(start, last event) of the user's latest session."""
        s = self.store.plan.session(self.p) if self.p is not None else None
        return None if s is None else (s[0], s[1])

    def session_id(self, ts: int) -> str:
        start = self.session_start(ts)
        return "" if start is None else _session_id(self.user, start)

    def zone(self):
        book = self.store.triggers.book
        default = book.guards.default_timezone if book is not None else "UTC"
        tz = self.p.tz if self.p is not None else None
        return trigger_guards.zone(tz[1] if tz else None, default)

    def marketing_ok(self, policy: str) -> bool:
        if self.store.config.marketing_consent == "opt_in":  # the global policy is a floor
            policy = "opt_in"
        given = self.p.marketing if self.p is not None else None
        value = given[1] if given else None
        return value is True if policy == "opt_in" else value is not False


class PlayedContext(TriggerContext):
    """A trigger rule that reads a model score is decided when the models play its event: the
    score is the one just played, the features with a point-in-time value are as of the
    event's minute (the others, the session, consent and time zone are the profile's now)."""

    __slots__ = ("at",)

    def __init__(self, store: "ProfileStore", user: str, p: Profile | None, at: int):
        super().__init__(store, user, p)
        self.at = at

    def session_span(self) -> tuple[int, int] | None:
        start = self.session_start(self.at)
        return None if start is None else (start, self.at)

    def feature(self, name: str):
        plan = self.store.plan
        if self.p is None or name in plan.model_fields or name not in plan.point_in_time:
            return super().feature(name)
        if self._num is None:
            self._num = plan.values_at(self.user, self.p, self.at)
        return self._num(name)


class ProfileStore:
    """Profiles of one shard, their event-time timers, the trigger rules and (in the profile
    shards) the online models' side: scores, open predictions, labels."""

    def __init__(self, plan: FeaturePlan, config: ShardConfig):
        self.plan = plan
        self.config = config
        self.users: dict[str, Profile] = {}
        self.timers: list[tuple[int, str]] = []
        self.dirty: set[str] = set()
        self.watermark = -END_OF_TIME
        self.unknown_fields = 0  # after a restart: fields a new profile's hash may already hold
        self.triggers = TriggerEngine() if config.trigger_rules else None
        self.models: ShardModels | None = None  # set by ProfileShard (visitors get no score)
        # At most `cap` profiles (anonymous visitors); beyond, the least recently active in
        # event time is forgotten as if its time to live had passed.
        self.cap: int | None = None
        self.recency: OldestFirst | None = None
        self.anonymous = False  # the ingest shards' store of anonymous visitors
        self.consent = ConsentBook(config.profiling_consent, config.consent_ttl_ms)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"cap": None, "recency": None, "triggers": None, "anonymous": False,
                              "consent": None, "models": None, **state})
        self.__dict__.pop("rule", None)  # the one hard-coded rule before the trigger engine
        self.__dict__.pop("model", None)  # the per-shard propensity model before models/

    def refresh_rules(self, wall_ms: int = 0) -> None:
        """The current trigger rule file (re-read when it changed: hot reload)."""
        if self.config.trigger_rules:
            if self.triggers is None:
                self.triggers = TriggerEngine()
            self.triggers.use(rule_file(self.config.trigger_rules, self.config.trigger_reload_s).get())
            self.triggers.wall_ms = wall_ms
            # rules reading a model score react when the models play the event (not for visitors)
            self.triggers.deferred = self.plan.model_fields if self.models is not None else frozenset()
        else:
            self.triggers = None

    def _engine(self) -> TriggerEngine | None:
        eng = self.triggers
        if eng is not None and eng.book is None:
            self.refresh_rules()
        return self.triggers

    def limit(self, cap: int) -> None:
        self.cap = cap
        if self.recency is None:
            self.recency = OldestFirst()
            for name, p in self.users.items():
                self.recency.touch(name, p.last_event)

    def admit(self, e: Event, out: ShardOut) -> bool:
        """The consent policy on one event: may it be profiled? A withdrawal forgets what was
        built (and cancels pending sends)."""
        book = self.consent
        if book is None:  # a snapshot from before the consent ledger
            book = self.consent = ConsentBook(self.config.profiling_consent, self.config.consent_ttl_ms)
        allowed, withdrawn = book.decide(e.user, e.consent, e.ts_ms, e.linked, e.device_consent)
        if not allowed:
            out.consent_denied += 1
            if withdrawn or (e.consent is False and not e.linked):
                if e.user in self.users:
                    self.forget(e.user, out, e.ts_ms)
        return allowed

    def apply(self, e: Event, out: ShardOut) -> None:
        p = self.users.get(e.user)
        if p is None:
            p = self.users[e.user] = self.plan.new_profile()
            p.written = self.unknown_fields
        engine = self._engine()
        if engine is not None:  # what was due before this event fires first, without it
            ctx = TriggerContext(self, e.user, p)
            engine.elapse(e.user, e.ts_ms, ctx, out)
        if e.linked and e.ts_ms < e.linked_at and self.models is not None:
            # the visitor's, before its login: not in what the models see before the login
            self.models.visiting(e.user, e.linked_at, p, self.plan)
        self.plan.apply(p, e)
        self.dirty.add(e.user)
        if self.recency is not None:
            self.recency.touch(e.user, e.ts_ms)
            while len(self.users) > self.cap:
                victim = self.recency.pop_oldest()
                if victim is None:
                    break
                if victim in self.users:
                    self._drop(victim, out)
                    STATS.add_labeled("evictions", "anonymous_profile")
        models = self.models
        if models is not None:  # played (scores, labels) once the watermark has passed it
            if not e.linked:  # (see ShardModels.note)
                keep = engine is not None and engine.defers(e.name)  # for a score's rules
                models.note(e.user, e.name, e.ts_ms, e if keep else None)
            if e.user in models.before:
                models.applied(e, self.plan)
        if engine is not None:
            ctx._num = None  # the features now include this event
            withdrawn = False
            # (a linked anonymous device may not grant or withdraw for the person)
            if e.marketing is not None and not e.linked and (p.marketing is None
                                                             or e.ts_ms >= p.marketing[0]):
                withdrawn = e.marketing is False and (p.marketing is None or p.marketing[1])
                p.marketing = (e.ts_ms, e.marketing)
            if e.tz and (p.tz is None or e.ts_ms >= p.tz[0]):
                p.tz = (e.ts_ms, e.tz)
            if withdrawn:
                engine.revoke(e.user, e.ts_ms, out)
            engine.on_event(e.user, e, ctx, out, e.arrival_ms)

    def elapse(self, user: str, ts: int, out: ShardOut) -> None:
        """Fire the user's trigger timers due by ``ts`` (an operation at ``ts`` comes next)."""
        engine = self._engine()
        if engine is not None and ts:
            engine.elapse(user, ts, TriggerContext(self, user, self.users.get(user)), out)

    def absorb(self, user: str, other: Profile, consent: tuple[int, bool] | None = None,
               ts: int = 0) -> None:
        """A visitor's profile merges into the user's (at a login at ``ts``). The user's own
        consent statement wins over the visitor's; a user who refused profiling does not receive
        the visitor's data."""
        if self.consent is not None:
            self.consent.adopt(user, consent)
            if not self.consent.allows(user):
                return
        p = self.users.get(user)
        if self.models is not None:  # the models see the visitor's data from the login on
            self.models.merged(user, ts, other, self.plan)
            self.models.merging(user, ts, p, self.plan)
        if p is None:
            self.users[user] = other
            other.next_due = None
            other.written = self.unknown_fields  # its bits described the visitor's hash
            other.sent_as_of = None  # and so did what it last wrote: write in full
        else:
            self.plan.merge(p, other)
        if self.models is not None:
            self.models.adopt(user, other.pending_examples)
        other.pending_examples = None
        engine = self._engine()
        if engine is not None:
            engine.adopt(user, other.moving_triggers, max(self.watermark, other.last_event))
        other.moving_triggers = None
        self.dirty.add(user)

    def take(self, user: str) -> Profile | None:
        """Remove a profile from this shard (it moves to another), with its model examples."""
        p = self.users.pop(user, None)
        self.dirty.discard(user)
        if self.recency is not None:
            self.recency.discard(user)
        if p is not None:
            p.pending_examples = self.models.take(user) if self.models is not None else None
            if self.triggers is not None:
                p.moving_triggers = self.triggers.take(user)
        return p

    def forget(self, user: str, out: ShardOut, ts: int = 0) -> None:
        """Profiling consent withdrawn: the state and the stored profile go, and every pending
        trigger send is cancelled."""
        if self.triggers is not None:
            self.triggers.revoke(user, max(ts, self.watermark), out)
        self._drop(user, out, keep_sent=True)

    def erase(self, user: str, out: ShardOut) -> int:
        """Erasure: every trace of the identity in this store goes (profile, model examples,
        trigger state with its history, consent, timer entries); its hash is deleted. Returns
        the number of profiles removed (0 or 1)."""
        found = self.users.pop(user, None) is not None
        if self.models is not None:
            self.models.erase(user)
        if self.triggers is not None:
            self.triggers.erase(user)
        if self.consent is not None:
            self.consent.take(user)
        self.dirty.discard(user)
        if self.recency is not None:
            self.recency.purge(user)
        if any(name == user for _, name in self.timers):
            self.timers = [t for t in self.timers if t[1] != user]
            heapq.heapify(self.timers)
        out.features.append(Write(user, None, anonymous=self.anonymous))
        return int(found)

    def _drop(self, user: str, out: ShardOut, keep_sent: bool = False) -> None:
        """The profile's state and its stored hash go (consent withdrawn, time to live, cap)."""
        self.users.pop(user, None)
        if self.models is not None:
            self.models.drop(user)
        if self.triggers is not None and not keep_sent:  # (kept: what was sent, for the caps)
            self.triggers.drop(user)
        self.dirty.discard(user)
        if self.recency is not None:
            self.recency.discard(user)
        out.features.append(Write(user, None, anonymous=self.anonymous))

    # -- time ------------------------------------------------------------------------------
    def advance(self, watermark: int, out: ShardOut) -> None:
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        ttl = self.config.state_ttl_ms
        while self.timers and self.timers[0][0] <= watermark:
            due, name = heapq.heappop(self.timers)
            p = self.users.get(name)
            if p is None or p.next_due != due:
                continue  # superseded by a later schedule
            p.next_due = None
            if due >= p.last_event + ttl:
                self._drop(name, out)  # silent for the time to live: forget it, as Redis does
                continue
            try:
                self.plan.advance(p, due)
            except Exception as exc:  # noqa: BLE001 - one profile's bug must not stop the flow
                out.dead.append(step_failure("profile_timers", exc, b"", name.encode(), due))
            self.dirty.add(name)
            self._schedule(name, p)  # the next change may come before this watermark too
        engine = self._engine()
        if engine is not None:
            users = self.users
            engine.advance(watermark, lambda user: TriggerContext(self, user, users.get(user)), out)
        if self.consent is not None:
            self.consent.expire(watermark)

    def play_models(self, watermark: int, out: ShardOut) -> None:
        """The models play the events the watermark has passed (models/runtime.py); the trigger
        rules that read a score react to them then."""
        models = self.models
        if models is not None:
            engine = self._engine()
            played = None
            if engine is not None and engine.deferred:
                def played(user: str, e: Event) -> None:
                    # the profile as the models saw it (before a later login's merge)
                    p = models.profile_at(user, e.ts_ms, self.users.get(user))
                    engine.on_event(user, e, PlayedContext(self, user, p, e.ts_ms), out,
                                    e.arrival_ms, played=True)
            scored = models.advance(watermark, self.plan, self.users, played)
            if scored:
                self.dirty |= scored
                STATS.add("model_scored_users", len(scored))

    def finish(self, clock: int, out: ShardOut) -> None:
        """End of a bounded input: every profile as of the end (a replay ends "now" there)."""
        self.advance(clock, out)
        for name, p in self.users.items():
            if self.watermark > p.as_of:
                self.plan.advance(p, self.watermark)
                self.dirty.add(name)
        self.flush(out)

    def resumed(self) -> None:
        """After a restart from a snapshot, Redis may hold fields written after that snapshot
        which the replay never rewrites (its flushes fall elsewhere): each profile's next write
        removes every field it does not set. That holds for profiles the snapshot does not know
        as well: one first seen between the snapshot and the crash was written then too."""
        every = self.unknown_fields = sum(self.plan.bit.values())
        for p in self.users.values():
            p.written = every
            p.sent_as_of = None

    # -- output ----------------------------------------------------------------------------
    def flush(self, out: ShardOut) -> None:
        """Values of every profile touched since the last flush, as absolute values."""
        plan, models = self.plan, self.models
        model_bits = [(plan.bit[f], f) for f in sorted(plan.model_fields)]
        for name in sorted(self.dirty):
            p = self.users.get(name)
            if p is None:
                continue
            try:
                plan.prune_sessions(p, self.watermark)
                values, removed = plan.delta(name, p)  # only the fields that changed, mostly
                # the models' scores (every write: a few fields); one the profile no longer has
                # but may have written (after a restart: unknown) is removed
                scores = models.scores(name) if models is not None else {}
                written = p.written
                for bit, field_name in model_bits:
                    if field_name in scores:
                        values[field_name] = scores[field_name]
                        written |= bit
                    elif written & bit:
                        removed.append(field_name)
                        written ^= bit
                p.written = written
            except Exception as exc:  # noqa: BLE001 - one profile's bug must not stop the flow
                out.dead.append(step_failure("profile_write", exc, b"", name.encode(), p.as_of))
                continue
            out.features.append(Write(name, values, tuple(removed), p.active, p.arrival_ms,
                                      self.anonymous))
            p.active = False
            p.arrival_ms = 0
            self._schedule(name, p)
        self.dirty.clear()

    def _schedule(self, name: str, p: Profile) -> None:
        due = p.last_event + self.config.state_ttl_ms
        expiry = p.buckets.next_expiry()
        for t in (expiry * MINUTE_MS if expiry is not None else None, self.plan.day_due(p)):
            if t is not None and t < due:
                due = t
        if due != p.next_due:
            p.next_due = due
            heapq.heappush(self.timers, (due, name))
            if len(self.timers) > 2 * len(self.users) + 1024:
                self._compact_timers()

    def _compact_timers(self) -> None:
        """A reschedule leaves the old entry in the heap until its time (a profile's 90-day
        expiry stays there when it becomes active again): rebuilt from the live schedules
        once the stale entries outnumber them, so the heap stays O(profiles)."""
        self.timers = [(p.next_due, name) for name, p in self.users.items()
                       if p.next_due is not None]
        heapq.heapify(self.timers)
        STATS.add("timer_compactions")


def _session_id(user: str, start: int) -> str:
    return idempotency_key("session", user, str(start))


class IngestShard:
    # State added after the first release: a snapshot taken before it resumes with these empty.
    _ADDED_STATE = ("delays", "cohorts", "pending_views", "view_cohort", "last_interaction")

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name in self._ADDED_STATE:
            if name not in state:
                setattr(self, name, {})
        if "link_age" not in state:
            self.link_age = OldestFirst()
            for anon in self.links:
                self.link_age.touch(anon, self.watermark)
        if "stream" not in state:  # a snapshot from before the stream clock had its own class
            self.stream = StreamClock()
            self.stream.part_max = self.__dict__.pop("part_max", {})
            self.stream.partitions = self.__dict__.pop("partitions", 1)
            for name in ("part_wall", "first_wall", "idle_reset"):
                self.__dict__.pop(name, None)
            self.stream.resumed()
        self.__dict__.pop("sent_clock", None)  # before handovers carried the read positions
        self.__dict__.setdefault("progress", {})
        self.__dict__.setdefault("link_users", {})
        self.__dict__.setdefault("linked_at", {})
        if self.__dict__.get("erased") is None:
            self.erased = ErasedLedger(self.config.subject_key, dict(self.config.erased))
        self.store.anonymous = True

    def __init__(self, shard: int, config: ShardConfig, plan: FeaturePlan):
        self.shard = shard
        self.config = config
        self.store = ProfileStore(plan, config)  # anonymous visitors
        self.store.anonymous = True
        self.store.limit(config.max_anonymous)
        self.links: dict[str, str] = {}  # anonymous id -> user id (the latest linked)
        self.linked_at: dict[str, int] = {}  # anonymous id -> time of the login that linked it
        # anonymous id -> every user linked to it (a shared device), when more than one may be
        self.link_users: dict[str, tuple[str, ...]] = {}
        self.erased = ErasedLedger(config.subject_key, dict(config.erased))
        self.link_age = OldestFirst()  # when each link was last used (event time)
        self.swept: set[str] | None = None  # after a restart: linked visitors' hashes deleted
        self.seen: dict[str, int] = {}  # event_id -> ts, kept while a duplicate could be on time
        self.stream = StreamClock()
        self.watermark = -END_OF_TIME
        self.clock: int | None = None
        self.progress: dict[int, int] = {}  # source partition -> highest offset read
        # minute -> (channel, campaign, creative, event name) -> [events, revenue, cost, orders, users]
        self.minutes: dict[int, dict[tuple[str, str, str, str], list]] = {}
        self.delays: dict[int, dict[int, int]] = {}  # minute -> ingest-delay histogram
        # Bounces: a page view is a bounce when its visitor does nothing more for BOUNCE_MS.
        # Views are grouped by the minute they happened in (their cohort); once the watermark
        # is BOUNCE_MS past a cohort's minute, every view of it is decided: those still pending
        # bounced. cohort -> page -> [views, bounces]; cohort -> visitor -> (time, page).
        self.cohorts: dict[int, dict[str, list[int]]] = {}
        self.pending_views: dict[int, dict[str, tuple[int, str]]] = {}
        self.view_cohort: dict[str, int] = {}  # visitor -> cohort of its pending view
        # visitor -> time of its latest interaction, kept while a view before it can still come
        self.last_interaction: dict[str, int] = {}
        self.closed_through = -END_OF_TIME  # last minute reported as closed
        self.late_events = 0

    # -- input ---------------------------------------------------------------------------
    def ingest(self, chunk: Chunk, out: ShardOut) -> None:
        wall = chunk.wall_ms
        if self.stream.observe({}, chunk.partitions, wall):
            lookback = self.config.lookback_ms
            if self.watermark == -END_OF_TIME and lookback is not None and wall:
                self.advance(wall - lookback, out)  # older events are late: no minute opens there
        ops: dict[int, list] = {}
        for request in chunk.erasures or ():
            self.erase(request, out, ops)
        for event in chunk.events:
            try:
                self._event(event, out, ops)
            except Exception as exc:  # noqa: BLE001 - one event must not stop the flow
                out.dead.append(step_failure("ingest_shards", exc, event.raw or _event_bytes(event),
                                             event.user.encode(), event.ts_ms))
        self.stream.observe(chunk.clocks, chunk.partitions, wall)
        if chunk.progress is None:  # no positions: nothing can come before what was sent
            self.progress.update(dict.fromkeys(chunk.clocks, END_OF_TIME))
        else:
            for part, offset in chunk.progress.items():
                if offset > self.progress.get(part, -1):
                    self.progress[part] = offset
        clock = self.stream.now(wall, self.config.idle_ms)
        if clock is not None and (self.clock is None or clock > self.clock):
            self.clock = clock
            self.advance(clock - self.config.lateness_ms, out)
        self._hand_over(ops, out)

    def _event(self, e: Event, out: ShardOut, ops: dict[int, list]) -> None:
        ts = e.ts_ms
        if ts < self.watermark:
            if self.erased and self._erased_event(e, ts, out):
                return
            self.late_events += 1
            self._delay(minute_of(self.watermark), e)  # a stuck collector's data counts too
            out.dead.append(DeadLetter("late_event", f"event time {ts} < watermark {self.watermark}",
                                       e.raw or _event_bytes(e), e.user.encode(), "shard", ts))
            return
        if e.event_id in self.seen:
            out.duplicates += 1
            return
        self.seen[e.event_id] = ts
        if self.erased and self._erased_event(e, ts, out):
            return
        out.events += 1
        self._bounce(e, ts)
        if self.config.raw_events:
            out.raw.append(raw_row(e, self.config.pii_key))
        self._aggregate(e, ts)
        profile_shards = self.config.profile_shards
        if not e.identified and e.user in self.links:
            if self.swept is not None and e.user not in self.swept:
                # Before the crash this event may have come before its visitor's login (the two
                # partitions interleave differently) and written the visitor's own hash.
                self.swept.add(e.user)
                out.features.append(Write(e.user, None, anonymous=True))
            self.link_age.touch(e.user, ts)
            if self.store.consent is not None:
                e.device_consent = self.store.consent.allows(e.user)
            e.linked_at = self.linked_at.get(e.user, 0)
            e.user = self.links[e.user]
            e.identified = e.linked = True
        if not e.identified:  # an anonymous visitor: its consent and profile are kept here
            if self.store.admit(e, out):
                self.store.apply(e, out)
            return
        if e.anon and e.anon != e.user and e.consent is not False and not e.linked:
            self._link(e, ts, out, ops)
        # the user's consent is decided by their profile shard, which holds their statements
        ops.setdefault(shard_of(e.user, profile_shards), []).append((e.partition, e.offset, ts, e))

    def _link(self, e: Event, ts: int, out: ShardOut, ops: dict[int, list]) -> None:
        """Link the event's anonymous id to its user when the policy lets this event do it: a
        link event (login, identify...) from a trusted source, and at most
        ``max_users_per_anonymous`` users per anonymous id. The first link moves the visitor's
        profile into the user's (merged, never overwriting it)."""
        anon, user, config = e.anon, e.user, self.config
        current = self.links.get(anon)
        if current == user:
            self.link_age.touch(anon, ts)  # the link is in use: it stays
            return
        if not self._may_link(e):
            return
        if current is not None:  # a shared device: another user logs in on it
            users = self.link_users.get(anon, (current,))
            if user not in users:
                if len(users) >= config.max_users_per_anonymous:
                    STATS.add("identity_links_refused")
                    return
                self.link_users[anon] = users + (user,)
            self.links[anon] = user  # its anonymous events now belong to the latest user
            self.linked_at[anon] = ts
            self.link_age.touch(anon, ts)
            out.aliases.append((anon, user))
            return
        self.links[anon] = user
        self.linked_at[anon] = ts
        if config.max_users_per_anonymous > 1:
            self.link_users[anon] = (user,)
        self.link_age.touch(anon, ts)
        if len(self.links) > config.max_links:  # the least recently used link goes
            oldest = self.link_age.pop_oldest()
            del self.links[oldest]
            self.linked_at.pop(oldest, None)
            self.link_users.pop(oldest, None)
            STATS.add_labeled("evictions", "identity_link")
        out.aliases.append((anon, user))
        # (the device keeps its statement: its linked events carry it, see ConsentBook.decide)
        consent = self.store.consent.statement(anon) if self.store.consent is not None else None
        # the visitor's timers due before the login fire here, for the visitor, whatever the
        # batch: else they moved to the user if the watermark had not passed them yet
        self.store.elapse(anon, ts, out)
        anonymous = self.store.take(anon)
        if anonymous is not None:
            out.features.append(Write(anon, None, anonymous=True))
            ops.setdefault(shard_of(user, config.profile_shards), []).append(
                (e.partition, e.offset, ts, ("merge", user, anonymous, consent)))

    def _may_link(self, e: Event) -> bool:
        config = self.config
        return (config.link_events is None or e.name in config.link_events) and (
            not config.link_sources or e.origin in config.link_sources)

    def _erased_event(self, e: Event, ts: int, out: ShardOut) -> bool:
        """Is this an erased subject's event from before the erasure? Then it is dropped (a
        replay must not bring them back); a link event among them erases the device it names,
        late or not."""
        erased = self.erased
        if not (erased.covers(e.user, ts) or (e.anon and erased.covers(e.anon, ts))):
            return False
        STATS.add("erased_events_dropped")
        if e.identified and e.anon and e.anon != e.user and self._may_link(e) \
                and not erased.covers(e.anon, ts):
            self._erase_device(e, out)
        return True

    def _erase_device(self, e: Event, out: ShardOut) -> None:
        """An erased user's own link event, arriving after the erasure (a replay, or still in
        flight): the device it names was the person's, so it is erased as well."""
        at = self.erased.erased_at(e.user)
        PROCESS_LEDGER.add(e.anon, at)
        rid = hashlib.sha256(f"{self.erased.add(e.anon, at)}|{at}".encode()).hexdigest()[:32]
        request = ErasureRequest(rid, e.anon, True, "erasure follow-up", at, "in-stream")
        profiles = self.store.erase(e.anon, out)
        self.links.pop(e.anon, None)
        self.linked_at.pop(e.anon, None)
        self.link_users.pop(e.anon, None)
        self.link_age.purge(e.anon)
        out.aliases.append((e.anon, None))
        out.erasures.append(ErasureReport(request, f"ingest-{self.shard}", [e.anon],
                                          {"anonymous_profiles": profiles}, expected=1))

    def erase(self, request: ErasureRequest, out: ShardOut, ops: dict[int, list]) -> None:
        """In-stream erasure of a subject: a user with every anonymous id linked to them, or
        one anonymous id. What this shard holds goes; the user's profile shard gets an erase."""
        subject, at = request.subject, request.requested_at_ms
        if request.anonymous:
            anons = [subject] if shard_of(subject, self.config.ingest_shards) == self.shard else []
            idents = {subject}
        else:
            anons = sorted({a for a, u in self.links.items() if u == subject}
                           | {a for a, us in self.link_users.items() if subject in us})
            idents = {subject, *anons}
        counts = {"anonymous_profiles": 0, "identity_links": 0, "minute_user_entries": 0}
        for anon in anons:
            counts["anonymous_profiles"] += self.store.erase(anon, out)
            self.linked_at.pop(anon, None)
            if self.links.pop(anon, None) is not None:
                counts["identity_links"] += 1
            self.link_users.pop(anon, None)
            self.link_age.purge(anon)
            out.aliases.append((anon, None))
        if request.anonymous and not anons:  # another shard holds it; its hash goes anyway
            out.features.append(Write(subject, None, anonymous=True))
        for ident in idents:
            self.erased.add(ident, at)
            PROCESS_LEDGER.add(ident, at)
            self.last_interaction.pop(ident, None)
            cohort = self.view_cohort.pop(ident, None)
            if cohort is not None:
                self.pending_views.get(cohort, {}).pop(ident, None)
        for rows in self.minutes.values():  # not counted as a user of minutes still open
            for row in rows.values():
                if idents & row[4]:
                    counts["minute_user_entries"] += len(idents & row[4])
                    row[4] -= idents
        if not request.anonymous and self.shard == 0:  # one ingest shard asks for the profile
            ops.setdefault(shard_of(subject, self.config.profile_shards), []).append(
                (-1, -1, at, ("erase", subject, request)))
        out.erasures.append(ErasureReport(request, f"ingest-{self.shard}", anons, counts))

    def resumed(self) -> None:
        self.store.resumed()
        self.swept = set()
        self.stream.resumed()

    def _aggregate(self, e: Event, ts: int) -> None:
        minute = ts // MINUTE_MS
        rows = self.minutes.get(minute)
        if rows is None:
            rows = self.minutes[minute] = {}
        key = (e.channel, e.campaign, e.creative, e.name)
        row = rows.get(key)
        if row is None:
            if len(rows) >= self.config.max_minute_rows:
                # Hostile cardinality: beyond the cap, new keys of the minute count as one row,
                # so totals stay right and the state stays bounded.
                key = (OTHER, OTHER, OTHER, OTHER)
                STATS.add_labeled("evictions", "minute_row")
                row = rows.get(key)
            if row is None:
                row = rows[key] = [0, 0.0, 0.0, 0, set()]
        row[0] += 1
        row[1] += e.revenue
        row[2] += e.cost
        if e.name == "order_completed":
            row[3] += 1
        # Users as sent (user id, else anonymous id): stitching depends on how partitions
        # interleave, and counts must not. No profiling consent: counted, but not as a user.
        if e.consent is not False:
            row[4].add(e.user)
        self._delay(minute, e)

    def _delay(self, minute: int, e: Event) -> None:
        """The event's ingest delay into the minute's histogram, when the source gave a record
        time (Kafka); a late event goes to the open minute, where it is noticed."""
        if e.ingest_ms:
            hist = self.delays.get(minute)
            if hist is None:
                hist = self.delays[minute] = {}
            bucket = delay_bucket(e.ingest_ms - e.ts_ms)
            hist[bucket] = hist.get(bucket, 0) + 1

    def _bounce(self, e: Event, ts: int) -> None:
        if e.name in NOT_INTERACTIONS:
            return
        visitor = e.anon or e.user
        latest = self.last_interaction.get(visitor)
        if latest is None or ts > latest:
            self.last_interaction[visitor] = ts
        cohort = self.view_cohort.get(visitor)
        if cohort is not None:
            pending = self.pending_views[cohort]
            seen, viewed = pending[visitor]
            if ts >= seen:  # the visitor's next interaction: the view bounced if it came too late
                del pending[visitor]
                del self.view_cohort[visitor]
                if ts - seen > BOUNCE_MS:
                    self.cohorts[cohort][viewed][1] += 1
        if e.name in PAGE_VIEWS:
            page = e.properties.get("page")
            if isinstance(page, str) and page:
                # the path only: query strings and fragments would make every view its own page
                page = page.split("?", 1)[0].split("#", 1)[0][:MAX_PAGE_CHARS]
                minute = minute_of(ts)
                pages = self.cohorts.setdefault(minute, {})
                tally = pages.get(page)
                if tally is None:
                    if len(pages) >= self.config.max_minute_rows:
                        page = OTHER  # hostile page names: counted together beyond the cap
                        STATS.add_labeled("evictions", "bounce_page")
                        tally = pages.get(page)
                    if tally is None:
                        tally = pages[page] = [0, 0]
                tally[0] += 1
                # Something of the visitor after this view has arrived already (events of a
                # visitor arrive out of order within the allowed lateness, under BOUNCE_MS): it
                # did not bounce. Else it waits for the visitor's next interaction.
                if latest is None or latest <= ts:
                    self.pending_views.setdefault(minute, {})[visitor] = (ts, page)
                    self.view_cohort[visitor] = minute

    def _decided_cohorts(self, final: bool) -> dict[int, dict[str, list[int]]]:
        """Cohorts whose views are all decided, keyed by the minute that closes as they are
        (cohort + BOUNCE_MINUTES): the views still pending bounced. At the end of a bounded
        input, cohorts not yet decidable are dropped (their views' fate is unknown)."""
        out = {}
        for cohort in sorted(self.cohorts):
            if (cohort + 1) * MINUTE_MS + BOUNCE_MS > self.watermark:
                if final:
                    self.cohorts.pop(cohort)
                    for visitor in self.pending_views.pop(cohort, {}):
                        del self.view_cohort[visitor]
                continue
            pages = self.cohorts.pop(cohort)
            for visitor, (_, page) in self.pending_views.pop(cohort, {}).items():
                pages[page][1] += 1
                del self.view_cohort[visitor]
            out[cohort + BOUNCE_MINUTES] = pages
        return out

    def _hand_over(self, ops: dict[int, list], out: ShardOut, final: bool = False) -> None:
        """Send each profile shard its operations with the clock and the read positions: one
        handover per profile shard and output, even empty, so that the profile shards can
        release what every ingest shard has read past."""
        clock, progress = self.clock, dict(self.progress)
        sent = out.handover_to
        for j in range(self.config.profile_shards):
            h = sent.get(j)
            if h is None:
                h = sent[j] = Handover(j, self.shard, [], clock, progress, final)
                out.handovers.append((f"profiles-{j:04d}", h))
            else:  # several chunks in one batch: one handover with all their operations
                h.clock, h.progress, h.final = clock, progress, h.final or final
            items = ops.get(j)
            if items:
                h.ops += items

    # -- time ----------------------------------------------------------------------------
    def advance(self, watermark: int, out: ShardOut, *, final: bool = False) -> None:
        """Move "now" forward: fire due timers, close minutes, forget what can no longer matter."""
        if watermark <= self.watermark and not final:
            return
        previous_minute = minute_of(self.watermark) if self.watermark > -END_OF_TIME else None
        self.watermark = max(self.watermark, watermark)
        self.store.advance(self.watermark, out)
        closed = minute_of(self.watermark) - 1  # minutes ending at or before the watermark
        if final:
            closed_rows = sorted(self.minutes)  # end of input: flush even partial minutes
        else:
            closed_rows = sorted(m for m in self.minutes if m <= closed)
        parts = {m: self.minutes.pop(m) for m in closed_rows}
        delays = {m: self.delays.pop(m) for m in sorted(self.delays) if final or m <= closed}
        bounces = self._decided_cohorts(final)
        if closed > self.closed_through or parts or final:
            self.closed_through = max(self.closed_through, closed)
            if out.minutes is None:
                out.minutes = MinutePart(self.shard, self.closed_through, parts, final, delays, bounces)
            else:  # several chunks in one batch: one part with all the minutes they closed
                out.minutes.minutes.update(parts)
                out.minutes.delays.update(delays)
                out.minutes.bounces.update(bounces)
                out.minutes.closed_through = self.closed_through
                out.minutes.final = out.minutes.final or final
        if previous_minute is None or minute_of(self.watermark) != previous_minute:
            self.seen = {k: v for k, v in self.seen.items() if v >= self.watermark}
            self.last_interaction = {k: v for k, v in self.last_interaction.items()
                                     if v >= self.watermark}
            # a link unused for the state's time to live goes, as the visitor's profile would
            while (anon := self.link_age.pop_older_than(self.watermark - self.config.state_ttl_ms)):
                del self.links[anon]
                self.linked_at.pop(anon, None)

    def finish(self, out: ShardOut) -> None:
        """End of a bounded input: no event can be late any more, so now = the clock."""
        clock = self.stream.final()
        self.clock = max(clock if clock is not None else self.watermark, self.watermark)
        self.advance(self.clock, out, final=True)
        self.store.finish(self.clock, out)
        self._hand_over({}, out, final=True)


class ProfileShard:
    """The profiles of identified users. A user's operations come from several ingest shards
    (one per anonymous id the user had, and the user id's own), which run side by side: the
    order they arrive in depends on batch boundaries, workers and restarts. So a profile shard
    holds them until every ingest shard has read past their source position, then applies them
    in the order of the source partition (offsets): the same order in every run, and the same
    trigger actions. The wait is one batch (every ingest shard reports its read positions in
    every batch)."""

    def __init__(self, shard: int, config: ShardConfig, plan: FeaturePlan):
        self.shard = shard
        self.config = config
        self.store = ProfileStore(plan, config)
        self.store.models = _models_of(shard, config)
        self.erased = ErasedLedger(config.subject_key, dict(config.erased))
        self.clocks: dict[int, int | None] = {}  # ingest shard -> its clock
        self.progress: dict[int, dict[int, int]] = {}  # ingest shard -> partition -> offset read
        self.pending: list[tuple] = []  # (partition, offset, ts, op) not yet released
        self.final_from: set[int] = set()  # ingest shards whose input has ended

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"progress": {}, "pending": [], "erased": None, "final_from": set(),
                              **state})
        if self.erased is None:
            self.erased = ErasedLedger(self.config.subject_key, dict(self.config.erased))

    def _erase(self, user: str, request: ErasureRequest, out: ShardOut) -> None:
        """The user's profile and everything pending for them go; their later operations with an
        event time up to the erasure are dropped (:meth:`_apply`)."""
        self.erased.add(user, request.requested_at_ms)
        before = len(self.pending)
        self.pending = [item for item in self.pending if not _concerns(item[3], user)]
        profiles = self.store.erase(user, out)
        out.erasures.append(ErasureReport(request, f"profile-{self.shard}", [], {
            "user_profiles": profiles, "pending_operations": before - len(self.pending)}))

    def receive(self, h: Handover | VersionFor, out: ShardOut) -> None:
        """Take one handover, or a model version; :meth:`release` applies what can be."""
        if type(h) is VersionFor:
            if self.store.models is not None:
                self.store.models.receive(h.weights)
            return
        if h.ops:
            if self.erased:  # a person erased here since: dropped now, not held until released
                # (held, the operation put the id back into the snapshots after the erasure
                # had compacted the recovery store; _apply would only drop it later)
                self.pending += [item for item in h.ops if not self._erased_op(item[3])]
            else:
                self.pending += h.ops
        self.clocks[h.source] = h.clock
        self.progress[h.source] = h.progress
        if h.final:
            self.final_from.add(h.source)

    def release(self, out: ShardOut, everything: bool = False) -> None:
        """Apply, in source order, every pending operation that every ingest shard has read
        past, then move "now" on (never past a pending operation's event time)."""
        store = self.store
        if self.pending:
            # every ingest shard's input has ended: nothing earlier can come, all is ready
            if everything or len(self.final_from) >= self.config.ingest_shards:
                ready, self.pending = self.pending, []
            else:
                frontier = self._frontier()
                ready, waiting = [], []
                for item in self.pending:
                    (ready if item[1] <= frontier.get(item[0], -1) else waiting).append(item)
                self.pending = waiting
            ready.sort(key=_position)  # stable: one event's operations keep their order
            for part, offset, ts, op in ready:
                self._apply(op, out, ts)
        clock = self.clock()
        if clock is not None:
            watermark = clock - self.config.lateness_ms
            if self.pending:
                watermark = min(watermark, min(item[2] for item in self.pending))
            store.advance(watermark, out)
        self._play_models(out)

    def _ended(self) -> bool:
        """Every ingest shard's input has ended and nothing waits here."""
        return len(self.final_from) >= self.config.ingest_shards and not self.pending

    def _play_models(self, out: ShardOut) -> None:
        """The models play what the watermark has passed (at the end of a bounded input,
        everything up to its last event), then send their labels with this shard's mark: every
        label before it has been sent (an operation still to come is not older than the
        watermark). Once the input has ended and every event is played, the end of time."""
        models = self.store.models
        if models is None:
            return
        ended = self._ended()
        if ended:  # nothing can come: "now" is the last event (later horizons stay open)
            clocks = [c for c in self.clocks.values() if c is not None]
            self.store.play_models(max(clocks + [models.latest, self.store.watermark]) + 1, out)
        else:
            self.store.play_models(self.store.watermark, out)
        mark = END_OF_TIME if ended and models.idle() else models.mark(self.store.watermark)
        out.labels.extend(models.send(mark))

    def _frontier(self) -> dict[int, int]:
        """Per source partition, the offset every ingest shard has read past."""
        if len(self.progress) < self.config.ingest_shards:
            return {}
        shards = iter(self.progress.values())
        frontier = dict(next(shards))
        for progress in shards:
            for part, offset in list(frontier.items()):
                seen = progress.get(part, -1)
                if seen < offset:
                    frontier[part] = seen
        return frontier

    def _erased_op(self, op) -> bool:
        """An event or merge of a person erased after its time (:meth:`_apply` drops those)."""
        if type(op) is Event:
            return self.erased.covers(op.user, op.ts_ms)
        return op[0] == "merge" and self.erased.covers(op[1], op[2].last_event)

    def _apply(self, op, out: ShardOut, ts: int = 0) -> None:
        store = self.store
        try:
            if type(op) is Event:
                if self.erased and self.erased.covers(op.user, op.ts_ms):
                    STATS.add("erased_events_dropped")
                elif store.admit(op, out):
                    store.apply(op, out)
            elif op[0] == "merge":
                if not self.erased.covers(op[1], op[2].last_event):
                    # what was due before the login fires first, without the visitor's data (as
                    # before an event); else where the watermark stood decided it (batches)
                    store.elapse(op[1], ts, out)
                    store.absorb(op[1], op[2], op[3] if len(op) > 3 else None, ts)
            elif op[0] == "erase":
                self._erase(op[1], op[2], out)
            else:  # "forget": a snapshot from before consent moved to the profile shards
                store.forget(op[1], out)
        except Exception as exc:  # noqa: BLE001 - one event must not stop the flow
            if type(op) is Event:
                failed = step_failure("profile_shards", exc, op.raw or _event_bytes(op),
                                      op.user.encode(), op.ts_ms)
            else:
                failed = step_failure("profile_shards", exc, b"", op[1].encode())
            out.dead.append(failed)

    def clock(self) -> int | None:
        if len(self.clocks) < self.config.ingest_shards or None in self.clocks.values():
            return None
        return min(self.clocks.values())

    def resumed(self) -> None:
        self.store.resumed()
        if self.store.models is None and self.config.models:  # a snapshot from before models/
            self.store.models = _models_of(self.shard, self.config)

    def finish(self, out: ShardOut) -> None:
        self.release(out, everything=True)
        clock = self.clock()
        self.store.finish(clock if clock is not None else self.store.watermark, out)
        self._play_models(out)
        self.store.flush(out)


def _models_of(shard: int, config: ShardConfig) -> ShardModels | None:
    if not config.models:
        return None
    return ShardModels({spec.name: spec for spec in config.models}, shard,
                       config.model_period_ms, config.model_grace_ms,
                       subject_key=config.subject_key)


def _concerns(op, user: str) -> bool:
    """Does a pending profile-shard operation concern this user?"""
    return op.user == user if type(op) is Event else op[1] == user


_position = operator.itemgetter(0, 1)  # (partition, offset) of a pending operation: its sort key


def _event_bytes(e: Event) -> bytes:
    """Fallback when an event was built without its raw bytes (tests): its decoded core."""
    return orjson.dumps({"event_id": e.event_id, "user": e.user, "event": e.name,
                         "timestamp": e.ts_ms, "channel": e.channel})


class _Logic(StatefulBatchLogic):
    """Bytewax adapter. The builder does not get the key, so the state is created from the first
    item (which names its shard). Snapshots are pickled bytes: immutable, cheaper than a copy."""

    def __init__(self, config: ShardConfig, plan: FeaturePlan, resume: bytes | None):
        self.config = config
        self.plan = plan
        self.state = pickle.loads(resume) if resume is not None else None
        if self.state is not None:
            STATS.add("shards_restored")  # the progress line shows the restore (surgeflow/cli.py)
            STATS.add("snapshot_bytes_restored", len(resume))
            self.state.store.plan = plan
            # the configuration of this run, not the one the snapshot was taken under
            self.state.config = self.state.store.config = config
            self.state.resumed()

    def _created(self, state):
        """A shard's state made from its first item. With a recovery store it may be a restart
        after all, of a shard that had no snapshot yet (Bytewax passes no resume state either
        way), so it cleans up as a resumed one does."""
        self.state = state
        if self.config.snapshots:
            state.resumed()

    def _flushed(self, out: ShardOut):
        self.state.store.flush(out)
        return ([out] if out else []), False

    def on_eof(self):
        if self.state is None:
            return [], False
        out = ShardOut(self.state.shard)
        if stopping():  # a stop, not the input's end: write what is pending, keep "now" as is
            self.state.store.flush(out)
        else:
            self.state.finish(out)
        return ([out] if out else []), False

    def snapshot(self) -> bytes | None:
        if self.state is None or not self.config.snapshots:
            return None  # no recovery store: pickling every shard each epoch would be wasted
        plan, self.state.store.plan = self.state.store.plan, None
        try:
            return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            self.state.store.plan = plan


class IngestLogic(_Logic):
    def on_batch(self, chunks: list[Chunk]):
        if self.state is None:
            self._created(IngestShard(chunks[0].shard, self.config, self.plan))
        state = self.state
        state.store.refresh_rules(int(time.time() * 1000))
        out = ShardOut(state.shard)
        for chunk in chunks:
            state.ingest(chunk, out)
        STATS.add_labeled("step_in", "ingest_shards", sum(len(c.events) for c in chunks))
        label = str(state.shard)
        STATS.set_labeled("state_anonymous_profiles", label, len(state.store.users))
        STATS.set_labeled("state_identity_links", label, len(state.links))
        STATS.set_labeled("state_dedupe_ids", label, len(state.seen))
        if state.store.triggers is not None:
            STATS.set_labeled("state_trigger_users", f"i{state.shard}", len(state.store.triggers.users))
        if state.shard == 0:  # every ingest shard sees every batch: one speaks for the stream
            if state.clock is not None:
                STATS.set("stream_clock_ms", state.clock)
            if state.watermark > -END_OF_TIME:
                STATS.set("watermark_ms", state.watermark)
        return self._flushed(out)


class ProfileLogic(_Logic):
    def on_batch(self, handovers: list[Handover | VersionFor]):
        if self.state is None:
            self._created(ProfileShard(handovers[0].shard, self.config, self.plan))
        self.state.store.refresh_rules(int(time.time() * 1000))
        out = ShardOut(self.state.shard)
        for h in handovers:
            self.state.receive(h, out)
        self.state.release(out)
        STATS.add_labeled("step_in", "profile_shards",
                          sum(len(h.ops) for h in handovers if type(h) is Handover))
        STATS.add_labeled("step_out", "profile_shards", len(out.features))
        STATS.set_labeled("state_profiles", str(self.state.shard), len(self.state.store.users))
        if self.state.store.triggers is not None:
            STATS.set_labeled("state_trigger_users", f"p{self.state.shard}",
                              len(self.state.store.triggers.users))
        return self._flushed(out)
