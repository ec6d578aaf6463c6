"""Period reports (day, week, month): the KPI summary and the per-campaign table, from the named
KPI queries, for ``surgeflow report``.

Periods are calendar periods in the reporting time zone: a day from midnight, a week from Monday,
a month from the first.

>>> import datetime as dt
>>> [t.isoformat() for t in period_bounds("week", dt.date(2026, 11, 25), "Asia/Shanghai")]
['2026-11-23T00:00:00+08:00', '2026-11-30T00:00:00+08:00']
>>> [t.isoformat() for t in period_bounds("month", dt.date(2026, 12, 31), "UTC")]
['2026-12-01T00:00:00+00:00', '2027-01-01T00:00:00+00:00']
"""
from __future__ import annotations

import csv
import datetime as dt
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

from warehouse import kpi

PERIODS = ("day", "week", "month")
RATIO_KEYS = ("ctr", "cvr", "roi", "cpc", "cpa", "aov")
CAMPAIGN_COLUMNS = ("campaign", "channel", "impressions", "clicks", "ctr", "orders", "cvr",
                    "revenue", "cost", "roi", "cpc", "cpa", "aov", "users")


def period_bounds(period: str, day: dt.date, tz: str) -> tuple[dt.datetime, dt.datetime]:
    if period not in PERIODS:
        raise kpi.KpiError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
    zone = zoneinfo.ZoneInfo(tz)
    if period == "day":
        first, after = day, day + dt.timedelta(days=1)
    elif period == "week":
        first = day - dt.timedelta(days=day.weekday())
        after = first + dt.timedelta(days=7)
    else:
        first = day.replace(day=1)
        after = (first + dt.timedelta(days=32)).replace(day=1)
    return (dt.datetime.combine(first, dt.time(), zone), dt.datetime.combine(after, dt.time(), zone))


@dataclass
class Report:
    period: str
    start: dt.datetime
    end: dt.datetime
    summary: dict[str, float | int | None] = field(default_factory=dict)
    campaigns: list[dict] = field(default_factory=list)


def _ratio(a, b):
    return a / b if b else None


def build_report(client, db: str, period: str, day: dt.date | None = None) -> Report:
    """The report of the period containing ``day`` (default: the newest minute in the data)."""
    tz = kpi.timezone_of(client, db)
    if day is None:
        latest = kpi.run(client, "latest_minute", db)[0]
        newest = latest["t"] if latest["rows"] else dt.datetime.now(dt.timezone.utc)
        day = newest.astimezone(zoneinfo.ZoneInfo(tz)).date()
    start, end = period_bounds(period, day, tz)
    report = Report(period, start, end)
    window = {"start": start, "end": end}

    kpis = kpi.run(client, "campaign_kpis", db, granularity="total", **window)
    total = next((r for r in kpis if r["is_total"]), {})
    # Per campaign over all its channels first (an ad's clicks and the orders of the sessions it
    # brought are on different channels), then per campaign and channel.
    report.campaigns = sorted((r for r in kpis if not r["is_total"]),
                              key=lambda r: (-r["all_channels"], -(r["revenue"] or 0),
                                             r["campaign"], r["channel"]))
    s = report.summary
    uv = kpi.run(client, "uv", db, granularity="total", **window)
    s["events"] = uv[0]["events"] if uv else 0
    s["uv"] = uv[0]["uv"] if uv else 0
    for key in ("impressions", "clicks", "orders", "revenue", "cost"):
        s[key] = total.get(key, 0)
    for key in RATIO_KEYS:
        s[key] = total.get(key)

    active = kpi.run(client, "active_users", db, granularity=period, **window)
    s["active_users"] = active[0]["active_users"] if active else 0
    s["new_users"] = active[0]["new_users"] if active else 0
    daily = kpi.run(client, "active_users", db, granularity="day", **window)
    s["avg_dau"] = round(sum(r["active_users"] for r in daily) / len(daily), 1) if daily else 0

    funnel = next((r for r in kpi.run(client, "funnel", db, granularity="total", **window)
                   if r["is_total"]), {})
    for key in ("viewed", "carted", "checked_out", "ordered", "view_to_cart", "cart_to_checkout",
                "checkout_to_order", "view_to_order"):
        s[f"funnel_{key}"] = funnel.get(key, 0 if key in ("viewed", "carted", "checked_out", "ordered") else None)

    push = kpi.run(client, "push", db, granularity="total", **window)
    sent, delivered, opened = (sum(r[k] for r in push) for k in ("sent", "delivered", "opened"))
    s["push_sent"], s["push_delivered"], s["push_opened"] = sent, delivered, opened
    s["push_delivery_rate"] = _ratio(delivered, sent) if delivered else None
    s["push_open_rate"] = _ratio(opened, delivered if delivered else sent)

    cohorts = kpi.run(client, "retention", db, **window)
    for n in (1, 7):
        measured = [c for c in cohorts if c[f"retention_d{n}"] is not None]
        s[f"retention_d{n}"] = _ratio(sum(c[f"retained_d{n}"] for c in measured),
                                      sum(c["new_users"] for c in measured))
    return report


def write_csv(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """``<period>-<first day>-summary.csv`` (metric, value) and ``...-campaigns.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report.period}-{report.start.date().isoformat()}"
    summary = out_dir / f"{stem}-summary.csv"
    with summary.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value"])
        w.writerow(["period_start", report.start.isoformat()])
        w.writerow(["period_end", report.end.isoformat()])
        for key, value in report.summary.items():
            w.writerow([key, "" if value is None else value])
    campaigns = out_dir / f"{stem}-campaigns.csv"
    with campaigns.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CAMPAIGN_COLUMNS)
        for row in report.campaigns:
            row = dict(row, channel="all") if row["all_channels"] else row
            w.writerow(["" if row.get(c) is None else row.get(c) for c in CAMPAIGN_COLUMNS])
    return summary, campaigns
