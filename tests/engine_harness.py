"""Runs the two keyed stages (ingest shards, then profile shards) in process, without Bytewax,
and keeps what the Redis sink would hold: for tests of the pure logic."""
from __future__ import annotations

import zlib
from pathlib import Path

from config.registry import load_registry
from features.profile import FeaturePlan
from flows.events import Event
from flows.shard import Chunk, IngestShard, ProfileShard, ShardConfig, ShardOut


PAGES_ONLY = str(Path(__file__).parent / "trigger_rules" / "pages_only.yaml")


class Harness:
    def __init__(self, config: ShardConfig | None = None, plan: FeaturePlan | None = None,
                 partitions: int = 1):
        self.config = config or ShardConfig(lateness_ms=0, ingest_shards=2, profile_shards=3,
                                            trigger_rules=PAGES_ONLY)
        self.plan = plan or FeaturePlan(load_registry())
        self.partitions = partitions
        self.offsets: dict[int, int] = {}  # partition -> last offset given
        self.ingest = [IngestShard(i, self.config, self.plan) for i in range(self.config.ingest_shards)]
        self.profiles: dict[int, ProfileShard] = {}
        self.redis: dict[str, dict[str, str]] = {}  # by id, whatever the namespace
        self.stored: dict[tuple[str, str], dict[str, str]] = {}  # ("user" | "anon", id) -> hash
        self.aliases: dict[str, str] = {}
        self.actions: list[dict] = []
        self.audit: list[dict] = []
        self.dead = []
        self.minute_parts = []
        self.writes = 0

    def feed(self, events: list[Event]) -> None:
        """One source batch: every ingest shard gets its events and the partitions' clocks."""
        clocks: dict[int, int] = {}
        progress: dict[int, int] = {}
        routed: list[list[Event]] = [[] for _ in self.ingest]
        for e in events:
            # positions in the partition, as a source gives them
            e.offset = progress[e.partition] = self.offsets.get(e.partition, -1) + 1
            self.offsets[e.partition] = e.offset
            routed[zlib.crc32((e.anon or e.user).encode()) % len(self.ingest)].append(e)
            clocks[e.partition] = max(clocks.get(e.partition, e.ts_ms), e.ts_ms)
        if not clocks:
            return
        for shard, evs in zip(self.ingest, routed):
            out = ShardOut(shard.shard)
            shard.ingest(Chunk(shard.shard, evs, clocks, self.partitions, progress=progress), out)
            shard.store.flush(out)
            self._collect(out)

    def finish(self) -> None:
        for shard in self.ingest:
            out = ShardOut(shard.shard)
            shard.finish(out)
            self._collect(out)
        for shard in self.profiles.values():
            out = ShardOut(shard.shard)
            shard.finish(out)
            self._collect(out)

    def _collect(self, out: ShardOut) -> None:
        for w in out.features:
            self.writes += 1
            where = ("anon" if w.anonymous else "user", w.user)
            if w.values is None:
                self.redis.pop(w.user, None)
                self.stored.pop(where, None)
                continue
            for stored in (self.redis.setdefault(w.user, {}), self.stored.setdefault(where, {})):
                stored.update(w.values)
                for f in w.removed:
                    stored.pop(f, None)
        for anon, user in out.aliases:
            if user is None:
                self.aliases.pop(anon, None)
            else:
                self.aliases[anon] = user
        self.actions.extend(out.actions)
        self.audit.extend(out.audit)
        self.dead.extend(out.dead)
        if out.minutes is not None:
            self.minute_parts.append(out.minutes)
        self._route(out)

    def _route(self, out: ShardOut) -> None:
        """The handovers of a result to their profile shards, as the dataflow routes them."""
        for _, h in out.handovers:
            shard = self.profiles.get(h.shard)
            if shard is None:
                shard = self.profiles[h.shard] = ProfileShard(h.shard, self.config, self.plan)
            o = ShardOut(h.shard)
            shard.receive(h, o)
            shard.release(o)
            shard.store.flush(o)
            self._collect(o)

    def features(self, user: str, model: bool = False) -> dict[str, str] | None:
        values = self.redis.get(user)
        if values is None or model:
            return values
        return {k: v for k, v in values.items() if k != "p_purchase_24h"}


def event(i, user, name, ts, *, anon="", identified=None, revenue=0.0, props=None, campaign="",
          consent=None, partition=0, channel="web") -> Event:
    """A decoded event for tests. ``user`` is the profile key (user id, else anonymous id)."""
    if identified is None:
        identified = not user.startswith("anon")
    return Event(f"e{i}", "track", name, user, ts, channel, campaign, revenue, 0.0, "",
                 properties=props or {}, anon=anon or ("" if identified else user),
                 identified=identified, consent=consent, partition=partition)
