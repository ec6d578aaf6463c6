"""The stream clock: how "now" advances in event time for one keyed shard.

Every source batch tells each shard the highest event time it read on each source partition
(even when none of the batch's events belong to the shard), so a user who sends nothing still
sees time pass. "Now" is the minimum of those highest times over the partitions, so a partition
that lags behind holds the others back rather than seeing its events turn late. Two guards keep
one quiet or broken partition from stopping time:

- a partition silent for ``idle_ms`` of *wall* time stops holding the clock back, until it sends
  again (then its events are judged against the watermark, as any others); the wall clock only
  decides who counts, never what time it is, so a fast replay of days of history gives the same
  clock as the live run;
- a partition that never sent holds the clock for ``idle_ms`` after the first batch only.

A restart counts every partition as just heard from: downtime is not silence.

>>> c = StreamClock()
>>> c.observe({0: 5_000}, partitions=2, wall=1_000)  # the first batch since the start
True
>>> c.now(wall=1_000, idle_ms=60_000) is None  # partition 1 may still be about to send
True
>>> c.observe({1: 3_000}, partitions=2, wall=2_000)
False
>>> c.now(wall=2_000, idle_ms=60_000)  # the slower partition sets the clock
3000
>>> c.observe({0: 9_000}, partitions=2, wall=70_000)  # partition 1 silent for 68 s of wall time
False
>>> c.now(wall=70_000, idle_ms=60_000)
9000
>>> c.now(wall=70_000, idle_ms=None)  # no idleness: the silent partition holds the clock
3000
"""
from __future__ import annotations

END_OF_TIME = 2**62


class StreamClock:
    __slots__ = ("part_max", "part_wall", "partitions", "first_wall", "reset")

    def __init__(self) -> None:
        self.part_max: dict[int, int] = {}  # partition -> highest event time read
        self.part_wall: dict[int, int] = {}  # partition -> wall time it last sent an event
        self.partitions = 1  # source partitions known so far
        self.first_wall: int | None = None  # wall time of the first batch since a (re)start
        self.reset = False  # restarted: silence counts from the next batch

    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict) -> None:
        for name in self.__slots__:
            setattr(self, name, state[name])

    def observe(self, clocks: dict[int, int], partitions: int, wall: int) -> bool:
        """Take one batch's highest event time per partition, read at ``wall``. True for the
        first batch since the start or a restart (the caller may set a floor on "now" then)."""
        first = self.first_wall is None or self.reset
        if first:
            self.first_wall = wall
            self.part_wall = {part: wall for part in self.part_wall}
            self.reset = False
        for part, ts in clocks.items():
            if ts > self.part_max.get(part, -END_OF_TIME):
                self.part_max[part] = ts
            self.part_wall[part] = wall
        self.partitions = max(self.partitions, partitions)
        return first

    def now(self, wall: int, idle_ms: int | None) -> int | None:
        """The minimum over the partitions of their highest event time, leaving out those silent
        for ``idle_ms`` of wall time (if every one is silent, the highest time seen). None while
        a partition that never sent may still be about to. Without ``idle_ms`` (or a wall time)
        every partition counts."""
        if not self.part_max:
            return None
        if idle_ms is None or not wall:
            return min(self.part_max.values()) if len(self.part_max) >= self.partitions else None
        if len(self.part_max) < self.partitions and wall - self.first_wall < idle_ms:
            return None
        active = [ts for part, ts in self.part_max.items() if wall - self.part_wall[part] < idle_ms]
        return min(active) if active else max(self.part_max.values())

    def final(self) -> int | None:
        """At the end of a bounded input nothing more comes: "now" is the slowest partition."""
        return min(self.part_max.values()) if self.part_max else None

    def resumed(self) -> None:
        self.reset = True
