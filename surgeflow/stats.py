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

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

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


STATS = Stats()
