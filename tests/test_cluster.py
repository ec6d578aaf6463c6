"""Scale-out on Bytewax's cluster mode: `surgeflow run --processes N` started as a user would
(separate OS processes on loopback ports), on real Kafka with 4 partitions, real Redis and
embedded ClickHouse. 1, 2 and 4 processes give the same features, minute aggregates, actions
and alerts. Each run has its own chDB directory, read afterwards by a child process (one chDB
directory per process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import signal
import textwrap
import time
from pathlib import Path

import pytest
import redis

from connectors.kafka import produce
from connectors.synthetic import Anomaly, SyntheticSpec, generate
from flows.cluster import Place, pinned_key, worker_of
from tests.engine_harness import PAGES_ONLY
from tests.test_pipeline_kafka import VOLATILE, consume_all, redis_features

ROOT = Path(__file__).resolve().parent.parent
SPEC = SyntheticSpec(seed=23, users=300, start_ms=1_795_392_000_000, events_per_s=4.0,
                     duration_s=5400.0, malformed_share=0.01, duplicate_share=0.02,
                     max_disorder_ms=2000, anomalies=(Anomaly("traffic_spike", 3600, 600, 8.0),))

DUMP = textwrap.dedent("""
    import json, sys
    import clickhouse_connect
    client = clickhouse_connect.get_client(dsn=sys.argv[1])
    rows = client.query(sys.argv[2]).result_rows
    print(json.dumps([[str(v) for v in r] for r in rows]))
""")


def chdb_rows(dsn: str, sql: str) -> list:
    out = subprocess.run([sys.executable, "-c", DUMP, dsn, sql], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return sorted(map(tuple, json.loads(out)))


def test_pinned_keys_land_on_process_zero():
    """The erasure step's key lands on a worker of process 0 for any cluster shape (the routing
    function itself is checked against Bytewax below)."""
    for processes in (1, 2, 3, 4, 8):
        for per in (1, 2, 4):
            place = Place(0, processes, per)
            assert worker_of(pinned_key("all", place), place.workers) < per


def test_worker_of_matches_bytewax_routing():
    """Keys of a stateful step in a 4-worker run land where worker_of says (a DynamicSink built
    per worker records which worker wrote each key)."""
    script = textwrap.dedent("""
        import json
        import bytewax.operators as op
        from bytewax.dataflow import Dataflow
        from bytewax.outputs import DynamicSink, StatelessSinkPartition
        from bytewax.testing import TestingSource, cluster_main
        seen = {}
        class Part(StatelessSinkPartition):
            def __init__(self, w): self.w = w
            def write_batch(self, items):
                for k in items: seen[k] = self.w
        class Sink(DynamicSink):
            def build(self, step_id, w, n): return Part(w)
        keys = [f"k{i}" for i in range(80)] + ["all", "all-1", "shard-0003", "é✓", ""]
        flow = Dataflow("route")
        keyed = op.key_on("key", op.input("in", flow, TestingSource(keys)), lambda x: x)
        out = op.stateful_map("state", keyed, lambda s, v: (None, v))
        op.output("out", op.map("value", out, lambda kv: kv[1]), Sink())
        cluster_main(flow, [], 0, worker_count_per_proc=4)
        print(json.dumps(seen))
    """)
    seen = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                     text=True, timeout=120, check=True).stdout)
    assert len(seen) == 85 and len(set(seen.values())) == 4
    assert {k: worker_of(k, 4) for k in seen} == seen


def run_cluster(tmp_path: Path, kafka, topic: str, redis_url: str, processes: int,
                workers: int = 1) -> dict:
    name = f"p{processes}w{workers}"
    outs = {kind: kafka.create_topic(f"{kind}-{topic}-{name}") for kind in ("dead", "actions", "alerts")}
    dsn = f"chdb://{tmp_path / ('ch-' + name)}"
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({
        "source": {"kind": "kafka"}, "output": {"kind": "kafka"},
        "kafka": {"brokers": [kafka.bootstrap], "events_topic": topic, "tail": False,
                  "dead_letter_topic": outs["dead"], "actions_topic": outs["actions"],
                  "alerts_topic": outs["alerts"]},
        "redis": {"url": redis_url, "key_prefix": name},
        "clickhouse": {"dsn": dsn, "database": "sf", "spool_dir": str(tmp_path / f"spool-{name}")},
        "flow": {"shards": 8, "max_clock_skew_s": None, "max_lookback_s": None,
                 "recovery_dir": None, "allowed_lateness_s": 60},
        "trigger": {"rules": str(PAGES_ONLY)},
        "metrics": {"enabled": False},
    }))
    summary = tmp_path / f"{name}.json"
    env = {**os.environ, "SURGEFLOW_SUMMARY": str(summary)}
    done = subprocess.run([sys.executable, "-m", "surgeflow", "run", "-c", str(config),
                           "--processes", str(processes), "--workers", str(workers)],
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    feats = {u: {k: v for k, v in f.items() if k not in VOLATILE}
             for u, f in redis_features(redis_url, name).items()}
    minutes = chdb_rows(dsn, "SELECT toUnixTimestamp(ts), channel, campaign, event_name, "
                             "sum(events), uniqExactMerge(users), round(sum(revenue), 2) "
                             "FROM sf.events_minute FINAL GROUP BY ts, channel, campaign, event_name")
    actions = sorted(tuple(sorted((k, str(v)) for k, v in json.loads(m.value()).items()
                                  if k not in ("emitted_at", "sent_at", "latency_ms")))
                     for m in consume_all(kafka.bootstrap, outs["actions"]))
    alerts = sorted(tuple(sorted((k, str(v)) for k, v in a.items()))
                    for a in map(json.loads, (m.value() for m in consume_all(kafka.bootstrap,
                                                                            outs["alerts"])))
                    if a["area"] in ("ops", "market", "ads"))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    head = f"{name}:v2:alias:"
    linked = {}
    for key in client.scan_iter(match=head + "*", count=1000):
        linked[key[len(head):]] = client.get(key)
    return {"features": feats, "minutes": minutes, "actions": actions, "alerts": alerts,
            "linked": set(linked) | set(linked.values()),
            "summary": json.loads(summary.read_text())}


def unlinked(run: dict) -> list:
    return [a for a in run["actions"] if dict(a)["user_id"] not in run["linked"]]


@pytest.mark.timeout(1500)
def test_one_two_and_four_processes_give_the_same_outputs(kafka, redis_url, tmp_path):
    topic = kafka.create_topic("cluster-in", partitions=4)
    records = list(generate(SPEC))
    assert produce([kafka.bootstrap], topic, ((r.key, r.value, r.sent_ms) for r in records)) \
        == len(records)
    runs = {n: run_cluster(tmp_path, kafka, topic, redis_url, n) for n in (1, 2, 4)}
    one = runs[1]
    assert one["features"] and one["minutes"] and one["alerts"] and len(unlinked(one)) > 100
    assert one["summary"]["events_in"] == len(records)
    for n in (2, 4):
        other = runs[n]
        assert other["summary"]["processes"] == n
        assert other["summary"]["events_in"] == len(records)
        shares = [json.loads((tmp_path / f"p{n}w1.json.process-{i}").read_text())["events_in"]
                  for i in range(n)]
        assert all(shares) and sum(shares) == len(records)  # every process read its partitions
        assert other["summary"]["aggregate_rows"] == one["summary"]["aggregate_rows"]
        assert other["minutes"] == one["minutes"], f"minute rows differ (1 and {n} processes)"
        diff = {u for u in set(one["features"]) | set(other["features"])
                if one["features"].get(u) != other["features"].get(u)}
        assert not diff, f"features differ (1 and {n} processes): {sorted(diff)[:5]}"
        # Actions are decided on arrival (the 3rd view of a session). A visitor who logs in has
        # events under two Kafka keys, so in two partitions whose interleaving is not fixed even
        # between two runs of one process: their actions are left out (the features, made of
        # intervals, do not depend on it and are compared above).
        assert other["linked"] == one["linked"]
        assert unlinked(other) == unlinked(one)
        assert other["alerts"] == one["alerts"]
    # the work was spread: 4 processes each read a Kafka partition
    assert redis.Redis.from_url(redis_url).exists("p4w1:v2:registry")


BIG = SyntheticSpec(seed=29, users=800, start_ms=1_795_392_000_000, events_per_s=10.0,
                    duration_s=5400.0, duplicate_share=0.02, max_disorder_ms=2000)


def cluster_config(tmp_path: Path, kafka, topic: str, redis_url: str, name: str,
                   recovery: Path | None) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({
        "source": {"kind": "kafka"}, "output": {"kind": "files", "dir": str(tmp_path / f"out-{name}")},
        "kafka": {"brokers": [kafka.bootstrap], "events_topic": topic, "tail": False},
        "redis": {"url": redis_url, "key_prefix": name},
        "clickhouse": {"dsn": f"chdb://{tmp_path / ('ch-' + name)}", "database": "sf",
                       "spool_dir": str(tmp_path / f"spool-{name}")},
        "flow": {"shards": 8, "max_clock_skew_s": None, "max_lookback_s": None,
                 "recovery_dir": str(recovery) if recovery else None, "epoch_interval_s": 1.0,
                 "allowed_lateness_s": 60},
        "metrics": {"enabled": False},
    }))
    return config


def outputs_of(tmp_path: Path, redis_url: str, name: str) -> tuple[dict, list]:
    feats = {u: {k: v for k, v in f.items() if k not in VOLATILE}
             for u, f in redis_features(redis_url, name).items()}
    minutes = chdb_rows(f"chdb://{tmp_path / ('ch-' + name)}",
                        "SELECT toUnixTimestamp(ts), channel, campaign, event_name, sum(events), "
                        "uniqExactMerge(users), round(sum(revenue), 2) FROM sf.events_minute FINAL "
                        "GROUP BY ts, channel, campaign, event_name")
    return feats, minutes


@pytest.mark.timeout(1500)
def test_a_killed_process_then_a_restart_of_all_loses_and_doubles_nothing(kafka, redis_url,
                                                                          tmp_path):
    """Two processes with a recovery store; one is killed (SIGKILL) mid-run, the launcher stops
    the other, and `surgeflow run --processes 2` again resumes from the snapshot: the features
    and the minute aggregates equal a clean one-process run's."""
    topic = kafka.create_topic("cluster-crash", partitions=4)
    records = list(generate(BIG))
    produce([kafka.bootstrap], topic, ((r.key, r.value, r.sent_ms) for r in records))
    run = [sys.executable, "-m", "surgeflow", "run", "--processes", "2", "-c"]
    clean = cluster_config(tmp_path, kafka, topic, redis_url, "clean", None)
    done = subprocess.run(run[:-3] + ["-c", str(clean)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    crash = cluster_config(tmp_path, kafka, topic, redis_url, "crash", tmp_path / "recovery")
    launcher = subprocess.Popen(run + [str(crash)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    first = launcher.stdout.readline()
    while "cluster of 2 processes" not in first:
        assert first, "the launcher ended before starting its processes"
        first = launcher.stdout.readline()
    victim = int(first.rsplit("pids ", 1)[1].split(",")[1].strip(" )\n"))
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 120
    while not any(True for _ in client.scan_iter(match="crash:v2:user:*", count=100)):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.1)
    time.sleep(2.5)  # a few epochs: snapshots were taken
    assert launcher.poll() is None, "the run ended before the kill: make the stream longer"
    os.kill(victim, signal.SIGKILL)
    rest = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0 and "ended with exit code" in rest, rest[-2000:]

    summary = tmp_path / "again.json"
    again = subprocess.run(run + [str(crash)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "SURGEFLOW_SUMMARY": str(summary)})
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    resumed = json.loads(summary.read_text())
    assert 0 < resumed["events_in"] < len(records), resumed  # on from the snapshot, not the start
    assert resumed["shards_restored"] > 0  # (what the progress line counts while restoring)
    clean_feats, clean_minutes = outputs_of(tmp_path, redis_url, "clean")
    feats, minutes = outputs_of(tmp_path, redis_url, "crash")
    assert clean_feats and clean_minutes
    assert minutes == clean_minutes  # nothing lost, nothing counted twice
    diff = {u for u in set(feats) | set(clean_feats) if feats.get(u) != clean_feats.get(u)}
    assert not diff, f"features differ after the crash and restart: {sorted(diff)[:5]}"


def test_compose_runs_the_configured_number_of_processes():
    """docker-compose passes SURGEFLOW_PROCESSES to `surgeflow run --processes`, and the CLI
    takes the options the README gives for several machines."""
    import yaml
    from typer.testing import CliRunner

    from surgeflow.cli import app

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["surgeflow"]  # (its environment comes from x-surgeflow)
    assert service["command"][0] == "run"
    assert compose["x-surgeflow"]["environment"]["SURGEFLOW_PROCESSES"] == "${SURGEFLOW_PROCESSES:-1}"
    # the variable reaches --processes: a value out of its range is refused before anything runs
    refused = CliRunner().invoke(app, ["run", "-c", "none.yaml"], env={"SURGEFLOW_PROCESSES": "0"})
    assert refused.exit_code == 2 and "processes" in refused.output
    help_text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    readme = (ROOT / "README.md").read_text()
    for option in ("--processes", "--addresses", "--process-id", "--workers"):
        assert option in help_text and option in readme


def test_the_launcher_sees_any_process_fail_and_stops_the_others(monkeypatch, tmp_path):
    """Whichever process fails first (here the last one, while the first still runs), the
    launcher notices it, stops the rest and returns its exit code: a cluster that lost a process
    would otherwise wait forever for it. (Stand-in processes: the launcher's own logic.)"""
    from surgeflow import launch as launcher

    def command(config, addresses, process_id, workers):
        if process_id == 0:  # runs until told to stop
            code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(120)"
        else:
            code = "import sys, time; time.sleep(0.5); sys.exit(3)"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(launcher, "command", command)
    monkeypatch.delenv("SURGEFLOW_SUMMARY", raising=False)
    said: list[str] = []
    started = time.monotonic()
    code, _ = launcher.launch(tmp_path / "unused.yaml", 2, None, say=said.append, kill_after_s=10)
    assert code == 3 and time.monotonic() - started < 10
    assert any("process 1 ended with exit code 3" in s for s in said), said
