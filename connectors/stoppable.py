"""Any partitioned source made stoppable: once :data:`surgeflow.shutdown.STOP` is set, each
partition ends at its next batch (Bytewax then drains the flow and takes its last snapshot, with
the offsets of what was read). Bytewax's Kafka source has no stop of its own: without this, Ctrl-C
and SIGTERM could not end a run that follows a topic. It also beats the heart that ``/healthz``
checks: a worker that still polls its source is alive, whether or not traffic comes."""
from __future__ import annotations

import threading
import time

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from flows.gc_pacing import between_batches
from surgeflow.shutdown import STOP
from surgeflow.stats import STATS


# Set once every partition of the main input of this process has ended: side inputs that
# follow it (the erasure inbox) end too, so a bounded run ends. Cleared by flows.runner.run.
INPUT_DONE = threading.Event()
_open = [0]
_open_lock = threading.Lock()


def reset_input_done() -> None:
    with _open_lock:
        _open[0] = 0
        INPUT_DONE.clear()


class _StoppablePartition(StatefulSourcePartition):
    def __init__(self, inner: StatefulSourcePartition, side: bool = False):
        self.inner = inner
        self.side = side  # a side input (the erasure topic): follows the main input's end
        self.beat = 0.0
        self.ended = False
        if not side:
            with _open_lock:
                _open[0] += 1

    def _end(self) -> None:
        if not self.ended and not self.side:
            self.ended = True
            with _open_lock:
                _open[0] -= 1
                if _open[0] <= 0:
                    INPUT_DONE.set()

    def next_batch(self):
        between_batches()  # the last batch is done: its objects are gone, the GC scans the rest
        if STOP.is_set() or (self.side and INPUT_DONE.is_set()):
            self._end()
            raise StopIteration()
        now = time.monotonic()
        if now - self.beat >= 1.0:  # the worker is polling its source: alive, even with no traffic
            self.beat = now
            STATS.set("heartbeat_ms", time.time() * 1000)
        try:
            return self.inner.next_batch()
        except StopIteration:
            self._end()
            raise

    def next_awake(self):
        return self.inner.next_awake()

    def snapshot(self):
        return self.inner.snapshot()

    def close(self):
        self.inner.close()


class Stoppable(FixedPartitionedSource):
    """``side=True``: a side input (the erasure topic), which ends when the main input of this
    process has ended: a bounded run (a replay, a source that stops) ends even if the side input
    follows its topic."""

    def __init__(self, inner: FixedPartitionedSource, side: bool = False):
        self.inner = inner
        self.side = side

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state):
        return _StoppablePartition(self.inner.build_part(step_id, for_part, resume_state), self.side)
