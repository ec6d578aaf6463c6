"""Process-wide counters for the progress line and the run summary (thread-safe)."""
from __future__ import annotations

import random
import threading
import time
from typing import Iterable


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.users: set[str] = set()
        self.track_users = True
        self.samples: dict[str, list[float]] = {}
        self.max_samples = 200_000
        self.seen: dict[str, int] = {}
        self.rng = random.Random(0)
        # component -> (what is wrong, wall time it started): a sink that cannot reach its
        # service; /readyz answers 503 while any is set (surgeflow/metrics.py).
        self.outages: dict[str, tuple[str, float]] = {}
        self.outage_members: dict[str, set[str]] = {}  # component -> who currently sees it down
        # name -> callable returning a number or {label value: number}: sampled when scraped
        self.gauges: dict[str, object] = {}
        # name (or ``name{label}``) -> last value set by the flow: watermark_ms, stream_clock_ms,
        # source_offset{partition}, state sizes, ready, heartbeat_ms (exported as gauges)
        self.values: dict[str, float] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def add_labeled(self, name: str, label: str, n: int = 1) -> None:
        """A counter with one label (e.g. dead letters by reason): kept as ``name{label}``."""
        self.add(f"{name}{{{label}}}", n)

    def labeled(self, name: str) -> dict[str, int]:
        """The label values of a labelled counter and their counts."""
        prefix = name + "{"
        with self.lock:
            return {k[len(prefix):-1]: v for k, v in self.counts.items() if k.startswith(prefix)}

    def outage(self, component: str, detail: str | None, member: str = "") -> bool:
        """Mark (detail) or clear (None) an outage of a service as seen by one of its users
        (``member``: a table, a topic, a worker's sink); True when this call started the outage
        (the first member to fail) or ended it (the last member to recover), so the callers log
        one line when a service goes down and one when it is back, however many use it."""
        with self.lock:
            members = self.outage_members.setdefault(component, set())
            if detail is None:
                members.discard(member)
                if members:
                    return False
                return self.outages.pop(component, None) is not None
            members.add(member)
            if component in self.outages:
                return False
            self.outages[component] = (detail, time.time())
            return True

    def gauge(self, name: str, fn) -> None:
        """Register a callable sampled at scrape time (queue lengths, state sizes)."""
        with self.lock:
            self.gauges[name] = fn

    def set(self, name: str, value: float) -> None:
        """A gauge set by value (the watermark, a state size); the last value wins."""
        with self.lock:
            self.values[name] = value

    def set_labeled(self, name: str, label: str, value: float) -> None:
        """A gauge with one label (e.g. the source offset by partition): kept as ``name{label}``."""
        self.set(f"{name}{{{label}}}", value)

    def value(self, name: str, default: float | None = None) -> float | None:
        """The last value set under ``name`` (or ``name{label}``), else ``default``."""
        return self.values.get(name, default)

    def mark_users(self, users: Iterable[str]) -> None:
        if self.track_users:
            with self.lock:
                self.users.update(users)

    def observe_since(self, name: str, arrivals_ms: list[int]) -> None:
        """Latency samples: now minus each arrival time (wall clock, ms)."""
        if not arrivals_ms:
            return
        now = time.time() * 1000
        with self.lock:
            samples = self.samples.setdefault(name, [])
            seen = self.seen.get(name, 0)
            for a in arrivals_ms:  # reservoir sampling: a uniform sample of the whole run
                seen += 1
                if len(samples) < self.max_samples:
                    samples.append(now - a)
                else:
                    j = self.rng.randrange(seen)
                    if j < self.max_samples:
                        samples[j] = now - a
            self.seen[name] = seen

    def percentile(self, name: str, q: float) -> float | None:
        samples = sorted(self.samples.get(name, ()))
        if not samples:
            return None
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    def get(self, name: str) -> int:
        return self.counts.get(name, 0)

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.users.clear()
            self.samples.clear()
            self.seen.clear()
            self.outages.clear()
            self.outage_members.clear()
            self.values.clear()


STATS = Stats()
