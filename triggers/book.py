"""The live trigger rule file of a process: read at start-up, re-read when it changes (hot reload).

A change is picked up within ``reload_s`` (wall clock) of being saved. A file that no longer
validates is refused with its errors logged (``trigger_reload_errors``); the running rules stay.
Matches in progress keep the version of the rule they started with (:meth:`TriggerEngine.use`).
Each worker picks the change up at its next batch, so for a moment two workers may run
different versions: a reload is an operation on a live system, not a replayable input.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from surgeflow.stats import STATS
from triggers.engine import CompiledBook
from triggers.spec import TriggerRuleError, load_trigger_rules

log = logging.getLogger("surgeflow.triggers")
_BY_NAME: dict[tuple, "RuleFile"] = {}  # (path as given, reload_s) -> the same RuleFile
_FILES: dict[tuple[str, float], "RuleFile"] = {}
_LOCK = threading.Lock()


class RuleFile:
    def __init__(self, path: str | Path, reload_s: float = 5.0):
        self.path = Path(path)
        self.reload_s = reload_s
        self.stamp = self._stamp()
        self.book = CompiledBook(load_trigger_rules(self.path), version=1)
        self.checked = time.monotonic()
        self.lock = threading.Lock()

    def _stamp(self):
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def get(self) -> CompiledBook:
        now = time.monotonic()
        if now - self.checked < self.reload_s:
            return self.book
        with self.lock:
            if now - self.checked < self.reload_s:
                return self.book
            self.checked = now
            stamp = self._stamp()
            if stamp is not None and stamp != self.stamp:
                self.stamp = stamp
                try:
                    book = CompiledBook(load_trigger_rules(self.path), self.book.version + 1)
                except TriggerRuleError as exc:
                    STATS.add("trigger_reload_errors")
                    log.error("trigger rules %s not reloaded, the running rules stay: %s",
                              self.path, exc)
                else:
                    self.book = book
                    STATS.add("trigger_reloads")
                    log.info("trigger rules %s reloaded: version %d, %d rules", self.path,
                             book.version, len(book.rules))
        return self.book


def rule_file(path: str | Path, reload_s: float = 5.0) -> RuleFile:
    """The process's one :class:`RuleFile` for this path (shared by its workers). Called per
    batch of every shard: the path as given is looked up first (resolving it costs syscalls)."""
    f = _BY_NAME.get((path, reload_s))
    if f is not None:
        return f
    key = (str(Path(path).resolve()), reload_s)
    with _LOCK:
        f = _FILES.get(key)
        if f is None:
            f = _FILES[key] = RuleFile(path, reload_s)
        _BY_NAME[(path, reload_s)] = f
        return f
