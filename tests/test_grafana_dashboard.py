"""The Grafana dashboard (dashboards/grafana/surgeflow.json) is well formed, and its SQL runs on the
real schema and shows the right numbers.

No Grafana is needed. The schema comes from warehouse/migrate.py on chDB, with known rows seeded
through the same landing table the engine writes to. Every query of the dashboard (panel
targets, template variables, annotations) is then expanded the way Grafana and the ClickHouse
plugin expand it (``expand`` below) and run on chDB. Its tables are not qualified with a
database: like the data source (``defaultDatabase: surgeflow``), the queries run on a client
handle whose default database is the test's database. chDB opens one data directory per process,
so that handle is a second connection to the session's directory, never another directory.

Each warehouse test runs in UTC and in Asia/Kolkata (a half-hour offset), since the rollup tables
keep their hour and day starts in the reporting time zone.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

import clickhouse_connect
import pytest
import yaml

from warehouse.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "grafana" / "surgeflow.json"
DATASOURCES = ROOT / "dashboards" / "grafana" / "provisioning" / "datasources"
PLUGIN = "grafana-clickhouse-datasource"
UTC = dt.UTC

# --- Grafana's expansion of a query -------------------------------------------------------------
#
# What reaches ClickHouse, in the order it happens:
#   1. the plugin's frontend replaces $__conditionalAll(condition, $var) by `1=1` when the variable
#      selects All (or nothing), else by the condition;
#   2. Grafana replaces the dashboard variables: ${var:singlequote} -> 'a','b' (quotes escaped as
#      \'), ${var:sqlstring} -> 'a','b' (quotes doubled), ${var:raw}, and $var / ${var} / [[var]]
#      with the plugin's own format ('a','b' for several values, the bare value for one). All
#      stands for every option of the variable;
#   3. the plugin's backend expands its macros (pkg/macros of grafana-clickhouse-datasource):
#      $__timeFilter(c) -> c >= toDateTime(<from>) AND c <= toDateTime(<to>) (Unix seconds),
#      $__timeFilter_ms(c) the same with fromUnixTimestamp64Milli(<ms>), $__dateFilter(c) ->
#      c >= toDate('<from day>') AND c <= toDate('<to day>'), $__fromTime / $__toTime ->
#      toDateTime(<s>), $__fromTime_ms / $__toTime_ms, $__interval_s -> the panel interval in
#      seconds (at least 1), $__timeInterval(c) -> toStartOfInterval(toDateTime(c), INTERVAL <s>
#      second).
# Anything else that looks like a macro or a variable is an error here, so a typo fails the test
# instead of reaching Grafana.

ALL = "$__all"


@dataclass
class Request:
    """A dashboard refresh: time range, panel interval, and the variables' selections."""

    start: dt.datetime
    end: dt.datetime
    interval_s: int = 60
    selected: dict[str, list[str] | str] = field(default_factory=dict)  # name -> values or ALL
    options: dict[str, list[str]] = field(default_factory=dict)  # name -> every option (for All)

    def values(self, name: str) -> list[str] | str:
        if name not in self.selected:
            raise ValueError(f"unknown dashboard variable ${name}")
        return self.selected[name]


def _balanced_args(sql: str, open_at: int) -> tuple[list[str], int]:
    """Arguments of the call whose '(' is at ``open_at``, split at top-level commas; and the index
    after its ')'."""
    depth, args, start = 0, [], open_at + 1
    quote = None
    for i in range(open_at, len(sql)):
        ch = sql[i]
        if quote:
            if ch == "\\":
                continue
            if ch == quote and sql[i - 1] != "\\":
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i])
                return args, i + 1
        elif ch == "," and depth == 1:
            args.append(sql[start:i])
            start = i + 1
    raise ValueError(f"unbalanced parentheses after {sql[open_at - 20:open_at + 20]!r}")


def _conditional_all(sql: str, req: Request) -> str:
    macro = "$__conditionalAll("
    while (at := sql.find(macro)) != -1:
        args, end = _balanced_args(sql, at + len(macro) - 1)
        if len(args) != 2:
            raise ValueError(f"$__conditionalAll takes 2 arguments: {args}")
        m = re.fullmatch(r"\s*\$\{?(\w+)\}?\s*", args[1])
        if m is None:
            raise ValueError(f"$__conditionalAll's second argument is not a variable: {args[1]!r}")
        value = req.values(m.group(1))
        everything = value == ALL or value in ([], "")
        sql = sql[:at] + ("1=1" if everything else args[0]) + sql[end:]
    return sql


def _format(values: list[str] | str, fmt: str | None) -> str:
    if fmt == "singlequote":
        items = values if isinstance(values, list) else [values]
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in items)
    if fmt == "sqlstring":
        items = values if isinstance(values, list) else [values]
        return ",".join("'" + v.replace("'", "''") + "'" for v in items)
    if fmt == "raw":
        return ",".join(values) if isinstance(values, list) else values
    if fmt is None:  # the plugin's format(): arrays become 'a','b'; a single string stays bare
        return "'" + "','".join(values) + "'" if isinstance(values, list) else values
    raise ValueError(f"variable format {fmt!r} is not handled here")


_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")


def _variables(sql: str, req: Request) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3) or m.group(5)
        fmt = m.group(2) or m.group(4)
        if name.startswith("__"):  # a macro for the backend (or a Grafana built-in)
            return m.group(0)
        values = req.values(name)
        if values == ALL:
            values = req.options[name]
        return _format(values, fmt)

    return _VARIABLE.sub(sub, sql)


def _macros(sql: str, req: Request) -> str:
    start, end = int(req.start.timestamp()), int(req.end.timestamp())
    start_ms, end_ms = int(req.start.timestamp() * 1000), int(req.end.timestamp() * 1000)
    interval = max(int(req.interval_s), 1)
    day = lambda t: t.astimezone(UTC).strftime("%Y-%m-%d")  # the time range is in UTC
    plain = {
        "fromTime": f"toDateTime({start})",
        "toTime": f"toDateTime({end})",
        "fromTime_ms": f"fromUnixTimestamp64Milli({start_ms})",
        "toTime_ms": f"fromUnixTimestamp64Milli({end_ms})",
        "interval_s": str(interval),
    }
    with_column = {
        "timeFilter": lambda c: f"{c} >= toDateTime({start}) AND {c} <= toDateTime({end})",
        "timeFilter_ms": lambda c: (f"{c} >= fromUnixTimestamp64Milli({start_ms}) AND "
                                    f"{c} <= fromUnixTimestamp64Milli({end_ms})"),
        "dateFilter": lambda c: f"{c} >= toDate('{day(req.start)}') AND {c} <= toDate('{day(req.end)}')",
        "timeInterval": lambda c: f"toStartOfInterval(toDateTime({c}), INTERVAL {interval} second)",
    }
    out, pos = [], 0
    for m in re.finditer(r"\$__(\w+)", sql):
        if m.start() < pos:
            continue
        name = m.group(1)
        out.append(sql[pos:m.start()])
        if name in with_column:
            if m.end() >= len(sql) or sql[m.end()] != "(":
                raise ValueError(f"$__{name} needs a column argument")
            args, after = _balanced_args(sql, m.end())
            if len(args) != 1:
                raise ValueError(f"$__{name} takes 1 argument: {args}")
            out.append(with_column[name](args[0].strip()))
            pos = after
        elif name in plain:
            out.append(plain[name])
            pos = m.end()
        else:
            raise ValueError(f"unknown macro $__{name}")
    out.append(sql[pos:])
    return "".join(out)


def _without_conditional_all(sql: str) -> str:
    macro = "$__conditionalAll("
    while (at := sql.find(macro)) != -1:
        sql = sql[:at] + sql[_balanced_args(sql, at + len(macro) - 1)[1]:]
    return sql


def expand(sql: str, req: Request) -> str:
    """The SQL that Grafana and the ClickHouse plugin send to ClickHouse for ``req``."""
    sql = _macros(_variables(_conditional_all(sql, req), req), req)
    leftover = re.search(r"\$\{?\w+|\[\[\w+", sql)
    if leftover:
        raise ValueError(f"not expanded: {leftover.group(0)!r}")
    return sql


def test_expand_follows_the_plugin():
    req = Request(dt.datetime(2025, 3, 10, 9, 45, tzinfo=UTC), dt.datetime(2025, 3, 10, 11, tzinfo=UTC),
                  interval_s=0, selected={"channel": ALL, "campaign": ["o'brien", "x"]},
                  options={"channel": ["ad", "web"]})
    assert expand("$__timeFilter(ts) AND d >= $__fromTime - INTERVAL 1 HOUR", req) == (
        "ts >= toDateTime(1741599900) AND ts <= toDateTime(1741604400)"
        " AND d >= toDateTime(1741599900) - INTERVAL 1 HOUR")
    assert expand("$__dateFilter(day) LIMIT $__interval_s", req) == (
        "day >= toDate('2025-03-10') AND day <= toDate('2025-03-10') LIMIT 1")
    assert expand("$__conditionalAll(channel IN (${channel:singlequote}), $channel)", req) == "1=1"
    assert expand("$__conditionalAll(campaign IN (${campaign:singlequote}), $campaign)", req) == (
        "campaign IN ('o\\'brien','x')")
    assert expand("c IN ($channel) OR c IN (${campaign:sqlstring})", req) == (
        "c IN ('ad','web') OR c IN ('o''brien','x')")
    for broken in ("$__timeFiltr(ts)", "$__timeFilter", "$chanel", "${campaign:csv}"):
        with pytest.raises(ValueError):
            expand(broken, req)


# --- the dashboard model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    sources = [ds for path in sorted(DATASOURCES.glob("*.yaml"))
               for ds in yaml.safe_load(path.read_text())["datasources"] if ds["type"] == PLUGIN]
    assert len(sources) == 1, "one provisioned ClickHouse data source"
    return sources[0]["uid"]


def targets(dashboard: dict):
    """(where, target) for every ClickHouse query: panel targets, variables, annotations."""
    for p in dashboard["panels"]:
        for t in p["targets"]:
            yield f"panel {p['id']} {p['title']!r} {t['refId']}", t
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            yield f"variable ${v['name']}", {"rawSql": v["query"], "datasource": v["datasource"]}
    for a in dashboard["annotations"]["list"]:
        if a.get("datasource", {}).get("type") == PLUGIN:
            yield f"annotation {a['name']!r}", a["target"] | {"datasource": a["datasource"]}


def find_panel(dashboard: dict, types: tuple[str, ...], *patterns: str) -> dict:
    """The one panel of one of ``types`` whose SQL matches every regex in ``patterns``."""
    found = [p for p in dashboard["panels"] if p["type"] in types
             and all(any(re.search(pat, t["rawSql"]) for t in p["targets"]) for pat in patterns)]
    assert len(found) == 1, f"expected one {types} panel matching {patterns}, found {len(found)}"
    return found[0]


def test_dashboard_identity(dashboard):
    assert dashboard["uid"] == "surgeflow-ops" and len(dashboard["uid"]) <= 40
    assert dashboard["title"].strip()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert "id" not in dashboard or dashboard["id"] is None, "provisioned dashboards carry no database id"
    assert dashboard["time"]["from"].startswith("now-")


def test_panels_are_clickhouse_panels_with_their_own_place(dashboard, datasource_uid):
    panels = dashboard["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells = set()
    for p in panels:
        assert p["datasource"] == {"type": PLUGIN, "uid": datasource_uid}, p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_query_targets_the_data_source_in_sql(dashboard, datasource_uid):
    for where, t in targets(dashboard):
        assert t["datasource"] == {"type": PLUGIN, "uid": datasource_uid}, where
        assert t["rawSql"].strip(), where
        if "refId" in t:  # panel and annotation targets: the plugin's SQL editor, and its format
            assert t["editorType"] == "sql", where
            assert (t["queryType"], t["format"]) in {("timeseries", 0), ("table", 1)}, where
        # The database is the data source's default one: no table is qualified with a database.
        qualified = re.findall(r"\b(?:FROM|JOIN)\s+(\w+)\.(\w+)", t["rawSql"], re.IGNORECASE)
        assert not qualified, f"{where}: tables must not name a database: {qualified}"
        assert "{db}" not in t["rawSql"] and "surgeflow." not in t["rawSql"], where


def test_variables_for_channel_and_campaign(dashboard, datasource_uid):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("channel", "campaign"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["type"] == PLUGIN, name
        assert v["refresh"] == 2, f"${name} is refreshed when the time range changes"
        assert v["multi"] and v["includeAll"], name
        assert v["current"]["value"] == [ALL], f"${name} defaults to All"
        assert re.search(rf"\bSELECT\s+DISTINCT\s+{name}\b", v["query"]), name
    # Queries filter through $__conditionalAll, so that All adds no IN list of every value.
    for where, t in targets(dashboard):
        rest = _without_conditional_all(t["rawSql"])
        assert not re.search(r"\$\{?(channel|campaign)\b", rest), f"{where}: a variable outside $__conditionalAll"


def test_required_panel_kinds(dashboard):
    traffic = find_panel(dashboard, ("timeseries",), r"FROM events_minute FINAL", r"sum\(events\)")
    assert re.search(r"GROUP BY time, channel", traffic["targets"][0]["rawSql"])
    find_panel(dashboard, ("timeseries",), r"FROM events_minute FINAL", r"uniqExactMerge\(users\)")
    funnel = find_panel(dashboard, ("barchart", "bargauge"), r"FROM funnel_hour")
    for state in ("viewed", "carted", "checked_out", "ordered"):
        assert f"uniqExactMerge({state})" in funnel["targets"][0]["rawSql"]
    kpi = find_panel(dashboard, ("table",), r"FROM events_(hour|day)\b", r"\bctr\b")
    for column in ("impressions", "clicks", "ctr", "orders", "cvr", "revenue", "cost", "roi", "cpc", "cpa", "aov"):
        assert re.search(rf"\bAS {column}\b|^\s+{column},", kpi["targets"][0]["rawSql"], re.MULTILINE), column
    find_panel(dashboard, ("table",), r"FROM alerts FINAL")
    find_panel(dashboard, ("state-timeline",), r"FROM alerts FINAL")
    annotations = [a for a in dashboard["annotations"]["list"] if a.get("datasource", {}).get("type") == PLUGIN]
    assert len(annotations) == 1 and "FROM alerts FINAL" in annotations[0]["target"]["rawSql"]
    find_panel(dashboard, ("timeseries",), r"FROM user_days FINAL")
    find_panel(dashboard, ("timeseries",), r"FROM users_first_seen")
    find_panel(dashboard, ("timeseries",), r"FROM events_hour", r"sum\(revenue\)")
    find_panel(dashboard, ("timeseries",), r"FROM actions FINAL")


# --- the warehouse, seeded ----------------------------------------------------------------------

T0 = dt.datetime(2025, 3, 10, 10, 0, tzinfo=UTC)
MIN = dt.timedelta(minutes=1)
DAY = dt.timedelta(days=1)
RANGE = (dt.datetime(2025, 3, 10, 9, 45, tzinfo=UTC), dt.datetime(2025, 3, 10, 11, 0, tzinfo=UTC))
COLUMNS = ["ts", "channel", "campaign", "creative", "event_name", "events", "revenue", "cost", "orders", "users"]
# (minute, channel, campaign, creative, event name, events, revenue, cost, orders, users)
ROWS = [
    (T0, "ad", "spring", "cr1", "ad_impression", 1000, 0.0, 5.0, 0, []),
    (T0, "ad", "spring", "cr1", "ad_click", 50, 0.0, 25.0, 0, ["u1", "u2", "u3"]),
    (T0 + MIN, "ad", "spring", "cr1", "ad_impression", 1000, 0.0, 5.0, 0, []),
    (T0 + MIN, "ad", "spring", "cr1", "ad_click", 30, 0.0, 15.0, 0, ["u4"]),
    (T0 + MIN, "ad", "spring", "cr2", "product_viewed", 40, 0.0, 0.0, 0, ["u1", "u2", "u3", "u4"]),
    (T0 + MIN, "ad", "spring", "cr2", "add_to_cart", 10, 0.0, 0.0, 0, ["u1", "u2", "u3"]),
    (T0 + 2 * MIN, "ad", "spring", "cr2", "checkout_started", 5, 0.0, 0.0, 0, ["u1", "u2"]),
    (T0 + 2 * MIN, "ad", "spring", "cr2", "order_completed", 4, 200.0, 0.0, 4, ["u1"]),
    (T0, "email", "summer", "m1", "product_viewed", 20, 0.0, 0.0, 0, ["u5", "u6"]),
    (T0 + MIN, "email", "summer", "m1", "order_completed", 2, 100.0, 0.0, 2, ["u5"]),
    (T0, "web", "", "", "page_viewed", 100, 0.0, 0.0, 0, ["u7", "u8", "u1"]),
    (T0 + 2 * MIN, "web", "o'brien", "x", "ad_impression", 10, 0.0, 1.0, 0, []),
    (T0 - DAY, "web", "", "", "page_viewed", 999, 0.0, 0.0, 0, ["u7"]),  # the day before: out of range
]
ALERT_COLUMNS = ["alert_id", "rule", "series", "status", "minute", "value", "mu", "sigma", "k", "z", "window",
                 "severity", "first_seen", "response", "baseline"]
RULE = "events_per_minute"


def _alert(series, status, minute, value, mu, sigma, z, first_seen, baseline="time of day"):
    return (f"{RULE}|{series}|{int(first_seen.timestamp() * 1000)}", RULE, series, status, minute, value, mu,
            sigma, 3.0, z, "30m", "II", first_seen, "check ingest", baseline)


H9 = dt.datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
ALERTS = [
    _alert("channel=web", "firing", H9, 500.0, 100.0, 20.0, 20.0, H9),  # from before the range ...
    _alert("channel=web", "resolved", H9 + 50 * MIN, 110.0, 100.0, 20.0, 0.5, H9),  # ... into it
    _alert("all", "firing", T0 + MIN, 2200.0, 1000.0, 100.0, 12.0, T0 + MIN),
    _alert("all", "resolved", T0 + 3 * MIN, 1100.0, 1000.0, 100.0, 1.0, T0 + MIN),
    _alert("channel=ad", "firing", T0 + 2 * MIN, 9.0, 1000.0, 50.0, -19.8, T0 + 2 * MIN,
           "shift from level"),  # still firing
    _alert("all", "firing", T0 - DAY, 10.0, 1.0, 1.0, 9.0, T0 - DAY),  # over long before the range
    _alert("all", "resolved", T0 - DAY + 5 * MIN, 1.0, 1.0, 1.0, 0.0, T0 - DAY),
    _alert("channel=email", "firing", T0 + 90 * MIN, 50.0, 2.0, 1.0, 48.0, T0 + 90 * MIN),  # after the range
]
ACTION_COLUMNS = ["action_id", "rule", "user_id", "channel", "campaign", "session_id", "event_time"]
ACTIONS = [
    ("a1", "three_page_views", "u1", "ad", "spring", "s1", T0 + dt.timedelta(seconds=10)),
    ("a2", "three_page_views", "u2", "ad", "spring", "s2", T0 + dt.timedelta(seconds=40)),
    ("a3", "cart_abandoned", "u5", "email", "summer", "s3", T0 + dt.timedelta(seconds=65)),
    ("a0", "three_page_views", "u7", "web", "", "s4", T0 - DAY),
]


MODEL_COLUMNS = ["ts", "model", "shard", "metric", "value", "examples"]
MODEL_ROWS = [(T0, "ctr", 0, "auc", 0.6, 10), (T0, "ctr", 0, "log_loss", 0.4, 10),
              (T0 + MIN, "ctr", 0, "auc", 0.7, 12), (T0 + MIN, "ctr", 0, "labels", 2.0, 12),
              (T0, "churn_risk", 0, "log_loss", 0.5, 3), (T0 - DAY, "ctr", 0, "auc", 0.1, 1)]


class Warehouse:
    """The migrated, seeded test database, and a client whose default database it is."""

    def __init__(self, client, db: str, tz: str, dashboard: dict):
        self.client, self.db, self.tz, self.dashboard = client, db, tz, dashboard

    def request(self, interval_s: int = 60, **selected) -> Request:
        sel = {"channel": ALL, "campaign": ALL} | selected
        return Request(*RANGE, interval_s=interval_s, selected=sel,
                       options={"channel": ["ad", "email", "web"], "campaign": ["o'brien", "spring", "summer"]})

    def run(self, sql: str, req: Request | None = None) -> list[dict]:
        result = self.client.query(expand(sql, req or self.request()))
        return [dict(zip(result.column_names, row)) for row in result.result_rows]

    def panel(self, types, *patterns, ref: str = "A", req: Request | None = None) -> list[dict]:
        p = find_panel(self.dashboard, types, *patterns)
        (t,) = [t for t in p["targets"] if t["refId"] == ref]
        return self.run(t["rawSql"], req)


@pytest.fixture(params=["UTC", "Asia/Kolkata"])
def warehouse(request, chdb_client, chdb_dsn, ch_database, dashboard):
    tz = request.param
    migrate(chdb_client, ch_database, tz)
    db = ch_database
    chdb_client.insert(f"{db}.events_minute_in", ROWS, column_names=COLUMNS)
    # A replayed minute: the same rows again in events_minute; FINAL must count them once.
    chdb_client.command(f"INSERT INTO {db}.events_minute SELECT * FROM {db}.events_minute WHERE channel = 'email'")
    for _ in range(2):  # alerts and actions written twice, as after a restart
        chdb_client.insert(f"{db}.alerts", ALERTS, column_names=ALERT_COLUMNS)
        chdb_client.insert(f"{db}.actions", ACTIONS[:1], column_names=ACTION_COLUMNS)
    chdb_client.insert(f"{db}.actions", ACTIONS[1:], column_names=ACTION_COLUMNS)
    for _ in range(2):  # a replayed label minute: FINAL reads it once
        chdb_client.insert(f"{db}.model_metrics", MODEL_ROWS, column_names=MODEL_COLUMNS)
    # The data source's default database: a second handle on the session's chDB directory.
    client = clickhouse_connect.get_client(dsn=chdb_dsn, database=db)
    try:
        yield Warehouse(client, db, tz, dashboard)
    finally:
        client.close()


def epoch(t) -> int:
    """A result time (naive = UTC, as clickhouse_connect returns DateTime) as Unix seconds."""
    if isinstance(t, dt.datetime):
        return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp())
    return int(dt.datetime(t.year, t.month, t.day, tzinfo=UTC).timestamp())


def in_range(rows=ROWS, channels=None, campaigns=None):
    start, end = RANGE
    return [r for r in rows if start <= r[0] <= end and (channels is None or r[1] in channels)
            and (campaigns is None or r[2] in campaigns)]


def expected_traffic(bucket_min=1, **kw) -> dict[tuple[int, str], float]:
    out: dict[tuple[int, str], float] = {}
    for r in in_range(**kw):
        t = int(r[0].timestamp()) // (60 * bucket_min) * 60 * bucket_min
        out[(t, r[1])] = out.get((t, r[1]), 0) + r[5] / bucket_min
    return out


def test_every_query_runs_with_any_selection(warehouse):
    selections = [{}, {"channel": ["ad"]}, {"channel": ["web", "email"], "campaign": ["o'brien"]},
                  {"campaign": ["spring", "summer"]}]
    for where, t in targets(warehouse.dashboard):
        for interval_s in (1, 60, 3600):
            for sel in selections:
                try:
                    warehouse.run(t["rawSql"], warehouse.request(interval_s, **sel))
                except Exception as exc:  # noqa: BLE001 - any failure, reported with the query and selection
                    pytest.fail(f"{where} fails with interval {interval_s}s and {sel}: {exc}")


def test_time_series_start_with_a_sorted_time_column(warehouse):
    for p in warehouse.dashboard["panels"]:
        for t in p["targets"]:
            if t["format"] != 0:
                continue
            result = warehouse.client.query(expand(t["rawSql"], warehouse.request()))
            assert result.column_names[0] == "time", p["title"]
            times = [epoch(row[0]) for row in result.result_rows]
            assert times and times == sorted(times), f"{p['title']}: long frames must be sorted by time"


def test_replacing_tables_are_read_final_and_aggregating_tables_merged(warehouse, dashboard):
    engines = dict(warehouse.client.query(
        "SELECT name, engine FROM system.tables WHERE database = {db:String}", parameters={"db": warehouse.db}
    ).result_rows)
    for where, t in targets(dashboard):
        sql = t["rawSql"]
        for table, final in re.findall(r"\bFROM\s+(\w+)(\s+FINAL\b)?", sql):
            if table not in engines:
                continue  # a CTE or subquery alias
            if engines[table] == "ReplacingMergeTree":
                assert final, f"{where}: {table} keeps duplicates until merged; read it with FINAL"
            elif engines[table] == "AggregatingMergeTree":  # rows of a key merge at query time
                assert re.search(r"\bGROUP BY\b|\bSELECT\s+DISTINCT\b|\w+Merge\(", sql), \
                    f"{where}: merge {table}'s rows (GROUP BY, DISTINCT keys or -Merge functions)"


def test_traffic_events_per_minute_by_channel(warehouse):
    panel = (("timeseries",), r"FROM events_minute FINAL", r"sum\(events\)")

    def got(req):
        return {(epoch(r["time"]), r["channel"]): r["events_per_minute"] for r in warehouse.panel(*panel, req=req)}

    assert got(warehouse.request()) == expected_traffic()
    assert got(warehouse.request())[(int(T0.timestamp()), "ad")] == 1050  # by hand: 1000 + 50
    assert got(warehouse.request(channel=["ad"])) == expected_traffic(channels={"ad"})
    assert got(warehouse.request(campaign=["summer"])) == expected_traffic(campaigns={"summer"})
    # Two-minute buckets on a longer range: still events per minute.
    assert got(warehouse.request(interval_s=120)) == expected_traffic(bucket_min=2)
    assert got(warehouse.request(interval_s=150)) == expected_traffic(bucket_min=2)


def test_traffic_unique_users_per_minute(warehouse):
    rows = warehouse.panel(("timeseries",), r"FROM events_minute FINAL", r"uniqExactMerge\(users\)")
    expected: dict[int, set] = {}
    for r in in_range():
        expected.setdefault(int(r[0].timestamp()), set()).update(r[9])
    assert {epoch(r["time"]): r["unique_users"] for r in rows} == {t: len(u) for t, u in expected.items()}
    assert [r["unique_users"] for r in rows] == [7, 5, 2]  # by hand


def test_funnel_steps_and_conversion(warehouse):
    def funnel(**sel):
        rows = warehouse.panel(("barchart", "bargauge"), r"FROM funnel_hour", req=warehouse.request(**sel))
        return [(r["step"], r["users"], r["step_conversion"], r["conversion_from_view"]) for r in rows]

    assert funnel() == [
        ("1 product_viewed", 6, 1.0, 1.0),  # u1-u4 (ad), u5, u6 (email)
        ("2 add_to_cart", 3, 0.5, 0.5),
        ("3 checkout_started", 2, pytest.approx(2 / 3), pytest.approx(1 / 3)),
        ("4 order_completed", 2, 1.0, pytest.approx(1 / 3)),  # u1 and u5
    ]
    assert [users for _, users, _, _ in funnel(channel=["ad"])] == [4, 3, 2, 1]
    assert funnel(channel=["web"]) == [
        ("1 product_viewed", 0, None, None), ("2 add_to_cart", 0, None, None),
        ("3 checkout_started", 0, None, None), ("4 order_completed", 0, None, None)]


def test_campaign_kpis(warehouse):
    def kpis(**sel):
        rows = warehouse.panel(("table",), r"FROM events_(hour|day)\b", r"\bctr\b", req=warehouse.request(**sel))
        return {(r.pop("campaign"), r.pop("channel")): r for r in rows}

    rows = kpis()
    assert list(rows) == [("spring", "ad"), ("summer", "email"), ("o'brien", "web")]  # by revenue
    # spring: 2,000 impressions, 80 clicks, 4 orders for 200.0, cost 5+25+5+15 = 50.0.
    assert rows["spring", "ad"] == {
        "impressions": 2000, "clicks": 80, "ctr": pytest.approx(0.04), "orders": 4, "cvr": pytest.approx(0.05),
        "revenue": 200.0, "cost": 50.0, "roi": pytest.approx(3.0), "cpc": pytest.approx(0.625),
        "cpa": pytest.approx(12.5), "aov": pytest.approx(50.0)}
    # No impressions, clicks or cost: the ratios over them are NULL, not inf or an error.
    assert rows["summer", "email"] == {
        "impressions": 0, "clicks": 0, "ctr": None, "orders": 2, "cvr": None, "revenue": 100.0, "cost": 0.0,
        "roi": None, "cpc": None, "cpa": 0.0, "aov": pytest.approx(50.0)}
    assert rows["o'brien", "web"] == {
        "impressions": 10, "clicks": 0, "ctr": 0.0, "orders": 0, "cvr": None, "revenue": 0.0, "cost": 1.0,
        "roi": -1.0, "cpc": None, "cpa": None, "aov": None}
    # A campaign whose name holds a quote is selected safely, and the channel filter applies.
    assert list(kpis(campaign=["o'brien"])) == [("o'brien", "web")]
    assert list(kpis(channel=["email", "web"])) == [("summer", "email"), ("o'brien", "web")]


def test_alerts_table_latest_first(warehouse):
    rows = warehouse.panel(("table",), r"FROM alerts FINAL")
    got = [(r["series"], r["status"], epoch(r["first_seen"]), r["resolved_at"] and epoch(r["resolved_at"]),
            r["rule"], r["severity"], r["value"], r["mu"], r["sigma"], r["z"], r["baseline"]) for r in rows]
    ts = lambda t: int(t.timestamp())
    day = "time of day"
    assert got == [  # each alert once (written twice), the ones overlapping the range, latest first
        ("channel=ad", "firing", ts(T0 + 2 * MIN), None, RULE, "II", 9.0, 1000.0, 50.0, -19.8,
         "shift from level"),
        ("all", "resolved", ts(T0 + MIN), ts(T0 + 3 * MIN), RULE, "II", 2200.0, 1000.0, 100.0, 12.0, day),
        ("channel=web", "resolved", ts(H9), ts(H9 + 50 * MIN), RULE, "II", 500.0, 100.0, 20.0, 20.0, day),
    ]


def test_alert_state_timeline_and_annotations(warehouse):
    rows = warehouse.panel(("state-timeline",), r"FROM alerts FINAL")
    ts = lambda t: int(t.timestamp())
    assert [(epoch(r["time"]), r["alert"], r["state"]) for r in rows] == [
        (ts(RANGE[0]), f"{RULE} channel=web", 1),  # firing since before the range
        (ts(H9 + 50 * MIN), f"{RULE} channel=web", 0),
        (ts(T0 + MIN), f"{RULE} all", 1),
        (ts(T0 + 2 * MIN), f"{RULE} channel=ad", 1),
        (ts(T0 + 3 * MIN), f"{RULE} all", 0),
    ]
    (annotation,) = [a for a in warehouse.dashboard["annotations"]["list"]
                     if a.get("datasource", {}).get("type") == PLUGIN]
    notes = warehouse.run(annotation["target"]["rawSql"])
    assert [(epoch(n["time"]), epoch(n["timeEnd"])) for n in notes] == [
        (ts(H9), ts(H9 + 50 * MIN)), (ts(T0 + MIN), ts(T0 + 3 * MIN)), (ts(T0 + 2 * MIN), ts(T0 + 2 * MIN))]
    assert all(n["text"].startswith(RULE) and n["tags"] == f"II,{RULE}" for n in notes)
    assert "still firing" in notes[2]["text"] and "channel=ad" in notes[2]["text"]


def test_daily_and_new_users(warehouse):
    dau = warehouse.panel(("timeseries",), r"FROM user_days FINAL", ref="A")
    new = warehouse.panel(("timeseries",), r"FROM users_first_seen", ref="B")
    day = dt.date(2025, 3, 10)
    seen_today = {u for r in ROWS if r[0].astimezone(zoneinfo.ZoneInfo(warehouse.tz)).date() == day for u in r[9]}
    seen_before = {u for r in ROWS if r[0].astimezone(zoneinfo.ZoneInfo(warehouse.tz)).date() < day for u in r[9]}
    assert [(r["time"], r["dau"]) for r in dau] == [(day, len(seen_today))] == [(day, 8)]
    assert [(r["time"], r["new_users"]) for r in new] == [(day, len(seen_today - seen_before))] == [(day, 7)]


def test_revenue_per_hour(warehouse):
    def revenue(**sel):
        rows = warehouse.panel(("timeseries",), r"FROM events_hour", r"sum\(revenue\)",
                               req=warehouse.request(**sel))
        return {epoch(r["time"]): r["revenue"] for r in rows}

    local = T0.astimezone(zoneinfo.ZoneInfo(warehouse.tz)).replace(minute=0)  # the hour in the reporting zone
    hour = int(local.timestamp())
    assert revenue() == {hour: 300.0}
    assert revenue(campaign=["summer"]) == {hour: 100.0}
    assert revenue(channel=["web"]) == {hour: 0.0}


def test_actions_per_minute_by_rule(warehouse):
    def actions(**sel):
        rows = warehouse.panel(("timeseries",), r"FROM actions FINAL", req=warehouse.request(**sel))
        return {(epoch(r["time"]), r["rule"]): r["actions_per_minute"] for r in rows}

    t0 = int(T0.timestamp())
    assert actions() == {(t0, "three_page_views"): 2, (t0 + 60, "cart_abandoned"): 1}  # a1 once
    assert actions(channel=["ad"]) == {(t0, "three_page_views"): 2}
    assert actions(campaign=["summer"]) == {(t0 + 60, "cart_abandoned"): 1}


def test_variables_list_channels_and_campaigns(warehouse):
    variables = {v["name"]: v["query"] for v in warehouse.dashboard["templating"]["list"]}

    def values(name, **sel):
        return [next(iter(r.values())) for r in warehouse.run(variables[name], warehouse.request(**sel))]

    assert values("channel") == ["ad", "email", "web"]
    assert values("campaign") == ["o'brien", "spring", "summer"]
    assert values("campaign", channel=["email"]) == ["summer"]
    assert values("campaign", channel=["web"]) == ["o'brien"]


def test_a_broken_query_fails_validation(warehouse):
    """The checks above would catch a misspelt column or macro: chDB rejects the SQL."""
    traffic = find_panel(warehouse.dashboard, ("timeseries",), r"FROM events_minute FINAL", r"sum\(events\)")
    sql = traffic["targets"][0]["rawSql"]
    warehouse.run(sql)
    with pytest.raises(Exception, match="(?i)event_count|unknown|missing"):
        warehouse.run(sql.replace("sum(events)", "sum(event_count)"))
    with pytest.raises(ValueError, match="unknown macro"):
        warehouse.run(sql.replace("$__timeFilter(ts)", "$__timeFiltre(ts)"))


def test_online_models_auc_and_log_loss_per_model(warehouse):
    def quality(interval_s):
        rows = warehouse.panel(("timeseries",), r"FROM model_metrics FINAL",
                               req=warehouse.request(interval_s))
        return {(epoch(r["time"]), r["model"]): (r["auc"], r["log_loss"]) for r in rows}
    t0 = int(T0.timestamp())
    nan = quality(60)[(t0, "churn_risk")][0]
    assert nan != nan  # no AUC that minute: a gap, not a zero
    minutes = quality(60)
    assert minutes[(t0, "ctr")] == (0.6, 0.4)
    auc, log_loss = minutes[(t0 + 60, "ctr")]
    assert auc == 0.7 and log_loss != log_loss
    assert {k for k in minutes if k[1] == "ctr"} == {(t0, "ctr"), (t0 + 60, "ctr")}  # not the day before
    # an hour per bucket: the mean of the minutes that had the metric
    hour = quality(3600)
    bucket = t0 // 3600 * 3600
    assert hour[(bucket, "ctr")][0] == pytest.approx(0.65) and hour[(bucket, "ctr")][1] == 0.4
