"""Writes feature values to Redis: one round trip per batch, absolute values, TTL refreshed.

Writes are idempotent: a replay writes the same values again instead of adding to them. A write
sets the fields that changed since the user's previous write (all of them at times, see
FeaturePlan.delta); several writes of one user in a batch are merged into one. Hashes are
sparse: fields that became 0 or undefined are removed (HDEL). A key's time to live restarts when
its user was active; a write caused only by time passing keeps the running TTL (EXPIRE NX).

Outages: every call gives up after ``socket_timeout_s``. When Redis cannot be reached, times
out, is loading, is a read-only replica, is out of memory or cannot persist, ``write_batch``
sends the whole batch again with exponential backoff and jitter (up to
``retry_max_backoff_s``) for as long as it takes: the flow waits, nothing is dropped. Resending
is safe because every command sets an absolute value. Guarantee: each batch's final values are
in Redis exactly once as values (a retry rewrites the same bytes, ``updated_at`` included), in
batch order: a connection given up on is killed on the server (``CLIENT KILL ID .. ADDR ..``)
before the batch is sent again, so commands it still held (a hung server that wakes up) cannot
land after later batches. An outage is logged once when it starts and once when it ends.

An error reply that resending cannot fix (``WRONGTYPE``: something else wrote that key) concerns
its key only: it is counted (``redis_command_errors{<error>}``), logged at most once a minute
per error, and the rest of the batch stands.
"""
from __future__ import annotations

import logging
import random
import time
from itertools import chain, count

import orjson
import redis
from hiredis import pack_command
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from features.layout import alias_key, profile_key, registry_key
from privacy.secrets import redact
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.redis")

# Error replies that mean "not now" rather than "not this key": loading a dump, a read-only
# replica (failover), out of memory, persistence failing, cluster or master down, a busy script.
TRANSIENT_REPLIES = frozenset({"LOADING", "READONLY", "OOM", "MISCONF", "MASTERDOWN",
                               "TRYAGAIN", "CLUSTERDOWN", "BUSY", "NOREPLICAS"})
BACKOFF_INITIAL_S = 0.1
ERROR_LOG_EVERY_S = 60.0  # per-key errors: at most one log line per error code this often
REGISTRY_WAIT_S = 60.0  # at start-up, how long write_registry waits for Redis


class _TransientReply(Exception):
    """A batch got a "not now" reply for at least one command: send it all again."""


class Backoff:
    """Exponential backoff with full jitter in the upper half: each delay is drawn from
    [d/2, d], d doubling from ``initial_s`` up to ``max_s``, so retrying clients spread out.

    >>> b = Backoff(0.1, 0.4, random.Random(7))
    >>> d = [b.next() for _ in range(5)]
    >>> [0.05 <= d[0] <= 0.1, 0.1 <= d[1] <= 0.2, all(0.2 <= x <= 0.4 for x in d[2:])]
    [True, True, True]
    >>> b.reset(); 0.05 <= b.next() <= 0.1
    True
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None):
        self.initial_s, self.max_s = initial_s, max(max_s, initial_s)
        self.rng = rng or random.Random()
        self.current = initial_s

    def next(self) -> float:
        delay = self.rng.uniform(self.current / 2, self.current)
        self.current = min(self.current * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.current = self.initial_s


def describe_reply(exc: redis.ResponseError) -> str:
    """The error reply as Redis sent it, code first, shortened for a log line."""
    code, text = reply_code(exc), str(exc)
    return (text if text.startswith(code) else f"{code} {text}")[:200]


def reply_code(exc: redis.ResponseError) -> str:
    """The error code of an error reply: ``WRONGTYPE``, ``OOM``, ``ERR``...

    >>> reply_code(redis.ResponseError("WRONGTYPE Operation against a key"))
    'WRONGTYPE'
    >>> reply_code(redis.ResponseError("command not allowed", status_code="OOM"))
    'OOM'
    """
    code = getattr(exc, "status_code", None)
    if code:
        return code
    first = str(exc).split(" ", 1)[0]
    return first if first.isupper() else "ERR"


def _pool(url: str, socket_timeout_s: float) -> redis.ConnectionPool:
    # No retries inside redis-py: this module retries whole batches, with backoff and logging.
    return redis.ConnectionPool.from_url(url, socket_timeout=socket_timeout_s,
                                         socket_connect_timeout=socket_timeout_s,
                                         retry=Retry(NoBackoff(), 0))


def write_registry(url: str, prefix: str, registry_doc: dict, socket_timeout_s: float = 5.0,
                   retry_max_backoff_s: float = 30.0) -> None:
    """The registry next to the data, so a client in any language can type the values. Waits up
    to ``REGISTRY_WAIT_S`` for an unreachable Redis, then raises."""
    client = redis.Redis(connection_pool=_pool(url, socket_timeout_s))
    backoff = Backoff(BACKOFF_INITIAL_S, retry_max_backoff_s)
    deadline = time.monotonic() + REGISTRY_WAIT_S
    try:
        for attempt in count():
            try:
                client.set(registry_key(prefix), orjson.dumps(registry_doc))
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                if attempt == 0:
                    log.warning("Redis not ready for the registry (%s); waiting up to %.0f s",
                                redact(str(exc)), REGISTRY_WAIT_S)
                time.sleep(backoff.next())
    finally:
        client.close()


class _RedisPartition(StatelessSinkPartition):
    def __init__(self, url: str, prefix: str, ttl_s: int, socket_timeout_s: float = 5.0,
                 retry_max_backoff_s: float = 30.0):
        self.pool = _pool(url, socket_timeout_s)
        kw = self.pool.connection_kwargs
        self.where = redact(kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}")
        # One connection: the partition is single-threaded, and its server-side identity
        # (client id and address, learnt at connect) is what a retry kills.
        self.conn = self.pool.make_connection()
        self.conn.register_connect_callback(self._on_connect)
        self.ident: tuple[str, str] | None = None
        self.abandoned: list[tuple[str, str]] = []  # connections given up on, to kill
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.backoff = Backoff(BACKOFF_INITIAL_S, retry_max_backoff_s)
        self.down_since: float | None = None
        self.tries = 0
        self.error_log: dict[str, tuple[float, int]] = {}  # code -> (last logged, suppressed)

    def write_batch(self, items: list) -> None:
        # Coalesce per profile: the last values win; removals and TTL refreshes accumulate.
        pending: dict[tuple[str, bool], list] = {}  # (id, anonymous) -> [delete, values, removed, ttl]
        arrivals = []
        aliases = []
        for writes, links in items:
            aliases.extend(links)
            for w in writes:
                if w.arrival_ms:
                    arrivals.append(w.arrival_ms)
                who = (w.user, w.anonymous)
                if w.values is None:
                    pending[who] = [True, None, set(), False]
                    continue
                entry = pending.get(who)
                if entry is None:
                    pending[who] = [False, w.values, set(w.removed), w.refresh_ttl]
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
        for (user, anonymous), (delete, values, removed, refresh) in pending.items():
            key = profile_key(self.prefix, user, anonymous)
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
        for anon, user in aliases:  # user None: the link was erased
            commands.append(pack_command(("SET", alias_key(self.prefix, anon), user, "EX", ttl)
                                         if user is not None else ("DEL", alias_key(self.prefix, anon))))
        self._send_until_done(commands)
        STATS.observe_since("feature_latency_ms", arrivals)
        STATS.add("feature_writes", len(pending))
        STATS.mark_users(u for (u, _), e in pending.items() if e[1] is not None)

    # -- sending, and waiting out outages ------------------------------------------------------
    def _send_until_done(self, commands: list[bytes]) -> None:
        """Sends the batch until Redis has taken it: the flow waits (backpressure) meanwhile."""
        fresh = True
        while True:
            try:
                errors = self._send(commands)
            except (redis.ConnectionError, redis.TimeoutError, _TransientReply) as exc:
                if fresh and type(exc) is redis.ConnectionError and self.down_since is None:
                    # A connection idle while the server restarted is found closed at its
                    # next use: one immediate reconnect tells that apart from an outage.
                    fresh = False
                    continue
                self._failed(exc)
                time.sleep(self.backoff.next())
                continue
            self._recovered()
            for exc in errors:
                self._command_error(exc)
            return

    def _send(self, commands: list[bytes]) -> list[redis.ResponseError]:
        """One round trip for the whole batch: the commands are packed by hiredis (C) and sent
        raw on one connection, which costs a fraction of redis-py's per-command pipeline.
        Returns the error replies that concern single keys; raises when the batch must be
        sent again."""
        conn = self.conn
        kills = [pack_command(("CLIENT", "KILL", "ID", cid, "ADDR", addr, "SKIPME", "yes"))
                 for cid, addr in self.abandoned]
        try:
            # One sendall. A given-up connection is killed first: whatever it still held
            # (a hung server that wakes up) must not run after this batch.
            conn.send_packed_command([b"".join(kills + commands)], check_health=False)
            errors, transient = [], None
            for _ in range(len(kills) + len(commands)):
                try:
                    conn.read_response()
                except redis.ResponseError as exc:  # read the rest: the connection stays usable
                    if reply_code(exc) in TRANSIENT_REPLIES:
                        transient = exc
                    else:
                        errors.append(exc)
        except (redis.ConnectionError, redis.TimeoutError):
            if self.ident is not None:
                self.abandoned.append(self.ident)
            self.ident = None
            conn.disconnect()
            raise
        if transient is not None:
            raise _TransientReply(describe_reply(transient))
        self.abandoned.clear()
        return errors

    def _on_connect(self, conn) -> None:
        """Learns this connection's id and address as the server sees them (CLIENT INFO)."""
        self.ident = None
        conn.send_command("CLIENT", "INFO", check_health=False)
        try:
            info = conn.read_response()
        except redis.ResponseError:  # CLIENT INFO not allowed for this user: no kill then
            return
        fields = dict(f.split("=", 1) for f in info.decode().split() if "=" in f)
        if "id" in fields and "addr" in fields:
            self.ident = (fields["id"], fields["addr"])

    def _failed(self, exc: Exception) -> None:
        self.tries += 1
        STATS.add("redis_retries")
        if self.down_since is None:
            self.down_since = time.monotonic()
        # marked at every failure: another worker's recovery may have cleared it meanwhile
        detail = f"{type(exc).__name__}: {str(exc)[:200]}"
        if STATS.outage("redis", detail, member=str(id(self))):
            log.warning("Redis %s unavailable (%s); the flow waits, retrying with backoff",
                        self.where, detail)

    def _recovered(self) -> None:
        self.backoff.reset()
        if self.down_since is None:
            return
        if STATS.outage("redis", None, member=str(id(self))):
            log.warning("Redis %s is back after %.1f s (%d tries failed)", self.where,
                        time.monotonic() - self.down_since, self.tries)
        self.down_since, self.tries = None, 0

    def _command_error(self, exc: redis.ResponseError) -> None:
        code = reply_code(exc)
        STATS.add_labeled("redis_command_errors", code)
        now = time.monotonic()
        last, suppressed = self.error_log.get(code, (None, 0))
        if last is not None and now - last < ERROR_LOG_EVERY_S:
            self.error_log[code] = (last, suppressed + 1)
            return
        self.error_log[code] = (now, 0)
        log.error("Redis %s refused a write (%s); that key is skipped, the flow goes on%s",
                  self.where, describe_reply(exc),
                  f" ({suppressed} more since the last report)" if suppressed else "")

    def close(self) -> None:
        self.conn.disconnect()
        self.pool.disconnect()


class RedisFeatureSink(DynamicSink):
    def __init__(self, url: str, prefix: str, ttl_s: int, socket_timeout_s: float = 5.0,
                 retry_max_backoff_s: float = 30.0):
        self.url, self.prefix, self.ttl_s = url, prefix, ttl_s
        self.socket_timeout_s, self.retry_max_backoff_s = socket_timeout_s, retry_max_backoff_s

    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _RedisPartition(self.url, self.prefix, self.ttl_s, self.socket_timeout_s,
                               self.retry_max_backoff_s)
