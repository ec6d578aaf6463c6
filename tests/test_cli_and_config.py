"""The README's run command (embedded demo) and configuration errors, as a user meets them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]
SURGEFLOW = [sys.executable, "-m", "surgeflow"]


def test_typo_and_bad_broker_are_reported_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"kafka.brokres: Extra inputs are not permitted"):
        load_settings(env={"SURGEFLOW__KAFKA__BROKRES": "[x:1]"})
    with pytest.raises(ConfigError, match=r"kafka.brokers: .*'nohost' is not host:port"):
        load_settings(env={"SURGEFLOW__KAFKA__BROKERS": "[nohost]"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("flow:\n  shards: 0\n")
    with pytest.raises(ConfigError, match=r"flow.shards: Input should be greater than or equal to 1"):
        load_settings(cfg, env={})


def test_environment_overrides_the_file():
    s = load_settings(ROOT / "config" / "production.yaml",
                      env={"SURGEFLOW__REDIS__URL": "redis://other:6380/1",
                           "SURGEFLOW__FLOW__WORKERS": "4"})
    assert (s.redis.url, s.flow.workers, s.source.kind) == ("redis://other:6380/1", 4, "kafka")


def test_cli_reports_config_errors_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("redis:\n  url: redis://127.0.0.1:1/0\nkafka:\n  brokers: ['127.0.0.1:1']\n"
                   "source:\n  kind: kafka\n  typo: 1\n")
    r = subprocess.run(SURGEFLOW + ["run", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "source.typo" in r.stderr and "Traceback" not in r.stderr


def test_cli_reports_unreachable_kafka(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("redis:\n  url: redis://127.0.0.1:1/0\nkafka:\n  brokers: ['127.0.0.1:1']\n"
                   "source:\n  kind: kafka\n")
    r = subprocess.run(SURGEFLOW + ["run", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=90, env={**os.environ, "SURGEFLOW__KAFKA__CLIENT_CONFIG":
                                                      "{socket.connection.setup.timeout.ms: '2000'}"})
    assert r.returncode == 3 and "cannot reach Kafka brokers 127.0.0.1:1" in r.stderr
    assert "Traceback" not in r.stderr


def test_embedded_demo_runs_and_writes_its_summary(tmp_path):
    summary = tmp_path / "summary.json"
    env = {**os.environ, "SURGEFLOW_DEMO_SECONDS": "12", "SURGEFLOW_SUMMARY": str(summary)}
    r = subprocess.run(SURGEFLOW + ["demo"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(summary.read_text())
    for key in ("events_in", "events_dead_lettered", "users_with_features", "aggregate_rows",
                "actions_emitted"):
        assert s[key] > 0, key
    assert s["alerts_fired"] >= 0 and s["redis_url"].startswith("redis://")
    assert s["clickhouse_dsn"] == f"chdb://{tmp_path / '.surgeflow' / 'chdb'}"
    # The data stays on disk for inspection.
    assert (tmp_path / ".surgeflow" / "redis" / "dump.rdb").is_file()
    assert (tmp_path / ".surgeflow" / "out" / "actions.jsonl").stat().st_size > 0
    dead = (tmp_path / ".surgeflow" / "out" / "dead_letters.jsonl").read_text().splitlines()
    assert len(dead) == s["events_dead_lettered"] and all(json.loads(x)["reason"] for x in dead)


def test_demo_stops_on_ctrl_c_with_a_summary(tmp_path):
    import signal
    import time

    summary = tmp_path / "summary.json"
    env = {**os.environ, "SURGEFLOW_SUMMARY": str(summary)}
    env.pop("SURGEFLOW_DEMO_SECONDS", None)
    proc = subprocess.Popen(SURGEFLOW + ["demo"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        actions = tmp_path / ".surgeflow" / "out" / "actions.jsonl"
        while time.monotonic() < deadline and not (actions.exists() and actions.stat().st_size):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopping (SIGINT): draining the flow" in err
    assert json.loads(summary.read_text())["events_in"] > 0
