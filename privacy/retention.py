"""Retention of what the flow keeps on disk: dead-letter files and spools (privacy.retention).

ClickHouse tables have their time to live (warehouse/migrate.py ``apply_retention``); the files
here are swept at start-up and every hour while the flow runs:

- JSON-lines dead letters (``dead_letters.jsonl`` and the sinks' ``rejected*.jsonl``): lines
  written (``at_ms``, else the file's modification time) more than ``dead_letters_days`` ago go;
- spool files (ClickHouse blocks, webhook bodies waiting for their server) older than
  ``spool_days``: only at start-up, before any sink reads them, each one logged and counted, since
  what they hold was never delivered.

>>> import tempfile, orjson, time
>>> d = Path(tempfile.mkdtemp()); f = d / "dead_letters.jsonl"
>>> now = int(time.time() * 1000)
>>> _ = f.write_bytes(orjson.dumps({"at_ms": now - 20 * DAY_MS}) + b"\\n" + orjson.dumps({"at_ms": now}) + b"\\n")
>>> sweep_dead_letters([d], days=15, now_ms=now)
1
>>> len(f.read_bytes().splitlines())
1
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson

from connectors.files import drop_lines
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.retention")
DAY_MS = 86_400_000


def _dead_letter_files(paths: list[Path]):
    for p in paths:
        if p.is_dir():
            yield from sorted(x for x in p.rglob("*.jsonl")
                              if x.name.startswith(("dead_letters", "rejected", "webhook_rejected")))
        elif p.is_file():
            yield p


def sweep_dead_letters(paths: list[Path], days: float, now_ms: int | None = None) -> int:
    """Remove dead-letter lines older than ``days``; returns how many went."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - int(days * DAY_MS)
    removed = 0
    for f in _dead_letter_files(paths):
        try:
            mtime = int(f.stat().st_mtime * 1000)
        except FileNotFoundError:
            continue
        removed += drop_lines(f, lambda line: _written(line, mtime) < cutoff)
    if removed:
        STATS.add("dead_letters_expired", removed)
        log.warning("retention: %d dead letters older than %g days removed", removed, days)
    return removed


def _written(line: bytes, default: int) -> int:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return default
    at = doc.get("at_ms") if isinstance(doc, dict) else None
    return at if isinstance(at, int) else default


def sweep_spools(spool_dir: Path, days: float, now_s: float | None = None) -> int:
    """At start-up only: spool files older than ``days`` are deleted (logged); returns how many."""
    now_s = time.time() if now_s is None else now_s
    removed = 0
    if not spool_dir.is_dir():
        return 0
    for f in sorted(spool_dir.rglob("*")):
        if f.is_file() and f.suffix in (".pickle", ".jsonl") and not f.name.startswith(
                ("rejected", "webhook_rejected")) and now_s - f.stat().st_mtime > days * 86_400:
            log.warning("retention: spool file %s is older than %g days: deleted undelivered",
                        f.name, days)
            f.unlink(missing_ok=True)
            removed += 1
    if removed:
        STATS.add("spool_files_expired", removed)
    return removed
