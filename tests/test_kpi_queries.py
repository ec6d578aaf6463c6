"""Every named KPI query (warehouse/kpi/*.sql) on chDB against known data, hand-checked values.

The data (UTC database): on Monday 2026-11-02 at 10:00 and 10:01 an ad campaign c1 with two
creatives, its web funnel and orders, and a push campaign p1; on 11-03 three users come back (one
new); on 11-09 one user from 11-02 comes back (day 7).
"""
from __future__ import annotations

import datetime as dt

import pytest

from warehouse import kpi
from warehouse.migrate import migrate

UTC = dt.timezone.utc
COLUMNS = ["ts", "channel", "campaign", "creative", "event_name", "events", "revenue", "cost",
           "orders", "users"]


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def users(prefix: str, first: int, last: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(first, last + 1)]


MINUTES = {
    at(2, 10, 0): [
        ("ad", "c1", "cr1", "ad_impression", 100, 0.0, 0.0, 0, users("u", 1, 50)),
        ("ad", "c1", "cr1", "ad_click", 10, 0.0, 5.0, 0, users("u", 1, 10)),
        ("web", "c1", "", "product_viewed", 8, 0.0, 0.0, 0, users("u", 1, 8)),
        ("web", "c1", "", "add_to_cart", 4, 0.0, 0.0, 0, users("u", 1, 4)),
        ("web", "c1", "", "checkout_started", 2, 0.0, 0.0, 0, ["u1", "u2"]),
        ("web", "c1", "", "order_completed", 2, 30.0, 0.0, 2, ["u1", "u2"]),
        ("push", "p1", "", "push_sent", 20, 0.0, 0.0, 0, users("p", 1, 20)),
        ("push", "p1", "", "push_delivered", 18, 0.0, 0.0, 0, users("p", 1, 18)),
        ("push", "p1", "", "push_opened", 9, 0.0, 0.0, 0, users("p", 1, 9)),
    ],
    at(2, 10, 1): [
        ("ad", "c1", "cr2", "ad_impression", 100, 0.0, 0.0, 0, users("u", 41, 90)),
        ("ad", "c1", "cr2", "ad_click", 5, 0.0, 2.5, 0, users("u", 41, 45)),
        ("web", "c1", "", "order_completed", 1, 15.0, 0.0, 1, ["u41"]),
    ],
    at(3, 10): [("web", "", "", "page_view", 5, 0.0, 0.0, 0, ["u1", "u2", "n1"])],
    at(9, 10): [("web", "", "", "page_view", 1, 0.0, 0.0, 0, ["u1"])],
}


def seed(client, db: str) -> None:
    for ts, rows in MINUTES.items():
        client.insert(f"{db}.events_minute_in", [(ts, *r) for r in rows], column_names=COLUMNS,
                      settings={"insert_deduplication_token": f"minute-{ts.timestamp():.0f}",
                                "deduplicate_blocks_in_dependent_materialized_views": 1})


@pytest.fixture
def db(chdb_client, ch_database):
    migrate(chdb_client, ch_database)
    seed(chdb_client, ch_database)
    seed(chdb_client, ch_database)  # inserted twice: deduplicated by the minute tokens
    return ch_database


def run(client, db, name, **kw):
    return kpi.run(client, name, db, **kw)


def test_campaign_kpis(chdb_client, db):
    rows = run(chdb_client, db, "campaign_kpis", start=at(2, 0), end=at(3, 0), granularity="day")
    by = {(r["campaign"], r["channel"], r["is_total"]): r for r in rows}
    assert {r["t"] for r in rows} == {at(2, 0)}
    ad = by["c1", "ad", 0]
    assert (ad["impressions"], ad["clicks"], ad["orders"], ad["cost"], ad["users"]) == (200, 15, 0, 7.5, 90)
    assert ad["ctr"] == pytest.approx(0.075) and ad["cvr"] == 0.0 and ad["roi"] == -1.0
    assert ad["cpc"] == 0.5 and ad["cpa"] is None and ad["aov"] is None
    web = by["c1", "web", 0]
    assert (web["orders"], web["revenue"], web["users"]) == (3, 45.0, 9)
    assert web["ctr"] is None and web["cvr"] is None and web["cpc"] is None and web["roi"] is None
    assert web["cpa"] == 0.0 and web["aov"] == 15.0
    total = by["", "", 1]
    assert (total["impressions"], total["clicks"], total["orders"], total["revenue"], total["cost"],
            total["users"]) == (200, 15, 3, 45.0, 7.5, 110)
    assert (total["ctr"], total["cvr"], total["roi"], total["cpc"], total["cpa"], total["aov"]) == (
        pytest.approx(0.075), pytest.approx(0.2), 5.0, 0.5, 2.5, 15.0)
    # A filter value is a parameter, never SQL: an injection attempt simply matches nothing.
    assert run(chdb_client, db, "campaign_kpis", start=at(2, 0), end=at(3, 0), granularity="day",
               campaign="c1' OR 1=1 --") == []


def test_traffic_and_uv_by_granularity(chdb_client, db):
    rows = run(chdb_client, db, "traffic", start=at(2, 10), end=at(2, 10, 2), granularity="minute")
    got = {(r["t"], r["channel"]): (r["events"], r["users"]) for r in rows}
    assert got == {(at(2, 10), "ad"): (110, 50), (at(2, 10), "web"): (16, 8),
                   (at(2, 10), "push"): (47, 20), (at(2, 10, 1), "ad"): (105, 50),
                   (at(2, 10, 1), "web"): (1, 1)}
    hour = run(chdb_client, db, "uv", start=at(2, 0), end=at(10, 0), granularity="hour")
    assert [(r["t"], r["events"], r["uv"]) for r in hour] == [
        (at(2, 10), 279, 110), (at(3, 10), 5, 3), (at(9, 10), 1, 1)]
    week = run(chdb_client, db, "uv", start=at(1, 0), end=at(16, 0), granularity="week")
    assert [(r["t"], r["events"], r["uv"]) for r in week] == [(at(2, 0), 284, 111), (at(9, 0), 1, 1)]
    month = run(chdb_client, db, "traffic", start=at(1, 0), end=at(30, 0), granularity="month",
                channel="web")
    assert [(r["t"], r["events"], r["users"]) for r in month] == [
        (dt.datetime(2026, 11, 1, tzinfo=UTC), 23, 10)]


def test_funnel(chdb_client, db):
    rows = run(chdb_client, db, "funnel", start=at(2, 0), end=at(3, 0), granularity="hour")
    web = next(r for r in rows if r["channel"] == "web" and not r["is_total"])
    assert (web["viewed"], web["carted"], web["checked_out"], web["ordered"]) == (8, 4, 2, 3)
    assert (web["view_to_cart"], web["cart_to_checkout"], web["checkout_to_order"],
            web["view_to_order"]) == (0.5, 0.5, 1.5, 0.375)
    with pytest.raises(kpi.KpiError, match="finer"):
        run(chdb_client, db, "funnel", start=at(2, 0), end=at(3, 0), granularity="minute")


def test_active_users_and_retention(chdb_client, db):
    days = run(chdb_client, db, "active_users", start=at(1, 0), end=at(10, 0), granularity="day")
    assert [(r["t"], r["active_users"], r["new_users"]) for r in days] == [
        (at(2, 0), 110, 110), (at(3, 0), 3, 1), (at(9, 0), 1, 0)]
    weeks = run(chdb_client, db, "active_users", start=at(2, 0), end=at(16, 0), granularity="week")
    assert [(r["t"], r["active_users"], r["new_users"]) for r in weeks] == [
        (at(2, 0), 111, 111), (at(9, 0), 1, 0)]
    cohorts = run(chdb_client, db, "retention", start=at(1, 0), end=at(10, 0))
    assert [(c["t"], c["new_users"], c["retained_d1"], c["retained_d7"]) for c in cohorts] == [
        (at(2, 0), 110, 2, 1), (at(3, 0), 1, 0, 0)]
    assert cohorts[0]["retention_d1"] == pytest.approx(2 / 110)
    assert cohorts[0]["retention_d7"] == pytest.approx(1 / 110)
    assert cohorts[1]["retention_d1"] == 0.0 and cohorts[1]["retention_d7"] is None  # 11-10: no data yet


def test_push_rates(chdb_client, db):
    rows = run(chdb_client, db, "push", start=at(2, 0), end=at(3, 0), granularity="day")
    assert [(r["campaign"], r["sent"], r["delivered"], r["opened"], r["delivery_rate"],
             r["open_rate"]) for r in rows] == [("p1", 20, 18, 9, 0.9, 0.5)]


def test_recent_alerts_actions_and_latest_minute(chdb_client, db):
    alert = dict(rule="events_per_minute", series="channel=ad", k=3.0, window="30m", severity="II",
                 response="check", mu=100.0, sigma=10.0)
    chdb_client.insert(f"{db}.alerts", [
        ("a1", *[alert[c] for c in ("rule", "series")], "firing", at(2, 10), 200.0, 100.0, 10.0,
         3.0, 10.0, "30m", "II", at(2, 10), "check"),
        ("a1", *[alert[c] for c in ("rule", "series")], "resolved", at(2, 11), 105.0, 100.0, 10.0,
         3.0, 0.5, "30m", "II", at(2, 10), "check"),
        ("a2", "events_per_minute", "all", "firing", at(3, 10), 9.0, 50.0, 5.0, 3.0, -8.2, "30m", "II",
         at(3, 10), "check")],
        column_names=["alert_id", "rule", "series", "status", "minute", "value", "mu", "sigma", "k",
                      "z", "window", "severity", "first_seen", "response"])
    alerts = run(chdb_client, db, "recent_alerts", limit=10)
    assert [(a["alert_id"], a["status"], a["value"]) for a in alerts] == [
        ("a2", "firing", 9.0), ("a1", "resolved", 105.0)]
    chdb_client.insert(f"{db}.actions", [
        (f"x{i}", "session_page_views", f"u{i}", "push", "c1", f"s{i}", at(2, 10, i)) for i in range(3)],
        column_names=["action_id", "rule", "user_id", "channel", "campaign", "session_id", "event_time"])
    assert [a["action_id"] for a in run(chdb_client, db, "recent_actions", limit=2)] == ["x2", "x1"]
    latest = run(chdb_client, db, "latest_minute")[0]
    assert latest["t"] == at(9, 10) and latest["rows"] == 14  # seeded twice, stored once


def test_model_quality_per_model_and_minute(chdb_client, db):
    rows = [(at(2, 10, 0), "ctr", 0, "auc", 0.61, 40), (at(2, 10, 0), "ctr", 0, "log_loss", 0.3, 40),
            (at(2, 10, 0), "ctr", 0, "labels", 12.0, 40), (at(2, 10, 1), "ctr", 0, "labels", 3.0, 43),
            (at(2, 10, 1), "ctr", 0, "calibration", -0.02, 43),
            (at(2, 10, 0), "churn_risk", 0, "labels", 5.0, 5), (at(2, 12), "ctr", 0, "auc", 0.9, 50)]
    for _ in range(2):  # written twice (a replay): read once
        chdb_client.insert(f"{db}.model_metrics", rows,
                           column_names=["ts", "model", "shard", "metric", "value", "examples"])
    got = run(chdb_client, db, "model_quality", start=at(2, 10), end=at(2, 11))
    assert [(r["model"], r["t"], r["auc"], r["log_loss"], r["calibration"], r["labels"])
            for r in got] == [
        ("churn_risk", at(2, 10, 0), None, None, None, 5),
        ("ctr", at(2, 10, 0), 0.61, 0.3, None, 12),
        ("ctr", at(2, 10, 1), None, None, -0.02, 3)]  # 12:00 is outside the range


def test_every_query_is_covered_and_parameters_are_checked():
    tested = {"campaign_kpis", "traffic", "uv", "funnel", "active_users", "retention", "push",
              "recent_alerts", "recent_actions", "latest_minute", "model_quality"}
    assert set(kpi.QUERIES) == tested
    with pytest.raises(kpi.KpiError, match="granularity"):
        kpi.run(None, "traffic", "db", start=0, end=60, granularity="fortnight")
    with pytest.raises(kpi.KpiError, match="unknown KPI"):
        kpi.run(None, "traffic; DROP TABLE x", "db")


def test_days_follow_the_reporting_time_zone(chdb_client, ch_database):
    migrate(chdb_client, ch_database, "Asia/Shanghai")
    late_evening_utc = dt.datetime(2026, 11, 2, 17, 0, tzinfo=UTC)  # 01:00 on 11-03 in Shanghai
    chdb_client.insert(f"{ch_database}.events_minute_in",
                       [(late_evening_utc, "web", "", "", "page_view", 1, 0.0, 0.0, 0, ["u1"])],
                       column_names=COLUMNS)
    rows = kpi.run(chdb_client, "traffic", ch_database, start=at(1, 0), end=at(5, 0), granularity="day")
    assert [r["t"] for r in rows] == [dt.datetime(2026, 11, 2, 16, 0, tzinfo=UTC)]  # local midnight
    days = kpi.run(chdb_client, "active_users", ch_database, start=at(1, 0), end=at(5, 0),
                   granularity="day")
    assert [(r["t"], r["active_users"]) for r in days] == [(dt.datetime(2026, 11, 2, 16, 0, tzinfo=UTC), 1)]


def test_report_command_prints_and_writes_the_week(chdb_dsn, chdb_client, db, tmp_path):
    import csv

    from typer.testing import CliRunner

    from surgeflow.cli import app

    env = {"SURGEFLOW__CLICKHOUSE__DSN": chdb_dsn, "SURGEFLOW__CLICKHOUSE__DATABASE": db}
    result = CliRunner().invoke(app, ["report", "--period", "week", "--date", "2026-11-04",
                                      "--out", str(tmp_path)], env=env)
    assert result.exit_code == 0, result.output
    assert "c1" in result.output and "avg_dau" in result.output
    summary = dict(csv.reader((tmp_path / "week-2026-11-02-summary.csv").open()))
    assert summary["period_start"] == "2026-11-02T00:00:00+00:00"
    assert (summary["events"], summary["uv"], summary["orders"], summary["revenue"]) == (
        "284", "111", "3", "45.0")
    assert (summary["active_users"], summary["new_users"], summary["avg_dau"]) == ("111", "111", "56.5")
    assert float(summary["retention_d1"]) == pytest.approx(2 / 111)
    assert float(summary["retention_d7"]) == pytest.approx(1 / 110)  # the 11-03 cohort: not yet
    assert float(summary["push_open_rate"]) == 0.5 and float(summary["cvr"]) == pytest.approx(0.2)
    rows = list(csv.DictReader((tmp_path / "week-2026-11-02-campaigns.csv").open()))
    c1 = next(r for r in rows if r["campaign"] == "c1" and r["channel"] == "all")
    assert (c1["impressions"], c1["clicks"], c1["orders"], float(c1["ctr"]), float(c1["cvr"])) == (
        "200", "15", "3", 0.075, pytest.approx(0.2))
    assert {(r["campaign"], r["channel"]) for r in rows} >= {("c1", "ad"), ("c1", "web"), ("p1", "push")}
    bad = CliRunner().invoke(app, ["report", "--period", "fortnight"], env=env)
    assert bad.exit_code == 2
