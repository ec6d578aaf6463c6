"""Any partitioned source made stoppable: once :data:`surgeflow.shutdown.STOP` is set, each
partition ends at its next batch (Bytewax then drains the flow and takes its last snapshot, with
the offsets of what was read). Bytewax's Kafka source has no stop of its own: without this, Ctrl-C
and SIGTERM could not end a run that follows a topic. It also beats the heart that ``/healthz``
checks: a worker that still polls its source is alive, whether or not traffic comes."""
from __future__ import annotations

import time

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from surgeflow.shutdown import STOP
from surgeflow.stats import STATS


class _StoppablePartition(StatefulSourcePartition):
    def __init__(self, inner: StatefulSourcePartition):
        self.inner = inner
        self.beat = 0.0

    def next_batch(self):
        if STOP.is_set():
            raise StopIteration()
        now = time.monotonic()
        if now - self.beat >= 1.0:  # the worker is polling its source: alive, even with no traffic
            self.beat = now
            STATS.set("heartbeat_ms", time.time() * 1000)
        return self.inner.next_batch()

    def next_awake(self):
        return self.inner.next_awake()

    def snapshot(self):
        return self.inner.snapshot()

    def close(self):
        self.inner.close()


class Stoppable(FixedPartitionedSource):
    def __init__(self, inner: FixedPartitionedSource):
        self.inner = inner

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state):
        return _StoppablePartition(self.inner.build_part(step_id, for_part, resume_state))
