"""Typed configuration: a YAML file, overridden by ``SURGEFLOW__SECTION__KEY`` environment variables.

Everything is validated at start-up. Unknown keys are errors (a typo is reported by its path, not
ignored), and :func:`load_settings` raises :class:`ConfigError` whose message lists every problem.
Passwords come from environment variables only (``*.password_env``): one written into a URL, a
DSN or ``kafka.client_config`` of the YAML file is an error (files get committed), from a
``SURGEFLOW__`` override a warning; no message echoes a secret (privacy/secrets.py ``redact``).

>>> s = load_settings(env={"SURGEFLOW__FLOW__SHARDS": "8"})
>>> (s.source.kind, s.flow.shards, s.redis.key_prefix)
('synthetic', 8, 'sf')
>>> load_settings(env={"SURGEFLOW__FLOW__SHRADS": "8"})
Traceback (most recent call last):
...
config.settings.ConfigError: invalid configuration:
  flow.shrads: Extra inputs are not permitted
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_FILE = CONFIG_DIR / "embedded.yaml"
ENV_PREFIX = "SURGEFLOW__"
_HOST_PORT = re.compile(r"^[A-Za-z0-9._-]+:[0-9]{1,5}$")
log = logging.getLogger("surgeflow.config")
# librdkafka settings that hold a secret (sasl.password, ssl.key.password, ...)
_SECRET_KEY = re.compile(r"(?i).*(password|secret).*")


def _redact(text: str) -> str:
    from privacy.secrets import redact  # validation errors never echo a secret

    return redact(text)


def _url_password(url: str | None) -> bool:
    from urllib.parse import urlsplit

    try:
        return url is not None and urlsplit(url).password is not None
    except ValueError:
        return False


def _secret_warning(where: str, env_name: str) -> None:
    # Accepted (a URL from an environment override is not a committed file) but discouraged:
    # load_settings refuses the same in a configuration file.
    log.warning("%s holds a password; set it in $%s instead (only the environment variable "
                "should hold it)", where, env_name)


class ConfigError(Exception):
    """Invalid configuration; the message names each bad key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSecurity(Strict):
    """How clients authenticate and encrypt (privacy/secrets.py kafka_client_config)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = "SCRAM-SHA-256"
    username: str | None = None  # the SASL user (needed by SASL_*)
    # The SASL password is read from this environment variable, never from a file: a
    # sasl.password in kafka.client_config of a configuration file is an error, from an
    # environment override (SURGEFLOW__KAFKA__CLIENT_CONFIG) a warning.
    password_env: str = "SURGEFLOW_KAFKA_PASSWORD"
    ca_file: Path | None = None  # CA certificates (PEM) that sign the brokers' (SSL, SASL_SSL)

    @model_validator(mode="after")
    def _consistent(self) -> "KafkaSecurity":
        if self.protocol.startswith("SASL_") and not self.username:
            raise ValueError(f"protocol {self.protocol} needs kafka.security.username")
        if self.ca_file is not None and not self.protocol.endswith("SSL"):
            raise ValueError("ca_file needs protocol SSL or SASL_SSL")
        return self


class KafkaSettings(Strict):
    brokers: list[str] = ["127.0.0.1:9092"]
    events_topic: str = "events"
    dead_letter_topic: str = "events.dead_letter"
    actions_topic: str = "actions"
    alerts_topic: str = "alerts"
    # TLS / SASL, typed; merged into client_config (they win) by privacy.secrets.
    security: KafkaSecurity = KafkaSecurity()
    # Extra librdkafka settings (no secrets: see security.password_env).
    client_config: dict[str, str] = {}
    starting_offset: Literal["beginning", "end"] = "beginning"
    # False: stop at the end of the topic (replay, tests, benchmark); True: follow it live.
    tail: bool = True
    batch_size: int = Field(1000, ge=1)

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one broker is needed")
        for broker in value:
            if not _HOST_PORT.match(broker) or not 0 < int(broker.rsplit(":", 1)[1]) < 65536:
                raise ValueError(f"broker address {_redact(broker)!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _security(self) -> "KafkaSettings":
        chosen = self.client_config.get("security.protocol")
        if chosen and self.security.protocol != "PLAINTEXT" and chosen != self.security.protocol:
            raise ValueError("client_config's security.protocol contradicts kafka.security.protocol "
                             "(set it in kafka.security only)")
        for key in self.client_config:
            if _SECRET_KEY.fullmatch(key):
                _secret_warning(f"kafka.client_config.{key}", self.security.password_env)
        return self


class RedisSettings(Strict):
    # None: start an embedded Redis server under `embedded_dir`.
    url: str | None = None
    embedded_dir: Path = Path(".surgeflow/redis")
    key_prefix: str = Field("sf", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    ttl_days: float = Field(90, gt=0)
    # Every Redis call gives up after this long (a hung server must not hang the flow for ever);
    # the feature sink then retries with exponential backoff up to retry_max_backoff_s.
    socket_timeout_s: float = Field(5.0, gt=0)
    retry_max_backoff_s: float = Field(30.0, gt=0)
    # Credentials (privacy/secrets.py redis_url): the ACL user, and the password read from this
    # environment variable when connecting. A password inside `url` is an error in a
    # configuration file and a warning from SURGEFLOW__REDIS__URL; the variable wins over it.
    username: str | None = None
    password_env: str = "SURGEFLOW_REDIS_PASSWORD"
    ca_file: Path | None = None  # CA certificates (PEM) that sign a rediss:// server's

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError(f"redis url {_redact(value)!r} must start with redis://, rediss:// "
                             "or unix://")
        return value

    @model_validator(mode="after")
    def _secrets(self) -> "RedisSettings":
        if self.ca_file is not None and not (self.url or "").startswith("rediss://"):
            raise ValueError("ca_file needs a rediss:// url (TLS)")
        if _url_password(self.url):
            _secret_warning("redis.url", self.password_env)
        return self


class ClickHouseSettings(Strict):
    # chdb:///path runs ClickHouse in process; http(s)://user@host:8123 talks to a server.
    dsn: str = "chdb://.surgeflow/chdb"
    database: str = Field("surgeflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    insert_batch_rows: int = Field(5000, ge=1)  # insert when this many rows wait...
    flush_interval_s: float = Field(1.0, gt=0)  # ...or when the oldest has waited this long
    # Behind (a replay, a consumer far behind): complete minutes go to ClickHouse as one block
    # per aligned window of this many minutes (a divisor of 1440) once the window ended
    # catch_up_after_s before the wall clock; a block holds at most catch_up_block_rows rows.
    # Live minutes go one per block. (flows/minutes.BlockGrouper)
    catch_up_block_minutes: int = Field(60, ge=1, le=1440)
    catch_up_block_rows: int = Field(50_000, ge=1)
    catch_up_after_s: float = Field(300.0, ge=0)

    @field_validator("catch_up_block_minutes")
    @classmethod
    def _divides_a_day(cls, v: int) -> int:
        if 1440 % v:
            raise ValueError("must divide a day (1440 minutes): 1, 5, 15, 30, 60, 120, 1440...")
        return v
    # Reporting time zone: where days, weeks and months start (fixed when the database is created).
    timezone: str = "UTC"
    raw_events: bool = True  # keep masked raw events (events_raw, 30-day TTL) for drill-down
    # During an outage, rows beyond this many wait on disk in spool_dir instead of in memory.
    max_buffer_rows: int = Field(500_000, ge=1000)
    # ... and at most this many bytes (estimated) in all the queues together (every table and
    # worker): whichever bound is reached first. Per sink for the rows.
    max_buffer_bytes: int = Field(64 * 2**20, ge=2**16)
    spool_dir: Path = Path(".surgeflow/spool")
    # A block ClickHouse rejects for good (not a connection error) is tried this many times, then
    # written to the dead-letter file spool_dir/rejected-<table>.jsonl instead of blocking its table.
    max_insert_tries: int = Field(5, ge=1)
    # Every request to a ClickHouse server gives up after this long (chDB runs in process).
    timeout_s: float = Field(30.0, gt=0)
    # Credentials of a server (privacy/secrets.py clickhouse_dsn): the user (default: the DSN's),
    # and the password read from this environment variable when connecting. A password inside
    # `dsn` is an error in a configuration file and a warning from SURGEFLOW__CLICKHOUSE__DSN;
    # the variable wins over it.
    username: str | None = None
    password_env: str = "SURGEFLOW_CLICKHOUSE_PASSWORD"
    secure: bool = False  # TLS (HTTPS) even when the dsn says http://
    ca_file: Path | None = None  # CA certificates (PEM) that sign the server's

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        import zoneinfo

        if value not in zoneinfo.available_timezones():
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Shanghai)")
        return value

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        if not re.match(r"^(chdb|https?|clickhouse)://", value):
            raise ValueError(f"clickhouse dsn {_redact(value)!r} must start with chdb://, http:// "
                             "or https://")
        return value

    @model_validator(mode="after")
    def _secrets(self) -> "ClickHouseSettings":
        if _url_password(self.dsn):
            _secret_warning("clickhouse.dsn", self.password_env)
        return self


class FileSourceSettings(Strict):
    paths: list[Path] = []


class AnomalySettings(Strict):
    kind: Literal["traffic_spike", "cvr_drop", "click_fraud", "request_flood", "ingest_delay",
                  "tracking_bug"]
    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    magnitude: float = 0.0


class SyntheticSettings(Strict):
    seed: int = 7
    users: int = Field(2000, ge=1)
    # Event-time start in epoch ms; None = now minus `backfill_hours` (history, then live).
    start_ms: int | None = None
    backfill_hours: float = Field(6.0, ge=0)
    events_per_s: float = Field(50.0, gt=0)  # event-time rate, before the daily rhythm
    duration_s: float | None = None  # event-time length; None = endless
    campaigns: int = Field(6, ge=1)
    malformed_share: float = Field(0.005, ge=0, le=0.5)
    duplicate_share: float = Field(0.005, ge=0, le=0.5)
    max_disorder_ms: int = Field(5000, ge=0)
    # Wall-clock pacing: event-time seconds per wall second while replaying the past; once the
    # generator reaches the present it follows the wall clock. 0 = as fast as possible.
    speed: float = Field(120.0, ge=0)
    anomalies: list[AnomalySettings] = []


class SourceSettings(Strict):
    kind: Literal["synthetic", "file", "kafka"] = "synthetic"
    file: FileSourceSettings = FileSourceSettings()
    synthetic: SyntheticSettings = SyntheticSettings()


class OutputSettings(Strict):
    # Where dead letters, actions and alerts go: Kafka topics, or JSON-lines files (embedded).
    kind: Literal["files", "kafka"] = "files"
    dir: Path = Path(".surgeflow/out")


class DashboardSettings(Strict):
    # The built-in page (`surgeflow dashboard`; the demo starts it too). Loopback by default.
    host: str = "127.0.0.1"
    port: int = Field(8050, ge=0, le=65535)
    in_demo: bool = True


class FlowSettings(Strict):
    # Ids are hashed into shards, the unit of keyed state. Fixed by configuration, never by the
    # worker count, so results do not depend on how many workers run.
    shards: int = Field(8, ge=1, le=4096)  # ingest shards: dedupe, identity, aggregates
    profile_shards: int = Field(16, ge=1, le=4096)  # user profiles
    workers: int = Field(1, ge=1)
    allowed_lateness_s: float = Field(60.0, ge=0)
    max_event_bytes: int = Field(32_768, ge=256)
    # Event time (flows/shard.py "Time"). The wall clock caps event time, never drives it:
    # an event more than max_clock_skew_s ahead of the wall clock is a dead letter
    # (`future_event`), so no device clock can move a partition's clock into the future.
    max_clock_skew_s: float | None = Field(600.0, gt=0)
    # A source partition that sent nothing for idle_timeout_s (wall clock) stops holding the
    # watermark back, as Flink's idleness does; it rejoins with its next event. None = never idle.
    idle_timeout_s: float | None = Field(60.0, gt=0)
    # The first watermark of a fresh run is at least the wall clock minus max_lookback_s: one
    # very old first event cannot make the flow close every minute since. Replaying older
    # history: raise it to cover the history (or None: no bound).
    max_lookback_s: float | None = Field(8 * 86_400.0, gt=0)
    # Bytewax epoch length: how often state is snapshotted (wall clock; not event time).
    epoch_interval_s: float = Field(10.0, gt=0)
    # Bytewax recovery store (SQLite partitions); None = no snapshots. With it, a restarted run
    # resumes every shard and source offset from the last completed epoch and replays from there;
    # Redis writes are absolute values, so the replayed epoch rewrites the same bytes.
    recovery_dir: Path | None = Path(".surgeflow/recovery")
    # After SIGINT / SIGTERM the flow drains and snapshots; if that takes longer than this, the
    # process ends at once (as a crash: the next start replays from the last snapshot).
    drain_timeout_s: float | None = Field(60.0, gt=0)


class LimitSettings(Strict):
    """Hostile input and hostile cardinality: what one event may hold, and how much state any
    input can make the flow keep. Each cap evicts deterministically and counts each eviction."""

    # -- one event (flows/events.py decode): beyond these it is a dead letter
    max_depth: int = Field(16, ge=2, le=256)  # nesting of objects / arrays in an event
    max_keys: int = Field(512, ge=8)  # keys and list items in the whole event
    max_string_chars: int = Field(4096, ge=64)  # any string value or key
    max_money: float = Field(1e9, gt=0)  # |revenue|, |cost|, |price| in currency units
    max_quantity: float = Field(1e6, gt=0)  # |quantity|
    # -- state
    max_anonymous_profiles: int = Field(200_000, ge=1)  # per ingest shard: oldest-seen evicted
    max_identity_links: int = Field(500_000, ge=1)  # per ingest shard: oldest link evicted
    max_cart_items: int = Field(100, ge=1)  # per profile
    max_series: int = Field(10_000, ge=1)  # distinct series per minute rule (campaign, page, ...)
    max_minute_rows: int = Field(50_000, ge=1)  # distinct (channel, campaign, creative, event) per minute and shard
    max_entity_keys: int = Field(200_000, ge=1)  # IPs, IP clusters, users per entity shard


class MetricsSettings(Strict):
    # Prometheus metrics (/metrics), /healthz and /readyz on one HTTP port; port 0 = any free port.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class FeatureSettings(Strict):
    # The feature registry (config/features.yaml by default): every feature declared as data.
    registry: Path = CONFIG_DIR / "features.yaml"


class ModelSettings(Strict):
    # The online models (config/models.yaml: when they score, what they predict, their inputs
    # and learners). None: the shipped file; enabled: false runs no model at all.
    file: Path | None = None
    enabled: bool = True
    # Version k of a model is learned from the labels before k periods of event time; an event
    # at t scores with the version of t - grace (published by then, live).
    period_min: int = Field(60, ge=1)
    grace_min: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _grace(self) -> "ModelSettings":
        if self.grace_min >= self.period_min:
            raise ValueError(f"model.grace_min ({self.grace_min}) must be shorter than "
                             f"model.period_min ({self.period_min})")
        return self


class WebhookSettings(Strict):
    # POST every alert message here (None: no webhook). Retries with backoff; never blocks.
    url: str | None = None
    timeout_s: float = Field(5.0, gt=0)
    headers: dict[str, str] = {}
    # HMAC-SHA256 signature of each body, with the secret from this environment variable
    secret_env: str = "SURGEFLOW_WEBHOOK_SECRET"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://", value):
            raise ValueError(f"webhook url {_redact(value)!r} must start with http:// or https://")
        return value


class AlertSettings(Strict):
    # The rule catalogue (config/alert_rules.yaml by default): every rule declared as data.
    rules: Path = CONFIG_DIR / "alert_rules.yaml"
    webhook: WebhookSettings = WebhookSettings()

    @field_validator("rules")
    @classmethod
    def _rules(cls, value: Path) -> Path:
        from alerts.rules import load_rules  # a bad catalogue stops the start, naming each rule

        load_rules(value)
        return value


class TriggerSettings(Strict):
    # The trigger rule file (config/trigger_rules.yaml by default): rules as data, validated at
    # start-up (a bad file stops the start, naming each rule and field); None = no triggers.
    rules: Path | None = CONFIG_DIR / "trigger_rules.yaml"
    # A running flow re-reads the file this often (wall clock) when it changed: hot reload.
    reload_s: float = Field(5.0, gt=0)
    # POST every action here too (None: no webhook); same options as alerts.webhook.
    webhook: WebhookSettings = WebhookSettings()

    @field_validator("rules")
    @classmethod
    def _rules(cls, value: Path | None) -> Path | None:
        if value is not None:
            from triggers.spec import load_trigger_rules

            load_trigger_rules(value)
        return value


class ConsentSettings(Strict):
    # Per purpose: opt_in = nothing without an explicit grant (SPEC section 9: no profiling
    # without consent); opt_out = allowed until withdrawn. A withdrawal is remembered until the
    # user grants again; an erasure forgets every grant.
    profiling: Literal["opt_in", "opt_out"] = "opt_in"
    marketing: Literal["opt_in", "opt_out"] = "opt_in"  # gates every trigger action
    # How long a user's consent is remembered after their last event (flow state, bounded).
    remember_days: float = Field(400.0, gt=0)


class IdentitySettings(Strict):
    # Events that may link an anonymous id to a user id (merge the visitor's profile into the
    # user's); any other event carrying both is applied to the user without linking.
    # null: any event carrying both ids links them (v1's rule: not for untrusted sources).
    link_events: list[str] | None = ["identify", "login", "signup"]
    # context.source values trusted to link (stamped by the collector, never by the client);
    # empty = any source.
    link_sources: list[str] = []
    # One anonymous id (a shared device) is linked to at most this many users; more are refused.
    max_users_per_anonymous: int = Field(3, ge=1)


class RetentionSettings(Strict):
    raw_events_days: int = Field(15, ge=1)  # events_raw (SPEC: deletion within 15 days)
    user_tables_days: int = Field(400, ge=1)  # actions, alerts, trigger_audit, user_days, ...
    dead_letters_days: float = Field(15.0, gt=0)  # dead-letter files
    spool_days: float = Field(15.0, gt=0)  # ClickHouse and webhook spool files


class ErasureSettings(Strict):
    # Requests arrive on this Kafka topic (kafka mode) or as JSON lines in `inbox` (embedded).
    topic: str = "erasure"
    inbox: Path = Path(".surgeflow/erasure/inbox.jsonl")
    # ClickHouse deletes run again this long after a request, for rows that were in flight.
    resweep_s: float = Field(20.0, gt=0)


class PrivacySettings(Strict):
    consent: ConsentSettings = ConsentSettings()
    identity: IdentitySettings = IdentitySettings()
    retention: RetentionSettings = RetentionSettings()
    erasure: ErasureSettings = ErasureSettings()
    # Keys come from the environment only (never from a file that could be committed).
    pii_key_env: str = "SURGEFLOW_PII_KEY"  # HMAC key of e-mails, phones and subject hashes
    dead_letter_key_env: str = "SURGEFLOW_DEAD_LETTER_KEY"  # AES-GCM key of dead letters' bytes


class AccessSettings(Strict):
    """Who may read the feature API and the dashboard (privacy/access.py)."""

    # Bearer tokens with their scopes: "token:scope,scope;token2:scope" in this variable, and / or
    # one "token scope,scope" per line in tokens_file. Without any token the surfaces only bind
    # to loopback addresses.
    tokens_env: str = "SURGEFLOW_API_TOKENS"
    tokens_file: Path | None = None
    max_body_bytes: int = Field(16_384, ge=256)
    rate_per_s: float = Field(50.0, gt=0)  # per token (or client address): ids read count each
    burst: int = Field(500, ge=1)


class ApiSettings(Strict):
    # The feature API (`surgeflow serve-features`). Loopback by default.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch: int = Field(100, ge=1, le=1000)  # ids per POST /features


class Settings(Strict):
    source: SourceSettings = SourceSettings()
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    output: OutputSettings = OutputSettings()
    flow: FlowSettings = FlowSettings()
    features: FeatureSettings = FeatureSettings()
    model: ModelSettings = ModelSettings()
    alerts: AlertSettings = AlertSettings()
    trigger: TriggerSettings = TriggerSettings()
    dashboard: DashboardSettings = DashboardSettings()
    metrics: MetricsSettings = MetricsSettings()
    limits: LimitSettings = LimitSettings()
    privacy: PrivacySettings = PrivacySettings()
    access: AccessSettings = AccessSettings()
    api: ApiSettings = ApiSettings()


def _set_path(doc: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        doc = doc.setdefault(part, {})
        if not isinstance(doc, dict):
            raise ConfigError(f"invalid configuration:\n  {'.'.join(path)}: parent is not a mapping")
    try:
        doc[path[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:  # not YAML (a URL with a password full of symbols): the text itself
        doc[path[-1]] = value


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top)"
        lines.append(f"  {where}: {_redact(e['msg'])}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Load YAML (default: the embedded profile), apply environment overrides, validate.

    ``SURGEFLOW__KAFKA__BROKERS='[kafka:9092]'`` sets ``kafka.brokers``; values are parsed as YAML.
    Keyword ``overrides`` are dotted paths (``flow__shards=4``) for programmatic use.
    """
    env = os.environ if env is None else env
    file = Path(path) if path is not None else Path(env.get("SURGEFLOW_CONFIG", DEFAULT_FILE))
    try:
        doc = yaml.safe_load(file.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"configuration file {file} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {file} is not valid YAML: {_redact(str(exc))}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"configuration file {file} must hold a mapping")
    in_file = _passwords_in(doc)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            _set_path(doc, name[len(ENV_PREFIX):].lower().split("__"), value)
    for name, value in overrides.items():
        parts = name.split("__")
        target = doc
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    try:
        settings = Settings.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    if in_file:  # a file may be committed, copied, baked into an image: no password in it
        env_of = {"kafka": settings.kafka.security.password_env,
                  "redis": settings.redis.password_env,
                  "clickhouse": settings.clickhouse.password_env}
        raise ConfigError(f"invalid configuration in {file}:\n" + "\n".join(
            f"  {where}: holds a password; remove it and set ${env_of[where.split('.')[0]]}"
            for where in in_file))
    return settings


def _passwords_in(doc: dict) -> list[str]:
    """Where a configuration document holds a password (dotted paths)."""
    def section(name: str) -> dict:
        value = doc.get(name)
        return value if isinstance(value, dict) else {}

    found = [f"{name}.{key}" for name, key in (("redis", "url"), ("clickhouse", "dsn"))
             if isinstance(section(name).get(key), str) and _url_password(section(name)[key])]
    client_config = section("kafka").get("client_config")
    if isinstance(client_config, dict):
        found += [f"kafka.client_config.{k}" for k in client_config if _SECRET_KEY.fullmatch(str(k))]
    return found
