"""TLS / SASL / ACL options, on the real servers where this machine has them, and secrets that
are never printed.

- Kafka: a broker of this module's own with a SASL_PLAINTEXT listener and a SCRAM-SHA-256 user
  created at format time; the project's helpers produce and consume through it with the typed
  ``kafka.security`` settings, and a wrong password is refused.
- Redis: a redis-server with ``requirepass`` and the ACL user of docker-compose.yml (keys
  ``sf:*``, only the commands the engine uses); the feature sink, the readers and
  ``write_registry`` work through ``privacy.secrets.redis_url``, a wrong password does not.
- Secrets never printed: ``surgeflow`` commands run with passwords in URLs, DSNs and the
  environment; their whole output (stdout, stderr, logs, the summary file) holds none of them.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from hypothesis import given, settings as hsettings, strategies as st

import services
from config.settings import (ClickHouseSettings, ConfigError, KafkaSettings, RedisSettings,
                            load_settings)
from privacy.secrets import (MASK, MissingSecret, clickhouse_dsn, kafka_client_config, redact,
                             redis_url)
from test_compose import raw_services, redis_acl_user, redis_argv

ROOT = Path(__file__).resolve().parents[1]
SURGEFLOW = [sys.executable, "-m", "surgeflow"]
# Distinct, greppable secrets (each run its own, so nothing can match by accident).
_RUN = uuid.uuid4().hex[:8]
KAFKA_PW = f"kafka-Pw-{_RUN}"
REDIS_APP_PW = f"redis-app-Pw-{_RUN}"
REDIS_ADMIN_PW = f"redis-admin-Pw-{_RUN}"
CH_PW = f"ch-Pw-{_RUN}"
URL_PW = f"url-Pw-{_RUN}"  # written into URLs and DSNs (the env variable must win over it)
WRONG_PW = f"wrong-Pw-{_RUN}"
SECRETS = (KAFKA_PW, REDIS_APP_PW, REDIS_ADMIN_PW, CH_PW, URL_PW, WRONG_PW)
KAFKA_USER = "sf-app"


def assert_no_secret(*texts: str) -> None:
    """No password in any of ``texts``, raw or percent-encoded, even across a wrapped line."""
    for text in (*texts, *("".join(t.split()) for t in texts)):
        for secret in SECRETS:
            for form in (secret, quote(secret, safe="")):
                assert form not in text, f"a password is printed: ...{text[max(0, text.find(form) - 200):][:400]}"


# --- redact, settings -------------------------------------------------------------------------

_PW_CHARS = st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                          exclude_characters="/'\"<>`")


@hsettings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(["redis", "rediss", "http", "https", "clickhouse", "kafka"]),
       user=st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
       password=st.text(_PW_CHARS, min_size=6, max_size=30),
       host=st.from_regex(r"[a-z][a-z0-9.-]{0,15}", fullmatch=True),
       tail=st.sampled_from(["", ":6379/0", ":8123/db?compress=1", "/0?ssl_cert_reqs=required"]),
       encode=st.booleans(), before=st.sampled_from(["", "url ", "connecting to '", "(x) "]))
def test_redact_never_leaves_a_url_password(scheme, user, password, host, tail, encode, before):
    """A URL or DSN password is masked, raw or percent-encoded, whatever it holds (an unencoded
    '/' ends a URL's authority: such a URL is not a URL a client would use)."""
    shown = quote(password, safe="") if encode else password
    text = f"{before}{scheme}://{user}:{shown}@{host}{tail} and after"
    out = redact(text)
    assert shown not in out and password not in out
    assert out.startswith(f"{before}{scheme}://{user}:{MASK}@") and out.endswith(" and after")


@hsettings(max_examples=200, deadline=None)
@given(key=st.sampled_from(["password", "sasl.password", "ssl.key.password", "client_secret"]),
       password=st.from_regex(r"[A-Za-z0-9!#$%()*+.:=@\[\]^_{|}~-]{6,30}", fullmatch=True),
       quote_char=st.sampled_from(["", "'", '"']), sep=st.sampled_from(["=", " = "]))
def test_redact_masks_secret_pairs(key, password, quote_char, sep):
    for text in (f"{key}{sep}{quote_char}{password}{quote_char} next=1",
                 f"{{'{key}': '{password}', 'bootstrap.servers': 'k:9092'}}",
                 f"http://h:8123/?{key}={quote(password, safe='')}&db=x"):
        assert password not in redact(text) and quote(password, safe="") not in redact(text), text


def test_a_password_in_a_config_file_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"redis:\n  url: redis://app:{URL_PW}@cache:6379/0\n"
                   f"clickhouse:\n  dsn: http://sf:{URL_PW}@ch:8123\n"
                   f"kafka:\n  client_config:\n    sasl.password: {URL_PW}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    message = str(err.value)
    assert "redis.url: holds a password; remove it and set $SURGEFLOW_REDIS_PASSWORD" in message
    assert "clickhouse.dsn: holds a password; remove it and set $SURGEFLOW_CLICKHOUSE_PASSWORD" in message
    assert "kafka.client_config.sasl.password: holds a password" in message
    assert_no_secret(message)


def test_a_password_from_the_environment_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="surgeflow.config"):
        s = load_settings(env={"SURGEFLOW__REDIS__URL": f"redis://app:{URL_PW}@cache:6379/0",
                               "SURGEFLOW__CLICKHOUSE__DSN": f"http://sf:{URL_PW}@ch:8123"})
    assert redis_url(s.redis, env={}) == f"redis://app:{URL_PW}@cache:6379/0"
    # the environment variable wins over the URL's password
    assert clickhouse_dsn(s.clickhouse, env={"SURGEFLOW_CLICKHOUSE_PASSWORD": CH_PW}) == \
        f"http://sf:{CH_PW}@ch:8123"
    assert "redis.url holds a password; set it in $SURGEFLOW_REDIS_PASSWORD" in caplog.text
    assert "clickhouse.dsn holds a password; set it in $SURGEFLOW_CLICKHOUSE_PASSWORD" in caplog.text
    assert_no_secret(caplog.text)


def test_validation_errors_do_not_echo_secrets():
    bad = {"SURGEFLOW__REDIS__URL": f"http://app:{URL_PW}@cache:6379/0",
           "SURGEFLOW__CLICKHOUSE__DSN": f"ftp://sf:{URL_PW}@ch:8123",
           "SURGEFLOW__ALERTS__WEBHOOK__URL": f"ftp://hook:{URL_PW}@example.com/x?password={CH_PW}",
           "SURGEFLOW__KAFKA__BROKERS": f"['u:{URL_PW}@broker']",
           "SURGEFLOW__KAFKA__SECURITY__PROTOCOL": "SASL_SSL"}  # and no username
    with pytest.raises(ConfigError) as err:
        load_settings(env=bad)
    message = str(err.value)
    for where in ("redis.url", "clickhouse.dsn", "alerts.webhook.url", "kafka.brokers",
                  "kafka.security"):
        assert where in message
    assert "needs kafka.security.username" in message
    assert_no_secret(message)


def test_typed_options_reach_the_clients():
    k = KafkaSettings(security={"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                "username": "app", "ca_file": "/etc/ca.pem"},
                      client_config={"sasl.mechanisms": "PLAIN", "linger.ms": "5"})
    assert kafka_client_config(k, env={"SURGEFLOW_KAFKA_PASSWORD": KAFKA_PW}) == {
        "linger.ms": "5", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "app", "sasl.password": KAFKA_PW, "ssl.ca.location": "/etc/ca.pem"}
    with pytest.raises(MissingSecret, match=r"\$SURGEFLOW_KAFKA_PASSWORD"):
        kafka_client_config(k, env={})
    with pytest.raises(ValueError, match="contradicts"):
        KafkaSettings(security={"protocol": "SSL"}, client_config={"security.protocol": "SASL_SSL"})
    assert kafka_client_config(KafkaSettings(), env={"SURGEFLOW_KAFKA_PASSWORD": KAFKA_PW}) == {}
    r = RedisSettings(url="rediss://cache:6380/0", username="app", ca_file="/etc/ca.pem")
    assert redis_url(r, env={"SURGEFLOW_REDIS_PASSWORD": "p w"}) == \
        "rediss://app:p%20w@cache:6380/0?ssl_ca_certs=%2Fetc%2Fca.pem&ssl_cert_reqs=required"
    with pytest.raises(ValueError, match="rediss://"):
        RedisSettings(url="redis://cache:6379/0", ca_file="/etc/ca.pem")
    ch = ClickHouseSettings(dsn="http://ch:8123", username="sf", secure=True, ca_file="/etc/ca.pem")
    assert clickhouse_dsn(ch, env={"SURGEFLOW_CLICKHOUSE_PASSWORD": CH_PW}) == \
        f"https://sf:{CH_PW}@ch:8123?ca_cert=%2Fetc%2Fca.pem"


# --- Kafka: SASL / SCRAM on a real broker -----------------------------------------------------

@pytest.fixture(scope="module")
def sasl_kafka():
    broker = services.KafkaBroker(scram_users={KAFKA_USER: KAFKA_PW})
    try:
        broker.start()
    except Exception as exc:  # noqa: BLE001
        services.unavailable("Kafka (SASL)", exc)
    yield broker
    broker.stop()


def sasl_settings(broker, **extra) -> KafkaSettings:
    return KafkaSettings(brokers=[broker.sasl_bootstrap], tail=False, **extra,
                         security={"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
                                   "username": KAFKA_USER})


def consume_all(k: KafkaSettings, topic: str, config: dict) -> list[bytes]:
    """Every record of ``topic``, read by the flow's Kafka source (Bytewax) until its end."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    from connectors.kafka import events_source

    out: list = []
    flow = Dataflow("sasl-read")
    items = op.input("in", flow, events_source(k.brokers, topic, tail=False, from_beginning=True,
                                              batch_size=100, extra=config))
    op.output("out", items, TestingSink(out))
    run_main(flow)
    return [m.value for m in out if getattr(m, "value", None) is not None]


def test_kafka_sasl_scram_produce_and_consume(sasl_kafka, monkeypatch, capfd):
    from connectors.kafka import check_brokers, ensure_topics, partition_count, produce

    monkeypatch.setenv("SURGEFLOW_KAFKA_PASSWORD", KAFKA_PW)
    k = sasl_settings(sasl_kafka)
    config = kafka_client_config(k)
    assert config["security.protocol"] == "SASL_PLAINTEXT" and config["sasl.password"] == KAFKA_PW
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    ensure_topics(k.brokers, [topic], partitions=2, extra=config)
    assert topic in check_brokers(k.brokers, config) and partition_count(k.brokers, topic, config) == 2
    records = [(f"u{i}".encode(), json.dumps({"i": i}).encode()) for i in range(50)]
    assert produce(k.brokers, topic, records, config) == 50
    assert sorted(consume_all(k, topic, config)) == sorted(v for _, v in records)
    # The same broker without credentials, or with a wrong password: refused.
    monkeypatch.setenv("SURGEFLOW_KAFKA_PASSWORD", WRONG_PW)
    from connectors.kafka import KafkaUnavailable

    for cfg in (kafka_client_config(k), {}):
        with pytest.raises(KafkaUnavailable) as err:
            check_brokers(k.brokers, {**cfg, "socket.connection.setup.timeout.ms": "2000"},
                          timeout_s=4)
        assert_no_secret(str(err.value))
    out, errors = capfd.readouterr()
    assert_no_secret(out, errors)


def test_produce_command_logs_in_with_sasl(sasl_kafka, tmp_path):
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SURGEFLOW__KAFKA__BROKERS": f"[{sasl_kafka.sasl_bootstrap}]",
           "SURGEFLOW__KAFKA__SECURITY__PROTOCOL": "SASL_PLAINTEXT",
           "SURGEFLOW__KAFKA__SECURITY__USERNAME": KAFKA_USER, "SURGEFLOW_KAFKA_PASSWORD": KAFKA_PW}
    r = subprocess.run(SURGEFLOW + ["produce", "--events", "300", "--topic", topic],
                       capture_output=True, text=True, cwd=tmp_path, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"300 events to {topic}" in r.stderr
    consumed = consume_all(sasl_settings(sasl_kafka), topic, kafka_client_config(
        sasl_settings(sasl_kafka), env={"SURGEFLOW_KAFKA_PASSWORD": KAFKA_PW}))
    assert len(consumed) == 300
    # without the password: said at once, naming the variable
    env.pop("SURGEFLOW_KAFKA_PASSWORD")
    r2 = subprocess.run(SURGEFLOW + ["produce", "--events", "1", "--topic", topic],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert r2.returncode == 2 and "$SURGEFLOW_KAFKA_PASSWORD" in r2.stderr
    assert "Traceback" not in r2.stderr
    assert_no_secret(r.stdout, r.stderr, r2.stdout, r2.stderr)


# --- Redis: requirepass and the compose file's ACL user ---------------------------------------

@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    """A redis-server with the admin password and the engine's ACL user of docker-compose.yml
    (the same rules, so this proves the compose ACL is enough for the engine)."""
    name, rules = redis_acl_user(redis_argv(raw_services()["redis"]))
    rules = [f">{REDIS_APP_PW}" if r.startswith(">") else r for r in rules]
    try:
        proc, port = services.start_redis_secured(
            tmp_path_factory.mktemp("acl-redis"),
            ["--requirepass", REDIS_ADMIN_PW, "--user", name, *rules], name, REDIS_APP_PW)
    except Exception as exc:  # noqa: BLE001
        services.unavailable("Redis", exc)
    yield name, port
    proc.terminate()
    proc.wait(10)


def test_redis_acl_user_runs_the_feature_sink_and_readers(acl_redis, monkeypatch, caplog):
    from connectors.redis_features import RedisFeatureSink, write_registry
    from features.reader import AsyncFeatureReader, FeatureReader
    from flows.runner import count_feature_users
    from flows.shard import Write

    user, port = acl_redis
    monkeypatch.setenv("SURGEFLOW_REDIS_PASSWORD", REDIS_APP_PW)
    r = RedisSettings(url=f"redis://127.0.0.1:{port}/0", username=user)
    url = redis_url(r)
    assert url == f"redis://{user}:{REDIS_APP_PW}@127.0.0.1:{port}/0"
    write_registry(url, "sf", {"features": {}})
    sink = RedisFeatureSink(url, "sf", 3600).build("features", 0, 1)
    try:
        sink.write_batch([([Write("u1", {"views_1h": "3", "as_of": "1795392000000"}, (), True),
                            Write("gone", {"views_1h": "1"}, (), True)], [("anon-1", "u1")])])
        sink.write_batch([([Write("u1", {"views_1h": "4"}, ("as_of",), False),
                            Write("gone", None)], [])])
        assert sink.down_since is None and sink.ident is not None  # CLIENT INFO allowed
    finally:
        sink.close()
    client = redis.Redis.from_url(url)
    try:
        reader = FeatureReader(client, "sf")
        assert reader.get("u1")["views_1h"] == 4 and reader.get("gone") is None
        assert reader.get("anon-1", anonymous=True)["user_id"] == "u1"
        assert reader.stored_registry() is not None
        # confined to its prefix, and to the commands it needs
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("other:key", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
    finally:
        client.close()
    assert count_feature_users(url, "sf") == 1

    async def read_async():
        import redis.asyncio as aioredis

        c = aioredis.Redis.from_url(url, protocol=2)
        try:
            return await AsyncFeatureReader(c, "sf").get("u1")
        finally:
            await c.aclose()

    assert asyncio.run(read_async())["views_1h"] == 4
    assert_no_secret(caplog.text)


def test_redis_wrong_password_fails_without_showing_it(acl_redis, caplog):
    from features.reader import FeatureReader

    user, port = acl_redis
    for name, password in ((user, WRONG_PW), (None, None), ("default", WRONG_PW)):
        url = redis_url(RedisSettings(url=f"redis://127.0.0.1:{port}/0", username=name),
                        env={"SURGEFLOW_REDIS_PASSWORD": password} if password else {})
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            with pytest.raises((redis.exceptions.AuthenticationError,
                                redis.exceptions.ResponseError)) as err:
                FeatureReader(client, "sf").get("u1")
        finally:
            client.close()
        assert_no_secret(str(err.value), repr(err.value), redact(url))
    assert_no_secret(caplog.text)


# --- secrets never printed by the CLI ---------------------------------------------------------

class _FakeClickHouse(BaseHTTPRequestHandler):
    """Answers every request as a ClickHouse server refusing the credentials, and remembers
    which credentials came."""

    seen: list[tuple[str | None, str | None]] = []

    def _refuse(self):
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        else:
            user, password = self.headers.get("X-ClickHouse-User"), self.headers.get("X-ClickHouse-Key")
        self.seen.append((user, password))
        body = (f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, "
                "or there is no user with such name. (AUTHENTICATION_FAILED)").encode()
        self.send_response(403)
        self.send_header("X-ClickHouse-Exception-Code", "516")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_clickhouse():
    _FakeClickHouse.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeClickHouse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], _FakeClickHouse.seen
    server.shutdown()
    server.server_close()


def test_clickhouse_password_reaches_the_server_but_no_output(fake_clickhouse, tmp_path):
    port, seen = fake_clickhouse
    env = {**os.environ, "SURGEFLOW__CLICKHOUSE__DSN": f"http://sf-ch:{URL_PW}@127.0.0.1:{port}",
           "SURGEFLOW_CLICKHOUSE_PASSWORD": CH_PW, "SURGEFLOW__CLICKHOUSE__TIMEOUT_S": "5"}
    r = subprocess.run(SURGEFLOW + ["migrate"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120, env=env)
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"http://sf-ch:{MASK}@127.0.0.1:{port}" in r.stderr and "AUTHENTICATION_FAILED" in r.stderr
    assert "Traceback" not in r.stderr
    assert seen and set(seen) == {("sf-ch", CH_PW)}, "the environment's password, not the DSN's"
    assert_no_secret(r.stdout, r.stderr)


def _events_file(path: Path) -> Path:
    from connectors.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(seed=3, users=30, start_ms=1_795_392_000_000, events_per_s=2.0,
                         duration_s=600.0)
    with path.open("wb") as out:
        for rec in generate(spec):
            if b"\n" not in rec.value:
                out.write(rec.value + b"\n")
    return path


def test_run_summary_and_logs_hold_no_password(acl_redis, tmp_path):
    """`surgeflow run` on the ACL'd Redis with a password in SURGEFLOW__REDIS__URL (a wrong one:
    the environment variable wins) and in every password variable."""
    user, port = acl_redis
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({
        "source": {"kind": "file", "file": {"paths": [str(_events_file(tmp_path / "ev.jsonl"))]}},
        "output": {"kind": "files", "dir": str(tmp_path / "out")},
        "clickhouse": {"dsn": f"chdb://{tmp_path / 'chdb'}", "spool_dir": str(tmp_path / "spool")},
        "flow": {"max_clock_skew_s": None, "max_lookback_s": None, "recovery_dir": None},
        "metrics": {"port": 0}}))
    summary = tmp_path / "summary.json"
    env = {**os.environ, "SURGEFLOW__REDIS__URL": f"redis://{user}:{URL_PW}@127.0.0.1:{port}/0",
           "SURGEFLOW_REDIS_PASSWORD": REDIS_APP_PW, "SURGEFLOW_KAFKA_PASSWORD": KAFKA_PW,
           "SURGEFLOW_CLICKHOUSE_PASSWORD": CH_PW, "SURGEFLOW_SUMMARY": str(summary)}
    r = subprocess.run(SURGEFLOW + ["run", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["redis_url"] == f"redis://{user}:{MASK}@127.0.0.1:{port}/0"
    assert s["users_with_features"] > 0
    assert "redis.url holds a password; set it in $SURGEFLOW_REDIS_PASSWORD" in r.stderr
    outputs = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert_no_secret(r.stdout, r.stderr, summary.read_text(), outputs)


def test_feature_commands_hold_no_password(acl_redis, tmp_path):
    """`features` (the password from the environment) and `serve-features` (in --redis-url)."""
    user, port = acl_redis
    env = {**os.environ, "SURGEFLOW_REDIS_URL": f"redis://{user}@127.0.0.1:{port}/0",
           "SURGEFLOW_REDIS_PASSWORD": REDIS_APP_PW}
    r = subprocess.run(SURGEFLOW + ["features", "nobody"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, env=env)
    assert r.returncode == 1 and r.stdout.strip() == "null", r.stderr[-3000:]
    proc = subprocess.Popen(
        SURGEFLOW + ["serve-features", "--port", "0", "--redis-url",
                     f"redis://{user}:{REDIS_APP_PW}@127.0.0.1:{port}/0"],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while (proc.poll() is None and time.monotonic() < deadline
               and not any("feature API on" in line for line in lines)):
            time.sleep(0.1)
        time.sleep(1)  # whatever it prints at start (or on failure) is in the output
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        reader.join(10)
    err = "".join(lines)
    assert f"(Redis redis://{user}:{MASK}@127.0.0.1:{port}/0, prefix sf)" in " ".join(err.split()), err
    assert_no_secret(r.stdout, r.stderr, out, err)
