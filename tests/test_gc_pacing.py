"""flows/gc_pacing.py: while the flow runs, cyclic garbage is still freed (between batches), a
batch's own live objects are never scanned mid-batch, and the collector is back on after."""
from __future__ import annotations

import gc
import weakref

from flows.gc_pacing import between_batches, paced


class _Node:
    def __init__(self):
        self.other = None


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # only the cyclic GC frees these
    return weakref.ref(a)


def test_cyclic_garbage_is_freed_between_batches_not_during_them():
    was = gc.isenabled()
    with paced((100, 10, 10)):
        assert not gc.isenabled()
        dead = [_cycle() for _ in range(200)]  # a "batch" making garbage cycles
        assert any(r() is not None for r in dead)  # nothing collected inside the batch
        batch = [[i] for i in range(5_000)]  # and the batch's own live objects
        gens = [between_batches() for _ in range(3)]
        assert gens[0] is not None  # growth past threshold0: a collection ran
        assert all(r() is None for r in dead)
        assert len(batch) == 5_000
    assert gc.isenabled() == was


def test_nothing_runs_when_the_growth_is_under_the_threshold_or_outside_a_run():
    assert between_batches() is None  # no flow running: automatic GC does the work
    with paced((10**9, 10, 10)):
        _cycle()
        assert between_batches() is None
