"""The ClickHouse sink on chDB: minute blocks deduplicated by token, an outage (a table detached)
retried without loss or double counting, memory bounded by spilling to disk, and a restart that
sends what the previous run spilled."""
from __future__ import annotations

import logging
import time

from connectors.clickhouse import ClickHouseSink, connect
from flows.minutes import CompleteMinute
from surgeflow.stats import STATS
from warehouse.migrate import migrate

T0 = 29_930_000  # a minute index (2026-11-26)


def minute(m: int, n: int) -> CompleteMinute:
    return CompleteMinute(m, [("web", "c1", "", "page_view", n, 1.5 * n, 0.0, 0, [f"u{m}", "u0"])])


def raw(i: int) -> tuple:
    return ((T0 * 60 + i) * 1000, f"e{i}", "track", "page_view", "", f"a{i}", "web", "", "", 0.0,
            0.0, "10.0.0.0", "CN", "{}")


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def totals(client, db):
    return {t: client.query(f"SELECT sum(events), uniqExactMerge(users) FROM {db}.{t} FINAL").result_rows[0]
            for t in ("events_minute", "events_hour", "events_day")}


def test_minutes_survive_an_outage_exactly_once(chdb_dsn, chdb_client, ch_database, caplog, tmp_path):
    migrate(chdb_client, ch_database)
    sink = ClickHouseSink(chdb_dsn, ch_database, "events_minute_in", max_rows=1, max_delay_s=0.2,
                          spool_dir=tmp_path)
    part = sink.build("s", 0, 1)
    part.write_batch([[minute(T0, 5), minute(T0 + 1, 7)]])
    assert wait_for(lambda: totals(chdb_client, ch_database)["events_day"] == (12, 3))

    # Outage: one of the rollup tables disappears. The first views may still take the block,
    # so the retry must not count it twice where it already landed.
    errors = STATS.get("clickhouse_insert_errors")
    chdb_client.command(f"DETACH TABLE {ch_database}.events_hour")
    with caplog.at_level(logging.WARNING, logger="surgeflow.clickhouse"):
        part.write_batch([[minute(T0 + 2, 4)]])
        part.write_batch([[minute(T0 + 1, 7)]])  # a replayed minute: same token, counted once
        assert wait_for(lambda: STATS.get("clickhouse_insert_errors") >= errors + 2)
        chdb_client.command(f"ATTACH TABLE {ch_database}.events_hour")
        assert wait_for(lambda: totals(chdb_client, ch_database)["events_hour"] == (16, 4))
        part.close()
    assert totals(chdb_client, ch_database) == {t: (16, 4) for t in
                                                 ("events_minute", "events_hour", "events_day")}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "failed" in messages and "is back" in messages


def test_an_outage_spills_to_disk_and_a_restart_sends_it(chdb_dsn, chdb_client, ch_database, tmp_path):
    migrate(chdb_client, ch_database)
    chdb_client.command(f"DETACH TABLE {ch_database}.events_raw")
    sink = ClickHouseSink(chdb_dsn, ch_database, "events_raw", max_rows=500, max_delay_s=0.2,
                          max_buffer_rows=1000, spool_dir=tmp_path)
    part = sink.build("s", 0, 1)
    part.close_wait_s = 1.0
    client, lock = connect(chdb_dsn)
    with lock:  # ClickHouse busy: writing must not wait for it
        for start in range(0, 5000, 250):
            part.write_batch([[raw(i) for i in range(start, start + 250)]])
            assert part.rows <= 1000  # memory stays bounded
    spool = tmp_path / f"{ch_database}.events_raw" / "worker-0"
    assert list(spool.glob("*.pickle"))
    part.close()  # still down at shutdown: what is left goes to disk too
    on_disk = sum(1 for _ in spool.glob("*.pickle"))
    assert on_disk >= 2 and part.rows == 0

    chdb_client.command(f"ATTACH TABLE {ch_database}.events_raw")
    again = sink.build("s", 0, 1)  # the next run of the program
    assert wait_for(lambda: not list(spool.glob("*.pickle")))
    again.close()
    count = chdb_client.query(f"SELECT count(), uniqExact(event_id) FROM {ch_database}.events_raw FINAL")
    assert count.result_rows == [(5000, 5000)]


def test_raw_event_times_land_to_the_millisecond_from_ints_and_old_spools(chdb_dsn, chdb_client,
                                                                          ch_database, tmp_path):
    """events_raw rows carry epoch ms (DateTime64(3) as is); a spool file of an earlier version,
    whose rows held datetimes, is still sent right."""
    import datetime as dt
    import pickle

    migrate(chdb_client, ch_database)
    spool = tmp_path / f"{ch_database}.events_raw" / "worker-0"
    spool.mkdir(parents=True)
    old = [raw(i) for i in range(10, 13)]
    old = [(dt.datetime.fromtimestamp(r[0] / 1000, tz=dt.timezone.utc), *r[1:]) for r in old]
    (spool / "000000000000.pickle").write_bytes(pickle.dumps((None, old, None)))
    sink = ClickHouseSink(chdb_dsn, ch_database, "events_raw", max_rows=500, max_delay_s=0.1,
                          spool_dir=tmp_path)
    part = sink.build("s", 0, 1)
    fresh = [raw(i) for i in range(3)]
    fresh[1] = (fresh[1][0] + 123, *fresh[1][1:])  # not on a whole second
    part.write_batch([fresh])
    part.close()
    got = dict(chdb_client.query(f"SELECT event_id, toUnixTimestamp64Milli(event_time) "
                                 f"FROM {ch_database}.events_raw FINAL").result_rows)
    want = {r[1]: r[0] for r in fresh} | {f"e{i}": (T0 * 60 + i) * 1000 for i in range(10, 13)}
    assert got == want
