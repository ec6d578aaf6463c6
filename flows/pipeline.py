"""The surgeflow dataflow, top-down: follow one event from the source to every output.

    events_in            raw records (Kafka, JSON-lines files or the synthetic generator)
    decode_and_route     orjson decode + validation; good events grouped by ingest shard
                         (anonymous id, else user id), and the entity rules' signals by IP
                         cluster or user; bad records become dead letters
    ingest_shards        per shard: dedupe by event_id, late check against the watermark,
                         minute aggregates, consent, identity links (anonymous id -> user id),
                         anonymous visitors' profiles; identified events and the profiles of
                         visitors who logged in are handed over to the profile shards
    profile_shards       per shard: user profiles built from the feature registry, session,
                         propensity model, trigger rules (triggers/engine.py, rules as data in
                         config/trigger_rules.yaml); event-time timers fire as the watermark
                         passes them (windows decay, days pass, state expires, trigger timers)
      -> features_to_redis        one sparse hash per profile, absolute values, pipelined
      -> raw_events_to_clickhouse masked copies of the accepted events (events_raw, 30-day TTL)
      -> actions_to_*             trigger actions: Kafka topic or JSON lines, ClickHouse, webhook
      -> trigger_audit_to_clickhouse  every trigger decision and its reason (trigger_audit)
      -> dead_letters_to_*        decode failures and late events
    erasures_in          erasure requests (Kafka topic `erasure`, or the embedded inbox), routed
                         to every ingest shard: the subject leaves the shards' state in-stream
    erasures             the shards' erasure reports gathered per request: every ClickHouse
                         table, the files, the ledger in Redis, the audit (privacy/erasure.py)
    close_minutes        the ingest shards' closed minutes merged once every shard closed them
      -> aggregates_to_clickhouse one insert per complete minute, deduplicated by the minute
                                  (hour / day rollups, funnel, user days follow in ClickHouse)
    minute_rules         complete minutes in order: traffic, CTR / CVR / CPC per campaign, DAU
                         pace, ingest delay (alerts/minute_rules.py, config/alert_rules.yaml)
    entity_rules         per IP, IP cluster and user counts on every event: floods, click
                         fraud, failed logins, login countries, orders per user
      -> alerts_to_*              the log, Kafka topic or JSON lines, ClickHouse, webhook
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
import zlib
from dataclasses import dataclass, field

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import FixedPartitionedSink, Sink

from alerts.minute_rules import MinuteRules
from alerts.rules import load_rules
from config.settings import Settings
from connectors.kafka import SOURCE_OUTAGE
from flows.events import DEFAULT_LIMITS, DeadLetter, Event, Limits, decode, step_failure
from config.registry import Registry, load_registry
from features.profile import FeaturePlan
from flows.cluster import pinned_key
from flows.entity_alerts import EntityChunk, EntityLogic, SignalRouter
from flows.minutes import BlockGrouper, CompleteMinute, MinuteBlock, MinuteCloser
from flows.shard import Chunk, IngestLogic, ProfileLogic, ShardConfig, ShardOut, VersionFor
from connectors.model_versions import End
from flows.model_learning import LearnerLogic
from models.spec import load_models
from privacy.erasure import PROCESS_LEDGER, Eraser, ErasureLogic, names_erased, reset_process_ledger, request_of
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.alerts")
flow_log = logging.getLogger("surgeflow.flow")
DEAD = "dead"
ENTITIES = "entities"


def shard_config(settings: Settings, erased: dict[str, int] | None = None) -> ShardConfig:
    pv = settings.privacy
    key = os.environ.get(pv.pii_key_env)
    return ShardConfig(
        lateness_ms=int(settings.flow.allowed_lateness_s * 1000),
        models=model_specs(settings),
        model_period_ms=settings.model.period_min * 60_000,
        model_grace_ms=settings.model.grace_min * 60_000,
        trigger_rules=str(settings.trigger.rules) if settings.trigger.rules is not None else None,
        trigger_reload_s=settings.trigger.reload_s,
        state_ttl_ms=int(settings.redis.ttl_days * 86_400_000),
        profile_shards=settings.flow.profile_shards,
        ingest_shards=settings.flow.shards,
        raw_events=settings.clickhouse.raw_events,
        pii_key=key.encode() if key else None,
        subject_key=key.encode() if key else None,
        profiling_consent=pv.consent.profiling,
        marketing_consent=pv.consent.marketing,
        consent_ttl_ms=int(pv.consent.remember_days * 86_400_000),
        link_events=frozenset(pv.identity.link_events) if pv.identity.link_events is not None else None,
        link_sources=frozenset(pv.identity.link_sources),
        max_users_per_anonymous=pv.identity.max_users_per_anonymous,
        erased=tuple(sorted((erased or {}).items())),
        idle_ms=_ms(settings.flow.idle_timeout_s),
        lookback_ms=_ms(settings.flow.max_lookback_s),
        max_anonymous=settings.limits.max_anonymous_profiles,
        max_links=settings.limits.max_identity_links,
        max_minute_rows=settings.limits.max_minute_rows,
    )


def model_specs(settings: Settings) -> tuple:
    """The models this run scores and learns (none when ``model.enabled`` is false)."""
    if not settings.model.enabled:
        return ()
    registry = load_registry(settings.features.registry)
    return tuple(load_models(settings.model.file, registry=registry).values())


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


class DecodeAndRoute:
    """Batch step: raw records -> one Chunk per shard (all shards, for the clock) + dead letters.

    The wall clock read here caps event time (``max_future_ms``) and tells the shards how long a
    partition has been silent (idleness); it never becomes event time itself."""

    def __init__(self, shards: int, partitions: int, max_bytes: int, max_future_ms: int | None,
                 router: SignalRouter | None = None, limits: Limits = DEFAULT_LIMITS):
        self.shards = shards
        self.keys = [f"shard-{i:04d}" for i in range(shards)]
        self.router = router
        self.entity_keys = [f"{ENTITIES}-{i:04d}" for i in range(router.shards)] if router else []
        self.partitions = partitions
        self.max_bytes = max_bytes
        self.max_future_ms = max_future_ms
        self.limits = limits

    @staticmethod
    def _source_trouble(error: KafkaError) -> None:
        """A broker outage: the consumer retries by itself; say so once, count every report."""
        STATS.add_labeled("kafka_source_errors", error.err.name() if hasattr(error.err, "name")
                          else "error")
        SOURCE_OUTAGE.down(str(error.err))

    def __call__(self, batch: list) -> list:
        now_ms = int(time.time() * 1000)
        routed: list[list[Event]] = [[] for _ in range(self.shards)]
        clocks: dict[int, int] = {}
        dead: list[DeadLetter] = []
        router = self.router
        signals: list[list] = [[] for _ in self.entity_keys]
        for msg in batch:
            if isinstance(msg, KafkaError):
                m = msg.msg
                if m.value is None:  # the consumer's trouble (broker down...), not a record's
                    self._source_trouble(msg)
                    continue
                dead.append(DeadLetter("kafka_error", str(msg.err), m.value, m.key,
                                       f"{m.topic}:{m.partition}:{m.offset}"))
                continue
            value = msg.value
            where = f"{msg.topic}:{msg.partition}:{msg.offset}"
            if value is None:
                dead.append(DeadLetter("empty_message", "record without a value", b"", msg.key, where))
                continue
            ev = decode(value, key=msg.key, source=where, max_bytes=self.max_bytes,
                        max_future_ms=self.max_future_ms, now_ms=now_ms, limits=self.limits)
            if type(ev) is DeadLetter:
                dead.append(ev)
                continue
            try:
                part = msg.partition or 0
                ev.partition = part
                ev.offset = msg.offset
                ts = getattr(msg, "timestamp", None)
                ev.arrival_ms = getattr(msg, "arrival_ms", 0) or (ts[1] if ts else now_ms)
                # Kafka's record time (type 0: none); the synthetic source gives its send time
                ev.ingest_ms = getattr(msg, "ingest_ms", 0) or (ts[1] if ts and ts[0] else 0)
                shard = zlib.crc32((ev.anon or ev.user).encode()) % self.shards
                sigs = router.route(ev) if router is not None else None
            except Exception as exc:  # noqa: BLE001 - one record must not stop the flow
                dead.append(step_failure("decode_and_route", exc, value, msg.key, ev.ts_ms))
                continue
            routed[shard].append(ev)
            if sigs:
                for i, signal in sigs.items():
                    signals[i].append(signal)
            if ev.ts_ms > clocks.get(part, -1):
                clocks[part] = ev.ts_ms
        STATS.add("events_in", len(batch))
        STATS.add_labeled("step_out", "decode_and_route", len(batch) - len(dead))
        if clocks:
            SOURCE_OUTAGE.reading()
        offsets: dict[int, int] = {}  # how far each partition was read: consumer lag, release
        for msg in batch:
            m = msg.msg if isinstance(msg, KafkaError) else msg
            if m.value is not None and m.offset > offsets.get(m.partition or 0, -1):
                offsets[m.partition or 0] = m.offset
        for part, offset in offsets.items():
            STATS.set_labeled("source_offset", str(part), offset)
        out: list = []
        if clocks:
            out = [(key, Chunk(i, evs, clocks, self.partitions, now_ms, offsets))
                   for i, (key, evs) in enumerate(zip(self.keys, routed))]
            out += [(key, EntityChunk(i, sig, clocks, self.partitions, now_ms))
                    for i, (key, sig) in enumerate(zip(self.entity_keys, signals))]
        if dead:
            count_dead(dead)
            out.append((DEAD, dead))
        return out


def count_dead(dead: list[DeadLetter]) -> None:
    STATS.add("events_dead_lettered", len(dead))
    for d in dead:
        STATS.add_labeled("dead_letters", d.reason)


@dataclass(slots=True)
class MinuteRelease:
    """What the minute closer releases per batch: complete minutes for the detectors (at once)
    and the ClickHouse blocks they make up (held while the stream is behind)."""

    minutes: list[CompleteMinute]
    blocks: list[MinuteBlock]


class MinuteLogic(op.StatefulBatchLogic):
    """Single-key step: merges the ingest shards' minute parts into complete minutes, and groups
    them into ClickHouse blocks (flows/minutes.BlockGrouper)."""

    def __init__(self, shards: int, resume, grouper: BlockGrouper | None = None):
        if isinstance(resume, tuple):  # (closer, grouper)
            self.closer, self.grouper = resume
        else:  # nothing to resume, or a snapshot from before blocks: its closer alone
            self.closer = resume if resume is not None else MinuteCloser(shards)
            self.grouper = grouper or BlockGrouper(block_minutes=1)

    def on_batch(self, parts: list) -> tuple[list, bool]:
        done = [m for part in parts for m in self.closer.add(part)]
        now_ms = int(time.time() * 1000)
        for m in done:
            m.closed_at_ms = now_ms
        blocks = _without_erased(self.grouper.add(done, now_ms))
        return ([MinuteRelease(done, blocks)] if done or blocks else []), False

    def on_eof(self) -> tuple[list, bool]:
        blocks = _without_erased(self.grouper.flush())
        return ([MinuteRelease([], blocks)] if blocks else []), False

    def snapshot(self):
        # The held minutes name their users: a person erased since goes before the state is
        # written (the erasure compacts the recovery store; a later snapshot must not bring the
        # id back, as a test under load caught). The output is filtered too (_without_erased).
        if PROCESS_LEDGER:
            self.closer.scrub(PROCESS_LEDGER.covers)
            self.grouper.scrub(PROCESS_LEDGER.covers)
        return (self.closer, self.grouper)


def _without_erased(blocks: list[MinuteBlock]) -> list[MinuteBlock]:
    """Minute blocks leave out the ids of people erased since their minutes closed: a block held
    while the stream is behind may go after the erasure swept ClickHouse (user_days and
    users_first_seen take the ids from it). Blocks already queued are swept again (pass 2)."""
    if not PROCESS_LEDGER or not blocks:
        return blocks
    covers = PROCESS_LEDGER.covers
    return [MinuteBlock([dataclasses.replace(m, rows=[
        (*r[:-1], [u for u in r[-1] if not covers(u, m.minute_ms)]) for r in m.rows])
        for m in block.minutes]) for block in blocks]


class AlertLogic(op.StatefulBatchLogic):
    """Single-key step: the minute rules over complete minutes, in minute order. Snapshots are
    pickled bytes; a resumed step takes the current catalogue, keeping the state of the rules
    that did not change."""

    def __init__(self, catalogue, timezone: str, resume: bytes | None, snapshots: bool,
                 max_series: int):
        self.snapshots = snapshots
        rules = pickle.loads(resume) if resume is not None else None
        if isinstance(rules, MinuteRules):
            self.rules = rules.retuned(catalogue, max_series=max_series)
        else:  # nothing to resume (or a snapshot from before the rule catalogue)
            self.rules = MinuteRules(catalogue, timezone, max_series=max_series)

    def on_batch(self, batches: list[list[CompleteMinute]]) -> tuple[list, bool]:
        alerts = []
        for minutes in batches:
            for m in minutes:
                if m.partial:
                    continue  # cut short by the end of the input: not a drop in traffic
                try:
                    judged = self.rules.judge(m)
                except Exception as exc:  # noqa: BLE001 - a rule's bug must not stop the flow
                    STATS.add_labeled("step_errors", "minute_rules")
                    log.error("minute rules failed on minute %s: %s", m.minute, exc, exc_info=exc)
                    continue
                for a in judged:
                    alert = a.to_dict()
                    alert["_arrival_ms"] = m.closed_at_ms  # the minute closed: latency from here
                    alerts.append(alert)
        return ([alerts] if alerts else []), False

    def snapshot(self) -> bytes | None:
        if not self.snapshots:
            return None
        return pickle.dumps(self.rules, protocol=pickle.HIGHEST_PROTOCOL)


def log_alerts(batch: list[dict]) -> list[dict]:
    """The log sink (every alert message, whichever rule family raised it), and the counter."""
    for a in batch:
        log.warning("alert %s %s %s severity %s value=%s mu=%s z=%s k=%s (%s) %s", a["status"],
                    a["rule"], a["series"], a["severity"], _num(a["value"]), _num(a["mu"]),
                    _num(a["z"]), _num(a["k"]), a.get("baseline", ""), a["detail"])
    STATS.add("alerts_fired", sum(a["status"] == "firing" for a in batch))
    return batch


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


@dataclass
class Outputs:
    """Where each kind of result goes; each list may hold several sinks (e.g. Kafka and ClickHouse)."""

    features: Sink
    aggregates: Sink  # complete minutes
    raw_events: Sink | None = None
    actions: list[tuple[str, Sink]] = field(default_factory=list)
    audit: Sink | None = None  # trigger decisions (ClickHouse trigger_audit)
    alerts: list[tuple[str, Sink]] = field(default_factory=list)
    dead_letters: list[tuple[str, Sink]] = field(default_factory=list)
    model_versions: Sink | None = None  # the versions channel (connectors/model_versions.py)
    model_metrics: Sink | None = None  # ClickHouse model_metrics


def build_flow(settings: Settings, source: Source, outputs: Outputs, partitions: int,
               flow_id: str = "surgeflow", registry: Registry | None = None,
               snapshots: bool = False, erasure_source: Source | None = None,
               eraser: Eraser | None = None, erased: dict[str, int] | None = None,
               versions_source: Source | None = None) -> Dataflow:
    shards = settings.flow.shards
    max_future = settings.flow.max_clock_skew_s
    lim = settings.limits
    limits = Limits(lim.max_depth, lim.max_keys, lim.max_string_chars, lim.max_money,
                    lim.max_quantity)
    cfg = dataclasses.replace(shard_config(settings, erased), snapshots=snapshots)
    reset_process_ledger(cfg.subject_key, erased or {})
    plan = FeaturePlan(registry or load_registry(settings.features.registry),
                       max_cart_items=settings.limits.max_cart_items)

    catalogue = load_rules(settings.alerts.rules)
    entity_rules = catalogue.entity_rules
    router = SignalRouter(entity_rules, shards) if entity_rules else None

    flow = Dataflow(flow_id)
    raw = op.input("events_in", flow, source)
    routed = op.flat_map_batch("decode_and_route", raw, DecodeAndRoute(
        shards, partitions, settings.flow.max_event_bytes,
        int(max_future * 1000) if max_future is not None else None, router, limits))
    split = op.branch("split_dead_letters", routed, lambda kv: kv[0] != DEAD)
    bad = op.map("bad_records", split.falses, lambda kv: kv[1])
    by_kind = op.branch("split_entity_signals", split.trues, lambda kv: type(kv[1]) is Chunk)

    to_ingest = by_kind.trues
    if erasure_source is not None:  # erasure requests reach every ingest shard
        requests = op.filter_map("erasure_requests", op.input("erasures_in", flow, erasure_source),
                                 request_of)
        routed_erasures = op.flat_map("route_erasures", requests, lambda r: [
            (f"shard-{i:04d}", Chunk(i, [], {}, partitions, int(time.time() * 1000), None, [r]))
            for i in range(shards)] + [
            (f"{ENTITIES}-{i:04d}", EntityChunk(i, [], {}, partitions, int(time.time() * 1000), [r]))
            for i in range(router.shards if router is not None else 0)])
        split_erasures = op.branch("split_erasures", routed_erasures, lambda kv: type(kv[1]) is Chunk)
        to_ingest = op.merge("ingest_input", to_ingest, split_erasures.trues)
        to_entities = op.merge("entity_input", by_kind.falses, split_erasures.falses)
    else:
        to_entities = by_kind.falses
    ingested = op.stateful_batch("ingest_shards", to_ingest,
                                 lambda resume: IngestLogic(cfg, plan, resume))
    ingested = op.map("ingest_results", ingested, lambda kv: kv[1])
    handovers = op.flat_map("handovers", ingested, lambda o: o.handovers)
    specs = {spec.name: spec for spec in cfg.models}
    if specs:  # the learners' versions come back to every profile shard (the loop via Redis)
        if versions_source is None or outputs.model_versions is None:
            raise ValueError("the online models need the versions channel (source and sink)")
        versions = op.input("model_versions_in", flow, versions_source)
        to_profiles = op.flat_map("versions_to_profile_shards", versions, lambda w: [
            (f"profiles-{j:04d}", VersionFor(j, w)) for j in range(cfg.profile_shards)])
        handovers = op.merge("profile_shard_input", handovers, to_profiles)
    profiled = op.stateful_batch("profile_shards", handovers,
                                 lambda resume: ProfileLogic(cfg, plan, resume))
    profiled = op.map("profile_results", profiled, lambda kv: kv[1])
    results = op.merge("shard_results", ingested, profiled)
    model_alerts = None
    if specs:  # one learner per model: labels in, versions, metrics and drift alerts out
        labels = op.flat_map("model_labels", profiled, lambda o: o.labels)
        learned = op.stateful_batch("model_learners", labels, lambda resume: LearnerLogic(
            specs, cfg.profile_shards, cfg.model_period_ms, resume, snapshots))
        learned = op.map("learned", learned, lambda kv: kv[1])
        published = op.flat_map("model_versions", learned, lambda o: o.weights + (
            [End(o.model)] if o.end else []))
        _output("model_versions_to_redis", published, outputs.model_versions)
        if outputs.model_metrics is not None:
            metrics = op.filter_map("model_metrics", learned, lambda o: o.metrics or None)
            _output("model_metrics_to_clickhouse", metrics, outputs.model_metrics)
        model_alerts = op.filter_map("model_alerts", learned, lambda o: o.alerts or None)

    if eraser is not None:
        reports = op.filter_map("erasure_reports", results, lambda o: o.erasures or None)
        # the sweep also compacts the recovery store: after two epochs no snapshot holds them
        resweep_s = max(settings.privacy.erasure.resweep_s, 2 * settings.flow.epoch_interval_s)
        erasure_key = pinned_key("all")  # it deletes from ClickHouse: a worker of process 0
        expected = (shards + 1, shards)  # reports per request, by request.anonymous: a user's
        # come from every ingest shard and the profile shard, an anonymous id's from the first
        op.stateful_batch("erasures", op.key_on("all-erasures", reports, lambda _: erasure_key),
                          lambda resume: ErasureLogic(eraser, expected, resweep_s, resume))
    features = op.filter_map("feature_values", results,
                             lambda o: (o.features, o.aliases) if o.features or o.aliases else None)
    _output("features_to_redis", features, outputs.features)
    parts = op.filter_map("minute_parts", results,
                          lambda o: ("all-minutes", o.minutes) if o.minutes else None)
    ch = settings.clickhouse
    released = op.stateful_batch("close_minutes", parts, lambda resume: MinuteLogic(
        shards, resume, BlockGrouper(ch.catch_up_block_minutes, ch.catch_up_block_rows,
                                     int(ch.catch_up_after_s * 1000))))
    released = op.map("released_minutes", released, lambda kv: kv[1])
    blocks = op.filter_map("minute_blocks", released, lambda r: r.blocks or None)
    _output("aggregates_to_clickhouse", blocks, outputs.aggregates)
    minutes = op.filter_map("complete_minutes", released, lambda r: r.minutes or None)
    if outputs.raw_events is not None:
        raw = op.filter_map("raw_events", results, lambda o: o.raw or None)
        _output("raw_events_to_clickhouse", raw, outputs.raw_events)
    actions = op.filter_map("actions", results, _counted_actions)
    for name, sink in outputs.actions:
        _output(f"actions_to_{name}", actions, sink)
    if outputs.audit is not None:
        audit = op.filter_map("trigger_decisions", results, lambda o: o.audit or None)
        _output("trigger_audit_to_clickhouse", audit, outputs.audit)
    late = op.filter_map("late_events", results, lambda o: o.dead or None)
    dead_streams = [bad, late]

    tz = settings.clickhouse.timezone
    minute_alerts = op.stateful_batch("minute_rules",
                                      op.key_on("all-series", minutes, lambda _: "all"),
                                      lambda resume: AlertLogic(catalogue, tz, resume, snapshots,
                                                                settings.limits.max_series))
    alerts = op.map("minute_alerts", minute_alerts, lambda kv: kv[1])
    if model_alerts is not None:
        alerts = op.merge("minute_and_model_alerts", alerts, model_alerts)
    if router is not None:
        lateness = int(settings.flow.allowed_lateness_s * 1000)
        entity_out = op.stateful_batch(
            "entity_rules", to_entities,
            lambda resume: EntityLogic(entity_rules, lateness, resume, snapshots,
                                       max_entity_keys=settings.limits.max_entity_keys,
                                       idle_ms=cfg.idle_ms, lookback_ms=cfg.lookback_ms))
        entity_alerts = op.filter_map("entity_alerts", entity_out, lambda kv: kv[1][0] or None)
        alerts = op.merge("alerts", alerts, entity_alerts)
        dead_streams.append(op.filter_map("entity_dead_letters", entity_out,
                                          lambda kv: _counted_dead(kv[1][1]) or None))
    alerts = op.map("alerts_to_log", alerts, log_alerts)
    for name, sink in outputs.alerts:
        _output(f"alerts_to_{name}", alerts, sink)
    dead = op.filter_map("dead_letters", op.merge("all_dead_letters", *dead_streams),
                         _not_erased)
    for name, sink in outputs.dead_letters:
        _output(f"dead_letters_to_{name}", dead, sink)
    return flow


def _output(step_id: str, stream, sink) -> None:
    """op.output, with the (key, item) pairs a one-process sink (flows/cluster.OwnerSink) takes."""
    if isinstance(sink, FixedPartitionedSink):
        stream = op.map(f"{step_id}_to_owner", stream, lambda item: ("owner", item))
    op.output(step_id, stream, sink)


def _not_erased(dead: list) -> list | None:
    """Dead letters of people erased since are not written (their record predates the erasure)."""
    if PROCESS_LEDGER:
        dead = [d for d in dead if not names_erased(d.raw, d.key, d.ts_ms)]
    return dead or None


def _counted_dead(dead: list) -> list:
    if dead:
        count_dead(dead)
    return dead


def _counted_actions(o: ShardOut):
    if o.events or o.duplicates or o.consent_denied:
        STATS.add("events_unique", o.events)
        STATS.add("duplicates", o.duplicates)
        STATS.add("consent_denied", o.consent_denied)
    if o.dead:
        count_dead(o.dead)
        STATS.add("late_events", sum(d.reason == "late_event" for d in o.dead))
    if not o.actions:
        return None
    STATS.add("actions_emitted", len(o.actions))
    return o.actions
