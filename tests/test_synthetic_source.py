"""The paced synthetic source: a restart goes on with the same stream, where it stopped."""
from __future__ import annotations

import time

from connectors.synthetic import SyntheticSpec, generate
from connectors.synthetic_source import SyntheticSource

SPEC = SyntheticSpec(seed=3, users=50, start_ms=int(time.time() * 1000) - 3_600_000,
                     events_per_s=20.0, duration_s=3_600.0)


def drain(part, seconds: float) -> list:
    out, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        out += part.next_batch()
        time.sleep(0.01)
    return out


def test_a_resumed_paced_stream_goes_on_at_once_with_the_next_records():
    source = SyntheticSource(SPEC, speed=600.0, batch_size=200)
    first = source.build_part("in", "synthetic", None)
    before = drain(first, 0.5)
    assert before  # 0.5 s at 600x: about five minutes of the stream
    state = first.snapshot()
    resumed = source.build_part("in", "synthetic", state)
    after = drain(resumed, 0.3)
    # Before the fix the pace restarted at the stream's start: nothing came for as long as the
    # first run had lasted.
    assert after
    expected = [r.value for r in generate(SPEC)][:len(before) + len(after)]
    assert [r.value for r in before + after] == expected  # same stream, nothing skipped or repeated
    assert [r.offset for r in after] == list(range(len(before), len(before) + len(after)))
