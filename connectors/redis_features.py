"""Writes feature values to Redis: one pipeline per batch, absolute values (HSET), TTL refreshed.

Writes are idempotent: a replay writes the same values again instead of adding to them.
"""
from __future__ import annotations

import time
from itertools import chain

import redis
from hiredis import pack_command
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from features.layout import user_key
from surgeflow.stats import STATS


class _RedisPartition(StatelessSinkPartition):
    def __init__(self, url: str, prefix: str, ttl_s: int):
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.ttl_s = ttl_s

    def write_batch(self, items: list) -> None:
        # Coalesce: when a user appears in several shard outputs of one batch, the last wins.
        latest: dict[str, dict[str, str]] = {}
        arrivals = []
        for batch in items:
            for user, values, arrival_ms in batch:
                latest[user] = values
                if arrival_ms:
                    arrivals.append(arrival_ms)
        if not latest:
            return
        now_ms = str(int(time.time() * 1000))
        commands = []
        for user, values in latest.items():
            key = user_key(self.prefix, user)
            commands.append(pack_command(
                ("HSET", key, *chain.from_iterable(values.items()), "updated_at", now_ms)))
            commands.append(pack_command(("EXPIRE", key, self.ttl_s)))
        self._send(commands)
        STATS.observe_since("feature_latency_ms", arrivals)
        STATS.add("feature_writes", len(latest))
        STATS.mark_users(latest.keys())

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
