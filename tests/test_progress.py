"""The progress line of demo / run / replay: reading with an estimate, and the restore of a
snapshot before the first event."""
from __future__ import annotations

from surgeflow.cli import Progress
from surgeflow.stats import STATS


def test_restore_then_reading_then_a_replay_estimate():
    STATS.reset()
    try:
        line = Progress(shards=24, prefix="[process 1] ").line()
        assert line.startswith("[process 1] ") and "events 0" in line and "restoring" not in line
        STATS.add("shards_restored", 6)
        STATS.add("snapshot_bytes_restored", 3_000_000)
        line = Progress(shards=24).line()
        assert "restoring the snapshot: shards 6/24 (3.0 MB" in line and "s left" in line
        STATS.add("shards_restored", 18)
        assert "s left" not in Progress(shards=24).line()  # all restored: no estimate
        STATS.add("events_in", 500)
        line = Progress(shards=24, total=2000).line()
        assert "restoring" not in line and "events 500/2,000 (25%" in line and "s left" in line
    finally:
        STATS.reset()
