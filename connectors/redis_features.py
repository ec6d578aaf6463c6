"""Writes feature values to Redis: one round trip per batch, absolute values, TTL refreshed.

Writes are idempotent: a replay writes the same values again instead of adding to them. A write
sets the fields that changed since the user's previous write (all of them at times, see
FeaturePlan.delta); several writes of one user in a batch are merged into one. Hashes are
sparse: fields that became 0 or undefined are removed (HDEL). A key's time to live restarts when
its user was active; a write caused only by time passing keeps the running TTL (EXPIRE NX).
"""
from __future__ import annotations

import time
from itertools import chain

import orjson
import redis
from hiredis import pack_command
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from features.layout import alias_key, registry_key, user_key
from surgeflow.stats import STATS


def write_registry(url: str, prefix: str, registry_doc: dict) -> None:
    """The registry next to the data, so a client in any language can type the values."""
    client = redis.Redis.from_url(url)
    try:
        client.set(registry_key(prefix), orjson.dumps(registry_doc))
    finally:
        client.close()


class _RedisPartition(StatelessSinkPartition):
    def __init__(self, url: str, prefix: str, ttl_s: int):
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.ttl_s = ttl_s

    def write_batch(self, items: list) -> None:
        # Coalesce per user: the last values win; removals and TTL refreshes accumulate.
        pending: dict[str, list] = {}  # user -> [delete first, values, removed, refresh ttl]
        arrivals = []
        aliases = []
        for writes, links in items:
            aliases.extend(links)
            for w in writes:
                if w.arrival_ms:
                    arrivals.append(w.arrival_ms)
                if w.values is None:
                    pending[w.user] = [True, None, set(), False]
                    continue
                entry = pending.get(w.user)
                if entry is None:
                    pending[w.user] = [False, w.values, set(w.removed), w.refresh_ttl]
                elif entry[1] is None:  # deleted earlier in the batch
                    entry[1], entry[2], entry[3] = w.values, set(w.removed), True
                else:  # a write holds the fields that changed: later ones win field by field
                    entry[1] = {**entry[1], **w.values}  # (a copy: the Write's dict is not ours)
                    for f in w.removed:
                        entry[1].pop(f, None)
                    entry[2] = (entry[2] - w.values.keys()) | set(w.removed)
                    entry[3] = entry[3] or w.refresh_ttl
        if not pending and not aliases:
            return
        now_ms = str(int(time.time() * 1000))
        ttl = self.ttl_s
        commands = []
        for user, (delete, values, removed, refresh) in pending.items():
            key = user_key(self.prefix, user)
            if delete:
                commands.append(pack_command(("DEL", key)))
            if values is None:
                continue
            commands.append(pack_command(
                ("HSET", key, *chain.from_iterable(values.items()), "updated_at", now_ms)))
            if removed:
                commands.append(pack_command(("HDEL", key, *sorted(removed))))
            commands.append(pack_command(("EXPIRE", key, ttl) if refresh or delete
                                         else ("EXPIRE", key, ttl, "NX")))
        for anon, user in aliases:
            commands.append(pack_command(("SET", alias_key(self.prefix, anon), user, "EX", ttl)))
        self._send(commands)
        STATS.observe_since("feature_latency_ms", arrivals)
        STATS.add("feature_writes", len(pending))
        STATS.mark_users(u for u, e in pending.items() if e[1] is not None)

    def _send(self, commands: list[bytes]) -> None:
        """One round trip for the whole batch: the commands are packed by hiredis (C) and sent
        raw on one connection, which costs a fraction of redis-py's per-command pipeline."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(commands)], check_health=False)  # one sendall
            errors = []
            for _ in commands:
                try:
                    conn.read_response()
                except redis.ResponseError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def close(self) -> None:
        self.client.close()


class RedisFeatureSink(DynamicSink):
    def __init__(self, url: str, prefix: str, ttl_s: int):
        self.url, self.prefix, self.ttl_s = url, prefix, ttl_s

    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _RedisPartition(self.url, self.prefix, self.ttl_s)
