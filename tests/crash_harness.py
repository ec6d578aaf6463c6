"""Runs `surgeflow run` as production does (Kafka in and out, tail: true, recovery store,
webhook, ClickHouse) and collects everything it delivered, for the crash and stop tests
(tests/test_crash_restart.py) and their long version (bench/bench_crash.py).

A run is a real process: it is stopped with SIGTERM once its metrics say every source
partition was read to the end, or killed with SIGKILL at any moment. What it delivered is read
back from where a consumer would read it: Redis, every ClickHouse table, the Kafka topics and the
webhook's receiver."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
import yaml
from confluent_kafka import Consumer, TopicPartition

from connectors import kafka

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Written by the wall clock: not compared. (The online models' scores are: each uses the version
# its event's time needs, whatever the kills and restarts.)
VOLATILE_FIELDS = {b"updated_at"}


class Webhook:
    """A local HTTP endpoint that keeps (path, Idempotency-Key, body) of every POST."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, self.headers["Idempotency-Key"], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def by_key(self, path: str) -> dict[str, set[bytes]]:
        out = defaultdict(set)
        for p, key, body in list(self.received):
            if p == path:
                out[key].add(body)
        return dict(out)

    def close(self) -> None:
        self.server.shutdown()


def write_config(tmp: Path, name: str, bootstrap: str, topic: str, redis_url: str,
                 webhook: str | None, trigger_rules: str | None = None, **flow) -> Path:
    doc = {
        "source": {"kind": "kafka"},
        "kafka": {"brokers": [bootstrap], "events_topic": topic, "tail": True,
                  "dead_letter_topic": f"{name}.dead", "actions_topic": f"{name}.actions",
                  "alerts_topic": f"{name}.alerts"},
        "output": {"kind": "kafka"},
        "redis": {"url": redis_url, "key_prefix": name},
        "clickhouse": {"dsn": f"chdb://{tmp / 'chdb'}", "database": name,
                       "spool_dir": str(tmp / name / "spool")},
        "alerts": {"webhook": {"url": f"{webhook}/{name}" if webhook else None}},
        # No idleness: a partition read to its end would stop holding the watermark after 60 s
        # of wall time, so a run slowed by its kills (on a loaded machine) moved "now" further
        # than the clean run, and windows expired in one and not the other (a user's views_1h
        # 2 against 5). Event time alone decides here.
        "flow": {"max_clock_skew_s": None, "max_lookback_s": None, "epoch_interval_s": 0.5,
                 "workers": 2, "recovery_dir": str(tmp / name / "recovery"),
                 "idle_timeout_s": None, **flow},
        "metrics": {"port": 0},
    }
    if trigger_rules is not None:  # else the shipped catalogue
        doc["trigger"] = {"rules": trigger_rules}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    return kafka.end_offsets([bootstrap], topic)


class Run:
    """One `surgeflow run` process; its stderr is collected as it goes."""

    def __init__(self, config: Path):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "surgeflow", "run", "--config", str(config)],
                                     cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def stderr(self) -> str:
        return "".join(self.lines)[-4000:]

    def metrics(self) -> dict[str, float] | None:
        """The last scrape of /metrics as {"name{labels}": value}; None before it listens."""
        match = re.search(r"metrics\s+(http://\S+)/metrics", "".join(self.lines))
        if match is None:
            return None
        try:
            text = urllib.request.urlopen(match.group(1) + "/metrics", timeout=5).read().decode()
        except OSError:
            return None
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def read_through(self, ends: dict[int, int]) -> bool:
        m = self.metrics() or {}
        return all(m.get(f'surgeflow_source_offset{{partition="{p}"}}', -1) >= end - 1
                   for p, end in ends.items() if end)

    def settled(self, ends: dict[int, int], quiet_s: float = 1.5) -> bool:
        """Read through, and the flow's work counters and watermark unchanged for ``quiet_s``:
        the last batch's operations were released and "now" moved on. A stop then ends every
        run at the same point; right after reading through, it ends wherever the last batches
        happened to be (one more empty batch releases what the last one handed over)."""
        m = self.metrics() or {}
        if not self.read_through(ends):
            self._quiet = None
            return False
        work = tuple(sorted((k, v) for k, v in m.items()
                            if k.startswith(("surgeflow_step_", "surgeflow_watermark_ms"))))
        now = time.monotonic()
        if getattr(self, "_quiet", None) is None or self._quiet[0] != work:
            self._quiet = (work, now)
            return False
        return now - self._quiet[1] >= quiet_s

    def wait(self, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run exited {self.proc.returncode}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"timed out:\n{self.stderr()}"
            time.sleep(0.2)

    def running(self) -> bool:
        m = self.metrics()
        return m is not None and m.get("surgeflow_ready") == 1

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM; returns the seconds the run took to drain and exit (it must exit 0)."""
        asked = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        took = time.monotonic() - asked
        time.sleep(0.2)  # the reader thread takes the last lines
        assert self.proc.returncode == 0, self.stderr()
        return took

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def redis_contents(redis_url: str, prefix: str) -> dict[bytes, object]:
    client = redis.Redis.from_url(redis_url)
    out = {}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = client.type(key)
        if kind == b"stream":
            continue  # the models' versions channel: what it carried shows in the scores
        if kind == b"hash":
            out[key[len(prefix):]] = {k: v for k, v in client.hgetall(key).items()
                                      if k not in VOLATILE_FIELDS}
        else:
            out[key[len(prefix):]] = client.get(key)
    client.close()
    return out


def topic_records(bootstrap: str, topic: str, key_of) -> dict[str, set[bytes]]:
    """Every record of a topic by its idempotency key: a key with two different bodies is a bug,
    one body seen twice is an at-least-once redelivery."""
    ends = end_offsets(bootstrap, topic)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{topic}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in ends])
    out, n = defaultdict(set), 0
    deadline = time.monotonic() + 60
    while n < sum(ends.values()):
        assert time.monotonic() < deadline
        for m in c.consume(1000, timeout=1):
            assert m.error() is None, m.error()
            out[key_of(m.value())].add(body(m.value()))
            n += 1
    c.close()
    return dict(out)


def body(value: bytes) -> bytes:
    """A record's body without what differs between two deliveries of the same dead letter: the
    time it was written and the sealed bytes' random nonce (the masked bytes stay compared)."""
    try:
        doc = json.loads(value)
    except ValueError:
        return value
    if isinstance(doc, dict) and "at_ms" in doc:
        doc.pop("at_ms")
        doc.pop("raw_sealed", None)
        return json.dumps(doc, sort_keys=True).encode()
    return value


def delivered(bootstrap: str, name: str) -> dict[str, dict]:
    """The three Kafka outputs of a run, by idempotency key."""
    return {
        "actions": topic_records(bootstrap, f"{name}.actions", lambda v: json.loads(v)["action_id"]),
        "alerts": topic_records(bootstrap, f"{name}.alerts", alert_key),
        "dead": topic_records(bootstrap, f"{name}.dead",
                              lambda v: (lambda d: f"{d['source']}|{d['reason']}")(json.loads(v))),
    }


def alert_key(value: bytes) -> str:
    a = json.loads(value)
    return f"{a['alert_id']}:{a['status']}:{a['seq']}"


DUMP = r"""
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
out = {}
for db in sys.argv[2:]:
    tables = client.query(
        "SELECT name, engine FROM system.tables WHERE database = {db:String} "
        "AND engine NOT IN ('MaterializedView', 'Null', 'View') AND name != 'schema_migrations'",
        parameters={"db": db}).result_rows
    for table, engine in tables:
        # (stored_at: the wall time a row was stored, for retention: differs between runs)
        cols = client.query("SELECT name, type FROM system.columns WHERE database = {db:String} "
                            "AND table = {t:String} AND name != 'stored_at' ORDER BY position",
                            parameters={"db": db, "t": table}).result_rows
        # Float sums (revenue, cost) merged in another order differ in the last bit: compared
        # to 1e-6, what a money amount can mean
        exprs = [f"finalizeAggregation(`{c}`)" if t.startswith("AggregateFunction") else
                 f"round(`{c}`, 6)" if "Float" in t else f"`{c}`"
                 for c, t in cols]
        final = " FINAL" if engine != "MergeTree" and "MergeTree" in engine else ""
        rows = client.query(f"SELECT toJSONString(tuple({', '.join(exprs)})) FROM `{db}`.`{table}`"
                            f"{final}").result_rows
        out.setdefault(db, {})[table] = sorted(r[0] for r in rows)
print(json.dumps(out))
"""


def clickhouse_tables(chdb_dir: Path, *databases: str) -> dict[str, dict[str, list[str]]]:
    """Every table of each database (rows as JSON, sorted; aggregate states finalised), read by
    a process of its own: chDB opens one data directory per process."""
    r = subprocess.run([sys.executable, "-c", DUMP, f"chdb://{chdb_dir}", *databases],
                       capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def differences(got: dict, want: dict) -> dict:
    """Only what differs, key by key (and field by field for dicts)."""
    out = {}
    for key in sorted(got.keys() | want.keys(), key=str):
        a, b = got.get(key), want.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out[key] = {f: (a.get(f), b.get(f)) for f in sorted(a.keys() | b.keys(), key=str)
                        if a.get(f) != b.get(f)}
        else:
            out[key] = (a, b)
    return out
