"""Named, parameterised KPI queries: the files ``kpi/<name>.sql``.

Each file starts with comment lines: a description, ``-- params: ...`` (the parameters it takes)
and, optionally, ``-- coarsest table: <table> (...)`` when it reads a table that has no minute
grain. Values reach ClickHouse only as typed query parameters (``{start:Int64}``,
``{campaign:String}``, ...); no user value is ever pasted into SQL text. Two parameters are filled
in here: ``db`` (the configured database) and ``source`` (the aggregate table for the
granularity: events_minute, events_hour or events_day), both typed ``Identifier``. ``{bucket}``
in a file stands for :data:`BUCKET`, the one definition of a period's start.

Time ranges are ``[start, end)`` in epoch seconds or aware datetimes; buckets start at the
reporting time zone's minute, hour, day, Monday or first of the month, and come back as ``t``,
an aware UTC datetime.

>>> sorted(QUERIES)[:4]
['active_users', 'campaign_kpis', 'funnel', 'latest_minute']
>>> QUERIES["funnel"].params
('start', 'end', 'granularity', 'channel', 'campaign')
>>> check_granularity(QUERIES["funnel"], "minute")
Traceback (most recent call last):
...
warehouse.kpi.KpiError: funnel: granularity 'minute' is finer than its table allows (hour at least)
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

KPI_DIR = Path(__file__).resolve().parent / "kpi"
GRANULARITIES = ("minute", "hour", "day", "week", "month", "total")  # total: the whole range
SOURCE = {"minute": "events_minute", "hour": "events_hour", "day": "events_day",
          "week": "events_day", "month": "events_day", "total": "events_hour"}
_COARSEST = {"funnel_hour": "hour", "user_days": "day"}
# The start of the period holding ``ts``, in the column's time zone, as epoch seconds.
BUCKET = """toUnixTimestamp(multiIf(
        {granularity:String} = 'total', toTimeZone(toDateTime({start:Int64}), timezoneOf(ts)),
        {granularity:String} = 'minute', toStartOfMinute(ts),
        {granularity:String} = 'hour', toStartOfHour(ts),
        {granularity:String} = 'day', toStartOfDay(ts),
        {granularity:String} = 'week', toDateTime(toMonday(ts), timezoneOf(ts)),
        toDateTime(toStartOfMonth(ts), timezoneOf(ts))))"""
_UTC = dt.timezone.utc


class KpiError(ValueError):
    """A KPI query was asked for with a bad name or parameter."""


@dataclass(frozen=True)
class KpiQuery:
    name: str
    description: str
    params: tuple[str, ...]
    finest: str  # the finest granularity the query can answer
    sql: str


def _parse(path: Path) -> KpiQuery:
    text = path.read_text().replace("{bucket}", BUCKET)
    header = [line[2:].strip() for line in text.splitlines() if line.startswith("--")]
    params: tuple[str, ...] = ()
    finest = "minute"
    description = []
    for line in header:
        if line.startswith("params:"):
            params = tuple(line[len("params:"):].split())
        elif line.startswith("coarsest table:"):
            finest = _COARSEST[line.split(":", 1)[1].split()[0]]
        else:
            description.append(line)
    used = set(re.findall(r"\{(\w+):", text)) - {"db", "source", "tz"}
    if used != set(params):
        raise KpiError(f"{path.name}: declares {sorted(params)} but uses {sorted(used)}")
    return KpiQuery(path.stem, " ".join(description), params, finest, text)


QUERIES: dict[str, KpiQuery] = {p.stem: _parse(p) for p in sorted(KPI_DIR.glob("*.sql"))}


def check_granularity(query: KpiQuery, granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise KpiError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if granularity == "total" and "'total'" not in query.sql:
        raise KpiError(f"{query.name}: no 'total' granularity")
    if granularity != "total" and GRANULARITIES.index(granularity) < GRANULARITIES.index(query.finest):
        raise KpiError(f"{query.name}: granularity {granularity!r} is finer than its table allows "
                       f"({query.finest} at least)")


def _epoch(value) -> int:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise KpiError("datetimes must carry a time zone")
        return int(value.timestamp())
    if isinstance(value, dt.date):
        raise KpiError("give a datetime (with time zone) or epoch seconds, not a date")
    return int(value)


_TZ_CACHE: dict[tuple[int, str], str] = {}


def timezone_of(client, db: str) -> str:
    """The reporting time zone the database was created for (recorded by the migrations)."""
    key = (id(client), db)
    if key not in _TZ_CACHE:
        rows = client.query("SELECT argMax(timezone, applied_at) FROM {db:Identifier}.schema_migrations",
                            parameters={"db": db}).result_rows
        _TZ_CACHE[key] = rows[0][0] if rows and rows[0][0] else "UTC"
    return _TZ_CACHE[key]


def run(client, name: str, db: str, *, start=None, end=None, granularity: str = "hour",
        channel: str = "", campaign: str = "", limit: int = 100) -> list[dict]:
    """Run the named query; rows as dicts, ``t`` as an aware UTC datetime."""
    query = QUERIES.get(name)
    if query is None:
        raise KpiError(f"unknown KPI query {name!r}; known: {', '.join(sorted(QUERIES))}")
    params: dict = {"db": db}
    if "granularity" in query.params:
        check_granularity(query, granularity)
        params["granularity"] = granularity
    if "{source:" in query.sql:
        params["source"] = SOURCE[granularity]
    if "{tz:" in query.sql:
        params["tz"] = timezone_of(client, db)
    given = {"start": start, "end": end, "channel": channel, "campaign": campaign, "limit": limit}
    for p in query.params:
        if p in ("start", "end"):
            if given[p] is None:
                raise KpiError(f"{name} needs {p}")
            params[p] = _epoch(given[p])
        elif p in given:
            params[p] = given[p]
    if "start" in params and params["end"] <= params["start"]:
        raise KpiError("end must be after start")
    result = client.query(query.sql, parameters=params)
    rows = [dict(zip(result.column_names, row)) for row in result.result_rows]
    for row in rows:
        if "t" in row:
            row["t"] = dt.datetime.fromtimestamp(int(row["t"]), _UTC)
    return rows
