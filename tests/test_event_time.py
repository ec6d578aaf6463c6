"""Event time that cannot be hijacked: the wall clock caps a partition's clock (future events are
dead letters), a silent partition stops holding the watermark back after ``idle_ms`` and rejoins
when it sends again, and a fresh run's first watermark reaches back at most ``lookback_ms``.

Watermarks are asserted exactly: clock = min over the partitions heard from recently of their
highest event time; watermark = clock - allowed lateness.
"""
import pickle
import time
from types import SimpleNamespace

import orjson

from config.registry import load_registry
from features.profile import FeaturePlan
from flows.events import DeadLetter
from flows.minutes import MinuteCloser
from flows.pipeline import DEAD, DecodeAndRoute
from flows.shard import Chunk, IngestShard, ShardConfig, ShardOut
from tests.engine_harness import event

PLAN = FeaturePlan(load_registry())
T = 1_795_392_000_000  # 2026-11-23T00:00Z (event time)
W = 1_900_000_000_000  # a wall clock, independent of event time
LATE = 60_000
MIN = 60_000
DAY = 86_400_000


def shard(**config) -> IngestShard:
    return IngestShard(0, ShardConfig(lateness_ms=LATE, ingest_shards=1, **config), PLAN)


def feed(s: IngestShard, part: int, ts: int, wall: int, user: str = "u1", n: int = 2) -> ShardOut:
    out = ShardOut(0)
    e = event(f"{part}-{ts}-{user}", user, "page_view", ts)
    s.ingest(Chunk(0, [e], {part: ts}, n, wall), out)
    return out


def test_a_silent_partition_stops_holding_the_watermark_and_rejoins():
    s = shard(idle_ms=10_000)
    feed(s, 0, T, W)
    assert s.clock is None  # partition 1 has not spoken yet and may hold older events
    feed(s, 0, T + 1_000, W + 9_999)
    assert s.clock is None
    feed(s, 0, T + 5_000, W + 10_000)  # partition 1 silent for idle_ms: it holds nothing back
    assert (s.clock, s.watermark) == (T + 5_000, T + 5_000 - LATE)
    out = feed(s, 1, T + 1_000, W + 11_000)  # it rejoins, behind: on time, holds the clock
    assert not out.dead and s.clock == T + 5_000
    feed(s, 0, T + 20_000, W + 12_000)
    assert s.clock == T + 5_000  # min(20 s, 1 s) would go back: the clock never does
    feed(s, 0, T + 30_000, W + 20_999)
    assert s.clock == T + 5_000  # partition 1 heard from 9.999 s ago: still active
    feed(s, 0, T + 40_000, W + 21_000)
    assert (s.clock, s.watermark) == (T + 40_000, T + 40_000 - LATE)


def test_without_idleness_a_silent_partition_holds_the_watermark():
    s = shard(idle_ms=None)
    for i in range(5):
        feed(s, 0, T + i * DAY, W + i * 3_600_000)
    assert s.clock is None and s.watermark < T
    assert len(s.seen) == 5  # and dedupe state grows meanwhile: why idleness is on by default


def test_a_restart_does_not_make_every_partition_idle():
    s = shard(idle_ms=10_000)
    feed(s, 0, T, W)
    feed(s, 1, T + 2_000, W + 1)
    assert s.clock == T
    s.store.plan = None  # as IngestLogic.snapshot does: the plan is not state
    resumed = pickle.loads(pickle.dumps(s))
    resumed.store.plan = PLAN
    resumed.resumed()
    feed(resumed, 0, T + 9_000, W + 3_600_000)  # an hour later: partition 1 was not silent, we were
    assert resumed.clock == T + 2_000


def test_first_watermark_reaches_back_at_most_the_lookback():
    s = shard(idle_ms=10_000, lookback_ms=3_600_000)
    now = T + 30 * DAY  # wall clock = event time now: a live stream
    out = feed(s, 0, T, now)  # one event 30 days old first
    assert [d.reason for d in out.dead] == ["late_event"]
    assert s.watermark == now - 3_600_000
    closer = MinuteCloser(1)
    released = []
    for out in [out, feed(s, 1, now - 5 * MIN, now + 1), feed(s, 0, now + 5 * MIN, now + 2),
                feed(s, 1, now + 5 * MIN, now + 3)]:
        if out.minutes is not None:
            released += closer.add(out.minutes)
    # minutes run from the first one with an event, not from 30 days ago (43,199 empty minutes)
    assert [m.minute for m in released] == list(range((now - 5 * MIN) // MIN, (now + 4 * MIN) // MIN))


def test_first_watermark_without_lookback_follows_the_oldest_event():
    s = shard(idle_ms=None, lookback_ms=None)
    feed(s, 0, T, W)
    feed(s, 1, T + 2_000, W)
    assert s.watermark == T - LATE


def _msg(value: bytes, partition: int, offset: int):
    return SimpleNamespace(value=value, key=b"k", topic="events", partition=partition,
                           offset=offset, timestamp=(0, 0))


def _doc(event_id: str, ts: int) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": "u1", "event": "page_view",
                         "timestamp": ts})


def test_future_events_are_dead_letters_and_do_not_move_the_clock():
    now = int(time.time() * 1000)
    step = DecodeAndRoute(shards=1, partitions=2, max_bytes=32_768, max_future_ms=600_000)
    out = dict(step([_msg(_doc("real", now - 1_000), 0, 0),
                     _msg(_doc("hijack", now + 23 * 3_600_000), 0, 1),
                     _msg(_doc("skewed", now + 60_000), 1, 0)]))
    assert [(d.reason, d.step) for d in out[DEAD]] == [("future_event", "decode_and_route")]
    chunk = out["shard-0000"]
    assert chunk.clocks == {0: now - 1_000, 1: now + 60_000}  # within the skew: kept
    assert now <= chunk.wall_ms <= int(time.time() * 1000)


def test_one_future_event_per_partition_cannot_make_real_events_late():
    """The attack of the issue: an event dated now + 23 h on each partition, then real traffic."""
    now = int(time.time() * 1000)
    step = DecodeAndRoute(shards=1, partitions=2, max_bytes=32_768, max_future_ms=600_000)
    s = shard(idle_ms=60_000, lookback_ms=None)
    batches = [[_msg(_doc(f"evil{p}", now + 23 * 3_600_000), p, 0) for p in (0, 1)],
               [_msg(_doc(f"real{p}-{i}", now + i * 1_000), p, i + 1) for p in (0, 1) for i in range(5)]]
    dead = []
    for batch in batches:
        routed = dict(step(batch))
        dead += routed.get(DEAD, [])
        if "shard-0000" in routed:
            out = ShardOut(0)
            s.ingest(routed["shard-0000"], out)
            dead += out.dead
    assert sorted(d.reason for d in dead) == ["future_event", "future_event"]
    assert s.clock == now + 4_000 and s.watermark == now + 4_000 - LATE


def test_isolated_step_failure_becomes_a_dead_letter_and_the_shard_goes_on():
    """An error no validation foresaw (here: a profile whose state was corrupted) costs that
    event, with the step named and the original bytes kept; the next events are counted."""
    s = shard(idle_ms=None)
    bad = event("bad", "anon-bad", "page_view", T)
    bad.raw = b'{"the": "original bytes"}'
    bad.properties = None  # not a dict: the features code raises on it
    good = event("good", "anon-good", "page_view", T + 1)
    out = ShardOut(0)
    s.ingest(Chunk(0, [bad, good], {0: T + 1}, 1, 0), out)
    failed = [d for d in out.dead if isinstance(d, DeadLetter)]
    assert [(d.reason, d.step, d.raw) for d in failed] == [
        ("step_error", "ingest_shards", b'{"the": "original bytes"}')]
    assert "anon-good" in s.store.users and "anon-bad" not in s.store.users


# -- the entity rules keep the ingest shards' clock -------------------------------------------------

from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

from alerts.entities import Signal  # noqa: E402
from alerts.rules import load_rules  # noqa: E402
from flows.entity_alerts import EntityChunk, EntityLogic, EntityShard  # noqa: E402
from surgeflow import shutdown  # noqa: E402

ENTITY_RULES = load_rules().entity_rules

batches = st.lists(st.tuples(st.integers(0, 2),            # partition that sent
                             st.integers(-5 * MIN, 30 * MIN),  # its event time, from T
                             st.integers(0, 40_000),        # wall time passed since the last batch
                             st.booleans()),                # a restart before this batch
                   min_size=1, max_size=40)


@hsettings(max_examples=150, deadline=None)
@given(batches, st.sampled_from([None, 10_000, 30_000]), st.sampled_from([None, 20 * MIN]))
def test_entity_shards_and_ingest_shards_keep_one_watermark(steps, idle, lookback):
    """Both consume the same batches' clocks: they must drop the same late events, so their
    watermarks agree after every batch, restarts, idleness and the lookback floor included."""
    ingest = shard(idle_ms=idle, lookback_ms=lookback)
    entity = EntityShard(0, ENTITY_RULES, LATE, idle_ms=idle, lookback_ms=lookback)
    wall = W
    for i, (part, offset, pause, restart) in enumerate(steps):
        wall += pause
        if restart:
            ingest.store.plan = None
            ingest = pickle.loads(pickle.dumps(ingest))
            ingest.store.plan = PLAN
            ingest.resumed()
            entity = pickle.loads(pickle.dumps(entity))
            entity.resumed()
        ts = T + offset
        ingest.ingest(Chunk(0, [event(f"e{i}", "u1", "page_view", ts)], {part: ts}, 3, wall),
                      ShardOut(0))
        entity.ingest(EntityChunk(0, [], {part: ts}, 3, wall))
        assert entity.watermark == ingest.watermark


def test_entity_shard_lets_a_silent_partition_go_and_forgets_old_event_ids():
    entity = EntityShard(0, ENTITY_RULES, LATE, idle_ms=10_000)
    sig = Signal(T, "login_failed", "u1", "203.0.113.7", "NL", event_id="a")
    entity.ingest(EntityChunk(0, [sig], {0: T}, 2, W))
    assert entity.watermark == -2**62  # partition 1 may still send
    for i in range(1, 6):
        entity.ingest(EntityChunk(0, [], {0: T + i * MIN}, 2, W + i * 10_000))
    assert entity.watermark == T + 5 * MIN - LATE and entity.seen == {}


def test_a_failing_entity_rule_costs_one_signal_as_a_dead_letter(monkeypatch):
    entity = EntityShard(0, ENTITY_RULES, LATE)
    real = entity.rules.observe

    def observe(s):
        if s.event_id == "poison":
            raise ValueError("rule bug")
        return real(s)

    monkeypatch.setattr(entity.rules, "observe", observe)
    sigs = [Signal(T + i, "login_failed", "u1", "203.0.113.7", "NL", event_id=f"e{i}")
            for i in range(3)]
    sigs.insert(1, sigs[0]._replace(event_id="poison"))
    dead: list = []
    entity.ingest(EntityChunk(0, sigs, {0: T + 3}, 1), dead)
    assert [(d.reason, d.step, orjson.loads(d.raw)["event_id"]) for d in dead] == [
        ("step_error", "entity_rules", "poison")]
    assert set(entity.seen) == {"e0", "e1", "e2", "poison"}


def test_a_stop_keeps_the_entity_shards_now(monkeypatch):
    """SIGTERM ends the input; the shard must not jump to the end of time, or the next start
    drops as late what is still on time."""
    logic = EntityLogic(ENTITY_RULES, LATE, None, snapshots=True)
    logic.on_batch([EntityChunk(0, [], {0: T + 10 * MIN}, 1, W)])
    before = logic.state.watermark
    monkeypatch.setattr(shutdown, "stopping", lambda: True)
    monkeypatch.setattr("flows.entity_alerts.stopping", lambda: True)
    assert logic.on_eof() == ([], False) and logic.state.watermark == before == T + 10 * MIN - LATE
    monkeypatch.setattr("flows.entity_alerts.stopping", lambda: False)
    logic.on_eof()
    assert logic.state.watermark == T + 10 * MIN


def test_an_entity_snapshot_from_before_the_stream_clock_resumes():
    entity = EntityShard(0, ENTITY_RULES, LATE)
    entity.ingest(EntityChunk(0, [], {0: T, 1: T + 5}, 2))
    old = entity.__dict__.copy()
    stream = old.pop("stream")
    old.update(part_max=dict(stream.part_max), partitions=stream.partitions)
    for name in ("idle_ms", "lookback_ms"):
        old.pop(name)
    legacy = EntityShard.__new__(EntityShard)
    legacy.__setstate__(old)
    legacy.ingest(EntityChunk(0, [], {0: T + 9}, 2))
    assert legacy.watermark == T + 5 - LATE and legacy.stream.partitions == 2


def _two_partitions_with_a_silent_day():
    """Five days of events on two partitions, one every 10 minutes each; partition 1 sends
    nothing on day 3. Batches in source order: (partition, event time)."""
    out = []
    for minute in range(0, 5 * 1440, 10):
        ts = T + minute * MIN
        out.append((0, ts))
        if not 2 * DAY <= ts - T < 3 * DAY:
            out.append((1, ts + 5 * MIN))
    return out


def test_a_fast_replay_of_days_of_history_never_finds_a_partition_idle():
    """Replayed in well under a second of wall time, idleness never applies: the watermark
    is exactly min over the partitions minus the lateness, the same as with idleness off,
    and the silent day holds it back rather than turning partition 1's events late."""
    replay, reference = shard(idle_ms=60_000), shard(idle_ms=None)
    highest = {}
    for i, (part, ts) in enumerate(_two_partitions_with_a_silent_day()):
        wall = W + i // 100  # a batch every 0.01 ms of wall time
        a, b = feed(replay, part, ts, wall), feed(reference, part, ts, wall)
        highest[part] = ts
        assert not a.dead and not b.dead
        assert replay.watermark == reference.watermark
        if len(highest) == 2:
            assert replay.watermark == min(highest.values()) - LATE


def test_live_a_silent_day_does_not_stop_time_for_the_other_partition():
    """The same stream live (wall time = event time): during partition 1's silent day the
    watermark follows partition 0, idle_ms behind at most; without idleness it stands still
    for the whole day."""
    live, stuck = shard(idle_ms=60_000), shard(idle_ms=None)
    for part, ts in _two_partitions_with_a_silent_day():
        assert not feed(live, part, ts, ts).dead  # nothing turns late, before or after
        feed(stuck, part, ts, ts)
        if ts == T + 3 * DAY - 10 * MIN and part == 0:  # the silent day's last batch
            assert live.watermark == ts - LATE
            assert stuck.watermark <= T + 2 * DAY - LATE
    # partition 1 back: each partition sends every 10 minutes, more than idle_ms apart, so the
    # live clock is the latest partition's time; the other run's is the earliest's
    assert live.watermark == stuck.watermark + 5 * MIN
