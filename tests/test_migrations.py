"""Versioned migrations on chDB: applied once and recorded, idempotent, guarded against edited
migrations, a changed time zone and a database from before versioned migrations."""
from __future__ import annotations

import dataclasses

import pytest

from warehouse.migrate import MigrationError, load_migrations, migrate


def tables(client, db) -> set[str]:
    return {r[0] for r in client.query("SELECT name FROM system.tables WHERE database = {db:String}",
                                        parameters={"db": db}).result_rows}


def test_applied_once_recorded_and_idempotent(chdb_client, ch_database):
    migrations = load_migrations()
    assert migrate(chdb_client, ch_database) == [m.version for m in migrations]
    created = tables(chdb_client, ch_database)
    assert {"events_minute", "events_hour", "events_day", "funnel_hour", "user_days",
            "users_first_seen", "events_raw", "alerts", "actions", "model_metrics",
            "schema_migrations"} <= created
    assert migrate(chdb_client, ch_database) == []  # nothing left to do
    assert tables(chdb_client, ch_database) == created
    recorded = chdb_client.query(f"SELECT version, name, checksum FROM {ch_database}.schema_migrations "
                                 "FINAL ORDER BY version").result_rows
    assert recorded == [(m.version, m.name, m.checksum) for m in migrations]

    # A migration interrupted half-way: its statements run again without error.
    chdb_client.command(f"DROP TABLE {ch_database}.model_metrics")
    chdb_client.command(f"ALTER TABLE {ch_database}.schema_migrations DELETE WHERE version = 1")
    assert migrate(chdb_client, ch_database) == [1]
    assert "model_metrics" in tables(chdb_client, ch_database)


def test_alert_lifecycle_migration_upgrades_a_version_1_database(chdb_client, ch_database):
    """A database at version 1 with alerts in it: version 2 keeps them (the window becomes text),
    adds the lifecycle columns and keeps every message of an alert (seq in the sorting key);
    run again after an interruption, it changes nothing."""
    migrate(chdb_client, ch_database, migrations=load_migrations()[:1])
    chdb_client.command(
        f"INSERT INTO {ch_database}.alerts (alert_id, rule, series, status, minute, value, window, "
        f"first_seen) VALUES ('a1', 'r', 'all', 'firing', '2026-11-23 10:00:00', 5, 30, "
        f"'2026-11-23 10:00:00')")
    assert migrate(chdb_client, ch_database, migrations=load_migrations()[:2]) == [2]
    chdb_client.command(f"ALTER TABLE {ch_database}.schema_migrations DELETE WHERE version = 2")
    assert migrate(chdb_client, ch_database, migrations=load_migrations()[:2]) == [2]
    for seq in (1, 2):
        chdb_client.command(
            f"INSERT INTO {ch_database}.alerts (alert_id, rule, series, status, seq, minute, value, "
            f"window, first_seen, detail) VALUES ('a1', 'r', 'all', 'update', {seq}, "
            f"'2026-11-23 10:0{seq}:00', {seq}, '1m', '2026-11-23 10:00:00', 'x')")
    rows = chdb_client.query(f"SELECT status, seq, window, detail FROM {ch_database}.alerts FINAL "
                             "ORDER BY seq").result_rows
    assert rows == [("firing", 0, "30", ""), ("update", 1, "1m", "x"), ("update", 2, "1m", "x")]


def test_trigger_migration_keeps_actions_and_adds_the_audit(chdb_client, ch_database):
    """Version 3 on a database with actions: they stay (new columns empty), trigger_audit is
    created, and a second run after an interruption changes nothing."""
    migrate(chdb_client, ch_database, migrations=load_migrations()[:2])
    chdb_client.command(
        f"INSERT INTO {ch_database}.actions (action_id, rule, user_id, channel, campaign, "
        f"session_id, event_time) VALUES ('x1', 'session_page_views', 'u1', 'push', 'c', 's', "
        f"'2026-11-23 10:00:00')")
    assert migrate(chdb_client, ch_database, migrations=load_migrations()[:3]) == [3]
    chdb_client.command(f"ALTER TABLE {ch_database}.schema_migrations DELETE WHERE version = 3")
    assert migrate(chdb_client, ch_database, migrations=load_migrations()[:3]) == [3]
    rows = chdb_client.query(f"SELECT action_id, message, step, trigger, tags FROM "
                             f"{ch_database}.actions FINAL").result_rows
    assert rows == [("x1", "", 0, "", [])]
    assert "trigger_audit" in tables(chdb_client, ch_database)


def test_an_edited_migration_or_another_time_zone_is_refused(chdb_client, ch_database):
    migrate(chdb_client, ch_database)
    first = load_migrations()[0]
    edited = dataclasses.replace(first, text=first.text + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(chdb_client, ch_database, migrations=[edited])
    with pytest.raises(MigrationError, match="time zone UTC, not Asia/Shanghai"):
        migrate(chdb_client, ch_database, "Asia/Shanghai")
    with pytest.raises(MigrationError, match="unknown time zone"):
        migrate(chdb_client, ch_database, "Mars/Olympus")
    with pytest.raises(MigrationError, match="not an identifier"):
        migrate(chdb_client, "x; DROP DATABASE y")


def test_a_database_from_before_migrations_is_reported(chdb_client, ch_database):
    chdb_client.command(f"CREATE TABLE {ch_database}.events_minute (minute DateTime) "
                        "ENGINE = MergeTree ORDER BY minute")
    with pytest.raises(MigrationError, match="before versioned migrations"):
        migrate(chdb_client, ch_database)


def test_migrate_command_applies_then_reports_up_to_date_or_a_clear_error(chdb_dsn, chdb_client,
                                                                          ch_database):
    from typer.testing import CliRunner

    from surgeflow.cli import app

    env = {"SURGEFLOW__CLICKHOUSE__DSN": chdb_dsn, "SURGEFLOW__CLICKHOUSE__DATABASE": ch_database}
    first = CliRunner().invoke(app, ["migrate"], env=env)
    assert first.exit_code == 0 and "applied migrations [1, 2, 3, 4, 5, 6]" in first.output
    again = CliRunner().invoke(app, ["migrate"], env=env)
    assert again.exit_code == 0 and "up to date" in again.output
    old = ch_database + "_old"
    chdb_client.command(f"CREATE DATABASE {old}")
    chdb_client.command(f"CREATE TABLE {old}.events_minute (minute DateTime) ENGINE = MergeTree ORDER BY minute")
    try:
        refused = CliRunner().invoke(app, ["migrate"], env=dict(env, SURGEFLOW__CLICKHOUSE__DATABASE=old))
        assert refused.exit_code == 2 and "before versioned migrations" in refused.output
        assert "Traceback" not in refused.output
    finally:
        chdb_client.command(f"DROP DATABASE {old}")


def test_privacy_migration_audits_erasures_and_sets_retention(chdb_client, ch_database):
    """Version 4: the erasure audit table, and a time to live on every table holding a user id,
    which apply_retention changes when the settings do (only then)."""
    from warehouse.migrate import RETENTION, apply_retention

    migrate(chdb_client, ch_database)
    assert "erasure_audit" in tables(chdb_client, ch_database)
    ddl = dict(chdb_client.query(f"SELECT name, create_table_query FROM system.tables "
                                 f"WHERE database = '{ch_database}'").result_rows)
    assert "toIntervalDay(15)" in ddl["events_raw"]
    assert all("TTL" in ddl[t] for t in RETENTION)
    days = {"raw_events_days": 7, "user_tables_days": 400}
    assert apply_retention(chdb_client, ch_database, days) == ["events_raw"]
    assert apply_retention(chdb_client, ch_database, days) == []
