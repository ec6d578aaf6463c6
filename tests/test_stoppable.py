"""connectors/stoppable.py: a run whose main input ends also ends its side input (the erasure
topic followed with tail=True), so a bounded run does not hang; STOP ends both."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.testing import TestingSink, run_main

from connectors.stoppable import INPUT_DONE, Stoppable, reset_input_done
from surgeflow.shutdown import STOP


class _Items(StatefulSourcePartition):
    def __init__(self, items, forever):
        self.items, self.forever = list(items), forever

    def next_batch(self):
        if self.items:
            return [self.items.pop(0)]
        if self.forever:  # a followed topic: nothing new, poll again soon
            return []
        raise StopIteration()

    def next_awake(self):
        return datetime.now(timezone.utc) + timedelta(milliseconds=20)

    def snapshot(self):
        return None


class _Source(FixedPartitionedSource):
    def __init__(self, items, forever):
        self.items, self.forever = items, forever

    def list_parts(self):
        return ["p"]

    def build_part(self, step_id, for_part, resume_state):
        return _Items(self.items, self.forever)


def _run(main, side) -> tuple[list, bool]:
    out: list = []
    flow = Dataflow("stoppable")
    a = op.input("main", flow, main)
    b = op.input("side", flow, side)
    op.output("out", op.merge("both", a, b), TestingSink(out))
    reset_input_done()
    runner = threading.Thread(target=run_main, args=(flow,), daemon=True)
    runner.start()
    runner.join(20)
    return out, runner.is_alive()


def test_a_side_input_ends_with_the_main_input():
    out, hung = _run(Stoppable(_Source([1, 2, 3], forever=False)),
                     Stoppable(_Source(["request"], forever=True), side=True))
    assert not hung and INPUT_DONE.is_set()
    assert sorted(out, key=str) == [1, 2, 3, "request"]


def test_without_side_a_followed_input_keeps_the_run_going_until_stop():
    main = Stoppable(_Source([1], forever=False))
    side = Stoppable(_Source([], forever=True))  # counted as a main input: the run goes on
    out: list = []
    flow = Dataflow("stoppable2")
    op.output("out", op.merge("both", op.input("main", flow, main), op.input("side", flow, side)),
              TestingSink(out))
    reset_input_done()
    runner = threading.Thread(target=run_main, args=(flow,), daemon=True)
    runner.start()
    runner.join(1.5)
    assert runner.is_alive() and not INPUT_DONE.is_set()
    STOP.set()
    try:
        runner.join(20)
        assert not runner.is_alive() and out == [1]
    finally:
        STOP.clear()
