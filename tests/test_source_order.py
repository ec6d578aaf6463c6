"""A user's operations reach their profile shard from several ingest shards (one per anonymous
id, one for the user id), which run side by side: how they interleave depends on batch
boundaries, workers and restarts. The profile shard applies them in source order, so the trigger
actions (their ids derive from the session, which depends on which views came first) and the
features are the same however the source was cut into batches and however the ingest shards'
handovers interleave.

The reference below applies the events one by one in source order, with nothing in between:
written for this test, it shares no routing or release code with the flow.
"""
from __future__ import annotations

import random
from copy import copy

from hypothesis import given, settings, strategies as st

from config.registry import load_registry
from features.profile import FeaturePlan
from flows.shard import Handover, ProfileShard, ShardConfig, ShardOut
from tests.engine_harness import PAGES_ONLY, Harness, event

PLAN = FeaturePlan(load_registry())
T0 = 1_795_392_000_000
CONFIG = ShardConfig(lateness_ms=3 * 3_600_000, ingest_shards=4, profile_shards=2, trigger_rules=PAGES_ONLY,
                     raw_events=False)
USERS = ["u1", "u2", "u3"]
ANONS = {"u1": ["a1", "a2"], "u2": ["a3", "a4"], "u3": ["a5"]}

# One event: (user, which device sends it, its event time in minutes, a page view or a login).
# Times in any order over two hours: late views bridge sessions (30-minute gap) or open one
# before another, where the n-th view of a session depends on which views came first.
steps = st.lists(st.tuples(st.sampled_from(USERS[:2]), st.integers(0, 2), st.integers(0, 120),
                           st.sampled_from(["page_view", "page_view", "page_view", "login"])),
                 min_size=4, max_size=40)


def stream(spec) -> list:
    """Events in source order (the harness numbers them): identified on a device (its
    anonymous id travels with it, so each device's events go through its own ingest shard), or
    anonymous from the first device (joined to the user once that device logged in)."""
    out = []
    for i, (user, who, minute, name) in enumerate(spec):
        anon = ANONS[user][who % len(ANONS[user])]
        when = T0 + minute * 60_000
        if who < 2 or name == "login":
            e = event(i, user, name, when, anon=anon, identified=True)
        else:
            e = event(i, ANONS[user][0], name, when)
        out.append(e)
    return out


class Flow(Harness):
    """The two keyed stages with the handovers held in flight, delivered in a chosen order."""

    def __init__(self):
        super().__init__(CONFIG, PLAN)
        # (ingest shard, profile shard) -> handovers not delivered yet: a FIFO channel
        self.channels: dict[tuple[int, int], list] = {}

    def _route(self, out: ShardOut) -> None:
        for _, h in out.handovers:
            self.channels.setdefault((out.shard, h.shard), []).append(h)

    def deliver(self, rng: random.Random | None, everything: bool = False) -> None:
        """Deliver some (or all) handovers in flight: each channel keeps its order."""
        for key in sorted(self.channels):
            queue = self.channels[key]
            n = len(queue) if everything or rng is None else rng.randint(0, len(queue))
            take, self.channels[key] = queue[:n], queue[n:]
            for h in take:
                shard = self.profiles.setdefault(h.shard, ProfileShard(h.shard, CONFIG, PLAN))
                out = ShardOut(h.shard)
                shard.receive(h, out)
                if rng is None or rng.random() < 0.5:
                    shard.release(out)
                shard.store.flush(out)
                self._collect(out)

    def finish(self) -> None:
        for shard in self.ingest:
            out = ShardOut(shard.shard)
            shard.finish(out)
            self._collect(out)
        self.deliver(None, everything=True)
        for shard in self.profiles.values():
            out = ShardOut(shard.shard)
            shard.finish(out)
            self._collect(out)


def reference(events: list) -> Flow:
    """One event per batch, every handover delivered and released at once: plain source order."""
    flow = Flow()
    for e in events:
        flow.feed([e])
        flow.deliver(None, everything=True)
    flow.finish()
    return flow


def shuffled(events: list, seed: int) -> Flow:
    """Random batch boundaries, handovers delivered late and interleaved at random."""
    rng = random.Random(seed)
    flow = Flow()
    i = 0
    while i < len(events):
        n = rng.randint(1, 8)
        flow.feed(events[i:i + n])
        i += n
        flow.deliver(rng)
    flow.finish()
    return flow


def comparable(features: dict) -> dict:
    return {u: {k: v for k, v in f.items() if k not in ("p_purchase_24h", "updated_at")}
            for u, f in features.items()}


@settings(max_examples=120, deadline=None)
@given(steps, st.integers(0, 2**32))
def test_actions_and_features_do_not_depend_on_batches_or_interleaving(spec, seed):
    events = stream(spec)
    ref = reference([copy(e) for e in events])
    got = shuffled([copy(e) for e in events], seed)
    got_ids, ref_ids = ([a["action_id"] for a in f.actions] for f in (got, ref))
    assert sorted(got_ids) == sorted(ref_ids)
    assert len(set(got_ids)) == len(got_ids)
    assert comparable(got.redis) == comparable(ref.redis)


def test_a_profile_shard_waits_for_every_ingest_shard_then_applies_in_source_order():
    a = event(1, "u1", "page_view", T0 + 5_000, anon="a1", identified=True)
    b = event(2, "u1", "page_view", T0 + 1_000, anon="a2", identified=True)
    a.offset, b.offset = 7, 8
    shard = ProfileShard(0, ShardConfig(lateness_ms=0, ingest_shards=2, profile_shards=1), PLAN)
    out = ShardOut(0)
    shard.receive(Handover(0, 1, [(0, 8, b.ts_ms, b)], T0 + 5_000, {0: 8}), out)
    shard.release(out)
    assert shard.pending and "u1" not in shard.store.users  # ingest shard 0 has not read 8
    shard.receive(Handover(0, 0, [(0, 7, a.ts_ms, a)], T0 + 5_000, {0: 8}), out)
    shard.release(out)
    assert not shard.pending
    p = shard.store.users["u1"]
    assert p.last_event == T0 + 5_000 and shard.store.watermark == T0 + 5_000
