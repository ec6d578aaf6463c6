"""Multi-minute ClickHouse blocks (flows/minutes.BlockGrouper, connectors/clickhouse.py): the
grouping covers every minute once, and whatever the grouping, ClickHouse ends up with the
contents one-minute blocks give, also when the same minutes are sent again grouped otherwise
(a replay, a restart)."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from connectors.clickhouse import ClickHouseSink
from flows.minutes import BlockGrouper, CompleteMinute, MinuteBlock
from warehouse.migrate import migrate

T0 = 29_500_020  # minutes since the epoch (2026), a multiple of 60: an hour starts there
NOW = (T0 + 10_000) * 60_000  # long after every test minute: they are all "behind"


def minutes(first: int, count: int, seed: int) -> list[CompleteMinute]:
    rng = random.Random(seed)
    out = []
    for m in range(first, first + count):
        rows = []
        for name in rng.sample(["page_view", "add_to_cart", "order_completed", "ad_click"],
                               rng.randrange(0, 3)):  # some minutes are empty
            users = sorted({f"u{rng.randrange(20)}" for _ in range(rng.randrange(1, 4))})
            rows.append(("web", f"c{rng.randrange(2)}", "", name, rng.randrange(1, 9),
                         float(rng.randrange(0, 500)), 0.25 * rng.randrange(4),
                         int(name == "order_completed"), users))
        out.append(CompleteMinute(m, sorted(rows)))
    return out


def cuts(items: list, points: list[int]) -> list[list]:
    """``items`` split at the given positions (release batches)."""
    edges = sorted({p % (len(items) + 1) for p in points} | {0, len(items)})
    return [items[a:b] for a, b in zip(edges, edges[1:])]


# -- the grouping ------------------------------------------------------------------------------
@given(first=st.integers(T0, T0 + 200), count=st.integers(1, 300),
       points=st.lists(st.integers(0, 400), max_size=12),
       width=st.sampled_from([1, 5, 15, 60, 120]), max_rows=st.integers(1, 40),
       live_from=st.integers(0, 400))
def test_every_minute_goes_once_in_order_within_one_window(first, count, points, width, max_rows,
                                                           live_from):
    ms = minutes(first, count, seed=count)
    g = BlockGrouper(block_minutes=width, max_rows=max_rows, hold_after_ms=0)
    live_after = first + live_from  # the wall clock reaches the stream: later minutes are live
    blocks: list[MinuteBlock] = []
    live = set()  # minutes whose window was not over by the wall clock when they came
    for batch in cuts(ms, points):
        now = batch[-1].minute * 60_000 + 1 if batch[-1].minute >= live_after else NOW
        live |= {m.minute for m in batch if (m.minute // width + 1) * width * 60_000 > now}
        blocks += g.add(batch, now)
    blocks += g.flush()
    assert [m.minute for b in blocks for m in b.minutes] == [m.minute for m in ms]
    for b in blocks:
        assert len({m.minute // width for m in b.minutes}) == 1  # never across a window
        if len(b.minutes) > 1:
            assert b.token == f"minutes-{b.minutes[0].minute}-{b.minutes[-1].minute}"
            assert b.rows - len(b.minutes[-1].rows) < max_rows  # the cap closed it
    for b in blocks:  # a live minute is never held: it goes alone, at once
        if any(m.minute in live for m in b.minutes):
            assert len(b.minutes) == 1


def test_a_live_minute_is_written_at_once_and_history_waits_for_its_window():
    g = BlockGrouper(block_minutes=60, max_rows=10_000, hold_after_ms=300_000)
    old = minutes(T0, 90, seed=1)
    assert g.add(old[:30], NOW) == []  # the first window is not complete yet
    out = g.add(old[30:], NOW)
    assert [b.token for b in out] == [f"minutes-{T0}-{T0 + 59}"]  # (T0 + 60.. still held)
    assert [b.token for b in g.flush()] == [f"minutes-{T0 + 60}-{T0 + 89}"]
    now_minute = minutes(T0 + 200, 1, seed=2)
    live = g.add(now_minute, (T0 + 200) * 60_000 + 5_000)
    assert [b.token for b in live] == [f"minute-{T0 + 200}"]


# -- ClickHouse: the same contents whatever the grouping --------------------------------------
def contents(client, db: str) -> dict:
    """Every table the minute views feed, finalised and sorted (stored_at left out)."""
    out = {}
    for table in ("events_minute", "events_hour", "events_day", "funnel_hour", "user_days",
                  "users_first_seen"):
        cols = client.query(
            "SELECT name, type FROM system.columns WHERE database = {d:String} AND table = "
            "{t:String} AND name != 'stored_at' ORDER BY position",
            parameters={"d": db, "t": table}).result_rows
        exprs = [f"finalizeAggregation({n})" if t.startswith("AggregateFunction") else n
                 for n, t in cols]
        rows = client.query(f"SELECT {', '.join(exprs)} FROM {db}.{table} FINAL").result_rows
        out[table] = sorted(repr(r) for r in rows)
    return out


def send(dsn: str, db: str, batches: list[list]) -> None:
    part = ClickHouseSink(dsn, db, "events_minute_in", max_rows=1, max_delay_s=0.05).build(
        "s", 0, 1)
    try:
        for batch in batches:
            part.write_batch([batch])
    finally:
        part.close()  # waits until every block is in


def grouped(ms: list[CompleteMinute], width: int, points: list[int], max_rows: int) -> list:
    g = BlockGrouper(block_minutes=width, max_rows=max_rows, hold_after_ms=0)
    out = [g.add(batch, NOW) for batch in cuts(ms, points)]
    return [b for b in out + [g.flush()] if b]


@pytest.fixture(scope="module")
def databases(chdb_client):
    made = []

    def make() -> str:
        name = f"t_blocks_{len(made)}_{random.randrange(10**6)}"
        chdb_client.command(f"CREATE DATABASE {name}")
        migrate(chdb_client, name)
        made.append(name)
        return name

    yield make
    for name in made:
        chdb_client.command(f"DROP DATABASE IF EXISTS {name}")


def test_blocks_of_any_size_give_what_one_minute_blocks_give(chdb_dsn, chdb_client, databases):
    ms = minutes(T0 + 30, 150, seed=7)  # across three windows of an hour
    one = databases()
    send(chdb_dsn, one, [[m] for m in ms])  # one minute per block: the reference
    expected = contents(chdb_client, one)
    assert expected["events_minute"] and expected["events_hour"]
    many = databases()
    send(chdb_dsn, many, grouped(ms, 60, [17, 80], max_rows=10_000))
    assert contents(chdb_client, many) == expected
    rows = chdb_client.query(f"SELECT count() FROM {many}.minute_blocks FINAL").result_rows
    assert rows[0][0] == sum(1 for m in ms if m.rows)  # the ledger knows every minute sent


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first_points=st.lists(st.integers(0, 130), max_size=5),
       again_points=st.lists(st.integers(0, 130), max_size=5),
       first_width=st.sampled_from([1, 15, 60]), again_width=st.sampled_from([1, 30, 60]),
       overlap=st.integers(0, 120))
def test_sending_again_grouped_otherwise_changes_nothing(chdb_dsn, chdb_client, databases,
                                                         first_points, again_points, first_width,
                                                         again_width, overlap):
    ms = minutes(T0 + 10, 120, seed=11)
    reference = databases()
    send(chdb_dsn, reference, [[m] for m in ms])
    db = databases()
    # a first run sends a prefix, a second run (restart from an older snapshot, or a replay)
    # sends everything from an earlier point on, grouped its own way
    cut = 120 - overlap // 2
    send(chdb_dsn, db, grouped(ms[:cut], first_width, first_points, max_rows=25))
    send(chdb_dsn, db, grouped(ms[cut - overlap // 2 - 1 if cut > overlap // 2 else 0:],
                               again_width, again_points, max_rows=10_000))
    assert contents(chdb_client, db) == contents(chdb_client, reference)
    send(chdb_dsn, db, grouped(ms, again_width, [], max_rows=10_000))  # and the whole again
    assert contents(chdb_client, db) == contents(chdb_client, reference)


def test_the_minute_steps_snapshot_leaves_out_people_erased_since():
    """Minutes held by the minute step (waiting for a shard, or for their block) name their
    users; a snapshot after an erasure must not (the erasure compacts the recovery store)."""
    import pickle

    from flows.minutes import MinutePart
    from flows.pipeline import MinuteLogic
    from privacy.erasure import PROCESS_LEDGER, reset_process_ledger

    logic = MinuteLogic(2, None, BlockGrouper(block_minutes=60, hold_after_ms=0))
    row = lambda users: {("web", "", "", "page_view"): [2, 0.0, 0.0, 0, set(users)]}  # noqa: E731
    # shard 0 closed two minutes; shard 1 only the first: the second waits for it
    out, _ = logic.on_batch([MinutePart(0, T0 + 1, {T0: row({"victim", "u2"}),
                                                    T0 + 1: row({"victim", "u3"})}),
                             MinutePart(1, T0, {T0: row({"u4"})})])
    assert [m.minute for m in out[0].minutes] == [T0] and out[0].blocks == []  # T0's block waits
    assert b"victim" in pickle.dumps(logic.snapshot())  # held: T0 in the grouper, T0+1 waiting
    reset_process_ledger(b"key", {})
    try:
        PROCESS_LEDGER.add("victim", (T0 + 5) * 60_000)  # erased after both minutes
        state = pickle.dumps(logic.snapshot())
        assert b"victim" not in state and b"u2" in state and b"u3" in state
        held = logic.grouper.held[0].rows[0][-1]
        assert held == ["u2", "u4"]
    finally:
        reset_process_ledger(None, {})
