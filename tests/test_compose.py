"""docker-compose.yml, Dockerfile and .dockerignore agree with the code's production configuration.

No Docker engine is needed: the files are parsed and compared with config/production.yaml (loaded
through config.settings, exactly as `surgeflow run` loads it), pyproject.toml and the CLI. Each
test fails when one side drifts (a renamed topic, a moved port, an unpinned image, ...). Security:
every published port is on 127.0.0.1 and asks for credentials, and every secret comes from
`.env` (keys in .env.example) through ${VAR:?...}, so compose refuses to start without it.
"""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import pytest
import yaml

from config.settings import ConfigError, Settings, load_settings
from privacy.secrets import clickhouse_dsn, kafka_client_config, redis_url

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PRODUCTION = ROOT / "config" / "production.yaml"
IMAGE_CONFIG_DIR = "/app/config"  # where the Dockerfile puts config/*.yaml

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR and the $$ escape.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose variable interpolation over a parsed document (strings only, recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", ":?") and not current or op in ("-", "?") and current is None:
            if op.endswith("?"):
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return arg
        return current or ""

    return _VAR.sub(sub, value)


def env_example_keys() -> list[str]:
    return [line.split("=", 1)[0].strip() for line in ENV_EXAMPLE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# What a filled-in .env holds in these tests (the values only have to differ from each other).
SECRETS = {name: f"test-{name.lower().replace('_', '-')}-9Zq" for name in env_example_keys()}


def load_compose(env: Mapping[str, str] | None = None) -> dict:
    """The compose file as `docker compose` sees it with ``env`` (default: every secret set)."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict), "docker-compose.yml must hold a mapping"
    return interpolate(doc, SECRETS if env is None else env)


def raw_services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(PRODUCTION, env={})


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def container_ports(service: dict) -> set[int]:
    """Container-side ports published by a service ("host:container" or long syntax)."""
    ports = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def published(service: dict) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out[int(p["target"])] = int(p["published"])
        else:
            parts = str(p).split("/")[0].split(":")
            out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """"NAME://host:port,..." -> {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def host_config_path(container_path: str) -> Path:
    """The repository file the image holds at `container_path` (under /app/config)."""
    assert container_path.startswith(IMAGE_CONFIG_DIR + "/"), container_path
    return ROOT / "config" / container_path[len(IMAGE_CONFIG_DIR) + 1:]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def depends(service: dict) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {name: "service_started" for name in dep}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in dep.items()}


# --- compose file shape -------------------------------------------------------------------------

def test_compose_spec_without_version_key(compose):
    assert "version" not in compose, "the compose spec has no `version:` key (obsolete, warns)"
    assert {"kafka", "kafka-init", "redis", "clickhouse", "surgeflow", "producer", "grafana"} <= \
        set(compose["services"])


def test_images_are_pinned(services):
    for name, svc in services.items():
        if "build" in svc:
            continue  # built here from this repository
        image = svc.get("image")
        assert image, f"service {name} has neither image nor build"
        last = image.rsplit("/", 1)[-1]
        assert ":" in last or "@sha256:" in image, f"{name}: image {image} has no tag"
        tag = last.split("@")[0].rpartition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image} must be pinned, not {tag or 'untagged'}"


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for v in svc.get("volumes") or []:
            source = v["source"] if isinstance(v, dict) else str(v).split(":")[0]
            if not source.startswith((".", "/", "~")):
                used.add(source)
    assert used, "services keep their data on named volumes"
    assert used <= declared, f"undeclared volumes: {used - declared}"
    for name in ("kafka", "redis", "clickhouse"):
        assert services[name].get("volumes"), f"{name} needs a volume for its data"


# --- Kafka --------------------------------------------------------------------------------------

def test_kafka_clients_authenticate_with_sasl(settings, services):
    """Containers reach the brokers of production.yaml, the host localhost:29092: both SASL
    (SCRAM-SHA-256). The listeners without authentication listen on the container's loopback."""
    env = env_of(services["kafka"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    bound = listeners(env["KAFKA_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(bound) <= set(protocols), "every listener needs a security protocol"
    mechanisms = env["KAFKA_SASL_ENABLED_MECHANISMS"].split(",")
    for name, (host, _) in bound.items():
        if protocols[name].startswith("SASL_"):
            assert env.get(f"KAFKA_LISTENER_NAME_{name}_SCRAM___SHA___256_SASL_JAAS_CONFIG", "") \
                .startswith("org.apache.kafka.common.security.scram.ScramLoginModule required"), name
        else:
            assert host in ("127.0.0.1", "localhost"), f"listener {name} has no authentication: loopback only"
    engine = load_settings(PRODUCTION, env=env_of(services["surgeflow"])).kafka
    for broker in settings.kafka.brokers:
        host, port = broker.rsplit(":", 1)
        assert host in services, f"broker {broker}: no compose service {host}"
        matching = [n for n, addr in advertised.items() if addr == (host, int(port))]
        assert matching, f"broker {broker} is not an advertised listener: {advertised}"
        assert bound[matching[0]][1] == int(port), f"listener {matching[0]} does not bind port {port}"
        assert protocols[matching[0]] == engine.security.protocol == "SASL_PLAINTEXT"
    assert engine.security.sasl_mechanism in mechanisms == ["SCRAM-SHA-256"]
    # The host reaches Kafka only through the EXTERNAL listener, SASL too, on the published port.
    ext_host, ext_port = advertised["EXTERNAL"]
    assert protocols["EXTERNAL"] == "SASL_PLAINTEXT"
    assert ext_host == "localhost" and published(services["kafka"]).get(bound["EXTERNAL"][1]) == ext_port
    assert container_ports(services["kafka"]) == {bound["EXTERNAL"][1]}


def test_kafka_kraft_single_node(services):
    env = env_of(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller not in listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    voter_id, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert voter_id == env["KAFKA_NODE_ID"] == "1"
    assert voter == f"localhost:{listeners(env['KAFKA_LISTENERS'])[controller][1]}"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", f"{key} must be 1 on a single broker"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    test = services["kafka"]["healthcheck"]["test"]
    assert "/opt/kafka/bin/kafka-topics.sh" in test and "--list" in test
    assert option(test, "--bootstrap-server") == internal_bootstrap(services)


def internal_bootstrap(services) -> str:
    """host:port of the inter-broker listener (no authentication, the kafka container's loopback)."""
    env = env_of(services["kafka"])
    host, port = listeners(env["KAFKA_ADVERTISED_LISTENERS"])[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    return f"{host}:{port}"


def kafka_init_commands(services) -> list[list[str]]:
    init = services["kafka-init"]
    script = init["command"]
    script = "\n".join(script) if isinstance(script, list) else script
    variables = dict(re.findall(r"^\s*([A-Za-z_]\w*)=(\S+)\s*$", script, re.M))
    commands = []
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.fullmatch(r"[A-Za-z_]\w*=\S+|set -e", line):
            continue
        argv = shlex.split(line)
        argv = [re.sub(r"^\$(\w+)$", lambda m: variables.get(m.group(1), m.group(0)), a) for a in argv]
        commands.append(argv)
    return commands


def test_kafka_init_creates_the_user_and_the_configured_topics(settings, services):
    init = services["kafka-init"]
    assert init["image"] == services["kafka"]["image"]
    assert depends(init) == {"kafka": "service_healthy"}
    # the INTERNAL listener is on the kafka container's loopback: only its network reaches it
    assert init["network_mode"] == "service:kafka"
    commands = kafka_init_commands(services)
    assert all(option(argv, "--bootstrap-server") == internal_bootstrap(services) for argv in commands)
    creates = [argv for argv in commands if "--create" in argv]
    assert all(argv[0] == "/opt/kafka/bin/kafka-topics.sh" for argv in creates)
    topics = {option(argv, "--topic"): argv for argv in creates}
    k = settings.kafka
    assert set(topics) == {k.events_topic, k.dead_letter_topic, k.actions_topic, k.alerts_topic}
    assert len(creates) == len(topics), "a topic is created twice"
    for topic, argv in topics.items():
        assert "--if-not-exists" in argv, f"{topic}: creation must be idempotent"
        assert option(argv, "--replication-factor") == "1"
    assert option(topics[k.events_topic], "--partitions") == "4"
    # The SCRAM user the engine logs in as, with the password of the engine's variable.
    engine = load_settings(PRODUCTION, env=env_of(services["surgeflow"])).kafka.security
    users = [argv for argv in commands if argv[0] == "/opt/kafka/bin/kafka-configs.sh"]
    assert len(users) == 1 and option(users[0], "--entity-type") == "users"
    assert option(users[0], "--entity-name") == engine.username
    assert f"password=${engine.password_env}]" in option(users[0], "--add-config")
    assert option(users[0], "--add-config").startswith(f"{engine.sasl_mechanism}=[")
    assert raw_services()["kafka-init"]["environment"][engine.password_env].startswith(
        f"${{{engine.password_env}:?")


# --- Redis --------------------------------------------------------------------------------------

def redis_argv(service: dict) -> list[str]:
    """redis-server's arguments: the command, or the script of `sh -c` (the passwords are
    expanded by the container's shell), as the container's shell splits it."""
    command = service["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        command = shlex.split(command[2])
    assert "redis-server" in command, command
    return command[command.index("redis-server"):]


def redis_acl_user(argv: list[str]) -> tuple[str, list[str]]:
    """(name, rules) of the one ``--user`` of a redis-server command line."""
    at = argv.index("--user")
    end = next((i for i in range(at + 1, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[at + 1], argv[at + 2:end]


def test_redis_url_matches_the_redis_service(settings, services):
    url = urlsplit(settings.redis.url)
    assert url.hostname in services and url.hostname == "redis"
    redis = services[url.hostname]
    assert (url.port or 6379) in container_ports(redis)
    image = redis["image"]
    assert image.split(":")[0] == "redis"
    assert int(image.split(":")[1].split(".")[0]) >= 7, f"{image}: Redis 7 or later is needed"
    argv = redis_argv(redis)
    assert option(argv, "--appendonly") == "yes"
    assert "redis-cli" in redis["healthcheck"]["test"][1] and "ping" in redis["healthcheck"]["test"][1]


def test_redis_requires_passwords_and_confines_the_engine(settings, services):
    """The default user needs a password; the engine logs in as its ACL user, whose keys are
    its prefix only, with the password of the engine's variable."""
    raw = raw_services()["redis"]
    argv = redis_argv(raw)
    assert re.fullmatch(r'\$\$[A-Z_]+', option(argv, "--requirepass")), "no literal password"
    admin_var = option(argv, "--requirepass")[2:]
    assert raw["environment"][admin_var].startswith(f"${{{admin_var}:?")
    engine = load_settings(PRODUCTION, env=env_of(services["surgeflow"])).redis
    name, rules = redis_acl_user(argv)
    assert name == engine.username and "on" in rules
    assert f">$${engine.password_env}" in rules
    assert raw["environment"][engine.password_env].startswith(f"${{{engine.password_env}:?")
    assert [r for r in rules if r.startswith("~")] == [f"~{engine.key_prefix}:*"]
    assert "-@all" in rules and not any(r in rules for r in ("+@all", "allkeys", "allcommands", "nopass"))
    # the engine's effective URL: its ACL user and password
    url = urlsplit(redis_url(engine, env=env_of(services["surgeflow"])))
    assert (url.username, url.password) == (name, SECRETS[engine.password_env])
    assert f"--user {name}" in services["redis"]["healthcheck"]["test"][1], "health as the engine's user"


# --- ClickHouse ---------------------------------------------------------------------------------

def test_clickhouse_dsn_matches_the_clickhouse_service(settings, services):
    dsn = urlsplit(settings.clickhouse.dsn)
    assert dsn.scheme in ("http", "https")
    assert dsn.hostname in services and dsn.hostname == "clickhouse"
    ch = services[dsn.hostname]
    assert dsn.port in container_ports(ch) and dsn.port == 8123
    env = env_of(ch)
    assert dsn.username == env["CLICKHOUSE_USER"]
    assert dsn.password is None, "the committed YAML holds no password; the environment has it"
    raw = env_of(raw_services()["clickhouse"])
    name = settings.clickhouse.password_env
    assert raw["CLICKHOUSE_PASSWORD"].startswith(f"${{{name}:?"), "password comes from the environment"
    assert env["CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT"] == "1"
    assert ch["ulimits"]["nofile"]["soft"] >= 262144
    assert ch["healthcheck"]["test"], "clickhouse needs a healthcheck"


# --- the surgeflow services ---------------------------------------------------------------------

@pytest.mark.parametrize("host_env", [SECRETS, {**SECRETS, "SURGEFLOW_CLICKHOUSE_PASSWORD": "s3cret-Pw_1"}],
                         ids=["secrets", "other-password"])
def test_surgeflow_environment_loads_and_logs_in(host_env):
    services = load_compose(host_env)["services"]
    svc = services["surgeflow"]
    env = env_of(svc)
    command = svc["command"]
    assert command[0] == "run"
    config = option(command, "--config")
    assert env["SURGEFLOW_CONFIG"] == config
    path = host_config_path(config)
    assert path == PRODUCTION
    try:
        settings = load_settings(path, env=env)
    except ConfigError as exc:  # pragma: no cover - the failure message is the point
        pytest.fail(f"surgeflow's environment in docker-compose.yml is rejected:\n{exc}")
    # The effective DSN logs in as the ClickHouse service's user with its password.
    dsn = urlsplit(clickhouse_dsn(settings.clickhouse, env=env))
    ch_env = env_of(services["clickhouse"])
    assert (dsn.hostname, dsn.port) == ("clickhouse", 8123)
    assert dsn.username == ch_env["CLICKHOUSE_USER"]
    assert dsn.password == ch_env["CLICKHOUSE_PASSWORD"] == host_env["SURGEFLOW_CLICKHOUSE_PASSWORD"]
    assert settings.clickhouse.database == load_settings(PRODUCTION, env={}).clickhouse.database
    # Kafka: SASL as the user kafka-init creates, with the password it sets.
    kafka = kafka_client_config(settings.kafka, env=env)
    assert kafka["sasl.password"] == host_env[settings.kafka.security.password_env]
    assert kafka["security.protocol"] == "SASL_PLAINTEXT" and kafka["sasl.username"] == "surgeflow"


def test_every_secret_comes_from_env_example(compose):
    """Each ${VAR:?} of the compose file is a key of .env.example and the other way round; the
    keys there have no value; the engine's password variables are the settings' names."""
    text = COMPOSE_FILE.read_text()
    references = {m.group(1): m.group(2) for value in strings_of(yaml.safe_load(text))
                  for m in _VAR.finditer(value) if m.group(1)}
    required = {name for name, op in references.items() if op == ":?"}
    assert required == set(SECRETS), f"compose needs {sorted(required)}, .env.example has {sorted(SECRETS)}"
    not_secret = {"SURGEFLOW_PROCESSES"}  # a count, with a default of 1
    assert all(op == ":?" for n, op in references.items() if n not in not_secret), \
        f"no default values: {sorted(n for n, op in references.items() if op != ':?')}"
    assert not any(word in n for n in not_secret for word in ("PASSWORD", "KEY", "TOKEN"))
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert line.split("=", 1)[1].strip() == "", f".env.example gives a value: {line.split('=')[0]}"
    defaults = load_settings(PRODUCTION, env={})
    engine = env_of(raw_services()["surgeflow"])  # the x-surgeflow anchor's environment, merged
    for name in (defaults.kafka.security.password_env, defaults.redis.password_env,
                 defaults.clickhouse.password_env):
        assert engine.get(name, "").startswith(f"${{{name}:?"), f"surgeflow needs ${name} from .env"
    # `docker compose` refuses to start while any one is missing
    for name in SECRETS:
        with pytest.raises(AssertionError, match=name):
            load_compose({k: v for k, v in SECRETS.items() if k != name})


def test_env_file_is_ignored_by_git_and_docker():
    patterns = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert ".env" in patterns, ".env holds the secrets: it must be git-ignored"
    dockerignore = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip()]
    assert _ignored(".env", dockerignore)


def strings_of(value) -> list[str]:
    """Every string of a parsed document (keys excluded), depth first."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_of(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    return [value] if isinstance(value, str) else []


SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|_key$|token)")


def test_no_literal_password_anywhere():
    """Every value of a secret-named variable is a reference, and no command, healthcheck or
    other string holds a password: only $VAR / $$VAR / ${VAR:?}."""
    raw = raw_services()
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    sections = {**raw, "x-surgeflow": doc["x-surgeflow"]}
    for name, svc in sections.items():
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", value), f"{name}: {key} is not ${{VAR:?...}}"
    for text in strings_of(doc):
        for m in re.finditer(r"(?i)(?:password=|--password\s+|requirepass\s+|(?:^|\s)[\"']?>)(\S+)", text):
            value = m.group(1).strip("\"'[]")
            assert value.startswith("$"), f"literal secret in {text!r}"
    rendered = yaml.safe_dump(load_compose())
    assert not any(v in COMPOSE_FILE.read_text() for v in SECRETS.values())
    assert all(v in rendered for v in SECRETS.values()), "every secret of .env is used"


def host_ports(service: dict) -> list[tuple[str | None, int, int]]:
    """(host ip or None, host port, container port) of each published port."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), int(p.get("published", p["target"])), int(p["target"])))
            continue
        parts = str(p).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append((None, int(parts[0]), int(parts[1])))
        else:
            out.append((None, int(parts[0]), int(parts[0])))
    return out


def test_ports_are_published_on_loopback_only(services):
    published_any = False
    for name, svc in services.items():
        for ip, host_port, target in host_ports(svc):
            published_any = True
            assert ip in ("127.0.0.1", "::1"), \
                f"{name}: port {target} published on {ip or 'every interface'}, not 127.0.0.1"
        assert "network_mode" not in svc or svc["network_mode"].startswith("service:"), name
    assert published_any


def test_surgeflow_starts_after_its_services(services):
    svc = services["surgeflow"]
    assert svc["build"] in (".", {"context": "."}) or svc["build"].get("context") == "."
    assert depends(svc) == {
        "kafka": "service_healthy",
        "redis": "service_healthy",
        "clickhouse": "service_healthy",
        "kafka-init": "service_completed_successfully",
    }
    assert svc["restart"] == "unless-stopped"


def test_producer_runs_on_demand_with_the_same_image(services):
    producer, engine = services["producer"], services["surgeflow"]
    assert "load" in producer.get("profiles", [])
    assert "profiles" not in engine
    assert (producer.get("build"), producer.get("image")) == (engine.get("build"), engine.get("image"))
    assert producer["command"][0] == "produce"
    assert host_config_path(option(producer["command"], "--config")) == PRODUCTION
    assert int(option(producer["command"], "--events")) > 0
    assert depends(producer).get("kafka-init") == "service_completed_successfully"
    load_settings(PRODUCTION, env=env_of(producer))  # its environment is valid too


# --- Grafana ------------------------------------------------------------------------------------

GRAFANA_PLUGIN = "grafana-clickhouse-datasource"
GRAFANA_DATASOURCES = "/etc/grafana/provisioning/datasources"
GRAFANA_DASHBOARDS = "/etc/grafana/provisioning/dashboards"


def bind_mounts(service: dict) -> dict[str, tuple[Path, bool]]:
    """container path -> (path on the host, read-only) for a service's bind mounts."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            if v.get("type") != "bind":
                continue
            source, target, read_only = v["source"], v["target"], bool(v.get("read_only"))
        else:
            source, target, *mode = str(v).split(":")
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
            read_only = bool(mode) and "ro" in mode[0].split(",")
        out[target] = ((COMPOSE_FILE.parent / source).resolve(), read_only)
    return out


def grafana_plugins(env: Mapping[str, str]) -> dict[str, str]:
    """plugin id -> pinned version ('' when unpinned) from the plugin install variables:
    GF_PLUGINS_PREINSTALL(_SYNC) take `id@version`, GF_INSTALL_PLUGINS `id version`."""
    out = {}
    for name in ("GF_PLUGINS_PREINSTALL_SYNC", "GF_PLUGINS_PREINSTALL", "GF_INSTALL_PLUGINS"):
        for item in filter(None, (i.strip() for i in env.get(name, "").split(","))):
            plugin, _, version = item.partition("@") if "@" in item else item.partition(" ")
            out[plugin] = version.split("@")[0].strip()
    return out


def grafana_expand(value: str, env: Mapping[str, str]) -> str:
    """Grafana's environment expansion in provisioning files: $VAR and ${VAR}."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def provisioned(services: dict, container_dir: str) -> list[dict]:
    """The provisioning documents Grafana reads from the directory mounted at ``container_dir``."""
    host, _ = bind_mounts(services["grafana"])[container_dir]
    assert host.is_dir(), f"{container_dir} is mounted from {host}, which is not a directory"
    docs = [yaml.safe_load(path.read_text()) for path in sorted(host.glob("*.y*ml"))]
    assert docs and all(doc.get("apiVersion") == 1 for doc in docs), host
    return docs


def clickhouse_datasource(services: dict) -> dict:
    found = [ds for doc in provisioned(services, GRAFANA_DATASOURCES) for ds in doc.get("datasources") or []
             if ds["type"] == GRAFANA_PLUGIN]
    assert len(found) == 1, f"one {GRAFANA_PLUGIN} data source is provisioned, found {len(found)}"
    return found[0]


def test_grafana_service_is_pinned_published_and_read_only(compose, services):
    grafana = services["grafana"]
    repository, _, tag = grafana["image"].rpartition(":")
    assert repository in ("grafana/grafana", "grafana/grafana-oss")
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{grafana['image']}: pin an exact Grafana release"
    assert int(tag.split(".")[0]) in (11, 12), f"{grafana['image']}: tested with Grafana 11 and 12"
    env = env_of(grafana)
    plugins = grafana_plugins(env)
    assert re.fullmatch(r"\d+\.\d+\.\d+", plugins.get(GRAFANA_PLUGIN, "")), \
        f"{GRAFANA_PLUGIN} must be installed at a pinned version: {plugins}"
    assert published(grafana).get(3000) == 3000
    assert host_ports(grafana) == [("127.0.0.1", 3000, 3000)]
    assert depends(grafana) == {"clickhouse": "service_healthy"}
    assert grafana["restart"] == "unless-stopped"
    # Grafana's own state on a declared named volume; everything from the repository read-only.
    named = [str(v).split(":")[0] for v in grafana.get("volumes") or [] if not isinstance(v, dict)
             and str(v).split(":")[1:2] == ["/var/lib/grafana"]]
    assert named and named[0] in (compose.get("volumes") or {}), "grafana keeps its data on a named volume"
    mounts = bind_mounts(grafana)
    assert {GRAFANA_DATASOURCES, GRAFANA_DASHBOARDS} <= set(mounts)
    for target, (host, read_only) in mounts.items():
        assert host.exists(), f"{target} is mounted from {host}, which is not in the repository"
        assert host.is_relative_to(ROOT), f"{target}: mount files of this repository, not {host}"
        assert read_only, f"{target} must be mounted read-only"
    # Who may do what: nobody anonymous; the admin password is a secret of .env.
    raw = env_of(raw_services()["grafana"])
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "false", "no anonymous access"
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"
    assert raw.get("GF_SECURITY_ADMIN_PASSWORD", "").startswith("${GRAFANA_ADMIN_PASSWORD:?"), \
        "the admin password comes from the environment, without a default"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]


@pytest.mark.parametrize("host_env", [SECRETS, {**SECRETS, "SURGEFLOW_CLICKHOUSE_PASSWORD": "s3cret-Pw_1"}],
                         ids=["secrets", "other-password"])
def test_grafana_datasource_reaches_the_clickhouse_service(host_env):
    settings = load_settings(PRODUCTION, env={})
    services = load_compose(host_env)["services"]
    ds = clickhouse_datasource(services)
    data = ds["jsonData"]
    dsn = urlsplit(settings.clickhouse.dsn)
    ch_env = env_of(services["clickhouse"])
    # The engine's address: the clickhouse service, over the same protocol and port.
    assert data["host"] == dsn.hostname == "clickhouse" and data["host"] in services
    assert data["protocol"] in ("http", "native")
    port = int(data["port"])
    if data["protocol"] == "http":
        assert dsn.scheme == "http" and port == dsn.port
        assert not data.get("secure"), "the compose network speaks plain HTTP"
    else:
        assert port == 9000
    assert port in container_ports(services["clickhouse"])
    assert data["username"] == dsn.username == ch_env["CLICKHOUSE_USER"]
    assert data["defaultDatabase"] == settings.clickhouse.database
    # The password is the clickhouse service's, passed to the grafana container by compose.
    secret = ds["secureJsonData"]["password"]
    assert secret in ("${CLICKHOUSE_PASSWORD}", "$CLICKHOUSE_PASSWORD"), "no password in the repository"
    grafana_env = env_of(services["grafana"])
    assert grafana_expand(secret, grafana_env) == ch_env["CLICKHOUSE_PASSWORD"]
    assert ch_env["CLICKHOUSE_PASSWORD"] == host_env["SURGEFLOW_CLICKHOUSE_PASSWORD"]
    assert ds.get("uid"), "the dashboard refers to the data source by uid"


def test_grafana_loads_the_dashboard_of_the_repository(services):
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    providers = [p for doc in provisioned(services, GRAFANA_DASHBOARDS) for p in doc.get("providers") or []]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    folder = providers[0]["options"]["path"].rstrip("/")
    shown = {target: host for target, (host, _) in mounts.items()
             if target == folder or target.startswith(folder + "/")}
    files: list[Path] = []
    for host in shown.values():
        files += [host] if host.is_file() else sorted(host.rglob("*.json"))
    assert ROOT / "dashboards" / "grafana" / "surgeflow.json" in files, \
        f"the provider reads {folder}, where surgeflow.json is not mounted"
    uid = clickhouse_datasource(services)["uid"]
    for path in files:
        board = json.loads(path.read_text())
        used = {p["datasource"]["uid"] for p in board["panels"]
                if p.get("datasource", {}).get("type") == GRAFANA_PLUGIN}
        assert used == {uid}, f"{path.name}: panels use data source {used}, provisioned is {uid}"
    home = env_of(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home in mounts and mounts[home][0].is_file(), f"home dashboard {home} is not mounted"


# --- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def test_dockerfile_installs_the_project_and_runs_surgeflow(services):
    steps = dockerfile_instructions()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = [args for kw, args in steps if kw == "FROM"]
    assert base[-1].split()[0].startswith("python:3.11-"), "pyproject requires Python 3.11"
    assert any(kw == "RUN" and re.search(r"\bpip install (\S+ )*\.(\s|$)", args) for kw, args in steps), \
        "the Dockerfile must `pip install .` the project"
    entrypoint = [json.loads(args) for kw, args in steps if kw == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["surgeflow"]
    assert "surgeflow" in pyproject["project"]["scripts"]
    cmd = json.loads([args for kw, args in steps if kw == "CMD"][-1])
    assert cmd == services["surgeflow"]["command"], "default CMD = what compose runs"
    assert host_config_path(option(cmd, "--config")).is_file()
    users = [args for kw, args in steps if kw == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image runs as a non-root user"
    assert [args for kw, args in steps if kw == "WORKDIR"][-1] == "/app"
    copies = [args.split() for kw, args in steps if kw == "COPY"]
    assert any(c[-1].rstrip("/") == IMAGE_CONFIG_DIR and any(s.startswith("config/") for s in c[:-1])
               for c in copies), f"config YAML must be copied to {IMAGE_CONFIG_DIR}"


def _ignored(path: str, patterns: list[str]) -> bool:
    import fnmatch

    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, "**/" + pattern.removeprefix("**/"))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_sources_and_drops_local_state():
    patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines()
                if l.strip() and not l.strip().startswith("#")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "config/production.yaml"]
    needed += [f"{pkg}/__init__.py" for pkg in pyproject["tool"]["setuptools"]["packages"]]
    for path in needed:
        assert not _ignored(path, patterns), f".dockerignore drops {path}, needed to build the image"
    for path in (".venv/bin/python", ".git/HEAD", ".env", "surgeflow.egg-info/PKG-INFO"):
        assert _ignored(path, patterns), f".dockerignore must exclude {path}"
