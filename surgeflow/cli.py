"""The ``surgeflow`` command: demo (embedded), run (configured services), produce (load), features."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from config.settings import ConfigError, Settings, load_settings
from privacy.secrets import (MissingSecret, RedactingFilter, clickhouse_dsn, kafka_client_config,
                             redact, redis_url as connect_url)

# No local variables in tracebacks: they hold the URLs and DSNs with their passwords.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="surgeflow: real-time marketing signals from tracking events.")
console = Console(stderr=True)
ConfigOption = typer.Option(None, "--config", "-c", help="YAML configuration (default: embedded profile)")


def _settings(config: Optional[Path], **overrides) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _logging() -> None:
    """WARNING and above to stderr, every line redacted (a client library may log a URL)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _kafka_config(settings: Settings) -> dict[str, str]:
    """The Kafka clients' settings (SASL password from the environment), or exit 2 saying which
    variable is missing."""
    try:
        return kafka_client_config(settings.kafka)
    except MissingSecret as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _register_commands() -> None:
    from privacy.commands import register

    register(app, _settings)  # surgeflow erase (--user / --anonymous / --verify)


_register_commands()


class Progress:
    """A live status line (events/s, users, alerts, actions) while the flow runs."""

    def __init__(self, every_s: float = 1.0, total: int | None = None, shards: int | None = None,
                 prefix: str = ""):
        self.every_s = every_s
        self.total = total  # records to read, when known (a replay): percent and estimate
        self.shards = shards  # shard states a snapshot may hold (the restore's progress)
        self.prefix = prefix  # which process of a cluster prints the line
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.monotonic()

    def line(self) -> str:
        from surgeflow.stats import STATS

        from connectors.clickhouse import rows_in_flight

        elapsed = max(time.monotonic() - self.started, 1e-9)
        n = STATS.get("events_in")
        read = f"events {n:,}"
        if self.total:
            left = (self.total - n) / (n / elapsed) if n else None
            read += (f"/{self.total:,} ({100 * n / self.total:.0f}%"
                     + (f", ~{left:,.0f}s left" if left is not None and n < self.total else "")
                     + ")")
        waiting = rows_in_flight()  # reading done, this is the drain still to go
        restored = STATS.get("shards_restored")
        if restored and not n:  # resuming: the snapshot's shard states are loaded first
            of = f"/{self.shards:,}" if self.shards else ""
            left = (f", ~{elapsed / restored * (self.shards - restored):,.0f}s left"
                    if self.shards and restored < self.shards else "")
            return (f"{self.prefix}{elapsed:5.0f}s restoring the snapshot: shards {restored:,}{of}"
                    f" ({STATS.get('snapshot_bytes_restored') / 1e6:,.1f} MB{left})")
        return (f"{self.prefix}{elapsed:5.0f}s {read} ({n / elapsed:,.0f}/s) users {len(STATS.users):,} "
                f"dead {STATS.get('events_dead_lettered'):,} alerts {STATS.get('alerts_fired'):,} "
                f"actions {STATS.get('actions_emitted'):,}"
                + (f" | ClickHouse rows waiting {waiting:,}" if waiting else ""))

    def _loop(self) -> None:
        tty = sys.stderr.isatty()
        last = 0.0
        while not self.done.wait(self.every_s):
            if tty:
                console.print(self.line(), end="\r", highlight=False, soft_wrap=True)
            elif time.monotonic() - last >= 5:
                last = time.monotonic()
                console.print(self.line(), highlight=False)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        console.print(self.line(), highlight=False)


def _graceful_stop(deadline_s: float | None, drain_timeout_s: float | None) -> None:
    """SIGINT / SIGTERM (or the demo deadline) end every source; the flow drains, takes its last
    snapshot and the run ends normally (surgeflow/shutdown.py)."""
    from surgeflow import shutdown

    shutdown.install(drain_timeout_s, deadline_s,
                     say=lambda text: console.print(f"\n{text}", highlight=False))


def _summary(settings: Settings, redis_url: str, seconds: float, extra: dict) -> dict:
    from connectors.clickhouse import normalize_dsn
    from flows.runner import count_aggregate_rows, count_feature_users
    from surgeflow.stats import STATS

    return {
        "events_in": STATS.get("events_in"),
        "events_dead_lettered": STATS.get("events_dead_lettered"),
        "duplicates_dropped": STATS.get("duplicates"),
        "late_events": STATS.get("late_events"),
        "users_with_features": count_feature_users(redis_url, settings.redis.key_prefix),
        "aggregate_rows": count_aggregate_rows(settings),
        "alerts_fired": STATS.get("alerts_fired"),
        "actions_emitted": STATS.get("actions_emitted"),
        "shards_restored": STATS.get("shards_restored"),
        "seconds": round(seconds, 2),
        "events_per_s": round(STATS.get("events_in") / seconds, 1) if seconds else None,
        "redis_url": redact(redis_url),
        "clickhouse_dsn": redact(normalize_dsn(settings.clickhouse.dsn)),
        **extra,
    }


def _finish(summary: dict) -> None:
    for key, value in summary.items():
        console.print(f"  {key:22} {value}", highlight=False)
    path = os.environ.get("SURGEFLOW_SUMMARY")
    if path:
        Path(path).write_text(json.dumps(summary, indent=2))
        console.print(f"summary written to {path}")


@app.command()
def demo(config: Optional[Path] = ConfigOption,
         seconds: Optional[float] = typer.Option(None, help="stop after this many seconds "
                                                 "(default: $SURGEFLOW_DEMO_SECONDS, else until Ctrl-C)")):
    """Embedded demo: synthetic traffic, a Redis server started here, ClickHouse in process."""
    from connectors.clickhouse import chdb_dir, normalize_dsn
    from connectors.embedded_redis import EmbeddedRedis
    from flows.runner import run

    settings = _settings(config)
    if seconds is None and os.environ.get("SURGEFLOW_DEMO_SECONDS"):
        seconds = float(os.environ["SURGEFLOW_DEMO_SECONDS"])
    _logging()
    redis_dir = settings.redis.embedded_dir.resolve()
    server = None
    if settings.redis.url is None:
        server = EmbeddedRedis(redis_dir)
        redis_url = server.start()
    else:
        redis_url = connect_url(settings.redis)
    settings.output.dir.mkdir(parents=True, exist_ok=True)
    console.print(f"surgeflow demo\n  Redis       {redact(redis_url)} (data in {redis_dir})\n"
                  f"  ClickHouse  {redact(normalize_dsn(settings.clickhouse.dsn))}\n"
                  f"  outputs     {settings.output.dir.resolve()}", highlight=False)
    _migrate_or_exit(settings, server)
    page = None
    if settings.dashboard.in_demo:
        page = _start_dashboard(settings)
    stop_metrics = _start_metrics(settings, any_port_if_busy=True)
    console.print("Ctrl-C stops" + (f"; stopping after {seconds:g} s" if seconds else ""))
    _graceful_stop(seconds, settings.flow.drain_timeout_s)
    try:
        with Progress(shards=settings.flow.shards + settings.flow.profile_shards):
            result = run(settings, redis_url)
        summary = _summary(settings, redis_url, result.seconds, {
            "redis_data_dir": str(redis_dir),
            "clickhouse_data_dir": str(chdb_dir(settings.clickhouse.dsn) or ""),
            "outputs_dir": str(settings.output.dir.resolve()),
        })
    finally:
        stop_metrics()
        if page is not None:
            page[0].should_exit = True
            page[1].join(5)
        if server is not None:
            server.stop()
    _finish(summary)


def _start_metrics(settings: Settings, any_port_if_busy: bool = False):
    """Prometheus metrics, /healthz and /readyz (surgeflow/metrics.py); returns its stop."""
    from surgeflow import metrics

    try:
        address, stop = metrics.serve(settings, any_port_if_busy=any_port_if_busy)
    except OSError as exc:
        console.print(f"[red]{exc} (set metrics.port, or metrics.enabled: false)[/red]")
        raise typer.Exit(2) from None
    if address:
        console.print(f"  metrics     {address}/metrics  (health: {address}/healthz, "
                      f"{address}/readyz)", highlight=False)
    return stop


def _migrate_or_exit(settings: Settings, embedded_redis=None) -> list[int]:
    """Bring the ClickHouse schema up to date, or say why not (exit 2; 3: unreachable), without
    a traceback; returns the versions applied now."""
    from connectors.clickhouse import chdb_dir, ensure_schema, normalize_dsn
    from warehouse.migrate import MigrationError

    ch = settings.clickhouse
    try:
        return ensure_schema(clickhouse_dsn(ch), ch.database, ch.timezone)
    except MigrationError as exc:
        where = chdb_dir(ch.dsn)
        hint = f"\nthe embedded data is in {where}: remove that folder to start afresh" if where else ""
        console.print(f"[red]{redact(str(exc))}[/red]{hint}")
        code = 2
    except Exception as exc:  # noqa: BLE001 - unreachable, credentials refused, ...
        console.print(f"[red]ClickHouse {redact(normalize_dsn(ch.dsn))}: "
                      f"{type(exc).__name__}: {redact(str(exc))}[/red]", highlight=False)
        code = 3
    if embedded_redis is not None:
        embedded_redis.stop()
    raise typer.Exit(code)


def _start_dashboard(settings: Settings):
    """The built-in page in this process (chDB allows one process per data directory); the
    schema is already migrated."""
    from dashboards.server import start_in_thread

    ch, d = settings.clickhouse, settings.dashboard
    try:
        page = start_in_thread(clickhouse_dsn(ch), ch.database, d.host, d.port, access=settings.access)
    except Exception as exc:  # noqa: BLE001 - the demo runs on without its page
        console.print(f"[yellow]dashboard not started: {redact(str(exc))}[/yellow]")
        return None
    port = page[0].servers[0].sockets[0].getsockname()[1]
    console.print(f"  dashboard   http://{d.host}:{port}/", highlight=False)
    return page


@app.command(name="run")
def run_cmd(config: Path = typer.Option(..., "--config", "-c", help="YAML configuration"),
            workers: Optional[int] = typer.Option(None, help="worker threads in each process"),
            processes: int = typer.Option(1, min=1, envvar="SURGEFLOW_PROCESSES",
                                          help="processes on this machine (a Bytewax cluster on "
                                          "loopback ports)"),
            addresses: Optional[str] = typer.Option(None, help="host:port of every process of a "
                                                    "cluster across machines, comma-separated"),
            process_id: int = typer.Option(0, "--process-id", min=0,
                                           help="this process's index in --addresses")):
    """Production run: sources and sinks as configured (Kafka, Redis, ClickHouse)."""
    from connectors.kafka import KafkaUnavailable, check_brokers
    from flows.runner import recovery_config, run

    settings = _settings(config)
    _logging()
    if settings.redis.url is None:
        console.print("[red]redis.url must be set for `surgeflow run` (use `demo` for embedded)[/red]")
        raise typer.Exit(2)
    cluster = addresses.split(",") if addresses else None
    if cluster is not None and not 0 <= process_id < len(cluster):
        console.print(f"[red]--process-id {process_id} is not an index of the "
                      f"{len(cluster)} --addresses[/red]")
        raise typer.Exit(2)
    if processes > 1 and cluster is not None:
        console.print("[red]--processes starts a cluster on this machine; across machines "
                      "give --addresses and --process-id to each process[/red]")
        raise typer.Exit(2)
    url = connect_url(settings.redis)
    try:
        if settings.source.kind == "kafka" or settings.output.kind == "kafka":
            check_brokers(settings.kafka.brokers, _kafka_config(settings))
    except KafkaUnavailable as exc:
        console.print(f"[red]{redact(str(exc))}[/red]")
        raise typer.Exit(3) from None
    if processes > 1:
        from surgeflow.launch import launch

        recovery_config(settings.flow.recovery_dir)  # created once, before the processes share it
        code, summary = launch(config, processes, workers,
                               say=lambda text: console.print(text, highlight=False),
                               kill_after_s=(settings.flow.drain_timeout_s or 60.0) + 5)
        if summary is not None:
            console.print("cluster summary", highlight=False)
            _finish(summary)
        raise typer.Exit(code)
    if process_id == 0:  # the others join the cluster only once process 0 has migrated
        _migrate_or_exit(settings)
    if process_id and settings.metrics.enabled and settings.metrics.port:
        settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(
            update={"port": settings.metrics.port + process_id})})
    stop_metrics = _start_metrics(settings)
    _graceful_stop(None, settings.flow.drain_timeout_s)
    try:
        with Progress(shards=settings.flow.shards + settings.flow.profile_shards,
                      prefix=f"[process {process_id}] " if cluster else ""):
            result = run(settings, url, workers, addresses=cluster, process_id=process_id)
    finally:
        stop_metrics()
    _finish(_summary(settings, url, result.seconds, {"process_id": process_id} if cluster else {}))


@app.command()
def replay(files: list[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                             help="JSON-lines files, one source partition each"),
           config: Optional[Path] = ConfigOption,
           workers: Optional[int] = typer.Option(None, help="worker threads in this process")):
    """Backfill: replay JSON-lines files of history into the configured outputs (Redis,
    ClickHouse, actions, alerts). Event time drives everything; no wall-clock lookback or skew
    limit applies, and complete minutes go to ClickHouse in blocks of a window while behind."""
    from connectors.embedded_redis import EmbeddedRedis
    from flows.runner import run

    settings = _settings(config, source__kind="file", source__file__paths=[str(f) for f in files],
                         flow__max_lookback_s=None, flow__max_clock_skew_s=None)
    _logging()
    total = 0
    for f in files:  # for the estimate: a quick count of the lines to read
        with f.open("rb") as fh:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    server = None
    if settings.redis.url is None:
        server = EmbeddedRedis(settings.redis.embedded_dir.resolve())
        url = server.start()
    else:
        url = connect_url(settings.redis)
    if settings.output.kind == "files":
        settings.output.dir.mkdir(parents=True, exist_ok=True)
    console.print(f"surgeflow replay: {len(files)} file(s), {total:,} lines", highlight=False)
    try:
        _migrate_or_exit(settings, server)
        _graceful_stop(None, settings.flow.drain_timeout_s)
        with Progress(total=total, shards=settings.flow.shards + settings.flow.profile_shards):
            result = run(settings, url, workers)
        summary = _summary(settings, url, result.seconds, {"files": [str(f) for f in files]})
    finally:
        if server is not None:
            server.stop()
    _finish(summary)


@app.command()
def produce(config: Optional[Path] = ConfigOption,
            events: int = typer.Option(100_000, help="how many synthetic records to write"),
            topic: Optional[str] = typer.Option(None, help="default: kafka.events_topic")):
    """Load generator: writes synthetic events (with the configured anomalies, bad and duplicate
    records) to the Kafka events topic, keyed by user."""
    import itertools

    from connectors.kafka import KafkaUnavailable, ensure_topics, produce as produce_records
    from connectors.synthetic import generate
    from flows.runner import synthetic_spec

    settings = _settings(config)
    k, kafka_config = settings.kafka, _kafka_config(settings)
    topic = topic or k.events_topic
    try:
        ensure_topics(k.brokers, [topic], extra=kafka_config)
        # The record time is the simulated send time, so the ingest-delay rules see the stream's
        # own delays (and an injected ingest_delay), not how long ago the history was generated.
        # Older than a day, it is left to the broker: a topic's retention (7 days by default)
        # would delete records stamped further back as soon as they land.
        oldest = int(time.time() * 1000) - 86_400_000
        records = ((r.key, r.value, r.sent_ms if r.sent_ms >= oldest else 0)
                   for r in itertools.islice(generate(synthetic_spec(settings)), events))
        started = time.monotonic()
        sent = produce_records(k.brokers, topic, records, kafka_config,
                               progress=lambda n: console.print(f"{n:,} sent", end="\r"))
    except KafkaUnavailable as exc:
        console.print(f"[red]{redact(str(exc))}[/red]")
        raise typer.Exit(3) from None
    elapsed = time.monotonic() - started
    console.print(f"{sent:,} events to {topic} in {elapsed:.1f} s ({sent / elapsed:,.0f}/s)")


@app.command()
def features(user_id: str, redis_url: str = typer.Option(..., envvar="SURGEFLOW_REDIS_URL"),
             prefix: str = typer.Option("sf")):
    """Print one user's features as JSON (the password, if any, from $SURGEFLOW_REDIS_PASSWORD)."""
    import redis

    from config.settings import RedisSettings
    from features.reader import FeatureReader

    try:
        url = connect_url(RedisSettings(url=redis_url))
    except ValueError as exc:  # pydantic's ValidationError: the message is redacted
        console.print(f"[red]--redis-url: {redact(str(exc))}[/red]")
        raise typer.Exit(2) from None
    values = FeatureReader(redis.Redis.from_url(url), prefix).get(user_id)
    print(json.dumps(values, indent=2))
    if values is None:
        raise typer.Exit(1)


@app.command("serve-features")
def serve_features(config: Optional[Path] = ConfigOption,
                   host: Optional[str] = typer.Option(None, help="address to listen on (default: api.host)"),
                   port: Optional[int] = typer.Option(None, help="TCP port (default: api.port)"),
                   redis_url: Optional[str] = typer.Option(None, help="overrides redis.url of the configuration"),
                   max_age_s: float = typer.Option(60, help="a hash not rewritten for this long is 'stale'")):
    """Serve the read-only feature API (OpenAPI at /openapi.json)."""
    from features.http import serve

    overrides = {"redis__url": redis_url} if redis_url else {}
    settings = _settings(config, **overrides)  # --redis-url validated (and redacted) as redis.url
    url = connect_url(settings.redis)
    if url is None:
        console.print("[red]the configuration has no redis.url (embedded Redis lives only while the "
                      "flow runs): pass --redis-url redis://HOST:PORT/0[/red]")
        raise typer.Exit(2)
    a = settings.api
    host, port = host or a.host, port if port is not None else a.port
    console.print(f"feature API on http://{host}:{port} (Redis {redact(url)}, prefix "
                  f"{settings.redis.key_prefix})", highlight=False)
    from privacy.erasure import request_erasure

    def erase(user_id: str, anonymous: bool, requested_by: str) -> str:
        """POST /erasure (scope erasure:write): queued for the flow like `surgeflow erase`."""
        return request_erasure(settings, user_id, anonymous=anonymous, requested_by=requested_by,
                               source="http", redis_url=url).request_id

    serve(url, settings.redis.key_prefix, host, port, max_age_s, access=settings.access,
          max_batch=a.max_batch, on_erasure=erase)


if __name__ == "__main__":
    app()


@app.command()
def migrate(config: Optional[Path] = ConfigOption):
    """Apply the ClickHouse schema migrations that are missing (also done at start-up)."""
    from connectors.clickhouse import normalize_dsn

    settings = _settings(config)
    ch = settings.clickhouse
    applied = _migrate_or_exit(settings)
    where = f"{redact(normalize_dsn(ch.dsn))} database {ch.database}"
    console.print(f"applied migrations {applied} to {where}" if applied
                  else f"{where} is up to date", highlight=False)


@app.command()
def dashboard(config: Optional[Path] = ConfigOption,
              host: Optional[str] = typer.Option(None, help="default: dashboard.host"),
              port: Optional[int] = typer.Option(None, help="default: dashboard.port")):
    """The built-in live dashboard page on ClickHouse (traffic, funnel, campaign KPIs, alerts)."""
    from dashboards.server import serve

    settings = _settings(config)
    ch, d = settings.clickhouse, settings.dashboard
    _migrate_or_exit(settings)
    console.print(f"dashboard on http://{host or d.host}:{port or d.port}/ (ClickHouse "
                  f"{redact(ch.dsn)})", highlight=False)
    serve(clickhouse_dsn(ch), ch.database, host or d.host, port if port is not None else d.port,
          access=settings.access)


@app.command()
def report(period: str = typer.Option("day", "--period", "-p", help="day, week or month"),
           date: Optional[str] = typer.Option(None, help="a day in the period, YYYY-MM-DD "
                                              "(default: the newest data)"),
           out: Optional[Path] = typer.Option(None, help="CSV folder (default: <output.dir>/reports)"),
           config: Optional[Path] = ConfigOption):
    """The KPI summary of a day, week or month: printed, and written as two CSV files."""
    import datetime as dt

    from rich.table import Table

    from connectors.clickhouse import connect
    from warehouse.kpi import KpiError
    from warehouse.report import CAMPAIGN_COLUMNS, build_report, write_csv

    settings = _settings(config)
    ch = settings.clickhouse
    try:
        day = dt.date.fromisoformat(date) if date else None
    except ValueError:
        console.print(f"[red]--date {date!r} is not YYYY-MM-DD[/red]")
        raise typer.Exit(2) from None
    _migrate_or_exit(settings)
    client, lock = connect(clickhouse_dsn(ch))
    try:
        with lock:
            rep = build_report(client, ch.database, period, day)
    except KpiError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    out_console = Console()
    title = f"{rep.period} report {rep.start:%Y-%m-%d %H:%M} .. {rep.end:%Y-%m-%d %H:%M} {rep.start.tzname()}"
    summary = Table("metric", "value", title=title)
    for key, value in rep.summary.items():
        summary.add_row(key, _fmt(value))
    out_console.print(summary)
    campaigns = Table(*CAMPAIGN_COLUMNS, title="campaigns, all channels (by revenue; the CSV "
                      "also has each channel)")
    for row in rep.campaigns:
        if row["all_channels"]:
            row = dict(row, campaign=row["campaign"] or "(organic)", channel="all")
            campaigns.add_row(*(_fmt(row.get(c)) for c in CAMPAIGN_COLUMNS))
    out_console.print(campaigns)
    paths = write_csv(rep, out or settings.output.dir / "reports")
    console.print("written: " + ", ".join(str(p) for p in paths), highlight=False)


@app.command("nab-eval")
def nab_eval(data: Path = typer.Option(..., "--data", help="NAB data folder (<category>/<file>.csv)"),
             labels: Path = typer.Option(..., "--labels", help="NAB labels JSON (combined windows)"),
             out: Path = typer.Option(..., "--out", help="results folder (NAB's layout) and summary.json"),
             detector: list[str] = typer.Option(["windowed_gaussian", "surgeflow"], "--detector", "-d",
                                                help="detector name; repeat or comma-separate"),
             cv: bool = typer.Option(True, "--cv/--no-cv",
                                     help="also cross-validate the defaults (leave one category out)"),
             seeds: int = typer.Option(3, "--synthetic-seeds", min=0,
                                       help="generated series of each kind added to the cross-validation")):
    """Run detectors over the Numenta Anomaly Benchmark: NAB results files, scores, recall, delays;
    then the cross-validated score of the defaults, over these series and generated ones."""
    from alerts import nab

    names = [n.strip() for item in detector for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in nab.DETECTORS]
    if unknown or not names:
        console.print(f"[red]unknown detector {', '.join(unknown) or '(none)'}; known: "
                      f"{', '.join(nab.DETECTORS)}[/red]")
        raise typer.Exit(2)
    for path, what in ((data, "--data"), (labels, "--labels")):
        if not path.exists():
            console.print(f"[red]{what} {path} does not exist[/red]")
            raise typer.Exit(2)
    try:
        result = nab.evaluate(data, labels, out, names)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    print(nab.format_table(result))
    if cv:
        from alerts.nab_cv import evaluate_cv, format_cv

        result["cross_validation"] = evaluate_cv(data, labels, seeds)
        print(format_cv(result["cross_validation"]))
        (out / "summary.json").write_text(json.dumps(result, indent=1))
    console.print(f"written: {out}/<detector>/<category>/<detector>_<file>.csv and {out}/summary.json",
                  highlight=False)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


@app.command()
def rules(config: Optional[Path] = ConfigOption):
    """List the alert rules in force (alerts.rules): series, how each is judged, severity."""
    from rich.table import Table

    from alerts.rules import load_rules

    settings = _settings(config)
    catalogue = load_rules(settings.alerts.rules)
    table = Table(title=f"alert rules ({settings.alerts.rules})")
    for column in ("rule", "area", "series", "judged by", "for", "sev", "response"):
        table.add_column(column)
    for r in catalogue.rules:
        if r.threshold is not None:
            t = r.threshold
            judged = (f"> {t.above:g}" if t.above is not None else f"< {t.below:g}") + \
                (f" (n >= {t.min_n:g})" if t.min_n else "")
        else:
            params = ", ".join(f"{k}={v}" for k, v in r.detector.params.items())
            judged = f"{r.detector.kind}({params})"
        table.add_row(r.name + ("" if r.enabled else " (off)"), r.area,
                      f"{r.metric} by {r.by} / {r.window}", judged, r.for_, r.severity, r.response)
    console.print(table)


triggers_app = typer.Typer(no_args_is_help=True, help="Trigger rules: list them, test them.")
app.add_typer(triggers_app, name="triggers")


def _trigger_book(rules: Optional[Path], config: Optional[Path]):
    from triggers.spec import TriggerRuleError, load_trigger_rules

    path = rules if rules is not None else _settings(config).trigger.rules
    if path is None:
        console.print("[yellow]no trigger rules configured (trigger.rules is null)[/yellow]")
        raise typer.Exit(0)
    try:
        return path, load_trigger_rules(path)
    except TriggerRuleError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _when(r) -> str:
    k = r.kind
    if k == "count":
        return f"{r.count} x {'/'.join(r.events)} within {r.within}"
    if k == "sequence":
        return " then ".join("/".join(s.events) for s in r.steps) + f" within {r.within}"
    if k == "absence":
        extra = "".join(f"; {o.timeout} when " + " and ".join(
            f"{c.feature or c.property} {c.op} {c.value}" for c in o.when) for o in r.timeouts)
        corr = f" (same {', '.join(r.correlate)})" if r.correlate else ""
        return (f"{'/'.join(r.start.events)}, no {'/'.join(r.stop.events)}{corr} "
                f"within {r.timeout}{extra}")
    steps = ", ".join(s.after or f"day {s.after_days}" + (f" {s.at_local}" if s.at_local else "")
                      for s in r.steps) if k in ("schedule", "drip") else ""
    if k == "schedule":
        return f"after {'/'.join(r.start.events)}: {steps}"
    if k == "drip":
        return f"entered on {'/'.join(r.enter.events)}: {steps} (each after the previous)"
    conds = " and ".join(f"{c.feature or c.property or 'near a store'} {c.op} {c.value}"
                         if c.geo_within is None else f"within {c.geo_within.radius_km} km of a store"
                         for c in list(r.start.where) + list(r.when))
    return f"{'/'.join(r.start.events)} where {conds}"


@triggers_app.command("list")
def triggers_list(rules: Optional[Path] = typer.Option(None, "--rules", help="rule file "
                                                       "(default: trigger.rules)"),
                  config: Optional[Path] = ConfigOption):
    """The trigger rules and guards in force: what each watches for and what it sends."""
    from rich.table import Table

    path, book = _trigger_book(rules, config)
    table = Table(title=f"trigger rules ({path})")
    for column in ("rule", "kind", "when", "then", "prio", "re-entry", "mode"):
        table.add_column(column)
    for r in sorted(book.rules, key=lambda r: (-r.priority, r.name)):
        a = r.action
        then = f"{a.channel}: {a.message}" + (f" (else {a.fallback.channel} after "
                                              f"{a.fallback.after})" if a.fallback else "")
        table.add_row(r.name + ("" if r.enabled else " (off)"), r.kind, _when(r), then,
                      str(r.priority), r.reentry or "default", r.mode)
    out = Console(width=200)
    out.print(table)
    g = book.guards
    q = g.quiet_hours
    out.print(f"consent: {g.consent} · quiet hours: "
              + (f"{q.start}-{q.end} user-local on {', '.join(q.channels)} ({q.policy})" if q
                 else "none")
              + f" · at most {g.max_actions_per_event} action(s) per event")
    for cap in g.caps:
        scope = " ".join(x for x in (cap.channel and f"channel {cap.channel}",
                                     cap.tag and f"tag {cap.tag}",
                                     cap.per == "message" and "per message") if x) or "all"
        out.print(f"cap {cap.name}: {cap.max} per {cap.window} ({scope}), over cap: {cap.over_cap}"
                  + (f" -> {cap.fallback_channel}" if cap.fallback_channel else ""))


@triggers_app.command("test")
def triggers_test(events: Path = typer.Option(..., "--events", help="JSON lines, one tracking "
                                              "event per line"),
                  rules: Optional[Path] = typer.Option(None, "--rules", help="rule file "
                                                       "(default: trigger.rules)"),
                  run_on: str = typer.Option("60d", "--run-on", help="after the last event, let "
                                             "the clock run this long (timers fire)"),
                  as_json: bool = typer.Option(False, "--json", help="one JSON decision per line"),
                  config: Optional[Path] = ConfigOption):
    """Replay events through the rules on a simulated clock; print every action and suppression."""
    import datetime as dt

    from triggers.simulate import replay
    from triggers.spec import duration_ms

    path, _ = _trigger_book(rules, config)
    try:
        run_on_ms = duration_ms(run_on)
    except ValueError as exc:
        console.print(f"[red]--run-on: {exc}[/red]")
        raise typer.Exit(2) from None
    try:
        lines = [line for line in events.read_bytes().splitlines() if line.strip()]
    except OSError as exc:
        console.print(f"[red]cannot read {events}: {exc.strerror}[/red]")
        raise typer.Exit(2) from None
    result = replay(lines, path, run_on_ms=run_on_ms)
    if as_json:
        for row in result.audit:
            typer.echo(json.dumps(row, sort_keys=True))
    else:
        out = Console(width=200)
        for row in result.audit:
            at = dt.datetime.fromtimestamp(row["time_ms"] / 1000, dt.timezone.utc)
            shown = "[green]SENT[/green]" if row["decision"] == "sent" else row["decision"]
            out.print(f"{at:%Y-%m-%d %H:%M:%S}Z  {row['user_id']:<16} {row['rule']:<22} "
                      f"{row['channel'] or '-':<7} {row['message'] or '-':<22} {shown}  "
                      f"[dim]{row['reason']}[/dim]")
    sent = sum(1 for r in result.audit if r["decision"] == "sent")
    console.print(f"{result.events} events, {len(result.dead)} not used; {sent} actions sent, "
                  f"{len(result.audit) - sent} other decisions (clock ran to {result.end_ms})")
    for d in result.dead[:10]:
        console.print(f"[yellow]{d.reason}: {d.detail}[/yellow]")
