"""A graceful stop: SIGINT / SIGTERM (or the demo's deadline) end every source at its next batch.

The flow then drains: the keyed steps write what they hold, the sinks flush, Bytewax takes its
last snapshot (source offsets and state) and the run returns; the next start resumes there. A stop
is not the end of the input: the shards do not move the watermark to the clock nor close the
open minutes (that is for a bounded input's end), so a resumed run goes on as if never stopped.

A second signal, or a drain longer than ``drain_timeout_s``, ends the process at once, as a crash
would: the recovery store then replays from the last snapshot, so nothing is lost either way.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

STOP = threading.Event()
log = logging.getLogger("surgeflow")


def stopping() -> bool:
    """True once a stop was asked: an end of input now is a stop, not the input's end."""
    return STOP.is_set()


def install(drain_timeout_s: float | None = 60.0, deadline_s: float | None = None,
            say=lambda text: log.warning(text)) -> None:
    """Route SIGINT and SIGTERM to a graceful stop (and end the run after ``deadline_s``)."""

    def stop(signum, _frame):
        if STOP.is_set():
            say("second signal: stopping now (the next start replays from the last snapshot)")
            os._exit(130)
        say(f"stopping ({signal.Signals(signum).name}): draining the flow, taking a snapshot "
            "(Ctrl-C again to stop at once)")
        _stop(drain_timeout_s, say)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if deadline_s:
        timer = threading.Timer(deadline_s, _stop, (drain_timeout_s, say))
        timer.daemon = True
        timer.start()


def _stop(drain_timeout_s: float | None, say) -> None:
    STOP.set()
    if drain_timeout_s:
        def overdue():
            say(f"the drain took over {drain_timeout_s:g} s: stopping now (the next start "
                "replays from the last snapshot)")
            os._exit(124)

        timer = threading.Timer(drain_timeout_s, overdue)
        timer.daemon = True
        timer.start()
