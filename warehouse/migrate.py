"""Versioned schema migrations, applied at start-up and by ``surgeflow migrate``.

Migrations are the files ``migrations/NNNN_name.sql`` (statements separated by ``;`` at a line
end). Each applied version is recorded in ``<db>.schema_migrations`` with a checksum of its text:
applying again skips what is recorded, and a recorded migration whose file changed is an error
(ship a new migration instead of editing an old one). Every statement is ``IF NOT EXISTS``, so a
migration interrupted half-way is simply run again.

>>> [m.version for m in load_migrations()][:1]
[1]
>>> render("CREATE DATABASE IF NOT EXISTS {db}", db="sales", tz="UTC")
'CREATE DATABASE IF NOT EXISTS sales'
"""
from __future__ import annotations

import hashlib
import re
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class MigrationError(Exception):
    """The schema cannot be brought to the project's version; the message says why."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def statements(self, db: str, tz: str) -> list[str]:
        body = "\n".join(line for line in self.text.splitlines() if not line.lstrip().startswith("--"))
        return [render(s.strip(), db=db, tz=tz) for s in re.split(r";\s*\n", body + "\n") if s.strip()]


def check_names(db: str, tz: str) -> None:
    """The database and time zone go into SQL text: both must be plain identifiers."""
    if not _IDENT.match(db):
        raise MigrationError(f"database name {db!r} is not an identifier")
    if tz not in zoneinfo.available_timezones():
        raise MigrationError(f"unknown time zone {tz!r}")


def render(statement: str, *, db: str, tz: str) -> str:
    """Fill in the database and time zone (checked by :func:`check_names`, never user values)."""
    return statement.replace("{db}", db).replace("{tz}", tz)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if m is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3, ... without gaps: {versions}")
    return found


def applied(client, db: str) -> dict[int, tuple[str, str]]:
    """version -> (checksum, time zone) of the migrations recorded in ``db``."""
    rows = client.query(
        "SELECT version, argMax(checksum, applied_at), argMax(timezone, applied_at) "
        "FROM {db:Identifier}.schema_migrations GROUP BY version", parameters={"db": db}).result_rows
    return {int(v): (c, tz) for v, c, tz in rows}


def migrate(client, db: str, tz: str = "UTC", migrations: list[Migration] | None = None) -> list[int]:
    """Apply the missing migrations in order; returns the versions applied now."""
    migrations = load_migrations() if migrations is None else migrations
    check_names(db, tz)  # before touching anything
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    tables = {row[0] for row in client.query(
        "SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": db}).result_rows}
    if "schema_migrations" not in tables and "events_minute" in tables:
        raise MigrationError(f"database {db} holds tables from before versioned migrations; "
                             f"drop it (or choose another clickhouse.database) and start again")
    client.command(f"""CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
        version UInt32, name String, checksum String, timezone String,
        applied_at DateTime64(3, 'UTC') DEFAULT now64(3))
        ENGINE = ReplacingMergeTree(applied_at) ORDER BY version""")
    done = applied(client, db)
    now = []
    for m in migrations:
        if m.version in done:
            checksum, applied_tz = done[m.version]
            if checksum != m.checksum:
                raise MigrationError(f"migration {m.version:04d}_{m.name} changed after it was "
                                     f"applied to {db}; add a new migration instead")
            if applied_tz != tz:
                raise MigrationError(f"{db} was created for time zone {applied_tz}, not {tz}")
            continue
        for statement in m.statements(db, tz):
            client.command(statement)
        client.insert(f"{db}.schema_migrations", [(m.version, m.name, m.checksum, tz)],
                      column_names=["version", "name", "checksum", "timezone"])
        now.append(m.version)
    return now


# Tables holding a user id, and which retention setting (privacy.retention) applies. Their time
# to live counts from stored_at (when the row was stored). Erasure deletes from the same tables.
RETENTION = {
    "events_raw": "raw_events_days",
    "actions": "user_tables_days",
    "alerts": "user_tables_days",
    "user_days": "user_tables_days",
    "users_first_seen": "user_tables_days",
    "trigger_audit": "user_tables_days",
}


def apply_retention(client, db: str, days: dict[str, int]) -> list[str]:
    """Set each table's time to live from the retention settings (``days``: setting -> days),
    only where it differs from what the table has: a TTL change rewrites parts on a server.
    Returns the tables changed."""
    check_names(db, "UTC")
    rows = client.query("SELECT name, create_table_query FROM system.tables WHERE database = {db:String}",
                        parameters={"db": db}).result_rows
    have = dict(rows)
    changed = []
    for table, setting in RETENTION.items():
        n = int(days[setting])
        if table in have and f"stored_at + toIntervalDay({n})" not in have[table]:
            client.command(f"ALTER TABLE {db}.{table} MODIFY TTL stored_at + INTERVAL {n} DAY")
            changed.append(table)
    return changed
