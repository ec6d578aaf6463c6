"""ClickHouse side benchmark: insert throughput, storage per million events, minute-close to
queryable delay, and the dashboard's cost on 30 days of minute data. Prints JSON figures.

    python -m bench.bench_warehouse inserts            # rows/s, ratio to a plain table
    python -m bench.bench_warehouse flow --events 300000 --paced-s 120
    python -m bench.bench_warehouse dashboard --days 30

Everything runs in this process on one chDB directory (a temporary one unless --chdb is given).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from connectors.clickhouse import connect  # noqa: E402
from surgeflow.stats import STATS  # noqa: E402
from warehouse.migrate import migrate  # noqa: E402

COLUMNS = ["ts", "channel", "campaign", "creative", "event_name", "events", "revenue", "cost",
           "orders", "users"]
CHANNELS = ["app", "web", "mini_program", "ad", "push", "sms", "email", "store"]
NAMES = ["page_view", "product_viewed", "add_to_cart", "checkout_started", "order_completed",
         "ad_impression", "ad_click", "push_sent", "push_opened", "search"]


def log(msg: str) -> None:
    print(f"[bench_warehouse] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def minute_rows(m: int, rows: int, users: int) -> list[tuple]:
    ts = dt.datetime.fromtimestamp(m * 60, dt.timezone.utc)
    out = []
    for i in range(rows):
        ch, name = CHANNELS[i % len(CHANNELS)], NAMES[(i // len(CHANNELS)) % len(NAMES)]
        out.append((ts, ch, f"cmp-{i % 12:02d}", f"cr-{i % 3}", name, 5 + i % 7, 10.0 * (i % 3),
                    0.3 * (i % 2), i % 2, [f"u{(m * 7 + i * 13 + k) % 50_000}" for k in range(users)]))
    return out


def bench_inserts(client, args) -> dict:
    db = f"bench_{uuid.uuid4().hex[:6]}"
    migrate(client, db)
    client.command(f"""CREATE TABLE {db}.plain_minute (ts DateTime, channel String, campaign String,
        creative String, event_name String, events UInt64, revenue Float64, cost Float64,
        orders UInt64, users Array(String)) ENGINE = MergeTree ORDER BY (ts, channel, campaign)""")
    start_minute = 29_000_000
    blocks = [minute_rows(start_minute + m, args.rows, args.users) for m in range(args.minutes)]
    n_rows = sum(len(b) for b in blocks)
    figures = {}
    for label, table, settings in (
            ("plain MergeTree, no views (baseline)", "plain_minute", lambda m: {}),
            ("events_minute_in: 7 views, deduplication token", "events_minute_in",
             lambda m: {"insert_deduplication_token": f"minute-{m}",
                        "deduplicate_blocks_in_dependent_materialized_views": 1})):
        t0 = time.perf_counter()
        for m, rows in enumerate(blocks):
            client.insert(f"{db}.{table}", rows, column_names=COLUMNS, settings=settings(m))
        secs = time.perf_counter() - t0
        figures[label] = {"rows_per_s": round(n_rows / secs), "minutes_per_s": round(len(blocks) / secs, 1),
                          "ms_per_minute_block": round(1000 * secs / len(blocks), 2)}
    base, ours = figures.values()
    figures["ratio_to_baseline"] = round(ours["rows_per_s"] / base["rows_per_s"], 3)
    raw = [((29_000_000 * 60 + i) * 1000, f"e{i}", "track", NAMES[i % 10], f"u{i % 5000}", "",
            CHANNELS[i % 8], f"cmp-{i % 12:02d}", "", 0.0, 0.0, "10.1.2.0", "CN", '{"page":"/p"}')
           for i in range(args.raw)]
    rows = [(dt.datetime.fromtimestamp(r[0] / 1000, dt.timezone.utc), *r[1:]) for r in raw]
    cols = ["event_time", "event_id", "type", "event_name", "user_id", "anonymous_id", "channel",
            "campaign", "creative", "revenue", "cost", "ip_masked", "country", "properties"]
    t0 = time.perf_counter()
    for i in range(0, len(rows), 5000):
        client.insert(f"{db}.events_raw", rows[i:i + 5000], column_names=cols)
    secs = time.perf_counter() - t0
    figures["events_raw, 5,000-row batches"] = {"rows_per_s": round(len(rows) / secs)}
    figures["load"] = {"minute_blocks": len(blocks), "rows_per_minute": args.rows,
                       "users_per_row": args.users, "raw_rows": len(rows)}
    client.command(f"DROP DATABASE {db}")
    return figures


def storage(client, db: str) -> dict:
    rows = client.query(
        "SELECT table, sum(rows), sum(bytes_on_disk), sum(data_uncompressed_bytes) FROM system.parts "
        "WHERE database = {db:String} AND active GROUP BY table ORDER BY table",
        parameters={"db": db}).result_rows
    return {t: {"rows": int(r), "bytes_on_disk": int(b), "uncompressed": int(u)} for t, r, b, u in rows}


def bench_flow(client, dsn: str, args) -> dict:
    from config.settings import load_settings
    from connectors.embedded_redis import EmbeddedRedis
    from flows.runner import run

    tmp = Path(tempfile.mkdtemp(prefix="bench-wh-"))
    server = EmbeddedRedis(tmp / "redis")
    redis_url = server.start()
    results = {}
    try:
        for label, speed, events, seconds in (("replay (as fast as possible)", 0, args.events, None),
                                              ("paced replay", args.speed, None, args.paced_s)):
            db = f"bench_{uuid.uuid4().hex[:6]}"
            duration = events / args.rate if events else None
            settings = load_settings(None, env={}, redis__url=redis_url, redis__key_prefix=db,
                                     clickhouse__dsn=dsn, clickhouse__database=db,
                                     clickhouse__spool_dir=str(tmp / "spool"),
                                     output__dir=str(tmp / "out"), flow__recovery_dir=None,
                                     flow__max_lookback_s=None,
                                     source__synthetic={"seed": 3, "users": 20_000, "events_per_s": args.rate,
                                                        "duration_s": duration, "speed": speed,
                                                        "start_ms": 1_795_000_000_000, "anomalies": []})
            STATS.reset()
            STATS.samples.clear()
            STATS.seen.clear()
            if seconds:
                from connectors.synthetic_source import STOP
                import threading
                STOP.clear()
                threading.Timer(seconds, STOP.set).start()
            t0 = time.perf_counter()
            run(settings, redis_url)
            secs = time.perf_counter() - t0
            if seconds:
                from connectors.synthetic_source import STOP
                STOP.clear()
            n = STATS.get("events_in")
            delays = STATS.samples.get("minute_queryable_ms", [])
            parts = storage(client, db)
            per_m = 1_000_000 / max(n, 1)
            results[label] = {
                "events": n, "seconds": round(secs, 1), "events_per_s": round(n / secs),
                "minutes_closed": len(delays),
                "minute_close_to_queryable_ms": {"p50": pct(delays, 0.5), "p99": pct(delays, 0.99),
                                                 "max": pct(delays, 1.0)},
                "storage_bytes_per_1M_events": {t: round(v["bytes_on_disk"] * per_m) for t, v in parts.items()},
                "rows": {t: v["rows"] for t, v in parts.items()},
            }
            client.command(f"DROP DATABASE {db}")
    finally:
        server.stop()
    return results


def seed_days(client, db: str, days: int, end: dt.datetime) -> int:
    """``days`` of minutes up to ``end``: 8 channels x 6 campaigns x 3 event names per minute."""
    minutes = days * 1440
    first = int(end.timestamp()) // 60 - minutes
    client.command(f"""
        INSERT INTO {db}.events_minute_in
        SELECT toDateTime((intDiv(number, 144) + {first}) * 60) AS ts,
               ['app','web','mini_program','ad','push','sms','email','store'][number % 8 + 1] AS channel,
               concat('cmp-', leftPad(toString(intDiv(number, 8) % 6), 2, '0')) AS campaign,
               '' AS creative,
               ['product_viewed','add_to_cart','order_completed'][intDiv(number, 48) % 3 + 1] AS event_name,
               1 + number % 9 AS events,
               if(event_name = 'order_completed', 20.0 * (number % 5), 0) AS revenue,
               0.1 * (number % 3) AS cost,
               if(event_name = 'order_completed', events, 0) AS orders,
               arrayMap(k -> concat('u', toString((number * 7 + k) % 100000)), range(3)) AS users
        FROM numbers({minutes * 144})""")
    return minutes * 144


def bench_dashboard(client, dsn: str, args) -> dict:
    from fastapi.testclient import TestClient

    from dashboards.server import create_app, start_in_thread

    db = f"bench_{uuid.uuid4().hex[:6]}"
    migrate(client, db)
    end = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
    t0 = time.perf_counter()
    rows = seed_days(client, db, args.days, end)
    seeded_s = time.perf_counter() - t0
    app = create_app(dsn, db, max_age_s=0)  # every call recomputes: the refresh cost
    api = TestClient(app)
    times = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        r = api.get("/api/overview")
        times.append(1000 * (time.perf_counter() - t0))
        assert r.status_code == 200
    figures = {"days": args.days, "rows_seeded": rows, "seed_seconds": round(seeded_s, 1),
               "storage": storage(client, db),
               "api_overview_ms": {"p50": pct(times, 0.5), "p99": pct(times, 0.99), "calls": len(times)}}
    figures["first_render"] = first_render(dsn, db)
    client.command(f"DROP DATABASE {db}")
    return figures


def first_render(dsn: str, db: str) -> dict:
    """Headless chromium: navigation start to the page's first data render (data-ready)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from dashboards.server import start_in_thread

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, thread = start_in_thread(dsn, db, "127.0.0.1", port)
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1366,768"):
        opts.add_argument(a)
    opts.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    renders = []
    try:
        for _ in range(5):
            driver.get(f"http://127.0.0.1:{port}/?lang=zh")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if driver.execute_script("return document.documentElement.dataset.ready === '1'"):
                    break
                time.sleep(0.02)
            renders.append(driver.execute_script("return performance.now()"))
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(10)
    return {"ms": [round(r) for r in renders], "median_ms": round(statistics.median(renders))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["inserts", "flow", "dashboard", "all"])
    p.add_argument("--chdb", default=None, help="chDB directory (default: a temporary one)")
    p.add_argument("--minutes", type=int, default=2000)
    p.add_argument("--rows", type=int, default=200, help="rows per minute block")
    p.add_argument("--users", type=int, default=8, help="user ids per row")
    p.add_argument("--raw", type=int, default=200_000)
    p.add_argument("--events", type=int, default=300_000)
    p.add_argument("--rate", type=float, default=300.0, help="event-time events per second")
    p.add_argument("--speed", type=float, default=60.0, help="paced replay: event s per wall s")
    p.add_argument("--paced-s", type=float, default=120.0)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    dsn = "chdb://" + (args.chdb or tempfile.mkdtemp(prefix="bench-chdb-"))
    client, _lock = connect(dsn)
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "clickhouse": client.command("SELECT version()")}}
    if args.phase in ("inserts", "all"):
        out["inserts"] = bench_inserts(client, args)
    if args.phase in ("flow", "all"):
        out["flow"] = bench_flow(client, dsn, args)
    if args.phase in ("dashboard", "all"):
        out["dashboard"] = bench_dashboard(client, dsn, args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
