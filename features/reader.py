"""Read a user's features from Redis, typed by the feature registry.

Any Redis client can read the hashes directly (layout in :mod:`features.layout`); this is the
convenience for Python services and the HTTP API (:mod:`features.http`).

    reader = FeatureReader(redis.Redis.from_url(url, protocol=2), prefix="sf")
    reader.get("u00042")   # {'views_1h': 3, 'revenue_24h': 129.9, ..., 'stale': False, ...} or None
    reader.get("d-9f2c", anonymous=True)   # a visitor's device id: its profile, or its user's

A lookup names the kind of id it holds, and each kind has its own namespace (layout v2). By user
id (the default) only that user's hash ``<prefix>:v2:user:<id>`` is read. By anonymous id
(``anonymous=True``) the visitor's own hash ``<prefix>:v2:anon:<id>`` is read (a visitor not merged
yet), else the alias ``<prefix>:v2:alias:<id>`` is followed once to the user it was merged into. The ids in
tracking events are not authenticated: anyone can send ``{"user_id": "attacker",
"anonymous_id": "u00042"}`` and so write ``alias:u00042 -> attacker``. A user-id lookup that fell
back on aliases would then answer the attacker's features for ``u00042`` whenever that user's own
hash is missing (consent withdrawn, expired, not written yet); so it never follows one, and only a
caller holding an anonymous id, who asks for the profile that id was merged into, does.

Any client works; a RESP2 client (``protocol=2``) is faster for batches: hiredis builds RESP3 maps
(redis-py 8's default) at about twice the cost of RESP2's flat lists.

A result holds every registry feature (sparse counts / sums absent from the hash read as 0 / 0.0,
other absent features as None), unknown hash fields as raw strings (e.g. written under an older
registry), and ``as_of`` (event time of the values, epoch ms), ``updated_at`` (wall-clock time of
the write, epoch ms), ``stale``, ``user_id`` (whose hash was read) and ``alias_of`` (the anonymous
id asked for when its alias was followed, else None).

``stale`` is True when ``now - updated_at > max_age_s`` (or ``updated_at`` is missing): the hash
was not rewritten for ``max_age_s``, so it is stale from ``updated_at + max_age_s * 1000`` ms on.
The flow rewrites a user when one of their values changes (events, windows expiring), so an idle
user's hash can be stale while correct; a stale active user means the flow lags or stopped.

The lookup logic is written once, without I/O (:meth:`_Reader._lookup` yields command batches);
:class:`FeatureReader` runs it on a sync client, :class:`AsyncFeatureReader` on ``redis.asyncio``.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Iterable
from operator import call
from typing import Any

import hiredis
from hiredis import pack_command
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.registry import Feature, Registry, load_registry
from features.layout import alias_key, anon_key, is_valid_id, registry_key, user_key

META_FIELDS = ("as_of", "updated_at")  # written by the flow beside the features
RESULT_FIELDS = ("as_of", "updated_at", "stale", "user_id", "alias_of")  # added by the reader
READ_SIZE = 1 << 16


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def _pairs(raw: dict | list):
    if isinstance(raw, dict):
        return raw.items()
    it = iter(raw)
    return zip(it, it)


# Feature.type -> parser of the stored text (int() and float() take bytes as well).
PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": int, "money": float, "ratio": float, "score": float, "time_ms": int, "flag": int,
    "label": _text, "text": _text,
}


def default_value(feature: Feature) -> Any:
    """What an absent field means: 0 for sparse counts / sums, else None (unknown).

    >>> reg = load_registry()
    >>> default_value(reg.feature("views_1h")), default_value(reg.feature("revenue_30d")), default_value(reg.feature("last_seen"))
    (0, 0.0, None)
    """
    if feature.sparse:
        return 0.0 if feature.type == "money" else 0
    return None


def parse_value(feature: Feature, raw: bytes | str | None) -> Any:
    """Typed value of a stored field; a value the type cannot parse is returned as raw text
    (a reader must not fail a whole batch on one field written by another registry version).

    >>> reg = load_registry()
    >>> [parse_value(reg.feature(n), v) for n, v in [("views_1h", "3"), ("revenue_24h", b"129.90"),
    ...   ("aov_30d", "0.2500"), ("last_seen", "1795392000000"), ("rfm_tier", b"important-value"),
    ...   ("checkout_pending", "1"), ("p_purchase_24h", "0.123456")]]
    [3, 129.9, 0.25, 1795392000000, 'important-value', 1, 0.123456]
    >>> parse_value(reg.feature("views_1h"), None), parse_value(reg.feature("views_1h"), "n/a")
    (0, 'n/a')
    """
    if raw is None:
        return default_value(feature)
    try:
        return PARSERS[feature.type](raw)
    except ValueError:
        return _text(raw)


Plan = Generator[list[tuple], list, dict[str, dict | None]]


class _Reader:
    """Shared by the sync and async readers: the registry-typed decoding and the lookup plan."""

    def __init__(self, client, prefix: str = "sf", registry: Registry | None = None,
                 max_age_s: float = 60.0):
        self.client = client
        self.prefix = prefix
        self.registry = registry if registry is not None else load_registry()
        self.max_age_ms = max_age_s * 1000
        clash = set(RESULT_FIELDS) & set(self.registry.names)
        if clash:
            raise ValueError(f"feature names clash with reader fields: {sorted(clash)}")
        self._defaults = {f.name: default_value(f) for f in self.registry.features}
        self._defaults.update(dict.fromkeys(RESULT_FIELDS))
        # stored field (bytes; str on the fallback path of decoding clients) -> name / parser
        typed = [(f.name, PARSERS[f.type]) for f in self.registry.features]
        typed += [(m, int) for m in META_FIELDS]
        self._names = {k: n for n, _ in typed for k in (n, n.encode())}
        self._parsers = {k: p for n, p in typed for k in (n, n.encode())}
        self._fast = {n.encode(): bytes.decode if p is _text else p for n, p in typed}

    def typed(self, raw: dict | list, user_id: str, alias_of: str | None = None,
              now_ms: float | None = None) -> dict:
        """A hash as read from Redis (RESP2's flat list, or a RESP3 map) -> the typed result."""
        out = self._defaults.copy()
        try:  # common case, C-level iteration only: bytes fields, all known, well formed
            fields, values = (raw, raw.values()) if isinstance(raw, dict) else (raw[0::2], raw[1::2])
            out.update(zip(map(self._names.__getitem__, fields),
                           map(call, map(self._fast.__getitem__, fields), values)))
        except (KeyError, ValueError, TypeError):  # unknown fields and bad values stay text
            names, parsers = self._names, self._parsers
            for k, v in _pairs(raw):
                try:
                    out[names[k]] = parsers[k](v)
                except KeyError:
                    out[_text(k)] = _text(v)
                except ValueError:
                    out[names[k]] = _text(v)
        updated = out["updated_at"]
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        out["stale"] = not isinstance(updated, int) or now_ms - updated > self.max_age_ms
        out["user_id"] = user_id
        out["alias_of"] = alias_of
        return out

    def _lookup(self, ids: Iterable[str], anonymous: bool = False) -> Plan:
        """Yields command batches (one round trip each), receives their replies, returns the
        results: the hashes; then, for anonymous ids only and only those without a hash, their
        aliases; then the aliases' targets.

        >>> reader = _Reader(None, "sf")
        >>> plan = reader._lookup(["u1"])  # by user id
        >>> next(plan)
        [('HGETALL', 'sf:v2:user:u1')]
        >>> plan.send([[]])  # no hash: the answer, with no alias lookup
        Traceback (most recent call last):
        StopIteration: {'u1': None}
        >>> plan = reader._lookup(["d1"], anonymous=True)
        >>> next(plan)
        [('HGETALL', 'sf:v2:anon:d1')]
        >>> plan.send([[]])  # no hash of its own: its alias
        [('GET', 'sf:v2:alias:d1')]
        >>> plan.send([b"u1"])  # then the user it names, whose hash is the answer
        [('HGETALL', 'sf:v2:user:u1')]
        """
        out: dict[str, dict | None] = dict.fromkeys(ids)
        valid = [u for u in out if is_valid_id(u)]
        if not valid:
            return out
        own = anon_key if anonymous else user_key  # separate namespaces (features.layout)
        replies = yield [("HGETALL", own(self.prefix, u)) for u in valid]
        now_ms = time.time() * 1000
        missing = []
        for u, raw in zip(valid, replies):
            if raw:
                out[u] = self.typed(raw, u, now_ms=now_ms)
            else:
                missing.append(u)
        if not (anonymous and missing):  # a user id never reaches an alias (module docstring)
            return out
        targets = yield [("GET", alias_key(self.prefix, u)) for u in missing]
        merged = [(u, _text(t)) for u, t in zip(missing, targets) if t]
        if not merged:
            return out
        replies = yield [("HGETALL", user_key(self.prefix, t)) for _, t in merged]
        for (u, target), raw in zip(merged, replies):
            if raw:  # an alias is followed once: the target is a user, never another alias
                out[u] = self.typed(raw, target, alias_of=u, now_ms=now_ms)
        return out


class FeatureReader(_Reader):
    """Sync reader on a ``redis.Redis`` client (bytes or decoded responses)."""

    def get(self, user_id: str, *, anonymous: bool = False) -> dict | None:
        """Typed features of a user id, or None when it has no hash. With ``anonymous=True`` the
        id is an anonymous id: its own hash, else the user its alias names (followed once)."""
        return self._run(self._lookup((user_id,), anonymous))[user_id]

    def get_many(self, user_ids: Iterable[str], *, anonymous: bool = False) -> dict[str, dict | None]:
        """Typed features per id (None when unknown), ids read as :meth:`get` does: one pipeline
        round trip for the hashes; with ``anonymous=True``, one more for the aliases of the ids
        without a hash (only when there are some) and one for the alias targets."""
        return self._run(self._lookup(user_ids, anonymous))

    def stored_registry(self) -> bytes | None:
        """The registry JSON written by the flow, or None before its first start."""
        return self.client.get(registry_key(self.prefix))

    def _run(self, plan: Plan) -> dict[str, dict | None]:
        try:
            commands = next(plan)
            while True:
                commands = plan.send(self._execute(commands))
        except StopIteration as done:
            return done.value

    def _execute(self, commands: list[tuple]) -> list:
        packed = b"".join(map(pack_command, commands))
        pool = self.client.connection_pool
        for attempt in (1, 2):  # reads are idempotent: once more on a fresh connection
            conn = pool.get_connection()
            try:
                replies = _exchange(conn, packed, len(commands))
                break
            except (RedisConnectionError, RedisTimeoutError):
                conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread on it
                raise
            finally:
                pool.release(conn)
        return _raise_errors(replies)


class AsyncFeatureReader(_Reader):
    """The same reader on a ``redis.asyncio.Redis`` client."""

    async def get(self, user_id: str, *, anonymous: bool = False) -> dict | None:
        return (await self._run(self._lookup((user_id,), anonymous)))[user_id]

    async def get_many(self, user_ids: Iterable[str], *,
                       anonymous: bool = False) -> dict[str, dict | None]:
        return await self._run(self._lookup(user_ids, anonymous))

    async def stored_registry(self) -> bytes | None:
        return await self.client.get(registry_key(self.prefix))

    async def _run(self, plan: Plan) -> dict[str, dict | None]:
        try:
            commands = next(plan)
            while True:
                commands = plan.send(await self._execute(commands))
        except StopIteration as done:
            return done.value

    async def _execute(self, commands: list[tuple]) -> list:
        packed = b"".join(map(pack_command, commands))
        pool = self.client.connection_pool
        for attempt in (1, 2):
            conn = await pool.get_connection()
            try:
                replies = await _aexchange(conn, packed, len(commands))
                break
            except (RedisConnectionError, RedisTimeoutError):
                await conn.disconnect(nowait=True)
                if attempt == 2:
                    raise
            except BaseException:  # cancelled (client went away) with replies unread
                await conn.disconnect(nowait=True)
                raise
            finally:
                await pool.release(conn)
        return _raise_errors(replies)


# -- raw round trips ------------------------------------------------------------------------
# One packed write and a fresh hiredis reader per batch: redis-py's pipeline and its per-reply
# read_response cost ~5 ms for 100 HGETALLs on the development VM, this about 1.3 ms. The
# connection (pooling, AUTH, SELECT, TLS) is still redis-py's; without its socket / streams
# (another redis-py version) the public, slower read_response path is used.

_PUSH = getattr(hiredis, "PushNotification", ())  # RESP3 out-of-band messages: not replies


def _replies(reader: hiredis.Reader, out: list, data: bytes) -> None:
    if not data:
        raise RedisConnectionError("Redis closed the connection")
    reader.feed(data)
    while (reply := reader.gets()) is not False:
        if not isinstance(reply, _PUSH):
            out.append(reply)


def _exchange(conn, packed: bytes, n: int) -> list:
    sock = getattr(conn, "_sock", None)
    if sock is None:
        conn.send_packed_command([packed])
        return [_reply_or_error(conn.read_response) for _ in range(n)]
    try:
        sock.sendall(packed)
        reader, out = hiredis.Reader(replyError=ResponseError), []
        while len(out) < n:
            _replies(reader, out, sock.recv(READ_SIZE))
        return out
    except TimeoutError as exc:  # socket.timeout
        raise RedisTimeoutError(f"Redis read timed out: {exc}") from exc
    except OSError as exc:
        raise RedisConnectionError(f"Redis connection failed: {exc}") from exc


async def _aexchange(conn, packed: bytes, n: int) -> list:
    stream, writer = getattr(conn, "_reader", None), getattr(conn, "_writer", None)
    if stream is None or writer is None:
        await conn.send_packed_command([packed])
        return [await _areply_or_error(conn.read_response) for _ in range(n)]
    try:
        async with asyncio.timeout(conn.socket_timeout):
            writer.write(packed)
            await writer.drain()
            reader, out = hiredis.Reader(replyError=ResponseError), []
            while len(out) < n:
                _replies(reader, out, await stream.read(READ_SIZE))
            return out
    except TimeoutError as exc:  # asyncio.timeout
        raise RedisTimeoutError("Redis read timed out") from exc
    except OSError as exc:
        raise RedisConnectionError(f"Redis connection failed: {exc}") from exc


def _reply_or_error(read: Callable):
    try:
        return read()
    except ResponseError as exc:
        return exc


async def _areply_or_error(read: Callable):
    try:
        return await read()
    except ResponseError as exc:
        return exc


def _raise_errors(replies: list) -> list:
    """All replies were read (the connection stays usable); then the first error is raised."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies
