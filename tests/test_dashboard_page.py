"""The built-in dashboard (dashboards/server.py, dashboards/web/): its JSON API against seeded chDB
minutes, and the page itself in a real headless Chromium (Debian's chromium + chromedriver,
driven by selenium), served from this process beside the shared chDB client.

Seed: ten minutes 2024-05-01 10:00..10:09 UTC (old on purpose: every window ends at the newest
minute, event time) on three channels, and one minute at 08:30, inside the 24 h window of the
funnel and campaign KPIs but outside the 60 minutes of the traffic chart. The expected figures
below are worked out by hand from the seed.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from connectors.clickhouse import connect
from dashboards.server import start_in_thread
from warehouse.migrate import migrate

UTC = dt.UTC
MINUTE = dt.timedelta(minutes=1)
BASE = dt.datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
SEEDED = [BASE + i * MINUTE for i in range(10)]
OLD = dt.datetime(2024, 5, 1, 8, 30, tzinfo=UTC)
NEW = BASE + 10 * MINUTE  # inserted while the page is open
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

MINUTE_COLUMNS = ["ts", "channel", "campaign", "creative", "event_name", "events", "revenue", "cost",
                  "orders", "users"]
ALERT_COLUMNS = ["alert_id", "rule", "series", "status", "minute", "value", "mu", "sigma", "k", "z",
                 "window", "severity", "first_seen", "response", "baseline"]
ACTION_COLUMNS = ["action_id", "rule", "user_id", "channel", "campaign", "session_id", "event_time"]
VIEWERS, CARTERS, CHECKERS = [f"u{n}" for n in range(1, 7)], ["u1", "u2", "u3", "u4"], ["u1", "u2", "u3"]
SPIKE = "events_per_minute|web|1714557480000"


def minute_rows(i: int) -> list[tuple]:
    ts = SEEDED[i]
    rows = [
        (ts, "ad", "spring_sale", "banner_a", "ad_impression", 100 + 10 * i, 0.0, 2.0, 0, [f"a{i}", f"b{i}"]),
        (ts, "ad", "spring_sale", "banner_a", "ad_click", 4 + i % 3, 0.0, 0.0, 0, [f"a{i}"]),
        (ts, "web", "", "", "product_viewed", 20 + i, 0.0, 0.0, 0, VIEWERS),
        (ts, "web", "", "", "add_to_cart", 5, 0.0, 0.0, 0, CARTERS),
        (ts, "push", "winback", "", "push_opened", 5, 0.0, 0.0, 0, ["u7"]),
    ]
    if i in (2, 6):
        rows.append((ts, "web", "", "", "checkout_started", 2, 0.0, 0.0, 0, CHECKERS))
    if i in (3, 7):
        revenue, user = (59.9, "u1") if i == 3 else (40.1, "u2")
        rows.append((ts, "web", "spring_sale", "banner_a", "order_completed", 1, revenue, 0.0, 1, [user]))
    return rows


OLD_ROWS = [(OLD, "web", "", "", "product_viewed", 7, 0.0, 0.0, 0, ["u9"])]
NEW_ROWS = [(NEW, "web", "", "", "product_viewed", 33, 0.0, 0.0, 0, ["u1"])]
# events per channel in each seeded minute, by hand: ad = impressions + clicks; web = views + carts
# (+ 2 checkouts in minutes 2 and 6, + 1 order in minutes 3 and 7); push = 5 opens
PER_MINUTE = {
    "ad": [100 + 10 * i + 4 + i % 3 for i in range(10)],
    "web": [25 + i + (2 if i in (2, 6) else 0) + (1 if i in (3, 7) else 0) for i in range(10)],
    "push": [5] * 10,
}
ALERTS = [
    (SPIKE, "events_per_minute", "web", "firing", SEEDED[9], 250.0, 40.0, 12.5, 3.0, 16.8, "30m", "II",
     SEEDED[8], "check ingest and campaign traffic sources", "time of day"),
    ("events_per_minute|push|1714557720000", "events_per_minute", "push", "firing", SEEDED[2], 30.0, 5.0,
     0.0, 3.0, math.inf, "30m", "II", SEEDED[2], "check ingest", "level"),
    ("events_per_minute|push|1714557720000", "events_per_minute", "push", "resolved", SEEDED[4], 5.0, 5.0,
     0.0, 3.0, math.nan, "30m", "II", SEEDED[2], "check ingest", "level"),
]
ACTIONS = [(f"act-{n}", "session_page_views", f"u{n}", "push", "winback", f"s{n}",
            SEEDED[5 + n] + dt.timedelta(seconds=12)) for n in (1, 2, 3)]


def insert(ch, db: str, table: str, rows: list[tuple], columns: list[str]) -> None:
    client, lock = ch
    with lock:  # the dashboard's server thread queries the same client
        client.insert(f"{db}.{table}", rows, column_names=columns)


@pytest.fixture
def ch(chdb_client, chdb_dsn):
    """The session's chDB client and the lock every use of it holds."""
    client, lock = connect(chdb_dsn)
    assert client is chdb_client
    return client, lock


MODEL_COLUMNS = ["ts", "model", "shard", "metric", "value", "examples"]
MODEL_ROWS = [(SEEDED[7], "ctr", 0, "auc", 0.64, 80), (SEEDED[7], "ctr", 0, "labels", 6.0, 80),
              (SEEDED[7], "ctr", 0, "calibration", 0.01, 80),
              (SEEDED[9], "ctr", 0, "auc", 0.66, 84), (SEEDED[9], "ctr", 0, "log_loss", 0.25, 84),
              (SEEDED[9], "ctr", 0, "labels", 4.0, 84),
              (SEEDED[0] - dt.timedelta(days=2), "churn_risk", 0, "labels", 9.0, 9)]  # too old


@pytest.fixture
def empty_db(ch, ch_database):
    client, lock = ch
    with lock:
        migrate(client, ch_database)
    return ch_database


@pytest.fixture
def seeded_db(ch, empty_db):
    db = empty_db
    insert(ch, db, "events_minute_in", OLD_ROWS, MINUTE_COLUMNS)
    for i in range(10):  # each minute as its own block, as the flow writes them
        insert(ch, db, "events_minute_in", minute_rows(i), MINUTE_COLUMNS)
    insert(ch, db, "alerts", ALERTS, ALERT_COLUMNS)
    insert(ch, db, "actions", ACTIONS, ACTION_COLUMNS)
    insert(ch, db, "model_metrics", MODEL_ROWS, MODEL_COLUMNS)
    return db


def iso(t: dt.datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@contextlib.contextmanager
def served(dsn: str, db: str):
    """The dashboard on a free loopback port, in a thread of this process; yields its base URL
    and the uvicorn server."""
    server, thread = start_in_thread(dsn, db, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(10)


def get(base: str, path: str, **params):
    """(status, headers, body bytes) of a GET."""
    query = ("?" + "&".join(f"{k}={v}" for k, v in params.items())) if params else ""
    try:
        with urllib.request.urlopen(base + path + query, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def get_json(base: str, path: str, **params):
    status, _, body = get(base, path, **params)
    return status, orjson.loads(body)  # strict JSON: NaN or Infinity would not parse


# ---- the JSON API ------------------------------------------------------------------------------

@pytest.fixture
def api(chdb_dsn, seeded_db):
    with served(chdb_dsn, seeded_db) as (base, _):
        yield base


def test_overview_json_on_seeded_minutes(api):
    status, body = get_json(api, "/api/overview")
    assert status == 200
    assert body["as_of"] == iso(SEEDED[-1]) and body["timezone"] == "UTC"
    assert body["window"] == {"minutes": 60, "hours": 24, "end": "2024-05-01T10:10:00Z",
                              "minutes_start": "2024-05-01T09:10:00Z",
                              "hours_start": "2024-04-30T10:10:00Z"}

    traffic = body["traffic"]
    assert len(traffic["minutes"]) == 60
    assert traffic["minutes"][0] == "2024-05-01T09:10:00Z"
    assert traffic["minutes"][-10:] == [iso(t) for t in SEEDED]
    series = {s["channel"]: s for s in traffic["series"]}
    assert [s["channel"] for s in traffic["series"]] == ["ad", "web", "push"]  # busiest first
    for channel, counts in PER_MINUTE.items():
        assert series[channel]["events"] == [0] * 50 + counts  # 08:30 is outside the 60 minutes
        assert series[channel]["total"] == sum(counts)

    funnel = body["funnel"]["overall"]
    assert (funnel["viewed"], funnel["carted"], funnel["checked_out"], funnel["ordered"]) == (7, 4, 3, 2)
    assert funnel["view_to_cart"] == pytest.approx(4 / 7) and funnel["view_to_order"] == pytest.approx(2 / 7)
    assert funnel["checkout_to_order"] == pytest.approx(2 / 3)
    assert {(r["campaign"], r["channel"]): r["viewed"] for r in body["funnel"]["campaigns"]} == {
        ("", "web"): 7, ("spring_sale", "web"): 0}

    campaigns = body["campaigns"]
    rows = {(r["campaign"], r["channel"]): r for r in campaigns["rows"]}
    # One row per campaign over all its channels: the ad's clicks and the web orders together.
    assert [(r["campaign"], r["channel"]) for r in campaigns["rows"]] == [
        ("spring_sale", "all"), ("", "all"), ("winback", "all")]  # revenue desc
    spring = rows["spring_sale", "all"]
    assert (spring["impressions"], spring["clicks"], spring["cost"]) == (1450, 49, 20.0)
    assert spring["ctr"] == pytest.approx(49 / 1450) and spring["cpc"] == pytest.approx(20 / 49)
    assert spring["roi"] == pytest.approx(4.0) and spring["cpa"] == pytest.approx(10.0)
    assert (spring["orders"], spring["revenue"], spring["aov"]) == (2, 100.0, 50.0)
    assert spring["cvr"] == pytest.approx(2 / 49)
    assert rows["winback", "all"]["ctr"] is None  # no impressions: NULL, not 0
    total = campaigns["total"]
    assert (total["impressions"], total["clicks"], total["orders"], total["revenue"], total["cost"]) == (
        1450, 49, 2, 100.0, 20.0)
    assert total["roi"] == pytest.approx(4.0) and total["cpa"] == pytest.approx(10.0)

    all_events = sum(row[5] for i in range(10) for row in minute_rows(i)) + 7
    assert body["totals"] == {"events": all_events, "users": 20 + 7 + 1, "revenue": 100.0, "orders": 2}

    alerts = {a["alert_id"]: a for a in body["alerts"]}
    assert body["alerts"][0]["alert_id"] == SPIKE  # newest first
    spike = alerts[SPIKE]
    assert (spike["status"], spike["series"], spike["value"], spike["mu"], spike["sigma"], spike["z"]) == (
        "firing", "web", 250.0, 40.0, 12.5, 16.8)
    assert spike["first_seen"] == iso(SEEDED[8]) and spike["baseline"] == "time of day"
    resolved = alerts["events_per_minute|push|1714557720000"]
    assert resolved["status"] == "resolved" and resolved["z"] is None  # NaN -> null

    assert [a["action_id"] for a in body["actions"]] == ["act-3", "act-2", "act-1"]
    assert body["actions"][0]["event_time"] == "2024-05-01T10:08:12Z"
    # the latest value of each metric, the labels of the last 24 hours
    assert body["models"] == [{"model": "ctr", "auc": 0.66, "log_loss": 0.25, "calibration": 0.01,
                               "label_delay_s": None, "labels": 10, "updated": iso(SEEDED[9])}]
    assert body["query_ms"] > 0 and set(body["query_ms_by_kpi"]) == {
        "latest_minute", "traffic", "funnel", "campaign_kpis", "uv", "recent_alerts", "recent_actions",
        "model_quality"}

    status, narrow = get_json(api, "/api/overview", minutes=5, hours=1)
    assert status == 200 and narrow["traffic"]["minutes"] == [iso(t) for t in SEEDED[-5:]]
    assert narrow["funnel"]["overall"]["viewed"] == 6  # the 08:30 viewer is out of the last hour
    assert get(api, "/api/overview", minutes=0)[0] == 422
    assert get(api, "/api/overview", hours=10_000)[0] == 422

    assert get_json(api, "/healthz") == (200, {"status": "ok", "clickhouse": "ok", "as_of": iso(SEEDED[-1])})


def test_overview_json_on_an_empty_database(chdb_dsn, empty_db):
    with served(chdb_dsn, empty_db) as (base, _):
        status, body = get_json(base, "/api/overview")
        health = get_json(base, "/healthz")
    assert status == 200
    assert body["as_of"] is None and body["window"] is None
    assert body["traffic"] == {"minutes": [], "series": []}
    assert body["funnel"] == {"overall": None, "campaigns": []}
    assert body["campaigns"] == {"rows": [], "total": None}
    assert body["totals"] == {"events": None, "users": None, "revenue": None, "orders": None}
    assert body["alerts"] == [] and body["actions"] == [] and body["models"] == []
    assert health == (200, {"status": "ok", "clickhouse": "ok", "as_of": None})


def test_unmigrated_database_is_503_and_the_page_is_served(chdb_dsn, ch, ch_database):
    with served(chdb_dsn, ch_database) as (base, _):  # the database exists, without tables
        status, body = get_json(base, "/api/overview")
        assert (status, body) == (503, {"detail": "clickhouse unavailable"})  # no error text
        assert get_json(base, "/healthz") == (503, {"status": "unavailable", "clickhouse": "unavailable"})
        status, headers, page = get(base, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"static/app.js" in page and b"http" not in page  # nothing from outside
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"),
                           ("favicon.svg", "image/svg+xml")):
            status, headers, _ = get(base, "/static/" + name)
            assert status == 200 and headers["content-type"].startswith(kind), name
        assert get(base, "/static/nothing.js")[0] == 404


# ---- the page in a real browser ----------------------------------------------------------------

def _no_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def browser():
    """Headless Debian Chromium at 1366x768 with the console log recorded."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (shutil.which(p) and os.access(p, os.X_OK))]
    if missing:
        _no_browser(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver "
                    f"(scripts/test.sh does it when run as root)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _no_browser(f"selenium missing ({exc}): pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,768", "--lang=en-US", "--no-first-run",
                "--disable-background-networking", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:  # noqa: BLE001 - a browser that cannot start counts as missing
        _no_browser(f"chromium did not start: {exc}")
    driver.set_window_size(1366, 768)
    yield driver
    driver.quit()




def _wait(driver, predicate, timeout: float = 20.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: predicate(d), message=f"timed out waiting for {what}")


def _attr(driver, selector: str, name: str):
    return driver.find_element("css selector", selector).get_attribute(name)


def _all(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def _attrs(driver, selector: str, name: str) -> list:
    return [e.get_attribute(name) for e in _all(driver, selector)]


def _values(driver, channel: str) -> list[int]:
    """The per-minute counts the traffic chart drew for one channel."""
    path = f'#traffic-chart svg path.area[data-channel="{channel}"]'
    return [int(v) for v in _attr(driver, path, "data-values").split(",")]


def _text(driver, selector: str) -> str:
    return driver.find_element("css selector", selector).text.strip()


def _assert_no_horizontal_scroll(driver) -> None:
    """Neither the page nor any of its tables scrolls sideways (at 1366 px)."""
    widths = driver.execute_script("""
        const root = document.documentElement;
        return {inner: window.innerWidth, page: root.scrollWidth, client: root.clientWidth,
                tables: [...document.querySelectorAll('.table-wrap')]
                          .map(w => w.scrollWidth - w.clientWidth)};""")
    assert widths["inner"] >= 1300, widths
    assert widths["page"] <= widths["client"], widths
    assert all(extra <= 0 for extra in widths["tables"]), widths


def _ready(driver) -> bool:
    return driver.execute_script("return document.documentElement.dataset.ready") == "1"


def test_dashboard_page_in_headless_chromium(browser, chdb_dsn, ch, seeded_db):
    with served(chdb_dsn, seeded_db) as (base, server):
        check_page(browser, base + "/", server, ch, seeded_db)


def check_page(driver, page_url: str, server, ch, db: str) -> None:
    started = time.perf_counter()
    driver.get(page_url + "?lang=en")
    _wait(driver, _ready, what="data-ready")
    first_render_s = time.perf_counter() - started
    timing = driver.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        return {ready_ms: Number(document.documentElement.dataset.readyMs),
                dom_content_loaded_ms: nav.domContentLoadedEventEnd, load_ms: nav.loadEventEnd,
                api: performance.getEntriesByType('resource').filter(r => r.name.includes('/api/overview'))
                       .map(r => r.duration)[0]};""")
    first_query_ms = float(_text(driver, "#stamp").rsplit("queries ", 1)[1].split()[0].replace(",", ""))

    # traffic: one point per minute of the 60-minute window for each channel; the seeded minutes
    # are its last ten, with the counts worked out by hand
    svg = "#traffic-chart svg"
    assert _attr(driver, svg, "data-points") == "60" and _attr(driver, svg, "data-series") == "3"
    for channel, counts in PER_MINUTE.items():
        path = f'{svg} path.area[data-channel="{channel}"]'
        assert _attr(driver, path, "data-points") == "60"
        assert _values(driver, channel) == [0] * 50 + counts
    assert _attrs(driver, "#traffic-legend .item", "data-channel") == ["ad", "web", "push"]

    # funnel: the seeded unique users per step and the step conversions
    assert _attr(driver, "#funnel-chart svg", "data-points") == "4"
    steps = {e.get_attribute("data-step"): e for e in _all(driver, "#funnel-chart g.step")}
    assert {k: int(e.get_attribute("data-value")) for k, e in steps.items()} == {
        "viewed": 7, "carted": 4, "checked_out": 3, "ordered": 2}
    assert steps["carted"].find_element("css selector", ".bar-value").text == "4"
    assert steps["carted"].find_element("css selector", ".step-rate").text == "57.14% of previous step"
    assert steps["ordered"].find_element("css selector", ".step-rate").text == "66.67% of previous step"
    assert _text(driver, "#funnel-chart .overall") == "View → order: 28.57%"

    # campaign table: seeded campaigns, revenue first, hand-computed CTR (49 clicks / 1450 impressions)
    rows = _all(driver, "#campaign-table tbody tr")
    assert [(r.get_attribute("data-campaign"), r.get_attribute("data-channel")) for r in rows] == [
        ("spring_sale", "all"), ("", "all"), ("winback", "all")]
    spring = '#campaign-table tr[data-campaign="spring_sale"]'
    assert _text(driver, f'{spring} td[data-col="ctr"]') == f"{49 / 1450:.2%}" == "3.38%"
    assert _text(driver, f'{spring} td[data-col="impressions"]') == "1,450"
    assert _text(driver, f'{spring} td[data-col="cpc"]') == "0.41"
    assert _text(driver, f'{spring} td[data-col="roi"]') == "400.00%"
    assert _text(driver, f'{spring} td[data-col="revenue"]') == "100.00"
    assert _text(driver, f'{spring} td[data-col="aov"]') == "50.00"
    assert _text(driver, '#campaign-table tr[data-campaign="winback"] td[data-col="ctr"]') == "–"
    total = "#campaign-table tfoot tr"
    assert _text(driver, f'{total} td[data-col="ctr"]') == "3.38%"
    assert _text(driver, f'{total} td[data-col="roi"]') == "400.00%"
    assert _text(driver, '[data-tile="revenue"] .value') == "100.00"
    assert _text(driver, '[data-tile="orders"] .value') == "2"
    assert _text(driver, '[data-tile="firing"] .value') == "1"

    # alerts: the injected anomaly, highlighted while firing; the resolved one is not
    spike = f'#alert-table tr[data-alert="{SPIKE}"]'
    assert "firing" in _attr(driver, spike, "class").split()
    cells = [c.text for c in _all(driver, f"{spike} td")]
    assert cells == ["events_per_minute", "web", "II", "firing", "250.00", "40.00", "12.50", "16.80",
                     "time of day", "05/01, 10:08"]
    resolved = '#alert-table tr[data-status="resolved"]'
    assert "firing" not in (_attr(driver, resolved, "class") or "")
    assert _text(driver, f'{resolved} td[data-col="z"]') == "–"  # NaN on the wire is null
    assert _attrs(driver, "#action-table tbody tr", "data-action") == ["act-3", "act-2", "act-1"]
    # the models: each one's latest AUC, log loss, calibration, its labels of the last 24 hours
    cells = [c.text for c in _all(driver, '#model-table tr[data-model="ctr"] td')]
    assert cells == ["ctr", "0.660", "0.250", "0.010", "10", "–", "05/01, 10:09"]
    assert "as of 05/01, 10:09 UTC" in _text(driver, "#stamp")

    _assert_no_horizontal_scroll(driver)

    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    # zh / EN toggle: labels switch, the choice persists across a reload (localStorage) while
    # ?lang= still wins when given
    assert _text(driver, "h1") == "surgeflow live marketing dashboard"
    assert _text(driver, '#campaign-table th[data-col="ctr"]') == "CTR"
    driver.find_element("css selector", '.lang button[data-lang="zh"]').click()
    assert _text(driver, "h1") == "surgeflow 实时营销看板"
    assert _text(driver, '#campaign-table th[data-col="ctr"]') == "点击率"
    assert _text(driver, '[data-tile="revenue"] .label') == "收入"
    assert driver.execute_script("return document.documentElement.lang") == "zh-CN"
    assert _attr(driver, '.lang button[data-lang="zh"]', "aria-pressed") == "true"
    assert driver.current_url.endswith("?lang=zh")
    _assert_no_horizontal_scroll(driver)
    driver.get(page_url)
    _wait(driver, _ready, what="data-ready after reload")
    assert _text(driver, "h1") == "surgeflow 实时营销看板"  # from localStorage
    assert _text(driver, f'{spike} td[data-col="status"]') == "告警中"
    driver.get(page_url + "?lang=en")
    _wait(driver, _ready, what="data-ready with ?lang=en")
    assert _text(driver, "h1") == "surgeflow live marketing dashboard"
    # without ?lang= or a stored choice, the browser's language decides
    driver.execute_script("localStorage.clear()")
    driver.get(page_url)
    _wait(driver, _ready, what="data-ready with the browser's language (en-US)")
    assert _text(driver, "h1") == "surgeflow live marketing dashboard"
    user_agent = driver.execute_script("return navigator.userAgent")
    driver.execute_cdp_cmd("Emulation.setUserAgentOverride",
                           {"userAgent": user_agent, "acceptLanguage": "zh-CN"})
    driver.get(page_url)
    _wait(driver, _ready, what="data-ready with the browser's language (zh-CN)")
    assert driver.execute_script("return navigator.language") == "zh-CN"
    assert _text(driver, "h1") == "surgeflow 实时营销看板"
    driver.execute_cdp_cmd("Emulation.setUserAgentOverride",
                           {"userAgent": user_agent, "acceptLanguage": "en-US"})
    driver.get(page_url + "?lang=en")
    _wait(driver, _ready, what="data-ready with ?lang=en")
    empty_labels = driver.execute_script(
        "return [...document.querySelectorAll('[data-i18n]')].filter(e => !e.hidden && !e.textContent.trim())"
        ".map(e => e.dataset.i18n)")
    assert empty_labels == []

    # live refresh: a new minute appears without reloading the page
    before = int(driver.execute_script("return document.documentElement.dataset.refreshes"))
    insert(ch, db, "events_minute_in", NEW_ROWS, MINUTE_COLUMNS)
    _wait(driver, lambda d: d.execute_script("return document.documentElement.dataset.asOf") == iso(NEW),
          timeout=15, what="the new minute")
    assert int(driver.execute_script("return document.documentElement.dataset.refreshes")) > before
    assert _attr(driver, svg, "data-points") == "60"
    web_values = _values(driver, "web")
    assert web_values[-1] == 33 and web_values[-11:-1] == PER_MINUTE["web"]
    ad_values = _values(driver, "ad")
    assert ad_values[-1] == 0 and ad_values[-11:-1] == PER_MINUTE["ad"]
    assert "as of 05/01, 10:10 UTC" in _text(driver, "#stamp")

    # the browser said nothing bad on the way
    problems = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert problems == []
    query_ms = driver.execute_script("return fetch('api/overview').then(r => r.json()).then(b => b.query_ms)")
    (ARTIFACTS / "dashboard-timing.json").write_text(json.dumps(
        {"driver_get_to_ready_s": round(first_render_s, 3), **timing,
         "server_query_ms_first": first_query_ms, "server_query_ms_later": query_ms}, indent=2) + "\n")

    # the server goes away: the page keeps its data and says so, unobtrusively
    server.should_exit = True
    _wait(driver, lambda d: d.find_element("css selector", "#error").is_displayed(), timeout=15,
          what="the fetch error")
    assert _text(driver, "#error").startswith("update failed")
    assert _attr(driver, svg, "data-points") == "60" and "as of 05/01, 10:10 UTC" in _text(driver, "#stamp")
