"""The built-in dashboard page of the embedded mode (FastAPI; the page itself is ``web/``).

- ``GET /``: the page (vanilla JS and hand-written SVG, no asset from outside);
- ``GET /static/...``: its files, from ``dashboards/web/``;
- ``GET /api/overview?minutes=60&hours=24``: everything the page shows, as one JSON document
  (see :func:`overview`);
- ``GET /healthz``: ClickHouse answers (503 when it does not).

Access (:mod:`privacy.access`): every path but ``/healthz`` needs a token with the scope
``dashboard:read``, as a bearer token or, so that a browser can open the page, as the password
of HTTP Basic credentials (any user name); without any token configured the page serves
loopback only. ClickHouse errors are logged (``surgeflow.dashboard``), never shown.

Every window ends at ``as_of``, the newest minute with aggregates (event time), never at the wall
clock: a replay of old data shows as it would have live. The queries are the named KPI queries of
:mod:`warehouse.kpi`; this module writes no SQL.

chDB opens one data directory per process, so the page runs in the flow's process
(:func:`start_in_thread`) and shares its client and lock (:func:`connectors.clickhouse.connect`);
each query holds the lock, so the flow's inserts interleave between them.

>>> minute_axis(dt.datetime(2024, 5, 1, 10, 2, tzinfo=UTC), 3)
['2024-05-01T10:00:00Z', '2024-05-01T10:01:00Z', '2024-05-01T10:02:00Z']
>>> json_safe({"z": float("nan"), "t": dt.datetime(2024, 5, 1, 10, 0), "n": [1, float("inf")]})
{'z': None, 't': '2024-05-01T10:00:00Z', 'n': [1, None]}
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from pathlib import Path

import orjson
from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from config.settings import AccessSettings
from connectors.clickhouse import connect
from privacy.access import DASHBOARD_READ, Guard, Tokens, check_bind, load_tokens
from warehouse import kpi

log = logging.getLogger("surgeflow.dashboard")

WEB_DIR = Path(__file__).resolve().parent / "web"
UTC = dt.UTC
MINUTE = dt.timedelta(minutes=1)
JSON = "application/json"
MAX_MINUTES = 24 * 60
MAX_HOURS = 31 * 24
RECENT = 20  # alerts and actions shown


def iso(value: dt.datetime) -> str:
    """ISO 8601 in UTC with a ``Z``; a naive datetime is taken as UTC (how clickhouse_connect
    returns a DateTime whose zone is the session's)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def json_safe(value):
    """Values JSON can carry: NaN and infinities become None, datetimes ISO strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def minute_axis(as_of: dt.datetime, minutes: int) -> list[str]:
    """The ``minutes`` minute starts up to and including ``as_of``, oldest first."""
    return [iso(as_of - (minutes - 1 - i) * MINUTE) for i in range(minutes)]


def traffic_section(rows: list[dict], axis: list[str]) -> dict:
    """Per-channel events aligned to the minute axis, zeros filled; busiest channel first."""
    index = {t: i for i, t in enumerate(axis)}
    series: dict[str, list[int]] = {}
    for row in rows:
        i = index.get(iso(row["t"]))
        if i is not None:
            series.setdefault(row["channel"], [0] * len(axis))[i] += int(row["events"])
    ordered = sorted(series.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    return {"minutes": axis,
            "series": [{"channel": ch, "events": values, "total": sum(values)} for ch, values in ordered]}


def split_total(rows: list[dict]) -> tuple[dict | None, list[dict]]:
    """(the is_total row, the other rows), both without the period column ``t``."""
    total, parts = None, []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "t"}
        if row.pop("is_total"):
            total = row
        else:
            parts.append(row)
    return total, parts


def models_section(rows: list[dict]) -> list[dict]:
    """Per model, its latest AUC, log loss, calibration and label delay (from the latest label
    minute that had each) and the labels over the window."""
    out: dict[str, dict] = {}
    for r in rows:  # ordered by model, then minute
        m = out.setdefault(r["model"], {"model": r["model"], "labels": 0})
        m["labels"] += r["labels"] or 0
        m["updated"] = r["t"]
        for name in ("auc", "log_loss", "calibration", "label_delay_s"):
            if r[name] is not None:
                m[name] = r[name]
    return [{"auc": None, "log_loss": None, "calibration": None, "label_delay_s": None, **m,
             "updated": iso(m["updated"])} for m in out.values()]


class _Timer:
    """Runs KPI queries under the client's lock and keeps how long each took."""

    def __init__(self, client, lock: threading.Lock, db: str):
        self.client, self.lock, self.db = client, lock, db
        self.ms: dict[str, float] = {}

    def run(self, name: str, **params) -> list[dict]:
        started = time.perf_counter()
        with self.lock:
            rows = kpi.run(self.client, name, self.db, **params)
        self.ms[name] = round((time.perf_counter() - started) * 1000, 2)
        return rows


def overview(client, lock: threading.Lock, db: str, minutes: int = 60, hours: int = 24) -> dict:
    """The dashboard's data. ``traffic`` covers the last ``minutes`` minutes up to and including
    ``as_of``; ``funnel``, ``campaigns`` and ``totals`` the hours whose start lies in the last
    ``hours`` hours before the end of ``as_of`` (read from the hourly tables). With no minute
    yet, ``as_of`` is None and those sections are empty; alerts and actions are listed anyway."""
    q = _Timer(client, lock, db)
    started = time.perf_counter()
    latest = q.run("latest_minute")
    as_of = latest[0]["t"] if latest and latest[0]["rows"] else None
    with lock:  # the reporting time zone; cached per client and database after the first call
        timezone = kpi.timezone_of(client, db)
    body: dict = {"as_of": None, "timezone": timezone, "window": None,
                  "traffic": {"minutes": [], "series": []},
                  "funnel": {"overall": None, "campaigns": []},
                  "campaigns": {"rows": [], "total": None},
                  "totals": {"events": None, "users": None, "revenue": None, "orders": None}}
    if as_of is not None:
        end = as_of + MINUTE
        start_minutes, start_hours = end - minutes * MINUTE, end - dt.timedelta(hours=hours)
        traffic = q.run("traffic", start=start_minutes, end=end, granularity="minute")
        funnel = q.run("funnel", start=start_hours, end=end, granularity="total")
        campaigns = q.run("campaign_kpis", start=start_hours, end=end, granularity="total")
        uv = q.run("uv", start=start_hours, end=end, granularity="total")
        overall, funnel_rows = split_total(funnel)
        # One row per campaign over all its channels: an ad's clicks and the orders of the
        # sessions it brought are on different channels.
        total, campaign_rows = split_total(
            [dict(r, channel="all") for r in campaigns if r.pop("all_channels")])
        funnel_rows.sort(key=lambda r: (-r["viewed"], r["campaign"], r["channel"]))
        campaign_rows.sort(key=lambda r: (-(r["revenue"] or 0), r["campaign"], r["channel"]))
        body.update(
            as_of=iso(as_of),
            window={"minutes": minutes, "hours": hours, "end": iso(end),
                    "minutes_start": iso(start_minutes), "hours_start": iso(start_hours)},
            traffic=traffic_section(traffic, minute_axis(as_of, minutes)),
            funnel={"overall": overall, "campaigns": funnel_rows},
            campaigns={"rows": campaign_rows, "total": total},
            totals={"events": uv[0]["events"] if uv else 0, "users": uv[0]["uv"] if uv else 0,
                    "revenue": total["revenue"] if total else 0, "orders": total["orders"] if total else 0})
    body["models"] = models_section(q.run("model_quality", start=start_hours, end=end)) \
        if as_of is not None else []
    body["alerts"] = q.run("recent_alerts", limit=RECENT)
    body["actions"] = q.run("recent_actions", limit=RECENT)
    body["query_ms"] = round((time.perf_counter() - started) * 1000, 2)
    body["query_ms_by_kpi"] = q.ms
    return json_safe(body)


class _Recent:
    """The last answer per window, reused for ``max_age_s``: any number of open pages cost the
    flow (which waits for the same lock to insert) one set of queries per refresh; concurrent
    requests for the same window wait for one computation instead of repeating it."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self.lock = threading.Lock()
        self.answers: dict[tuple, tuple[float, bytes]] = {}

    def get(self, key: tuple, compute) -> bytes:
        with self.lock:
            now = time.monotonic()
            self.answers = {k: v for k, v in self.answers.items() if now - v[0] < self.max_age_s}
            if key not in self.answers:
                self.answers[key] = (now, compute())
            return self.answers[key][1]


def create_app(dsn: str, db: str, max_age_s: float = 1.0, access: AccessSettings | None = None,
               tokens: Tokens | None = None) -> FastAPI:
    """The dashboard app on the process-wide client of ``dsn`` (database ``db``); an overview is
    recomputed at most every ``max_age_s`` seconds per window. ``access``: limits and where the
    tokens come from (default: AccessSettings(), tokens from the environment); ``tokens``
    overrides them when given."""
    client, lock = connect(dsn)
    recent = _Recent(max_age_s)
    access = access if access is not None else AccessSettings()
    tokens = tokens if tokens is not None else load_tokens(access)
    app = FastAPI(title="surgeflow dashboard", version="1",
                  description="The built-in live dashboard of the embedded mode.")
    app.add_middleware(Guard, tokens=tokens, scopes_by_path=lambda method, path: DASHBOARD_READ,
                       max_body_bytes=access.max_body_bytes, rate_per_s=access.rate_per_s,
                       burst=access.burst, basic_realm="surgeflow dashboard")
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/overview")
    def get_overview(minutes: int = Query(60, ge=1, le=MAX_MINUTES, description="traffic window"),
                     hours: int = Query(24, ge=1, le=MAX_HOURS, description="funnel/campaign window")):
        """as_of, traffic per minute and channel, funnel, campaign KPIs, totals, recent alerts and
        actions (a sync route: the chDB client blocks, so it runs in the thread pool)."""
        try:
            body = recent.get((minutes, hours),
                              lambda: orjson.dumps(overview(client, lock, db, minutes, hours)))
        except Exception:  # noqa: BLE001 - any query failure: the page keeps its data
            log.warning("overview query failed", exc_info=True)
            return JSONResponse({"detail": "clickhouse unavailable"}, status_code=503)
        return Response(body, media_type=JSON, headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz():
        """ClickHouse answers the newest-minute query for this database."""
        try:
            with lock:
                latest = kpi.run(client, "latest_minute", db)
        except Exception:  # noqa: BLE001
            log.warning("health query failed", exc_info=True)
            return JSONResponse({"status": "unavailable", "clickhouse": "unavailable"}, status_code=503)
        as_of = iso(latest[0]["t"]) if latest and latest[0]["rows"] else None
        return {"status": "ok", "clickhouse": "ok", "as_of": as_of}

    return app


def _config(dsn: str, db: str, host: str, port: int, access: AccessSettings | None):
    import uvicorn

    access = access if access is not None else AccessSettings()
    tokens = load_tokens(access)
    check_bind(host, tokens, "the dashboard")  # before anything listens
    return uvicorn.Config(create_app(dsn, db, access=access, tokens=tokens), host=host, port=port,
                          log_level="warning", access_log=False)


def serve(dsn: str, db: str, host: str = "127.0.0.1", port: int = 8050,
          access: AccessSettings | None = None) -> None:
    """Serve the dashboard with uvicorn until interrupted (blocking). Refuses a non-loopback
    ``host`` when no token is configured (:func:`privacy.access.check_bind`)."""
    import uvicorn

    uvicorn.Server(_config(dsn, db, host, port, access)).run()


def start_in_thread(dsn: str, db: str, host: str = "127.0.0.1", port: int = 8050,
                    timeout_s: float = 10.0, access: AccessSettings | None = None):
    """Serve the dashboard from a daemon thread of this process (beside the flow, sharing its
    chDB client); returns ``(server, thread)`` once it listens. Stop it with
    ``server.should_exit = True; thread.join()``. With ``port=0`` the system picks a port:
    ``server.servers[0].sockets[0].getsockname()[1]``."""
    import uvicorn

    server = uvicorn.Server(_config(dsn, db, host, port, access))
    thread = threading.Thread(target=server.run, name="surgeflow-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the dashboard did not start on {host}:{port} (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the dashboard did not start on {host}:{port} within {timeout_s:g} s")
        time.sleep(0.01)
    return server, thread
