"""Replays and crashes leave Redis as one clean run would: the production command
(`surgeflow run`) on real Kafka and Redis, run cleanly once, run twice over the same input, and
killed with SIGKILL in the middle then restarted from its Bytewax recovery store.

Compared byte for byte: every user hash and alias key, except `updated_at` (the wall-clock write
time, by design). The online models' scores and versions are compared too: a score uses the
version its event's time needs, whatever the restarts. Every key must also carry a TTL."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import redis
import yaml

from connectors.kafka import produce
from connectors.synthetic import SyntheticSpec, generate
from tests.services import PROJECT_ROOT

SPEC = SyntheticSpec(seed=23, users=1500, start_ms=1_795_392_000_000, events_per_s=12.0,
                     duration_s=5400.0, malformed_share=0.01, duplicate_share=0.03,
                     max_disorder_ms=3000)
VOLATILE = {b"updated_at"}


@pytest.fixture(scope="module")
def topic(kafka):
    name = kafka.create_topic("events-recovery", partitions=2)
    produce([kafka.bootstrap], name, ((r.key, r.value, r.sent_ms) for r in generate(SPEC)))
    return name


def write_config(tmp_path, kafka, topic, redis_url, prefix, recovery=None):
    doc = {
        "source": {"kind": "kafka"},
        "kafka": {"brokers": [kafka.bootstrap], "events_topic": topic, "tail": False},
        "output": {"kind": "files", "dir": str(tmp_path / prefix / "out")},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "clickhouse": {"dsn": f"chdb://{tmp_path / prefix / 'chdb'}", "database": "surgeflow"},
        "metrics": {"port": 0},
        "flow": {"max_clock_skew_s": None, "max_lookback_s": None, "epoch_interval_s": 0.5, "workers": 2,
                 "recovery_dir": str(recovery) if recovery else None},
    }
    path = tmp_path / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def surgeflow_run(config) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "surgeflow", "run", "--config", str(config)],
                            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]


def contents(redis_url, prefix) -> dict[bytes, object]:
    """Every key under the prefix: hashes without the volatile fields, strings as they are."""
    client = redis.Redis.from_url(redis_url)
    out = {}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = client.type(key)
        if kind == b"stream":
            continue  # the models' versions channel (bounded, no TTL): checked by the scores
        if kind == b"hash":
            out[key[len(prefix):]] = {k: v for k, v in client.hgetall(key).items()
                                      if k not in VOLATILE}
        else:
            out[key[len(prefix):]] = client.get(key)
        if not key.endswith(b":registry"):
            assert client.ttl(key) > 0, key
    return out


def differences(got: dict, want: dict) -> dict:
    """Only what differs, key by key and field by field, so a failure names the few culprits
    instead of printing two whole databases."""
    out = {}
    for key in sorted(got.keys() | want.keys()):
        a, b = got.get(key), want.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out[key] = {f: (a.get(f), b.get(f)) for f in sorted(a.keys() | b.keys())
                        if a.get(f) != b.get(f)}
        else:
            out[key] = (a, b)
    return out


def user_count(client, prefix) -> int:
    return sum(1 for _ in client.scan_iter(match=f"{prefix}:v2:user:*", count=1000))


def test_replay_twice_and_crash_restart_leave_redis_as_one_clean_run(tmp_path, kafka, topic,
                                                                    redis_url):
    finish(surgeflow_run(write_config(tmp_path, kafka, topic, redis_url, "clean")))
    clean = contents(redis_url, "clean")
    users = sum(k.startswith(b":v2:user:") for k in clean)
    assert users > 1000 and any(k.startswith(b":v2:alias:") for k in clean)

    # The same input twice over the same keys (a producer re-sending everything).
    twice = write_config(tmp_path, kafka, topic, redis_url, "twice")
    finish(surgeflow_run(twice))
    finish(surgeflow_run(twice))
    assert differences(contents(redis_url, "twice"), clean) == {}

    # Killed mid-run (no clean shutdown, no final flush), then restarted from the last snapshot:
    # the restart replays the events after it, and absolute writes make that harmless.
    recovery = tmp_path / "recovery"
    crash = write_config(tmp_path, kafka, topic, redis_url, "crash", recovery)
    client = redis.Redis.from_url(redis_url)
    proc = surgeflow_run(crash)
    deadline = time.monotonic() + 300
    while user_count(client, "crash") < users // 3:
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = user_count(client, "crash")
    assert at_kill < users, "the run had finished before it was killed"
    assert any(recovery.glob("part-*.sqlite3"))
    finish(surgeflow_run(crash))
    assert differences(contents(redis_url, "crash"), clean) == {}
