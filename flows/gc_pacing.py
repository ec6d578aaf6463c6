"""Python's cyclic garbage collector, run between batches instead of in the middle of them.

A batch of 1,000 events holds about 60,000 small containers (decoded documents, events,
operations, rows) until its last step is done, and they are freed by reference counting when it
is. CPython counts a collection as due when the containers alive since the last one grow past
``threshold0``. So with automatic collection, each batch set off several collections halfway
through. Each one scanned the batch's live objects, all of them survivors, promoted them and
rescanned them at the next generation. That cost 24 % of the steps' CPU (bench_cpu, 100k events),
and a generation-1 pass paused the flow for up to 400 ms.

While the flow runs, automatic collection is off (:func:`paced`). Between batches, when a source
is polled again, :func:`between_batches` runs what CPython would run by the same counts. At that
point the last batch is gone, so a collection scans only what the state kept: new profiles,
pending operations, and any cyclic garbage, which it still frees. An idle flow still polls, so
garbage from other threads (HTTP, sinks) is collected too.

>>> import gc
>>> with paced((10, 10, 10)):
...     gc.isenabled()
False
>>> gc.isenabled()
True
"""
from __future__ import annotations

import contextlib
import gc
import threading

# (generation-0 growth, generation-0 collections per generation-1, generation-1 per full): the
# same meaning as gc.set_threshold's. A generation-1 pass scans at most threshold0 * threshold1
# survivors: about 50 ms at (10_000, 10) on the 2-core VM (bench/README, "Live latency").
THRESHOLD = (10_000, 10, 20)

_state = {"threshold": THRESHOLD, "on": False}
_lock = threading.Lock()  # several workers of one process poll their sources in parallel


@contextlib.contextmanager
def paced(threshold: tuple[int, int, int] = THRESHOLD):
    """Automatic collection off while the block runs (restored after); :func:`between_batches`
    collects instead. Objects alive at the start are frozen: the flow's set-up is never
    rescanned."""
    was_enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    _state["threshold"], _state["on"] = threshold, True
    try:
        yield
    finally:
        _state["on"] = False
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def between_batches() -> int | None:
    """Collect the generation CPython would collect now, by its counts and the threshold; None
    when none is due (the common case: one call to gc.get_count). Returns the generation.

    >>> with paced((1, 1, 1)):
    ...     _ = [[] for _ in range(100)]  # containers kept: growth past threshold0
    ...     between_batches() is not None
    True
    """
    if not _state["on"]:
        return None
    t0, t1, t2 = _state["threshold"]
    c0, c1, c2 = gc.get_count()
    if c0 <= t0:
        return None
    with _lock:
        c0, c1, c2 = gc.get_count()
        if c0 <= t0:
            return None  # another worker just collected
        gen = 2 if c1 >= t1 and c2 >= t2 else 1 if c1 >= t1 else 0
        gc.collect(gen)
        return gen
