"""The output sinks against real services that fail: a Redis server stopped (SIGSTOP) and then
killed and restarted, a Kafka broker killed and restarted, chDB tables detached, blocks
ClickHouse refuses for good, a spill under a small byte bound and a restart after a crash
between an insert and its spool file's removal. After each, every effect is present exactly
once (or, for the keyed at-least-once sinks, only as same-id repeats), the flow's thread never
saw an exception, and each outage was logged once when it started and once when it ended."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import socket
import threading
import time
import tracemalloc
import uuid

import orjson
import pytest
import redis
from clickhouse_connect.driver.exceptions import OperationalError
from confluent_kafka.admin import AdminClient, NewTopic

import services
from connectors.clickhouse import (WAIT_CODES, ClickHouseSink, _client, minute_blocks, raw_rows,
                                   row_bytes, rows_bytes)
from connectors.kafka import KafkaTopicSink
from connectors.redis_features import RedisFeatureSink
from features.layout import alias_key, user_key
from flows.minutes import CompleteMinute
from flows.shard import Write
from surgeflow.stats import STATS
from tests.test_pipeline_kafka import consume_all
from warehouse.migrate import migrate

T0 = 29_930_000  # a minute index (2026-11-26)


def wait_for(predicate, timeout=20.0, step=0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


class Flow(threading.Thread):
    """Stands for the flow's worker thread: calls ``write_batch`` with batch after batch until
    stopped, and keeps any exception (there must be none)."""

    def __init__(self, write, make_batch, pause_s=0.01):
        super().__init__(daemon=True)
        self.write, self.make_batch, self.pause_s = write, make_batch, pause_s
        self.done = 0  # batches write_batch returned from
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                self.write(self.make_batch(self.done))
                self.done += 1
                time.sleep(self.pause_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def advance(self, n: int, timeout=20.0) -> bool:
        """Waits until n more batches went through."""
        target = self.done + n
        return wait_for(lambda: self.done >= target, timeout)

    def finish(self):
        self.stop.set()
        self.join(60)
        assert not self.is_alive(), "write_batch never returned"
        assert self.error is None, f"the flow thread broke: {self.error!r}"


def messages(caplog, logger: str, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and text in r.getMessage()]


# -- Redis ------------------------------------------------------------------------------------
USERS = 60


def redis_batch(i: int) -> list:
    """Batch i writes 12 users (overlapping the previous batches', so order matters) and one
    alias; values are absolute, so a retried batch rewrites the same bytes."""
    writes = [Write(f"u{(i * 5 + j) % USERS}", {"views_1h": str(i), "as_of": str(i * 1000)},
                    (), True) for j in range(12)]
    return [(writes, [(f"anon-{i}", f"u{i % USERS}")])]


def expected_redis(batches: int) -> tuple[dict, dict]:
    users, aliases = {}, {}
    for i in range(batches):
        for writes, links in redis_batch(i):
            for w in writes:
                users[w.user] = w.values
            aliases.update(links)
    return users, aliases


def test_redis_sink_waits_out_a_hung_then_a_killed_server(tmp_path, caplog):
    data = tmp_path / "redis"
    try:
        proc, port = services.start_redis_aof(data)
    except Exception as exc:  # noqa: BLE001
        services.unavailable("Redis", exc)
    servers = [proc]
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    retries = STATS.get("redis_retries")
    part = RedisFeatureSink(f"redis://127.0.0.1:{port}/0", "out", 3600, socket_timeout_s=0.5,
                            retry_max_backoff_s=0.5).build("features_to_redis", 0, 1)
    flow = Flow(part.write_batch, redis_batch)
    caplog.set_level(logging.INFO, logger="surgeflow.redis")
    try:
        flow.start()
        assert flow.advance(10)
        # 1. hung: the server stops answering, connections still open (the kernel accepts)
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.6)
        stalled_at = flow.done
        time.sleep(2.0)
        assert flow.done <= stalled_at + 1  # the flow waits (backpressure), nothing dropped
        os.kill(proc.pid, signal.SIGCONT)
        assert flow.advance(10)
        # 2. killed (nothing saved but the fsynced append-only file) and restarted on its port
        proc.kill()
        proc.wait()
        time.sleep(1.5)
        proc, _ = services.start_redis_aof(data, port)
        servers.append(proc)
        assert flow.advance(10)
        flow.finish()

        users, aliases = expected_redis(flow.done)
        for user, values in users.items():
            stored = client.hgetall(user_key("out", user))
            assert {k.decode(): v.decode() for k, v in stored.items()
                    if k != b"updated_at"} == values
        for anon, user in aliases.items():
            assert client.get(alias_key("out", anon)) == user.encode()
        assert len(client.keys("out:v2:user:*")) == USERS
    finally:
        flow.stop.set()
        part.close()
        client.close()
        for server in servers:
            stop_server(server)
    assert STATS.get("redis_retries") > retries
    assert len(messages(caplog, "surgeflow.redis", "unavailable")) == 2  # one per outage
    assert len(messages(caplog, "surgeflow.redis", "is back")) == 2
    assert "redis" not in STATS.outages


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)  # a stopped server ignores SIGTERM until continued
        proc.terminate()
        proc.wait(10)


def test_redis_sink_skips_a_key_something_else_owns(redis_client, redis_url, caplog):
    redis_client.set("wt:v2:user:taken", "not a hash")  # another program's key
    before = STATS.labeled("redis_command_errors").get("WRONGTYPE", 0)
    part = RedisFeatureSink(redis_url, "wt", 3600).build("features_to_redis", 0, 1)
    caplog.set_level(logging.INFO, logger="surgeflow.redis")
    for i in range(3):
        part.write_batch([([Write("taken", {"views_1h": str(i)}, (), True),
                            Write("free", {"views_1h": str(i)}, (), True)], [])])
    part.close()
    assert redis_client.hget("wt:v2:user:free", "views_1h") == b"2"  # the rest of each batch
    assert redis_client.get("wt:v2:user:taken") == b"not a hash"
    assert STATS.labeled("redis_command_errors")["WRONGTYPE"] == before + 3
    assert len(messages(caplog, "surgeflow.redis", "WRONGTYPE")) == 1  # rate-limited


# -- Kafka ------------------------------------------------------------------------------------
TOPIC_MAX_BYTES = 20_000  # the topic's max.message.bytes: far below the client's 1 MB


@pytest.fixture
def own_kafka():
    """A broker of this test's own: it is killed and restarted, which the session's shared
    broker must not be."""
    broker = services.KafkaBroker()
    try:
        broker.start()
    except Exception as exc:  # noqa: BLE001
        services.unavailable("Kafka", exc)
    yield broker
    broker.stop()


def create_topic(broker, name: str) -> str:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    new = NewTopic(name, num_partitions=2, replication_factor=1,
                   config={"max.message.bytes": str(TOPIC_MAX_BYTES)})
    admin.create_topics([new])[name].result(30)
    assert wait_for(lambda: all(p.leader >= 0 for p in admin.list_topics(name, timeout=5)
                                .topics[name].partitions.values()))
    return name


def action(i: int, j: int, size: int = 0) -> dict:
    return {"action_id": f"a-{i}-{j}", "user_id": f"u{j}", "pad": "x" * size}


def test_kafka_sink_survives_a_broker_restart(own_kafka, tmp_path, caplog):
    topic = create_topic(own_kafka, f"actions-{uuid.uuid4().hex[:8]}")
    # a short message timeout: deliveries fail while the broker is away and are produced again
    sink = KafkaTopicSink([own_kafka.bootstrap], topic, orjson.dumps,
                          lambda a: a["action_id"].encode(),
                          extra={"message.timeout.ms": "3000"}, reject_dir=tmp_path)
    part = sink.build("actions_to_kafka", 0, 1)
    flow = Flow(part.write_batch, lambda i: [[action(i, j) for j in range(20)]], pause_s=0.05)
    caplog.set_level(logging.INFO, logger="surgeflow.kafka")
    rejected = STATS.labeled("kafka_rejected").get(topic, 0)
    try:
        flow.start()
        assert flow.advance(5, timeout=30)
        services.kill_kafka(own_kafka)
        time.sleep(5.0)  # longer than message.timeout.ms: deliveries fail and are retried
        services.restart_kafka(own_kafka)
        assert flow.advance(5, timeout=60)
        flow.finish()
    finally:
        flow.stop.set()
    # too large for the topic (refused by the broker), and for the client (refused at once)
    big = [action(-1, 0, 50_000), action(-1, 1, 2_000_000), action(-1, 2)]
    part.write_batch([big])
    part.close()

    got = [orjson.loads(m.value()) for m in consume_all(own_kafka.bootstrap, topic)]
    ids = [a["action_id"] for a in got]
    sent = {f"a-{i}-{j}" for i in range(flow.done) for j in range(20)} | {"a--1-2"}
    assert set(ids) == sent  # every record delivered, none lost
    by_id = {}
    for a in got:  # duplicates only as same-id repeats of the same record
        assert by_id.setdefault(a["action_id"], a) == a
    lines = [orjson.loads(x) for x in (tmp_path / f"rejected-{topic}.jsonl").read_bytes()
             .splitlines()]
    assert sorted(orjson.loads(x["value"])["action_id"] for x in lines) == ["a--1-0", "a--1-1"]
    assert {x["code"] for x in lines} == {"MSG_SIZE_TOO_LARGE"}
    assert STATS.labeled("kafka_rejected")[topic] == rejected + 2
    assert len(messages(caplog, "surgeflow.kafka", "Kafka unavailable")) == 1
    assert len(messages(caplog, "surgeflow.kafka", "Kafka is back")) == 1
    assert "kafka" not in STATS.outages


# -- ClickHouse (chDB) ------------------------------------------------------------------------
def minute(m: int, n: int) -> CompleteMinute:
    return CompleteMinute(m, [("web", "c1", "", "page_view", n, 1.5 * n, 0.0, 0, [f"u{m}", "u0"])])


def raw(i: int, **bad) -> tuple:
    row = [(T0 * 60 + i) * 1000, f"e{i}", "track", "page_view", "", f"a{i}", "web", "", "", 0.0,
           0.0, "10.0.0.0", "CN", "{}"]
    for index, value in bad.items():
        row[int(index[1:])] = value
    return tuple(row)


def totals(client, db):
    return {t: client.query(f"SELECT sum(events), uniqExactMerge(users) FROM {db}.{t} FINAL")
            .result_rows[0] for t in ("events_minute", "events_hour", "events_day")}


def raw_count(client, db) -> tuple:
    q = f"SELECT count(), uniqExact(event_id) FROM {db}.events_raw"
    return client.query(q).result_rows[0], client.query(q + " FINAL").result_rows[0]


def test_clickhouse_waits_for_detached_tables_and_counts_once(chdb_dsn, chdb_client, ch_database,
                                                              tmp_path, caplog):
    migrate(chdb_client, ch_database)
    minutes = ClickHouseSink(chdb_dsn, ch_database, "events_minute_in", max_rows=1,
                             max_delay_s=0.1, spool_dir=tmp_path).build("s", 0, 1)
    raws = ClickHouseSink(chdb_dsn, ch_database, "events_raw", max_rows=50, max_delay_s=0.1,
                          spool_dir=tmp_path).build("s", 0, 1)
    for part in (minutes, raws):
        part.backoff_initial_s = 0.1
    caplog.set_level(logging.INFO, logger="surgeflow.clickhouse")
    minutes.write_batch([[minute(T0, 5)]])
    raws.write_batch([[raw(i) for i in range(100)]])
    assert wait_for(lambda: raw_count(chdb_client, ch_database)[1] == (100, 100))

    chdb_client.command(f"DETACH TABLE {ch_database}.events_raw")
    chdb_client.command(f"DETACH TABLE {ch_database}.events_hour")  # a view's target
    for k in range(1, 6):
        minutes.write_batch([[minute(T0 + k, k)]])
        raws.write_batch([[raw(i) for i in range(100 * k, 100 * k + 100)]])
        time.sleep(0.3)
    assert "clickhouse" in STATS.outages
    chdb_client.command(f"ATTACH TABLE {ch_database}.events_raw")
    chdb_client.command(f"ATTACH TABLE {ch_database}.events_hour")
    minutes.write_batch([[minute(T0 + 3, 3)]])  # a replayed minute: same token, counted once
    assert wait_for(lambda: raw_count(chdb_client, ch_database)[1] == (600, 600))
    assert wait_for(lambda: totals(chdb_client, ch_database)["events_hour"] == (20, 7))
    minutes.close()
    raws.close()
    # nothing was inserted twice, not even physically (the failed inserts stored nothing)
    assert raw_count(chdb_client, ch_database)[0] == (600, 600)
    assert totals(chdb_client, ch_database) == {t: (20, 7) for t in
                                                 ("events_minute", "events_hour", "events_day")}
    # two tables failing: one outage, one line when it starts and one when it ends
    assert len(messages(caplog, "surgeflow.clickhouse", "ClickHouse unavailable")) == 1
    assert len(messages(caplog, "surgeflow.clickhouse", "ClickHouse is back")) == 1
    assert "clickhouse" not in STATS.outages


def test_clickhouse_sets_aside_blocks_it_refuses_for_good(chdb_dsn, chdb_client, ch_database,
                                                         tmp_path):
    migrate(chdb_client, ch_database)
    before = STATS.labeled("clickhouse_rejected_blocks")
    minutes = ClickHouseSink(chdb_dsn, ch_database, "events_minute_in", max_rows=1,
                             max_delay_s=0.1, spool_dir=tmp_path,
                             max_insert_tries=3).build("s", 0, 1)
    raws = ClickHouseSink(chdb_dsn, ch_database, "events_raw", max_rows=20, max_delay_s=0.1,
                          spool_dir=tmp_path, max_insert_tries=3).build("s", 0, 1)
    for part in (minutes, raws):
        part.backoff_initial_s = 0.05
    bad_minute = CompleteMinute(T0 + 1, [("web", "c1", "", "page_view", "many", 1.0, 0.0, 0, [])])
    minutes.write_batch([[minute(T0, 5), bad_minute, minute(T0 + 2, 7)]])
    # one bad value among 20 rows batched together: the good rows still go in
    raws.write_batch([[raw(i) if i != 7 else raw(i, c9="abc") for i in range(20)]])
    raws.write_batch([[raw(i) for i in range(20, 40)]])
    assert wait_for(lambda: raw_count(chdb_client, ch_database)[1] == (39, 39))
    assert wait_for(lambda: totals(chdb_client, ch_database)["events_day"] == (12, 3))
    minutes.close()
    raws.close()

    m_lines = [orjson.loads(x) for x in (tmp_path / "rejected-events_minute_in.jsonl")
               .read_bytes().splitlines()]
    assert len(m_lines) == 1 and m_lines[0]["token"] == f"minute-{T0 + 1}"
    assert m_lines[0]["tries"] == 3 and m_lines[0]["rows"][0][5] == "many"
    assert m_lines[0]["table"] == f"{ch_database}.events_minute_in"
    r_lines = [orjson.loads(x) for x in (tmp_path / "rejected-events_raw.jsonl")
               .read_bytes().splitlines()]
    assert len(r_lines) == 1 and len(r_lines[0]["rows"]) == 1  # the bad row alone
    assert r_lines[0]["rows"][0][1:2] == ["e7"] and r_lines[0]["rows"][0][9] == "abc"
    assert r_lines[0]["token"] is None and r_lines[0]["error"].startswith("ValueError")
    after = STATS.labeled("clickhouse_rejected_blocks")
    for table in ("events_minute_in", "events_raw"):
        assert after[table] == before.get(table, 0) + 1


def test_clickhouse_spills_under_a_byte_bound(chdb_dsn, chdb_client, ch_database, tmp_path):
    migrate(chdb_client, ch_database)
    chdb_client.command(f"DETACH TABLE {ch_database}.events_raw")
    bound = 64 * 1024
    sink = ClickHouseSink(chdb_dsn, ch_database, "events_raw", max_rows=100, max_delay_s=0.1,
                          max_buffer_rows=1_000_000, max_buffer_bytes=bound, spool_dir=tmp_path)
    part = sink.build("s", 0, 1)
    part.backoff_initial_s = 0.1
    spool = tmp_path / f"{ch_database}.events_raw" / "worker-0"
    for start in range(0, 3000, 25):
        part.write_batch([[raw(i) for i in range(start, start + 25)]])
        with part.cond:  # the queue's bytes, as held, stay under the bound
            assert part.bytes <= bound
            assert part.bytes == sum(rows_bytes(b.rows) for b in part.blocks)
    files = sorted(spool.glob("*.pickle"))
    assert len(files) >= 3 and not list(spool.glob("*.tmp"))
    for f in files:  # each file is whole: its blocks unpickle one by one
        with f.open("rb") as fh:
            assert pickle.load(fh)[1]
    chdb_client.command(f"ATTACH TABLE {ch_database}.events_raw")
    assert wait_for(lambda: raw_count(chdb_client, ch_database)[0] == (3000, 3000))
    part.close()
    assert not list(spool.glob("*.pickle"))
    assert raw_count(chdb_client, ch_database)[0] == (3000, 3000)


def test_a_spool_file_sent_again_after_a_crash_counts_once(chdb_dsn, chdb_client, ch_database,
                                                          tmp_path):
    """The worst crash: every block of the spool files inserted, the files not yet removed.
    The next start sends them all again: minutes are deduplicated by token; raw events (no
    token) are stored twice until a merge, and FINAL counts them once."""
    migrate(chdb_client, ch_database)
    for t in ("events_raw", "events_minute"):
        chdb_client.command(f"DETACH TABLE {ch_database}.{t}")
    sinks = [ClickHouseSink(chdb_dsn, ch_database, t, max_rows=100, max_delay_s=0.1,
                            max_buffer_rows=1000, spool_dir=tmp_path)
             for t in ("events_raw", "events_minute_in")]
    parts = [s.build("s", 0, 1) for s in sinks]
    for part in parts:
        part.close_wait_s = 0.3
    for k in range(10):
        parts[0].write_batch([[raw(i) for i in range(k * 200, k * 200 + 200)]])
        parts[1].write_batch([[minute(T0 + k, k + 1)]])
    for part in parts:
        part.close()  # ClickHouse still down: everything waits on disk
    assert "clickhouse" not in STATS.outages
    saved = tmp_path.parent / f"{tmp_path.name}-copy"
    shutil.copytree(tmp_path, saved)
    for t in ("events_raw", "events_minute"):
        chdb_client.command(f"ATTACH TABLE {ch_database}.{t}")

    def run_once():
        again = [s.build("s", 0, 1) for s in sinks]
        assert wait_for(lambda: not list(tmp_path.rglob("*.pickle")))
        for part in again:
            part.close()

    run_once()
    shutil.rmtree(tmp_path)
    shutil.copytree(saved, tmp_path)  # as if that run died before removing its files
    run_once()
    (count, unique), (final, final_unique) = raw_count(chdb_client, ch_database)
    assert (final, final_unique) == (2000, 2000) and unique == 2000 and count <= 4000
    assert totals(chdb_client, ch_database) == {t: (55, 11) for t in
                                                 ("events_minute", "events_hour", "events_day")}
    chdb_client.command(f"OPTIMIZE TABLE {ch_database}.events_raw FINAL")
    assert raw_count(chdb_client, ch_database)[0] == (2000, 2000)


def test_a_spool_file_of_the_previous_format_is_sent(chdb_dsn, chdb_client, ch_database,
                                                      tmp_path):
    """Earlier versions pickled one list of blocks per file: a later run still sends it."""
    migrate(chdb_client, ch_database)
    spool = tmp_path / f"{ch_database}.events_raw" / "worker-0"
    spool.mkdir(parents=True)
    blocks = [(None, list(raw_rows([raw(i) for i in range(k, k + 50)])), None) for k in (0, 50)]
    (spool / f"{7:012d}.pickle").write_bytes(pickle.dumps(blocks))
    (spool / f"{8:012d}.tmp").write_bytes(b"cut short by a crash")
    part = ClickHouseSink(chdb_dsn, ch_database, "events_raw", spool_dir=tmp_path).build("s", 0, 1)
    assert wait_for(lambda: not list(spool.iterdir()))
    part.close()
    assert raw_count(chdb_client, ch_database)[0] == (100, 100)


def flow_like_raw_rows(n: int) -> list:
    """Raw rows built as the flow builds them: from decoded JSON, each string its own object."""
    items = [tuple(orjson.loads(orjson.dumps(
        [(T0 * 60 + i) * 1000, f"evt-{i:012d}", "track", "page_view", f"user-{i % 977}",
         f"anon-{i:010d}", "web", f"camp-{i % 7}", "", 12.5, 0.0, "10.1.2.0", "CN",
         '{"path": "/p/%d", "ref": "search"}' % i]))) for i in range(n)]
    return list(raw_rows(items))


def test_the_byte_estimate_is_honest():
    """Measured against the real thing: never below the pickled size (a spool file is never
    bigger than what it relieves memory of), and within a factor 1.5 of the memory the rows
    really hold (tracemalloc)."""
    for build in (lambda: flow_like_raw_rows(5000),
                  lambda: [row for _, rows, _ in minute_blocks(
                      [CompleteMinute(T0 + k, [("web", f"c{j}", "", "page_view", 5, 1.5, 0.0, 0,
                                                [f"user-{k}-{u}" for u in range(40)])
                                               for j in range(10)]) for k in range(100)])
                      for row in rows]):
        tracemalloc.start()
        rows = build()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        estimate = rows_bytes(rows)
        assert estimate >= len(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))
        assert held / 1.5 <= estimate <= held * 1.5, (estimate, held)
    assert row_bytes(("x" * 1000,)) - row_bytes(("",)) == 1000


def test_the_wait_codes_are_named_as_clickhouse_names_them(chdb_client):
    names = chdb_client.query("SELECT " + ", ".join(f"errorCodeToName({c})" for c in WAIT_CODES))
    assert list(names.result_rows[0]) == list(WAIT_CODES.values())


def test_a_hung_clickhouse_server_times_out():
    """Every request to a server gives up after the configured timeout: here a server that
    accepts the connection and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError, match="timed out"):
            _client(f"http://127.0.0.1:{port}", timeout_s=1.0)
        assert time.monotonic() - started < 5
    finally:
        listener.close()
