"""Replay from JSON-lines files (two files = two source partitions) into real Redis and chDB,
with dead letters, actions and alerts written as JSON lines (the embedded outputs)."""
import json
import zlib
from collections import Counter

import redis

from config.settings import load_settings
from connectors.synthetic import SyntheticSpec, generate
from flows.runner import count_feature_users, run

SPEC = SyntheticSpec(seed=5, users=150, start_ms=1_795_392_000_000, events_per_s=3.0,
                     duration_s=1800.0, malformed_share=0.02, duplicate_share=0.02)


def test_replay_two_files(tmp_path, redis_url, chdb_dsn, chdb_client, ch_database):
    records = list(generate(SPEC))
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    # Split by user so each user's events stay in order within one file (like Kafka keys).
    for i, f in enumerate(files):
        with f.open("wb") as out:
            for r in records:
                if zlib.crc32(r.key or b"") % 2 == i and b"\n" not in r.value:
                    out.write(r.value + b"\n")
    written = [line for f in files for line in f.read_bytes().splitlines() if line]
    kinds = {r.value: r.kind for r in records}
    settings = load_settings(
        None, env={}, source__kind="file", source__file={"paths": [str(f) for f in files]},
        output__dir=str(tmp_path / "out"), redis__url=redis_url, redis__key_prefix="replay",
        clickhouse__dsn=chdb_dsn, clickhouse__database=ch_database, flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None)
    run(settings, redis_url)

    dead = [json.loads(x) for x in (tmp_path / "out" / "dead_letters.jsonl").read_text().splitlines()]
    expected = Counter(kinds[v].split(":", 1)[1] for v in written if kinds[v].startswith("malformed:"))
    assert Counter(d["reason"] for d in dead) == expected and sum(expected.values()) > 10
    docs = [json.loads(v) for v in written if kinds[v] in ("ok", "duplicate")]
    # the default link policy: only login, signup and identify events link a visitor to a user
    linked = {d["anonymous_id"] for d in docs if d.get("user_id") and d.get("anonymous_id")
              and (d.get("type") == "identify" or d.get("event") in ("login", "signup"))}
    users = {d.get("user_id") or d["anonymous_id"] for d in docs
             if d.get("context", {}).get("consent", {}).get("profiling") is not False}
    users -= linked  # visitors who logged in were merged into their user's profile
    assert count_feature_users(redis_url, "replay") == len(users)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    known = sorted(users & {d["user_id"] for d in docs if d.get("user_id")})
    assert r.object("encoding", f"replay:v2:user:{known[0]}") == "listpack"
    ok = {json.loads(v)["event_id"] for v in written if kinds[v] in ("ok", "duplicate")}
    total = chdb_client.command(f"SELECT sum(events) FROM {ch_database}.events_minute FINAL")
    assert total == len(ok)  # duplicates counted once
    actions = (tmp_path / "out" / "actions.jsonl").read_text().splitlines()
    assert actions and all("_arrival_ms" not in a for a in actions)
