"""Read-only HTTP API over the feature hashes (FastAPI; OpenAPI at ``/openapi.json``).

- ``GET /features/{user_id}``: one user's typed features (404 when unknown; any characters,
  percent-encoded: ``/features/a%2Fb`` reads the id ``a/b``); ``?anonymous=true``: the id is an
  anonymous id, merged visitors read their user's features (see :mod:`features.reader`: a user id
  never follows an alias, since the events that create aliases are not authenticated);
- ``POST /features`` ``{"user_ids": [...], "anonymous": false}`` (at most 1000 ids):
  ``{"features": {id: {...} | null}}``;
- ``GET /registry``: the registry the flow wrote to Redis (else the local one; header
  ``X-Registry-Source: redis|local``);
- ``GET /healthz``: pings Redis (503 when it does not answer).

Why it is shaped this way (server CPU per GET, measured on the 2-vCPU development VM with
sequential keep-alive requests; latency under load: ``bench/bench_reader.py``): async
handlers on ``redis.asyncio`` under uvicorn with uvloop + httptools, no thread hop: ~430 us per
request, against 660-810 us for a sync endpoint in FastAPI's thread pool. ``GET /features/{id}``
is answered by a small ASGI middleware before FastAPI's routing and dependency machinery
(~630 us through the route); orjson writes every body, so the response models document the API
and cost nothing per request. The Redis client is RESP2 (see :mod:`features.reader`).
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from redis.exceptions import RedisError

from config.registry import Registry, load_registry
from features.reader import AsyncFeatureReader, default_value

MAX_BATCH = 1000
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


class FeaturesRequest(BaseModel):
    user_ids: list[str] = Field(max_length=MAX_BATCH, description=f"at most {MAX_BATCH} ids")
    anonymous: bool = Field(False, strict=True, description=ANONYMOUS_DOC)


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


def route_path(scope: dict) -> str:
    """The path below the app's mount point (``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def features_answer(reader: AsyncFeatureReader, scope: dict,
                          anonymous: bool = False) -> tuple[int, bytes]:
    """Status and JSON body of ``GET /features/{id}``. The id is the whole rest of the decoded
    path (not Starlette's path parameter: its regex ends in `$`, which also matches before a
    final newline, so ``/features/u1%0A`` would read ``u1``)."""
    user_id = route_path(scope)[len(FEATURES):]
    try:
        values = await reader.get(user_id, anonymous=anonymous)
    except RedisError as exc:
        return 503, orjson.dumps({"detail": f"redis unavailable: {exc}"})
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
               registry: Registry | None = None) -> FastAPI:
    registry = registry if registry is not None else load_registry()
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

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError):
        return JSONResponse({"detail": f"redis unavailable: {exc}"}, status_code=503)

    @app.get("/features/{user_id:path}", response_model=UserFeatures,
             responses={404: {"model": Error, "description": "unknown user"},
                        503: {"model": Error, "description": "Redis unavailable"}})
    async def get_features(user_id: str, request: Request,
                           anonymous: bool = Query(False, description=ANONYMOUS_DOC)):
        """One profile's features, by user id (default) or by anonymous id.
        (Mostly served by :class:`FastFeatureGet`; this route documents it and answers the same.)"""
        status, body = await features_answer(request.app.state.reader, request.scope, anonymous)
        return Response(body, status_code=status, media_type=JSON)

    @app.post("/features", response_model=FeaturesResponse)
    async def post_features(body: FeaturesRequest, request: Request):
        """Features of many users (or anonymous ids) in one call (null for unknown ids)."""
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
            return JSONResponse({"status": "unavailable", "redis": str(exc) or type(exc).__name__,
                                 "registry": "unknown"}, status_code=503)
        return {"status": "ok", "redis": "ok", "registry": registry_status(stored, local_registry)}

    return app


def serve(redis_url: str, prefix: str = "sf", host: str = "127.0.0.1", port: int = 8000,
          max_age_s: float = 60) -> None:
    """Run the API with uvicorn until interrupted (uvloop and httptools when installed)."""
    import uvicorn

    uvicorn.run(create_app(redis_url, prefix, max_age_s), host=host, port=port,
                log_level="warning", access_log=False)
