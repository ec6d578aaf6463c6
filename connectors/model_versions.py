"""The versions channel: the learners' published model versions, back to the profile shards.

A dataflow is a DAG, and the learners (one per model) sit downstream of the shards that score
with what they learn. So the versions make the loop through Redis: the learner step writes each
publication to one stream (``{prefix}:model_versions``, JSON, never pickle: whoever can write
to Redis must not run code here), and the flow reads it back as an input, in order, on one
worker, which sends each version to every profile shard.

Determinism does not depend on this channel's timing: a shard scores an event only with the
version its time needs, and holds it until that version arrives (models/runtime.py). So the
channel may be slow, repeat itself (a restored learner sends its last versions again) or hold
versions of a crashed run of the same input (the same versions, bit for bit); only versions of
*another* input would be wrong, and a fresh run (no recovery state) clears the stream before the
flow starts (:func:`clear`).

End of a bounded input: each learner writes an end marker once every shard has sent its final
mark; the source ends when it has read the markers of every model (or at a stop), and only then
can the profile shards reach their own end.
"""
from __future__ import annotations

import logging
import time

import orjson
import redis
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.redis_features import Backoff
from models.learner import Weights
from surgeflow.shutdown import STOP
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.models")
MAX_ENTRIES = 100_000  # the stream is trimmed (approximately) beyond this many publications
POLL_S = 0.01  # how often the reader looks for new versions when there were none
READ_COUNT = 1000


class End:
    """A learner's end marker: every shard has sent its final mark."""

    __slots__ = ("model",)

    def __init__(self, model: str):
        self.model = model

    def __eq__(self, other: object) -> bool:
        return isinstance(other, End) and other.model == self.model

    def __repr__(self) -> str:
        return f"End({self.model!r})"


def stream_key(prefix: str) -> str:
    return f"{prefix}:model_versions"


def encode(item: Weights | End) -> bytes:
    if isinstance(item, End):
        return orjson.dumps({"end": item.model})
    return orjson.dumps(item.to_json())


def decode(raw: bytes) -> Weights | End:
    doc = orjson.loads(raw)
    if "end" in doc:
        return End(doc["end"])
    return Weights.from_json(doc)


def clear(client: redis.Redis, prefix: str) -> None:
    """A fresh run: versions of an earlier run (of another input, perhaps) must not be read."""
    client.delete(stream_key(prefix))


class _SinkPartition(StatelessSinkPartition):
    def __init__(self, client: redis.Redis, prefix: str, max_backoff_s: float):
        self.client, self.key = client, stream_key(prefix)
        self.backoff = Backoff(0.05, max_backoff_s)

    def write_batch(self, items: list) -> None:
        while True:  # an outage waits: a lost version would hold the shards for ever
            try:
                pipe = self.client.pipeline(transaction=False)
                for item in items:
                    pipe.xadd(self.key, {"v": encode(item)}, maxlen=MAX_ENTRIES, approximate=True)
                pipe.execute()
                self.backoff.reset()
                STATS.add("model_versions_published", len(items))
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                delay = self.backoff.next()
                log.warning("versions channel: Redis unavailable (%s); again in %.1f s", exc, delay)
                time.sleep(delay)

    def close(self) -> None:
        self.client.close()


class ModelVersionsSink(DynamicSink):
    """Writes each publication (Weights) and end marker to the stream, in order."""

    def __init__(self, url: str, prefix: str, socket_timeout_s: float = 5.0,
                 max_backoff_s: float = 30.0):
        self.url, self.prefix = url, prefix
        self.socket_timeout_s, self.max_backoff_s = socket_timeout_s, max_backoff_s

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _SinkPartition:
        client = redis.Redis.from_url(self.url, socket_timeout=self.socket_timeout_s)
        return _SinkPartition(client, self.prefix, self.max_backoff_s)


class _SourcePartition(StatelessSourcePartition):
    def __init__(self, client: redis.Redis | None, prefix: str, models: frozenset[str]):
        self.client, self.key = client, stream_key(prefix)
        self.waiting_for = set(models)  # models whose end marker has not been read
        self.last_id = b"0"
        self.awake: float | None = None
        self.backoff = Backoff(0.05, 5.0)

    def next_batch(self) -> list:
        if self.client is None or not self.waiting_for or STOP.is_set():
            raise StopIteration()
        try:
            got = self.client.xread({self.key: self.last_id}, count=READ_COUNT)
            self.backoff.reset()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            delay = self.backoff.next()
            log.warning("versions channel: Redis unavailable (%s); again in %.1f s", exc, delay)
            self.awake = time.time() + delay
            return []
        out = []
        for _, entries in got:
            for entry_id, fields in entries:
                self.last_id = entry_id
                item = decode(fields[b"v"])
                if isinstance(item, End):
                    self.waiting_for.discard(item.model)
                else:
                    out.append(item)
        # nothing new: look again shortly (the shards may be holding events for a version)
        self.awake = None if out else time.time() + POLL_S
        return out

    def next_awake(self):
        if self.awake is None:
            return None
        from datetime import datetime, timezone

        return datetime.fromtimestamp(self.awake, tz=timezone.utc)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


class ModelVersionsSource(DynamicSource):
    """The stream, read in order on worker 0 from its start; every other worker's part ends at
    once. Ends once every model's end marker was read, or at a stop."""

    def __init__(self, url: str, prefix: str, models: frozenset[str],
                 socket_timeout_s: float = 5.0):
        self.url, self.prefix, self.models = url, prefix, frozenset(models)
        self.socket_timeout_s = socket_timeout_s

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _SourcePartition:
        client = None
        if worker_index == 0:
            client = redis.Redis.from_url(self.url, socket_timeout=self.socket_timeout_s)
        return _SourcePartition(client, self.prefix, self.models)
