"""The entity-rule step: per IP, IP cluster and user counts (floods, click fraud, failed logins,
login countries, orders per user), judged on every event.

``decode_and_route`` sends each entity shard an :class:`EntityChunk` per source batch: the
signals of the events whose IP cluster or user hashes to it, and the partitions' highest event
times, so every shard's watermark moves on even when none of its IPs or users sends anything.
An IP's events all go to the shard of its cluster, so per-IP and per-cluster counts are whole.
Like the ingest shards, an entity shard drops duplicates (by event id) and late events.

>>> from alerts.rules import load_rules
>>> router = SignalRouter(load_rules().entity_rules, shards=4)
>>> from flows.events import Event
>>> e = Event("e1", "track", "login_failed", "u1", 1_000, "web", "", 0.0, 0.0, "203.0.113.7")
>>> {shard: s.scope for shard, s in router.route(e).items()}  # its IP cluster's and user's shards
{2: 3}
>>> e.ip = "10.1.2.3"
>>> {shard: s.scope for shard, s in router.route(e).items()}
{0: 1, 2: 2}
"""
from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass

import orjson
from bytewax.operators import StatefulBatchLogic

from alerts.entities import BY_IP, BY_USER, MAX_ENTITY_KEYS, EntityRules, Signal
from privacy.erasure import PROCESS_LEDGER
from privacy.pii import CANONICAL_IPV4
from alerts.metrics import ENTITY_METRICS, ip_cluster, normal_ip
from alerts.rules import RuleSpec
from flows.events import Event, step_failure
from flows.stream_clock import END_OF_TIME, StreamClock
from surgeflow.shutdown import stopping


@dataclass(slots=True)
class EntityChunk:
    shard: int
    signals: list[Signal]
    clocks: dict[int, int]  # source partition -> highest event time in the batch
    partitions: int
    wall_ms: int = 0  # wall time the batch was read: how long partitions have been silent
    erasures: list | None = None  # erasure requests (privacy/erasure.py), sent to every shard


class SignalRouter:
    """Which events the entity rules need, and to which shard each goes."""

    def __init__(self, rules: list[RuleSpec], shards: int):
        self.shards = shards
        ip_names: set[str] = set()
        self.ip_all = False
        user_names: set[str] = set()
        for r in rules:
            m = ENTITY_METRICS[r.metric]
            if m.entity == "user":
                user_names |= m.events or set()
            elif m.events is None:
                self.ip_all = True
            else:
                ip_names |= m.events
        self.ip_names = frozenset(ip_names)
        self.user_names = frozenset(user_names)

    def route(self, e: Event) -> dict[int, Signal]:
        name = e.name
        ip_wanted = e.ip and (self.ip_all or name in self.ip_names)
        user_wanted = name in self.user_names
        if not ip_wanted and not user_wanted:
            return {}
        ip = e.ip or ""
        if ip and not (type(ip) is str and CANONICAL_IPV4.fullmatch(ip)):
            ip = normal_ip(ip)  # (a canonical IPv4 address, most, is its own normal form)
        ip_wanted = ip_wanted and ip
        if ip_wanted and not user_wanted:  # most events: one signal, to its IP cluster's shard
            shard = zlib.crc32(ip_cluster(ip).encode()) % self.shards
            return {shard: Signal(e.ts_ms, name, e.user, ip, e.country, BY_IP, e.event_id)}
        # Each shard judges only the entities it owns (its IP clusters, its users): a signal
        # sent to two shards says which rules each applies, so nothing is counted twice.
        scopes: dict[int, int] = {}
        if ip_wanted:
            scopes[zlib.crc32(ip_cluster(ip).encode()) % self.shards] = BY_IP
        if user_wanted:
            shard = zlib.crc32(e.user.encode()) % self.shards
            scopes[shard] = scopes.get(shard, 0) | BY_USER
        return {shard: Signal(e.ts_ms, name, e.user, ip, e.country, scope, e.event_id)
                for shard, scope in scopes.items()}


class EntityShard:
    """One shard's entity rules and its watermark: the ingest shards' stream clock (the same
    idleness and lookback floor, :mod:`flows.stream_clock`) minus the allowed lateness, so both
    drop the same late events. Each rule keeps at most ``max_entity_keys`` entities (see
    :mod:`alerts.entities` for the eviction). A signal whose rules raise is dead-lettered with
    the step name and the rest go on."""

    def __init__(self, shard: int, rules: list[RuleSpec], lateness_ms: int,
                 max_entity_keys: int = MAX_ENTITY_KEYS, idle_ms: int | None = None,
                 lookback_ms: int | None = None):
        self.shard = shard
        self.rules = EntityRules(rules, max_entity_keys)
        self.lateness_ms = lateness_ms
        self.idle_ms, self.lookback_ms = idle_ms, lookback_ms
        self.stream = StreamClock()
        self.watermark = -END_OF_TIME
        self.seen: dict[str, int] = {}  # event id -> time, while a duplicate could be on time

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "stream" not in state:  # a snapshot from before the stream clock had its own class
            self.stream = StreamClock()
            self.stream.part_max = self.__dict__.pop("part_max", {})
            self.stream.partitions = self.__dict__.pop("partitions", 1)
            self.stream.resumed()
            self.idle_ms = self.lookback_ms = None

    def ingest(self, chunk: EntityChunk, dead: list | None = None) -> list:
        alerts = []
        if self.stream.observe({}, chunk.partitions, chunk.wall_ms):
            if self.watermark == -END_OF_TIME and self.lookback_ms is not None and chunk.wall_ms:
                alerts += self._advance(chunk.wall_ms - self.lookback_ms)
        for request in chunk.erasures or ():
            self.rules.erase({request.subject})
            # the ingest shards add it to the process's ledger too, but maybe later than this:
            # a signal of the person still in flight would bring them back into the state
            PROCESS_LEDGER.add(request.subject, request.requested_at_ms)
        for s in chunk.signals:
            if s.ts_ms < self.watermark or s.event_id in self.seen:
                continue  # late (dead-lettered by its ingest shard) or a duplicate
            if PROCESS_LEDGER and PROCESS_LEDGER.covers(s.user, s.ts_ms):
                continue  # a person erased since (a replay, or still in flight)
            self.seen[s.event_id] = s.ts_ms
            try:
                alerts += self.rules.observe(s)
            except Exception as exc:  # noqa: BLE001 - one event must not stop the flow
                if dead is None:
                    raise
                # A signal carries no raw bytes (they would cross workers for every event): the
                # dead letter keeps the signal, whose event id finds the event in events_raw.
                dead.append(step_failure("entity_rules", exc, orjson.dumps(s._asdict()),
                                         s.user.encode(), s.ts_ms))
        self.stream.observe(chunk.clocks, chunk.partitions, chunk.wall_ms)
        clock = self.stream.now(chunk.wall_ms, self.idle_ms)
        if clock is not None:
            alerts += self._advance(clock - self.lateness_ms)
        return alerts

    def _advance(self, watermark: int) -> list:
        if watermark <= self.watermark:
            return []
        if watermark // 60_000 != self.watermark // 60_000:
            self.seen = {k: v for k, v in self.seen.items() if v >= watermark}
        self.watermark = watermark
        return self.rules.tick(watermark)

    def finish(self) -> list:
        """End of a bounded input: nothing can be late any more; now = the clock."""
        clock = self.stream.final()
        return [] if clock is None else self._advance(clock)

    def resumed(self) -> None:
        self.stream.resumed()


class EntityLogic(StatefulBatchLogic):
    """Bytewax adapter. Snapshots are pickled bytes (immutable, as Bytewax asks); a resumed
    shard takes the current rule catalogue, keeping the state of the rules that did not change,
    the current cap on entities (``limits.max_entity_keys``) and the current idleness and
    lookback. A stop (SIGTERM) keeps "now" where it is, as the ingest shards do."""

    def __init__(self, rules: list[RuleSpec], lateness_ms: int, resume: bytes | None,
                 snapshots: bool, max_entity_keys: int = MAX_ENTITY_KEYS,
                 idle_ms: int | None = None, lookback_ms: int | None = None):
        self.rules, self.lateness_ms, self.snapshots = rules, lateness_ms, snapshots
        self.max_entity_keys = max_entity_keys
        self.idle_ms, self.lookback_ms = idle_ms, lookback_ms
        self.state: EntityShard | None = None
        if resume is not None:
            state = pickle.loads(resume)
            if isinstance(state, EntityShard):
                state.rules = state.rules.retuned(rules, max_entity_keys)
                state.idle_ms, state.lookback_ms = idle_ms, lookback_ms
                state.resumed()
                self.state = state

    def on_batch(self, chunks: list[EntityChunk]):
        """Emits ``(alert dicts, dead letters)`` when either is non-empty."""
        if self.state is None:
            self.state = EntityShard(chunks[0].shard, self.rules, self.lateness_ms,
                                     self.max_entity_keys, self.idle_ms, self.lookback_ms)
            if self.snapshots:  # perhaps a restart of a shard that had no snapshot yet
                self.state.resumed()
        dead: list = []
        alerts = [a for chunk in chunks for a in self.state.ingest(chunk, dead)]
        return self._out(alerts, dead), False

    def on_eof(self):
        if self.state is None or stopping():  # a stop, not the input's end: "now" stays
            return [], False
        return self._out(self.state.finish(), []), False

    @staticmethod
    def _out(alerts: list, dead: list) -> list:
        return [([a.to_dict() for a in alerts], dead)] if alerts or dead else []

    def snapshot(self) -> bytes | None:
        if self.state is None or not self.snapshots:
            return None
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
