"""Who may read the HTTP surfaces (the feature API, the dashboard): bearer tokens with scopes,
request-size and rate limits, loopback-only without a token.

Tokens come from ``SURGEFLOW_API_TOKENS`` (``"token:scope,scope;token2:scope"``) and / or
``access.tokens_file`` (one ``token scope,scope`` per line, ``#`` comments). Only their SHA-256
digests are kept, and no log line or error message holds a token (a malformed entry is named by
its position).

>>> tokens = load_tokens(AccessSettings(), env={
...     "SURGEFLOW_API_TOKENS": "reader-0123456789abcdefgh:features:read; admin-0123456789abcdefghi:*"})
>>> len(tokens), tokens.lookup(b"reader-0123456789abcdefgh").allows("features:read")
(2, True)
>>> tokens.lookup(b"reader-0123456789abcdefgh").allows("erasure:write"), tokens.lookup(b"guess")
(False, None)
>>> tokens.lookup(b"admin-0123456789abcdefghi").name
'token:bf71178f'
>>> load_tokens(AccessSettings(), env={"SURGEFLOW_API_TOKENS": "s3cret-but-too-short:features:read"})
Traceback (most recent call last):
...
privacy.access.AccessError: SURGEFLOW_API_TOKENS entry 1: a token needs at least 24 characters
>>> check_bind("0.0.0.0", Tokens())  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
privacy.access.AccessError: refusing to serve the HTTP surface on 0.0.0.0 without an access token: ...
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import time
from base64 import b64decode
from binascii import Error as Base64Error
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from config.settings import AccessSettings

log = logging.getLogger("surgeflow.access")

FEATURES_READ, REGISTRY_READ, DASHBOARD_READ, ERASURE_WRITE = (
    "features:read", "registry:read", "dashboard:read", "erasure:write")
SCOPES = frozenset({FEATURES_READ, REGISTRY_READ, DASHBOARD_READ, ERASURE_WRITE, "*"})
MIN_TOKEN_CHARS = 24  # ~140 bits of base64: not worth guessing online, even unthrottled
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token: no ':', ';', ',' or spaces
ACCESS = "surgeflow.access"  # the ASGI scope key of the request's Grant (see charge)
JSON_HEADERS = [(b"content-type", b"application/json")]
CLOSE = (b"connection", b"close")  # after a body left unread, the connection cannot go on
TOO_LARGE = "request body too large"
LINGER_BYTES, LINGER_S = 1 << 20, 1.0  # read and dropped before refusing a body (see Guard._refuse)


class AccessError(ValueError):
    """Bad token configuration, or an unsafe bind. The message never contains a token."""


@dataclass(frozen=True, slots=True)
class Principal:
    digest: bytes  # SHA-256 of the token
    scopes: frozenset[str]

    @property
    def name(self) -> str:
        """How logs and audit records name the caller: never the token itself."""
        return "token:" + self.digest.hex()[:8]

    def allows(self, scope: str | None) -> bool:
        return scope is None or scope in self.scopes or "*" in self.scopes


class Tokens:
    """The configured tokens, by digest. Empty (false) when none is configured."""

    def __init__(self, principals: Iterable[Principal] = ()):
        self._by_digest = {p.digest: p for p in principals}

    @classmethod
    def of(cls, mapping: Mapping[str, Iterable[str]]) -> Tokens:
        """From ``{token: scopes}`` (tests, embedding), validated like configured tokens."""
        return cls(_principal(t, s if isinstance(s, str) else ",".join(s), f"token {i}")
                   for i, (t, s) in enumerate(mapping.items(), 1))

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: bytes | None) -> Principal | None:
        """The principal of a presented token, else None. Hashing first makes the dict lookup
        independent of how much of the token matches; compare_digest confirms without a
        timing signal of its own. An absent token is hashed too, so it costs the same."""
        digest = hashlib.sha256(token or b"").digest()
        found = self._by_digest.get(digest)
        return found if found is not None and hmac.compare_digest(found.digest, digest) else None


def _principal(token: str, scopes: str, where: str) -> Principal:
    if len(token) < MIN_TOKEN_CHARS:
        raise AccessError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters")
    if not _TOKEN.fullmatch(token):
        raise AccessError(f"{where}: a token may only hold letters, digits and -._~+/ (then =)")
    names = [s.strip() for s in scopes.split(",") if s.strip()]
    if not names:
        raise AccessError(f"{where}: no scope (one or more of {', '.join(sorted(SCOPES))})")
    if not SCOPES.issuperset(names):  # not named: a token put in the wrong place would show
        raise AccessError(f"{where}: unknown scope (known: {', '.join(sorted(SCOPES))})")
    return Principal(hashlib.sha256(token.encode()).digest(), frozenset(names))


def load_tokens(access: AccessSettings, env: Mapping[str, str] | None = None) -> Tokens:
    """The tokens of ``access.tokens_env`` and ``access.tokens_file``; AccessError names the
    entry or line of a malformed one (never the token)."""
    env = os.environ if env is None else env
    found: list[tuple[Principal, str]] = []
    for i, entry in enumerate((env.get(access.tokens_env) or "").split(";"), 1):
        if entry.strip():
            token, sep, scopes = entry.strip().partition(":")
            where = f"{access.tokens_env} entry {i}"
            if not sep:
                raise AccessError(f"{where}: expected token:scope,scope")
            found.append((_principal(token, scopes, where), where))
    if access.tokens_file is not None:
        path = Path(access.tokens_file)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise AccessError(f"access.tokens_file {path}: cannot read it "
                              f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        if mode & 0o077:
            log.warning("access.tokens_file %s is readable by other users (chmod 600 it)", path)
        for n, line in enumerate(text.splitlines(), 1):
            line = line.partition("#")[0].strip()  # '#' is not a b64token character
            if line:
                parts = line.split(None, 1)
                where = f"{path}:{n}"
                if len(parts) != 2:
                    raise AccessError(f"{where}: expected 'token scope,scope'")
                found.append((_principal(parts[0], parts[1], where), where))
    seen: dict[bytes, str] = {}
    for principal, where in found:
        if principal.digest in seen:
            raise AccessError(f"{where}: the same token as {seen[principal.digest]}")
        seen[principal.digest] = where
    return Tokens(p for p, _ in found)


def is_loopback(host: str) -> bool:
    """
    >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "", "example.org")]
    [True, True, True, True, False, False, False]
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name could resolve to anything: treated as public


def check_bind(host: str, tokens: Tokens, what: str = "the HTTP surface") -> None:
    """Refuse a non-loopback bind without any token; warn that a loopback one is open."""
    if tokens:
        return
    if not is_loopback(host):
        raise AccessError(f"refusing to serve {what} on {host or '(all addresses)'} without an access "
                          f"token: set SURGEFLOW_API_TOKENS or access.tokens_file, or bind to 127.0.0.1")
    log.warning("%s on %s has no access token: any local process can use it", what, host)


def rate_window(rate_per_s: float, burst: int) -> tuple[int, int]:
    """(amount, seconds) of the moving window that allows ``burst`` at once and ``rate_per_s``
    on average (``limits`` windows are whole seconds, so a rate above the burst raises the
    burst to one second's worth).

    >>> rate_window(50, 500), rate_window(5, 5), rate_window(0.5, 1), rate_window(1000, 10)
    ((500, 10), (5, 1), (1, 2), (1000, 1))
    """
    seconds = max(1, math.ceil(burst / rate_per_s))
    return max(burst, math.ceil(rate_per_s * seconds)), seconds


def route_path(scope: dict) -> str:
    """The path below the app's mount point (``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def presented_token(header: bytes | None, basic: bool) -> bytes | None:
    """The token of an ``Authorization`` header: ``Bearer <token>``, or with ``basic`` the
    password of ``Basic`` credentials (what a browser can send to the dashboard).

    >>> presented_token(b"Bearer abc", False), presented_token(b"bearer  abc ", False)
    (b'abc', b'abc')
    >>> presented_token(b"Basic dXNlcjphYmM=", True), presented_token(b"Basic dXNlcjphYmM=", False)
    (b'abc', None)
    """
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == b"bearer":
        return value
    if scheme == b"basic" and basic:
        try:
            return b64decode(value, validate=True).partition(b":")[2]
        except (Base64Error, ValueError):
            return None
    return None


class Grant:
    """What the guard let through, for the app: who (``requested_by``) and a way to charge
    more of the rate limit for an expensive request (:func:`charge`)."""

    __slots__ = ("guard", "key", "principal")

    def __init__(self, guard: Guard, key: str, principal: Principal | None):
        self.guard, self.key, self.principal = guard, key, principal

    @property
    def requested_by(self) -> str:
        return self.principal.name if self.principal is not None else "unauthenticated"


def charge(scope: dict, cost: int) -> float | None:
    """Charge ``cost`` more units to the request's rate-limit key (the guard charged 1);
    None when allowed, else the seconds to wait (Retry-After)."""
    grant = scope.get(ACCESS)
    if grant is None or cost <= 0:
        return None
    return grant.guard.hit(grant.key, cost)


def requested_by(scope: dict) -> str:
    """How the caller is named in audit records: ``token:<8 hex of its digest>``."""
    grant = scope.get(ACCESS)
    return grant.requested_by if grant is not None else "unauthenticated"


async def reply(send, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A JSON error ``{"detail": ...}``: fixed texts only, never an exception's."""
    body = b'{"detail":"%s"}' % detail.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", b"%d" % len(body)), *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware, outermost: authentication (401), scope (403), rate (429) and body size
    (413), before the app sees the request.

    ``scopes_by_path(method, path)`` names the scope a path needs (None: any valid token);
    ``open_paths`` need none. Without any token every request passes (check_bind keeps that to
    loopback), limited per client address. With a token, the rate is charged to the token;
    wrong tokens to the client address, so guessing is throttled too. A body is read here up
    to ``max_body_bytes`` and handed on; past it, 413 (declared or counted while received)."""

    def __init__(self, app, tokens: Tokens, scopes_by_path: Callable[[str, str], str | None],
                 max_body_bytes: int = 16_384, rate_per_s: float = 50.0, burst: int = 500,
                 open_paths: Iterable[str] = ("/healthz",), basic_realm: str | None = None):
        self.app, self.tokens, self.scopes_by_path = app, tokens, scopes_by_path
        self.max_body_bytes, self.open_paths = max_body_bytes, frozenset(open_paths)
        self.item = RateLimitItemPerSecond(*rate_window(rate_per_s, burst))
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.basic = basic_realm is not None
        self.challenge = [(b"www-authenticate", b'Bearer realm="surgeflow"')]
        if self.basic:
            self.challenge.append((b"www-authenticate", b'Basic realm="%s"' % basic_realm.encode()))

    def hit(self, key: str, cost: int = 1) -> float | None:
        """None when ``cost`` fits in the key's window, else the seconds to wait."""
        if self.limiter.hit(self.item, key, cost=cost):
            return None
        reset = self.limiter.get_window_stats(self.item, key).reset_time
        return max(1, math.ceil(reset - time.time()))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        auth = length = None
        chunked = expect = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                expect = True
        try:
            declared = int(length) if length is not None else 0
        except ValueError:
            return await reply(send, 400, "bad content-length", [CLOSE])
        # what a refusal reads and discards first (see _refuse); nothing when the client waits
        # for a 100-continue before sending its body
        unread = 0 if expect else LINGER_BYTES if chunked else declared
        client = scope.get("client")
        key, principal = "addr:" + (client[0] if client else "-"), None
        path = route_path(scope)
        if self.tokens and path not in self.open_paths:
            principal = self.tokens.lookup(presented_token(auth, self.basic))
            if principal is None:
                if (wait := self.hit(key)) is not None:
                    return await self._too_many(send, wait)
                return await self._refuse(receive, send, unread, 401, "authentication required",
                                          self.challenge)
            key = "token:" + principal.digest.hex()
        if (wait := self.hit(key)) is not None:
            return await self._too_many(send, wait)
        if principal is not None and not principal.allows(self.scopes_by_path(scope["method"], path)):
            return await self._refuse(receive, send, unread, 403, "forbidden")
        if declared > self.max_body_bytes:
            return await self._refuse(receive, send, unread, 413, TOO_LARGE)
        if declared or chunked:
            body, more = await self._read(receive)
            if body is None:
                return await self._refuse(receive, send, LINGER_BYTES if more else 0, 413, TOO_LARGE)
            receive = _replay(body, receive)
        scope[ACCESS] = Grant(self, key, principal)
        await self.app(scope, receive, send)

    async def _read(self, receive) -> tuple[bytes | None, bool]:
        """(the whole body, False), or (None, whether more is coming) once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, False  # the client left
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, more
            chunks.append(chunk)
            if not more:
                return b"".join(chunks), False

    async def _refuse(self, receive, send, unread: int, status: int, detail: str,
                      headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Reply after reading and discarding what the client still sends of its body (at most
        LINGER_BYTES, for LINGER_S): closing a socket with unread data resets the connection,
        and the client would see the reset instead of the answer. A bigger body gets the reset."""
        if 0 < unread <= LINGER_BYTES:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_discard(receive, unread), LINGER_S)
        await reply(send, status, detail, [*headers, CLOSE] if unread else headers)

    async def _too_many(self, send, wait: float) -> None:
        # no lingering: a flood gets nothing read
        await reply(send, 429, "rate limit exceeded", [(b"retry-after", b"%d" % wait)])


async def _discard(receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, when it comes

    return replay
