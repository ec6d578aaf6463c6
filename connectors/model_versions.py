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


def _failed(part, exc: Exception) -> float:
    """A failed read or write of the channel: the delay before the next try. One log line when
    Redis goes down and one when it is back, shared with the feature sinks (STATS.outage)."""
    if part.down_since is None:
        part.down_since = time.monotonic()
    detail = f"{type(exc).__name__}: {str(exc)[:200]}"
    if STATS.outage("redis", detail, member=str(id(part))):
        log.warning("Redis unavailable for the models' versions channel (%s); retrying with "
                    "backoff", detail)
    return part.backoff.next()


def _recovered(part) -> None:
    part.backoff.reset()
    if part.down_since is None:
        return
    if STATS.outage("redis", None, member=str(id(part))):
        log.warning("Redis is back after %.1f s (the models' versions channel)",
                    time.monotonic() - part.down_since)
    part.down_since = None


class _SinkPartition(StatelessSinkPartition):
    def __init__(self, client: redis.Redis, prefix: str, max_backoff_s: float):
        self.client, self.key = client, stream_key(prefix)
        self.backoff = Backoff(0.05, max_backoff_s)
        self.down_since: float | None = None

    def write_batch(self, items: list) -> None:
        while True:  # an outage waits: a lost version would hold the shards for ever
            try:
                pipe = self.client.pipeline(transaction=False)
                for item in items:
                    pipe.xadd(self.key, {"v": encode(item)}, maxlen=MAX_ENTRIES, approximate=True)
                pipe.execute()
                _recovered(self)
                STATS.add("model_versions_published", len(items))
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                time.sleep(_failed(self, exc))

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
        self.down_since: float | None = None

    def next_batch(self) -> list:
        if self.client is None or not self.waiting_for or STOP.is_set():
            raise StopIteration()
        try:
            got = self.client.xread({self.key: self.last_id}, count=READ_COUNT)
            _recovered(self)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            self.awake = time.time() + _failed(self, exc)
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
