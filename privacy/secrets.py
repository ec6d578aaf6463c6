"""Secrets: read from the environment only, and never printed.

Passwords of Kafka, Redis and ClickHouse live in environment variables named by the settings
(``kafka.security.password_env``, ``redis.password_env``, ``clickhouse.password_env``), never in
a configuration file that could be committed. The helpers here build what clients connect with
(:func:`redis_url`, :func:`clickhouse_dsn`, :func:`kafka_client_config`); anything that prints
or logs a URL, a DSN or an error goes through :func:`redact` first. A password read by the
helpers is also remembered, so :func:`redact` masks it wherever else it shows up (an error
message of a client library, say); :class:`RedactingFilter` does the same for log records.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
_KNOWN: set[str] = set()  # secrets read from the environment: masked wherever they appear
_MIN_KNOWN = 4  # shorter values would mask ordinary words (and protect nothing)

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_TOKEN_END = re.compile(r"[\s'\"<>`]")
# key=value, and "key": "value" (JSON, dict reprs), where the key names a secret (password,
# sasl.password, ssl.key.password, client_secret, ...); *_env keys only name a variable, so they
# stay readable. An unquoted "password: ..." is prose (an error message), not a pair.
_SECRET_KEY = r"[\w.-]*(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token)(?![\w.-]*_env)[\w.-]*"
_PAIR = re.compile(
    rf"(?i)(?P<key>{_SECRET_KEY})(?P<sep>[\"']\s*[=:]\s*|\s*=\s*)"
    r"(?:(?P<q>[\"'])(?P<qv>.*?)(?P=q)|(?P<v>[^\s&]+))")
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[=:]\s*[\"']?(?:bearer|basic)\s+)[^\s\"',;]+")


class MissingSecret(ValueError):
    """A secret the configuration needs is not in its environment variable."""


def redact(text: str | None) -> str | None:
    """``text`` with every password masked: in URLs and DSNs (``scheme://user:pass@host``),
    in ``password=`` style pairs (query strings, librdkafka settings, dict reprs), in
    Authorization headers, and any secret read from the environment by this module.

    >>> redact("redis://app:s3cret@redis:6379/0")
    'redis://app:***@redis:6379/0'
    >>> redact("http://surgeflow:p@ss/w@clickhouse:8123/db?password=x&compress=1")
    'http://surgeflow:***@clickhouse:8123/db?password=***&compress=1'
    >>> redact("rediss://:only-pw@cache:6380 and http://user@host:8123 (no password)")
    'rediss://:***@cache:6380 and http://user@host:8123 (no password)'
    >>> redact("sasl.password=hunter2 sasl.username=app password_env=SURGEFLOW_KAFKA_PASSWORD")
    'sasl.password=*** sasl.username=app password_env=SURGEFLOW_KAFKA_PASSWORD'
    >>> redact("{'sasl.password': 'two words', 'bootstrap.servers': 'k:9092'}")
    "{'sasl.password': '***', 'bootstrap.servers': 'k:9092'}"
    >>> redact("Authorization: Bearer abc.def"), redact(None)
    ('Authorization: Bearer ***', None)
    """
    if text is None:
        return None
    text = str(text)
    out, pos = [], 0
    for m in _SCHEME.finditer(text):
        if m.start() < pos:
            continue
        start = m.end()
        end = _TOKEN_END.search(text, start)
        token = text[start:end.start() if end else len(text)]
        at = _userinfo_end(token)
        if at is None:
            continue
        user, colon, _ = token[:at].partition(":")
        if colon:
            out.append(text[pos:start] + f"{user}:{MASK}")
            pos = start + at
    text = "".join(out) + text[pos:]
    text = _PAIR.sub(lambda m: m.group("key") + m.group("sep")
                     + (f"{m.group('q')}{MASK}{m.group('q')}" if m.group("q") else MASK), text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)
    for secret in sorted(_KNOWN, key=len, reverse=True):
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, MASK)
    return text


def _userinfo_end(token: str) -> int | None:
    """Where the userinfo of ``user:pass@host/path`` ends (its '@'), or None. A password may hold
    an unencoded '@' or '/', so the userinfo runs to the last '@' of the token: at worst a URL
    with an '@' in its path or query is masked too much, never too little."""
    at = token.rfind("@")
    if at < 0 or any(c in token[:at].partition(":")[0] for c in "/?#"):
        return None
    return at


def redacted_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client configuration (librdkafka style) fit for printing.

    >>> redacted_config({"sasl.password": "x", "sasl.username": "app"})
    {'sasl.password': '***', 'sasl.username': 'app'}
    """
    secret = re.compile(_SECRET_KEY, re.I)
    return {k: MASK if secret.fullmatch(str(k)) else v for k, v in config.items()}


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (install it on handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def env_secret(name: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The secret in environment variable ``name`` (None when unset or empty); remembered so
    that :func:`redact` masks it everywhere."""
    value = (os.environ if env is None else env).get(name) if name else None
    if not value:
        return None
    if len(value) >= _MIN_KNOWN:
        _KNOWN.add(value)
    return value


def _with_credentials(url: str, username: str | None, password: str | None) -> str:
    """``url`` with its userinfo replaced by the given user and password (percent-encoded)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = quote(username or "", safe="")
    if password:
        userinfo += ":" + quote(password, safe="")
    netloc = f"{userinfo}@{host}" if userinfo else host
    return urlunsplit(parts._replace(netloc=netloc))


def _add_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _url_credentials(url: str) -> tuple[str | None, str | None]:
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if password and len(password) >= _MIN_KNOWN:
        _KNOWN.add(password)  # a password written into the URL is a secret all the same
    return user, password


def redis_url(redis_settings, env: Mapping[str, str] | None = None) -> str | None:
    """The URL Redis clients connect with (None: no ``redis.url``, the embedded server):
    ``redis.url`` with the ACL user ``redis.username`` (else the URL's) and the password from
    ``$redis.password_env`` (else the URL's, which the settings warn about), plus
    ``redis.ca_file`` for ``rediss://``. Print it only through :func:`redact`.

    >>> from config.settings import RedisSettings
    >>> r = RedisSettings(url="redis://cache:6379/0", username="app")
    >>> redis_url(r, env={"SURGEFLOW_REDIS_PASSWORD": "p@ss word"})
    'redis://app:p%40ss%20word@cache:6379/0'
    >>> redis_url(r, env={}), redis_url(RedisSettings(), env={})
    ('redis://app@cache:6379/0', None)
    """
    r = redis_settings
    if r.url is None:
        return None
    user, password = _url_credentials(r.url)
    url = _with_credentials(r.url, r.username or user, env_secret(r.password_env, env) or password)
    if r.ca_file is not None:
        url = _add_query(url, ssl_ca_certs=str(r.ca_file), ssl_cert_reqs="required")
    return url


def clickhouse_dsn(ch_settings, env: Mapping[str, str] | None = None) -> str:
    """The DSN ClickHouse clients connect with: ``clickhouse.dsn`` with the user
    ``clickhouse.username`` (else the DSN's) and the password from ``$clickhouse.password_env``
    (else the DSN's), over HTTPS when ``clickhouse.secure``, with ``clickhouse.ca_file``.
    A ``chdb://`` DSN (in process) is returned as it is.

    >>> from config.settings import ClickHouseSettings
    >>> ch = ClickHouseSettings(dsn="http://surgeflow@ch:8123", secure=True)
    >>> clickhouse_dsn(ch, env={"SURGEFLOW_CLICKHOUSE_PASSWORD": "pw/1"})
    'https://surgeflow:pw%2F1@ch:8123'
    >>> clickhouse_dsn(ClickHouseSettings(dsn="chdb:///data/ch"), env={})
    'chdb:///data/ch'
    """
    ch = ch_settings
    if ch.dsn.startswith("chdb://"):
        return ch.dsn
    user, password = _url_credentials(ch.dsn)
    dsn = _with_credentials(ch.dsn, ch.username or user, env_secret(ch.password_env, env) or password)
    if ch.secure:  # clickhouse:// and http:// alike
        dsn = "https://" + dsn.split("://", 1)[1]
    if ch.ca_file is not None:
        dsn = _add_query(dsn, ca_cert=str(ch.ca_file))
    return dsn


def kafka_client_config(kafka_settings, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """librdkafka settings for every Kafka client: ``kafka.client_config`` with the typed
    ``kafka.security`` options merged in (they win), the SASL password from
    ``$kafka.security.password_env``. Raises :class:`MissingSecret` when SASL has no password.

    >>> from config.settings import KafkaSettings
    >>> k = KafkaSettings(security={"protocol": "SASL_SSL", "username": "app", "ca_file": "/ca.pem"})
    >>> cfg = kafka_client_config(k, env={"SURGEFLOW_KAFKA_PASSWORD": "pw"})
    >>> sorted(cfg.items())  # doctest: +NORMALIZE_WHITESPACE
    [('sasl.mechanism', 'SCRAM-SHA-256'), ('sasl.password', 'pw'), ('sasl.username', 'app'),
     ('security.protocol', 'SASL_SSL'), ('ssl.ca.location', '/ca.pem')]
    >>> kafka_client_config(k, env={})
    Traceback (most recent call last):
    ...
    privacy.secrets.MissingSecret: kafka.security.protocol is SASL_SSL: set the password in $SURGEFLOW_KAFKA_PASSWORD
    """
    s = kafka_settings.security
    config = dict(kafka_settings.client_config)
    if s.protocol != "PLAINTEXT":  # PLAINTEXT is the default: leave client_config's choice
        config["security.protocol"] = s.protocol
    if s.protocol.startswith("SASL_"):
        config.pop("sasl.mechanisms", None)  # librdkafka's other spelling
        config["sasl.mechanism"] = s.sasl_mechanism
        if s.username:
            config["sasl.username"] = s.username
        password = env_secret(s.password_env, env) or config.get("sasl.password")
        if not password:
            raise MissingSecret(f"kafka.security.protocol is {s.protocol}: set the password in "
                                f"${s.password_env}")
        if len(password) >= _MIN_KNOWN:
            _KNOWN.add(password)
        config["sasl.password"] = password
    if s.ca_file is not None:
        config["ssl.ca.location"] = str(s.ca_file)
    return config
