"""Real services for tests and CI: a single-node Kafka broker and a Redis server.

Why: tests must exercise genuine Kafka and Redis on a fresh machine without
docker. Kafka runs from jars fetched with Maven (``scripts/kafka/pom.xml``) on
the local JVM in KRaft mode; Redis is ``connectors.embedded_redis``.

``python tests/services.py fetch-kafka`` only fetches the jars (used by
scripts/test.sh so the first test does not pay the download).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from surgeflow.launch import free_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KAFKA_POM = PROJECT_ROOT / "scripts" / "kafka" / "pom.xml"
KAFKA_LIBS = PROJECT_ROOT / ".cache" / "kafka-libs"
KAFKA_START_TIMEOUT_S = 90.0


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _has_kafka_jar(libs: Path) -> bool:
    return any(libs.glob("kafka_2.13-*.jar"))


def ensure_kafka_libs(libs: Path = KAFKA_LIBS) -> Path:
    """Fetch the broker jars into ``libs`` once, with a lock against parallel runs.

    Maven writes into a sibling temp dir that is renamed on success, so an
    interrupted download never leaves a half-filled cache behind.
    """
    if _has_kafka_jar(libs):
        return libs
    if shutil.which("mvn") is None:
        raise RuntimeError("Maven ('mvn') is not installed; it is needed to fetch the Kafka broker jars")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / (libs.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _has_kafka_jar(libs):  # another process fetched them meanwhile
            return libs
        staging = libs.parent / (libs.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        proc = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={staging}"],
            capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0 or not _has_kafka_jar(staging):
            out = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RuntimeError(f"fetching Kafka jars with Maven failed (exit {proc.returncode}):\n{out}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
    return libs


def _cluster_id() -> str:
    """22-char base64url UUID, the format Kafka uses; never starts with '-' (CLI-safe)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _die_with_parent() -> None:
    """Linux: SIGTERM the broker if the test process dies, so CI leaves no orphans."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


LOG4J = """\
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
"""


class KafkaBroker:
    """Single-node KRaft broker+controller on 127.0.0.1, in a throw-away directory.

    With ``scram_users`` ({name: password}) it also has a SASL_PLAINTEXT listener
    (``sasl_bootstrap``, SCRAM-SHA-256) whose users are created when the storage is formatted
    (``--add-scram``, KRaft since Kafka 3.5); the PLAINTEXT listener stays for admin calls.
    """

    def __init__(self, libs: Path | None = None, scram_users: dict[str, str] | None = None) -> None:
        self.libs = libs
        self.workdir: Path | None = None
        self.port = self.controller_port = self.sasl_port = 0
        self.scram_users = dict(scram_users or {})
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        assert self.workdir is not None and self.libs is not None
        return [
            "java", f"-Xmx{heap}", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp", f"{self.libs}/*", main, *args,
        ]

    def _log_tail(self) -> str:
        assert self.workdir is not None
        parts = [_tail(self.workdir / "server.log"), _tail(self.workdir / "stdout.log")]
        return "\n".join(p for p in parts if p) or "(no log output)"

    def start(self) -> "KafkaBroker":
        """Fetch jars if needed, format storage, start, and wait until metadata answers."""
        if shutil.which("java") is None:
            raise RuntimeError("Java ('java') is not installed; it is needed to run the Kafka broker")
        self.libs = ensure_kafka_libs(self.libs or KAFKA_LIBS)
        self.workdir = Path(tempfile.mkdtemp(prefix="surgeflow-kafka-"))
        self.port, self.controller_port, self.sasl_port = free_ports(3)
        listeners = f"PLAINTEXT://127.0.0.1:{self.port}"
        sasl: list[str] = []
        if self.scram_users:
            listeners += f",SASL://127.0.0.1:{self.sasl_port}"
            sasl = ["listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
                    "SASL:SASL_PLAINTEXT",
                    "sasl.enabled.mechanisms=SCRAM-SHA-256",
                    "listener.name.sasl.scram-sha-256.sasl.jaas.config="
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"]
        props = self.workdir / "server.properties"
        props.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners={listeners},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners={listeners}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            *(sasl or ["listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"]),
            f"log.dirs={self.workdir / 'logs'}",
            "num.partitions=1",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "log.segment.bytes=16777216",
            # No time-based retention: tests replay synthetic history whose record times
            # (the simulated send times) are hours or days old; the broker's directory is
            # temporary anyway.
            "log.retention.ms=-1",
            "log.retention.check.interval.ms=300000",
            "num.network.threads=2",
            "num.io.threads=2",
            "",
        ]))
        (self.workdir / "log4j.properties").write_text(
            LOG4J.format(log=self.workdir / "server.log"))
        scram = [arg for name, password in self.scram_users.items()
                 for arg in ("--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]")]
        fmt = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props),
                       *scram),
            capture_output=True, text=True, timeout=120,
        )
        if fmt.returncode != 0:
            raise RuntimeError(f"Kafka storage format failed (exit {fmt.returncode}):\n"
                               f"{fmt.stdout}{fmt.stderr}\n{self._log_tail()}")
        with open(self.workdir / "stdout.log", "wb") as out:
            self._proc = subprocess.Popen(
                self._java("kafka.Kafka", str(props), heap="512m"),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, preexec_fn=_die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_workdir=True)
            raise
        return self

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + KAFKA_START_TIMEOUT_S

        def check_alive() -> None:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Kafka broker exited with code {self._proc.returncode}:\n"
                                   + self._log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka broker not ready within {KAFKA_START_TIMEOUT_S:.0f}s "
                                   f"(logs in {self.workdir}):\n" + self._log_tail())

        # wait for the port first: librdkafka would log every refused connection
        while True:
            check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                break
            time.sleep(0.2)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            check_alive()
            try:
                md = admin.list_topics(timeout=5)
                if md.brokers:
                    return
            except Exception:  # KafkaException while the broker finishes starting
                pass
            time.sleep(0.2)

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 30.0) -> str:
        """Create a topic and wait until all its partitions have a leader."""
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)],
                                      operation_timeout=timeout)
        futures[name].result(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = admin.list_topics(topic=name, timeout=5).topics.get(name)
            if (t is not None and t.error is None and len(t.partitions) == partitions
                    and all(p.leader >= 0 and p.error is None for p in t.partitions.values())):
                return name
            time.sleep(0.1)
        raise RuntimeError(f"topic {name!r} has no leaders after {timeout:.0f}s")

    def stop(self, keep_workdir: bool = False) -> None:
        """SIGTERM (controlled shutdown), then SIGKILL; removes the data dir unless asked."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.workdir is not None and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(tmpdir: Path):
    """A started EmbeddedRedis persisting into ``tmpdir``."""
    from connectors.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(Path(tmpdir))
    server.start()
    return server


@contextlib.contextmanager
def serve_app(app):
    """Serve an ASGI ``app`` with uvicorn in a thread on a free loopback port; yields the port."""
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def http_call(port: int, method: str, path: str, body=None):
    """(status, headers, JSON body) of one request; ``path`` is sent as given (pre-encoded)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), (json.loads(raw) if raw else None)
    finally:
        conn.close()


def unavailable(service: str, exc: BaseException) -> None:
    """A service a test needs could not start: skipped, except under CI=true where it fails."""
    import pytest

    reason = f"{service} unavailable: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def start_redis_aof(data_dir: Path, port: int = 0) -> tuple[subprocess.Popen, int]:
    """A redis-server of the caller's own (not the session's), every write fsynced to its
    append-only file, so a SIGKILL loses nothing it acknowledged. Started again with the same
    ``data_dir`` and ``port`` after a kill, it reloads that file. Returns the process and its
    port once it answers."""
    return _start_redis(data_dir, port, ["--appendonly", "yes", "--appendfsync", "always"])


def start_redis_secured(data_dir: Path, args: list[str], username: str | None,
                        password: str) -> tuple[subprocess.Popen, int]:
    """A redis-server of the caller's own with ``args`` (``--requirepass``, ``--user`` ACLs, ...),
    no persistence; returns the process and its port once ``username`` / ``password`` logs in."""
    return _start_redis(data_dir, 0, ["--appendonly", "no", *args], username, password)


def _start_redis(data_dir: Path, port: int, args: list[str], username: str | None = None,
                 password: str | None = None) -> tuple[subprocess.Popen, int]:
    """Start a redis-server with ``args``; return it and its port once it is ours and loaded
    (and the credentials, if any, log in)."""
    import redis

    from connectors.embedded_redis import find_redis_server

    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1)[0]
    with open(data_dir / "redis.stdout", "ab") as out:
        proc = subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(data_dir.resolve()), "--save", "", "--daemonize", "no",
             "--logfile", str((data_dir / "redis.log").resolve()), *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
    client = redis.Redis(host="127.0.0.1", port=port, username=username, password=password,
                         socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + 15
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({proc.returncode}):\n"
                                   + _tail(data_dir / "redis.log") + _tail(data_dir / "redis.stdout"))
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError,
                                     redis.BusyLoadingError):
                # ours and loaded; a restricted ACL user may not run INFO: it logs in, then
                if (client.ping() if username else
                        client.info("server").get("process_id") == proc.pid):
                    return proc, port
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not answer:\n" + _tail(data_dir / "redis.log"))
            time.sleep(0.05)
    finally:
        client.close()


def kill_kafka(broker: KafkaBroker) -> None:
    """SIGKILL the broker (no controlled shutdown), keeping its data for ``restart_kafka``."""
    proc, broker._proc = broker._proc, None
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def restart_kafka(broker: KafkaBroker) -> None:
    """Start a killed broker again on the same ports and data directory; waits until it
    answers metadata requests."""
    assert broker.workdir is not None and broker._proc is None
    with open(broker.workdir / "stdout.log", "ab") as out:
        broker._proc = subprocess.Popen(
            broker._java("kafka.Kafka", str(broker.workdir / "server.properties"),
                         # the killed broker's registration must lapse before the new one is
                         # let in: with the default 9 s session that is most of the restart
                         "--override", "broker.session.timeout.ms=2000",
                         "--override", "broker.heartbeat.interval.ms=500", heap="512m"),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=broker.workdir, preexec_fn=_die_with_parent,
        )
    broker._wait_ready()


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch-kafka"]:
        print(ensure_kafka_libs())
    else:
        sys.exit("usage: python tests/services.py fetch-kafka")
