"""Where this process sits in a Bytewax cluster, and the two placements that depend on it.

`surgeflow run --processes N` (or `--addresses ... --process-id I` across machines) runs the same
dataflow in N processes of W worker threads (`bytewax.run.cluster_main`). Keyed steps are spread
over all N*W workers by Bytewax; Kafka partitions are the unit of parallelism of the input.

Two resources belong to one process only:

- the embedded ClickHouse (chDB opens one data directory in one process) and the JSON-lines
  output files: their sinks become :class:`OwnerSink`, a one-partition sink that only process 0
  lists, so Bytewax routes every item to a worker of process 0 (a ClickHouse server needs none
  of this: every worker writes its own share);
- the erasure step, which deletes from ClickHouse: its single key is chosen with
  :func:`pinned_key` so that Bytewax's key routing lands it on a worker of process 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from bytewax.outputs import DynamicSink, FixedPartitionedSink, StatefulSinkPartition


@dataclass(frozen=True)
class Place:
    """This process in the cluster: its index, how many processes, worker threads in each."""

    process_id: int = 0
    processes: int = 1
    workers_per_process: int = 1

    @property
    def workers(self) -> int:
        return self.processes * self.workers_per_process

    @property
    def owner_workers(self) -> range:
        """Worker indexes of process 0 (Bytewax numbers the workers process by process)."""
        return range(self.workers_per_process)


PLACE = Place()


def set_place(place: Place) -> None:
    global PLACE
    PLACE = place


_MASK = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def siphash13(data: bytes, k0: int = 0, k1: int = 0) -> int:
    """SipHash-1-3 (one compression round, three finalisation rounds), as Rust's DefaultHasher.

    >>> hex(siphash13(b""))
    '0xd1fba762150c532c'
    """
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def rnd():
        nonlocal v0, v1, v2, v3
        v0 = (v0 + v1) & _MASK; v1 = _rotl(v1, 13); v1 ^= v0; v0 = _rotl(v0, 32)  # noqa: E702
        v2 = (v2 + v3) & _MASK; v3 = _rotl(v3, 16); v3 ^= v2  # noqa: E702
        v0 = (v0 + v3) & _MASK; v3 = _rotl(v3, 21); v3 ^= v0  # noqa: E702
        v2 = (v2 + v1) & _MASK; v1 = _rotl(v1, 17); v1 ^= v2; v2 = _rotl(v2, 32)  # noqa: E702

    n = len(data)
    end = n - n % 8
    for i in range(0, end, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        rnd()
        v0 ^= m
    last = ((n & 0xFF) << 56) | int.from_bytes(data[end:], "little")
    v3 ^= last
    rnd()
    v0 ^= last
    v2 ^= 0xFF
    rnd(); rnd(); rnd()  # noqa: E702
    return v0 ^ v1 ^ v2 ^ v3


def worker_of(key: str, workers: int) -> int:
    """The worker Bytewax 0.21 routes a stateful step's key to: the key is a Rust String hashed
    by DefaultHasher (its bytes, then 0xFF), modulo the worker count.

    >>> worker_of("all", 1)
    0
    """
    return siphash13(key.encode() + b"\xff") % workers


def pinned_key(base: str, place: Place | None = None) -> str:
    """``base``, or ``base-<n>`` for the smallest n, whose worker is one of process 0's.

    >>> pinned_key("all", Place(0, 1, 4))
    'all'
    >>> p = Place(0, 4, 1)
    >>> worker_of(pinned_key("all", p), p.workers)
    0
    """
    place = place or PLACE
    if place.processes == 1:
        return base
    key, n = base, 0
    while worker_of(key, place.workers) not in place.owner_workers:
        n += 1
        key = f"{base}-{n}"
    return key


class _OwnedPartition(StatefulSinkPartition):
    def __init__(self, inner):
        self.inner = inner

    def write_batch(self, items: list) -> None:
        self.inner.write_batch(items)

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self.inner.close()


class OwnerSink(FixedPartitionedSink):
    """A sink whose writes all happen in process 0 (see the module text). It wraps an ordinary
    per-worker sink, built once there as worker 0 of 1; items are ``(any key, item)`` pairs."""

    def __init__(self, inner: DynamicSink):
        self.inner = inner

    def list_parts(self) -> list[str]:
        return ["owner"] if PLACE.process_id == 0 else []

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state) -> _OwnedPartition:
        return _OwnedPartition(self.inner.build(step_id, 0, 1))
