"""The synthetic generator as a Bytewax source, paced against the wall clock.

With ``speed`` > 0 the source replays the past at ``speed`` event-time seconds per wall second and,
once it reaches the present, follows the wall clock (a live stream). ``speed`` = 0 emits as fast
as possible (tests, benchmarks). Resume state is the count of records emitted: the generator is
deterministic, so a restart regenerates and skips them. The resume state also pins the
stream's start, so a demo restarted later goes on with the same stream (catching up from where it
stopped) instead of starting a new one behind the restored watermark.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.records import RawRecord
from connectors.synthetic import SyntheticSpec, generate
from surgeflow.shutdown import STOP  # noqa: F401 - set to end the source gracefully


class _Partition(StatefulSourcePartition[RawRecord, tuple]):
    def __init__(self, spec: SyntheticSpec, speed: float, resume, batch_size: int):
        if isinstance(resume, tuple):  # (start of the stream, records emitted)
            spec = replace(spec, start_ms=resume[0])
            resume = resume[1]
        self.spec = spec
        self.records = generate(spec)
        self.emitted = resume or 0
        if self.emitted:
            next(itertools.islice(self.records, self.emitted - 1, None), None)
        self.speed = speed
        self.batch_size = batch_size
        self.held = None
        self.waiting = False
        # Pacing starts where the stream stands: a resumed stream goes on from its next record,
        # not from its start (which would hold it back as long as the earlier runs lasted).
        self.start_ms = spec.start_ms
        if self.emitted:
            self.held = next(self.records, None)
            if self.held is not None:
                self.start_ms = max(spec.start_ms, self.held.ts_ms)
        self.wall0 = time.monotonic()

    def _limit_ms(self) -> float | None:
        if self.speed <= 0:
            return None
        paced = self.start_ms + (time.monotonic() - self.wall0) * 1000 * self.speed
        return min(paced, time.time() * 1000)

    def next_batch(self) -> list[RawRecord]:
        if STOP.is_set():
            raise StopIteration()
        limit = self._limit_ms()
        batch = []
        now_ms = int(time.time() * 1000)
        while len(batch) < self.batch_size:
            record = self.held if self.held is not None else next(self.records, None)
            self.held = None
            if record is None:
                if batch:
                    return batch
                raise StopIteration()
            if limit is not None and record.ts_ms > limit:
                self.held = record
                break
            batch.append(RawRecord(record.value, record.key, 0, self.emitted, "synthetic",
                                   now_ms, record.sent_ms))
            self.emitted += 1
        self.waiting = not batch
        return batch

    def next_awake(self) -> datetime | None:
        if self.waiting:
            return datetime.now(timezone.utc) + timedelta(milliseconds=50)
        return None

    def snapshot(self) -> tuple:
        return (self.spec.start_ms, self.emitted)


class SyntheticSource(FixedPartitionedSource[RawRecord, int]):
    def __init__(self, spec: SyntheticSpec, speed: float = 0.0, batch_size: int = 1000):
        self.spec, self.speed, self.batch_size = spec, speed, batch_size

    def list_parts(self) -> list[str]:
        return ["synthetic"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None):
        return _Partition(self.spec, self.speed, resume_state, self.batch_size)
