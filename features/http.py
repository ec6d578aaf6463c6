"""Read-only HTTP API over the feature hashes (FastAPI; OpenAPI at ``/openapi.json``).

- ``GET /features/{user_id}``: one user's typed features (404 when unknown; any characters,
  percent-encoded: ``/features/a%2Fb`` reads the id ``a/b``); ``?anonymous=true``: the id is an
  anonymous id, merged visitors read their user's features (see :mod:`features.reader`: a user id
  never follows an alias, since the events that create aliases are not authenticated);
- ``POST /features`` ``{"user_ids": [...], "anonymous": false}`` (at most ``max_batch`` ids,
  100 by default: a bigger batch is an enumeration, not a lookup): ``{"features": {id: {...} | null}}``;
- ``GET /registry``: the registry the flow wrote to Redis (else the local one; header
  ``X-Registry-Source: redis|local``);
- ``POST /erasure`` ``{"user_id": "...", "anonymous": false}``: hands an erasure request to the
  ``on_erasure`` callback (202 ``{"request_id": ...}``);
- ``GET /healthz``: pings Redis (503 when it does not answer).

Access (:mod:`privacy.access`, the outermost middleware): bearer tokens with the scopes
``features:read`` (``/features``, ``/openapi.json``, ``/docs``), ``registry:read``
(``/registry``), ``erasure:write`` (``/erasure``); ``/healthz`` is open. Without any token
configured the API serves loopback only. Rate limit per token, one unit per request and one per
id of a batch. No error body carries an exception's text: Redis errors are logged
(``surgeflow.api``) and answered ``503 {"detail": "redis unavailable"}``.

Why it is shaped this way (server CPU per GET, measured on the 2-vCPU development VM with
sequential keep-alive requests; latency under load: ``bench/bench_reader.py``): async
handlers on ``redis.asyncio`` under uvicorn with uvloop + httptools, no thread hop: ~430 us per
request, against 660-810 us for a sync endpoint in FastAPI's thread pool. ``GET /features/{id}``
is answered by a small ASGI middleware before FastAPI's routing and dependency machinery
(~630 us through the route); orjson writes every body, so the response models document the API
and cost nothing per request. The Redis client is RESP2 (see :mod:`features.reader`).
"""
# No `from __future__ import annotations`: the request models are built per app (max_batch), and
# FastAPI resolves a handler's string annotations in the module's globals, where they are not.
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from config.registry import Registry, load_registry
from config.settings import AccessSettings
from features.layout import MAX_ID_CHARS
from features.reader import AsyncFeatureReader, default_value
from privacy.access import (ERASURE_WRITE, FEATURES_READ, REGISTRY_READ, Guard, Tokens, charge,
                            check_bind, load_tokens, requested_by, route_path)

log = logging.getLogger("surgeflow.api")
MAX_BATCH = 100  # default ids per POST /features (ApiSettings.max_batch)
FEATURES = "/features/"
JSON = "application/json"
PY_TYPES = {"int": int, "money": float, "ratio": float, "score": float, "time_ms": int, "flag": int,
            "label": str, "text": str}


ANONYMOUS_DOC = ("true: anonymous ids, each read as its own profile, else as the user it was merged "
                 "into (alias); false: user ids, which never follow an alias (events, which "
                 "create aliases, are not authenticated)")
# Query strings the fast path answers itself; any other goes to the route, whose validation
# (FastAPI's bool: 422 for "maybe") is then the one rule.
FAST_QUERIES = {b"": False, b"anonymous=false": False, b"anonymous=true": True}


DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
REDIS_DOWN = b'{"detail":"redis unavailable"}'
OnErasure = Callable[[str, bool, str], str]  # (user_id, anonymous, requested_by) -> request id


def features_request_model(max_batch: int) -> type[BaseModel]:
    return create_model(
        "FeaturesRequest",
        user_ids=(list[str], Field(max_length=max_batch, description=f"at most {max_batch} ids")),
        anonymous=(bool, Field(False, strict=True, description=ANONYMOUS_DOC)))


class ErasureBody(BaseModel):
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    anonymous: bool = Field(False, strict=True, description="the id is an anonymous id")


class Accepted(BaseModel):
    request_id: str


class Error(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    redis: str
    registry: str = Field(description="redis registry vs local: match | differs | absent | unknown")


def features_model(registry: Registry) -> type[BaseModel]:
    """The response model of one user, generated from the registry (documentation only)."""
    fields: dict[str, Any] = {}
    for f in registry.features:
        kind = PY_TYPES[f.type]
        default = default_value(f)
        annotation = kind if default is not None else kind | None
        fields[f.name] = (annotation, Field(default, description=f"{f.description} ({f.type})"))
    fields.update(
        as_of=(int | None, Field(None, description="event time of the values, epoch ms")),
        updated_at=(int | None, Field(None, description="wall-clock time of the write, epoch ms")),
        stale=(bool, Field(description="not rewritten for more than max_age_s (see features.reader)")),
        user_id=(str, Field(description="the id whose hash was read (the alias target if merged)")),
        alias_of=(str | None, Field(None, description="the anonymous id asked for, when its alias "
                                                      "was followed")),
    )
    return create_model("UserFeatures", __config__=ConfigDict(extra="allow"), **fields)


def registry_status(stored: bytes | None, local: bytes) -> str:
    """How the registry the flow wrote compares with the one this API types values with.

    >>> registry_status(None, b"{}"), registry_status(b'{"a": 1}', b'{"a":1}'), registry_status(b"{", b"{}")
    ('absent', 'match', 'differs')
    """
    if not stored:
        return "absent"
    try:
        return "match" if orjson.loads(stored) == orjson.loads(local) else "differs"
    except orjson.JSONDecodeError:
        return "differs"


def feature_scope(method: str, path: str) -> str | None:
    """The scope a path of this API needs (None: any valid token; /healthz is open).

    >>> feature_scope("GET", "/features/u1"), feature_scope("GET", "/registry"), feature_scope("GET", "/x")
    ('features:read', 'registry:read', None)
    """
    if path.startswith(FEATURES) or path in DOC_PATHS:
        return FEATURES_READ
    return {"/features": FEATURES_READ, "/registry": REGISTRY_READ, "/erasure": ERASURE_WRITE}.get(path)


_last_logged = [0.0, 0]  # when a Redis error was last logged, and how many were not since


def redis_error(exc: BaseException) -> None:
    """Log a Redis error server side (its text stays out of responses), at most every 10 s
    during an outage."""
    now = time.monotonic()
    if now - _last_logged[0] < 10:
        _last_logged[1] += 1
        return
    log.warning("redis unavailable: %s: %s (%d more since the last report)",
                type(exc).__name__, exc, _last_logged[1])
    _last_logged[:] = [now, 0]


async def features_answer(reader: AsyncFeatureReader, scope: dict,
                          anonymous: bool = False) -> tuple[int, bytes]:
    """Status and JSON body of ``GET /features/{id}``. The id is the whole rest of the decoded
    path (not Starlette's path parameter: its regex ends in `$`, which also matches before a
    final newline, so ``/features/u1%0A`` would read ``u1``)."""
    user_id = route_path(scope)[len(FEATURES):]
    try:
        values = await reader.get(user_id, anonymous=anonymous)
    except RedisError as exc:
        redis_error(exc)
        return 503, REDIS_DOWN
    if values is None:
        return 404, b'{"detail":"unknown user"}'
    return 200, orjson.dumps(values)


class FastFeatureGet:
    """ASGI middleware answering ``GET /features/{id}`` itself. FastAPI's routing, dependency
    solving and response classes cost more CPU than the Redis read (server CPU per request on
    the development VM: ~630 us through the route, ~430 us here); the route stays for the
    OpenAPI document and answers the same way. It answers only the query strings in
    FAST_QUERIES (none, or ``anonymous=true|false``) and leaves any other to the route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] == "GET"
                and route_path(scope).startswith(FEATURES)
                and (anonymous := FAST_QUERIES.get(scope.get("query_string", b""))) is not None):
            status, body = await features_answer(scope["app"].state.reader, scope, anonymous)
            await send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def create_app(redis_url: str, prefix: str = "sf", max_age_s: float = 60,
               registry: Registry | None = None, access: AccessSettings | None = None,
               max_batch: int = MAX_BATCH, tokens: Tokens | None = None,
               on_erasure: OnErasure | None = None) -> FastAPI:
    """The API app. ``access``: limits and where tokens come from (default: AccessSettings(),
    tokens from the environment); ``tokens`` overrides them when given. ``on_erasure``: what
    ``POST /erasure`` calls (None: 503)."""
    registry = registry if registry is not None else load_registry()
    access = access if access is not None else AccessSettings()
    tokens = tokens if tokens is not None else load_tokens(access)
    FeaturesRequest = features_request_model(max_batch)
    local_registry = orjson.dumps(registry.to_dict())
    UserFeatures = features_model(registry)
    FeaturesResponse = create_model("FeaturesResponse", features=(dict[str, UserFeatures | None], ...))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = aioredis.Redis.from_url(redis_url, protocol=2)  # see features.reader
        app.state.reader = AsyncFeatureReader(client, prefix, registry, max_age_s)
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(title="surgeflow features", version="1", lifespan=lifespan,
                  description="Per-user marketing features, read-only.")
    app.add_middleware(FastFeatureGet)
    app.add_middleware(Guard, tokens=tokens, scopes_by_path=feature_scope,  # added last: outermost
                       max_body_bytes=access.max_body_bytes, rate_per_s=access.rate_per_s,
                       burst=access.burst)

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError):
        redis_error(exc)
        return Response(REDIS_DOWN, status_code=503, media_type=JSON)

    @app.get("/features/{user_id:path}", response_model=UserFeatures,
             responses={404: {"model": Error, "description": "unknown user"},
                        503: {"model": Error, "description": "Redis unavailable"}})
    async def get_features(user_id: str, request: Request,
                           anonymous: bool = Query(False, description=ANONYMOUS_DOC)):
        """One profile's features, by user id (default) or by anonymous id.
        (Mostly served by :class:`FastFeatureGet`; this route documents it and answers the same.)"""
        status, body = await features_answer(request.app.state.reader, request.scope, anonymous)
        return Response(body, status_code=status, media_type=JSON)

    @app.post("/features", response_model=FeaturesResponse,
              responses={429: {"model": Error, "description": "rate limit (one unit per id)"}})
    async def post_features(body: FeaturesRequest, request: Request):
        """Features of many users (or anonymous ids) in one call (null for unknown ids)."""
        # the guard charged one unit for the request: a batch costs one per id
        if (wait := charge(request.scope, len(body.user_ids) - 1)) is not None:
            return JSONResponse({"detail": "rate limit exceeded"}, status_code=429,
                                headers={"Retry-After": str(int(wait))})
        values = await request.app.state.reader.get_many(body.user_ids, anonymous=body.anonymous)
        return Response(orjson.dumps({"features": values}), media_type=JSON)

    @app.get("/registry", response_model=dict[str, Any])
    async def get_registry(request: Request):
        """The feature registry (names, types, windows, descriptions)."""
        stored = await request.app.state.reader.stored_registry()
        source = "redis" if stored else "local"
        return Response(stored or local_registry, media_type=JSON,
                        headers={"X-Registry-Source": source})

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz(request: Request):
        """Redis answers; and whether the flow's registry is the one this API types values with."""
        reader = request.app.state.reader
        try:
            await reader.client.ping()
            stored = await reader.stored_registry()
        except (RedisError, OSError) as exc:
            redis_error(exc)
            return JSONResponse({"status": "unavailable", "redis": "unavailable",
                                 "registry": "unknown"}, status_code=503)
        return {"status": "ok", "redis": "ok", "registry": registry_status(stored, local_registry)}

    @app.post("/erasure", status_code=202, response_model=Accepted,
              responses={503: {"model": Error, "description": "erasure not configured"}})
    async def post_erasure(body: ErasureBody, request: Request):
        """Request the erasure of one person's data (scope erasure:write); answered once the
        request is recorded, carried out by the flow."""
        if on_erasure is None:
            return JSONResponse({"detail": "erasure not configured"}, status_code=503)
        try:  # the callback may block (a Kafka produce, a file write): off the event loop
            request_id = await run_in_threadpool(on_erasure, body.user_id, body.anonymous,
                                                 requested_by(request.scope))
        except ValueError:
            return JSONResponse({"detail": "invalid erasure request"}, status_code=422)
        except Exception:  # noqa: BLE001 - logged here, never shown to the client
            log.exception("erasure request failed")
            return JSONResponse({"detail": "erasure unavailable"}, status_code=503)
        return JSONResponse({"request_id": request_id}, status_code=202)

    return app


def serve(redis_url: str, prefix: str = "sf", host: str = "127.0.0.1", port: int = 8000,
          max_age_s: float = 60, access: AccessSettings | None = None,
          max_batch: int = MAX_BATCH, on_erasure=None) -> None:
    """Run the API with uvicorn until interrupted (uvloop and httptools when installed).
    Refuses a non-loopback ``host`` when no token is configured (:func:`privacy.access.check_bind`)."""
    import uvicorn

    access = access if access is not None else AccessSettings()
    tokens = load_tokens(access)
    check_bind(host, tokens, "the feature API")
    app = create_app(redis_url, prefix, max_age_s, access=access, max_batch=max_batch, tokens=tokens,
                     on_erasure=on_erasure)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
