"""Consent per purpose, as configuration: what an event without a consent statement means, and
how long a statement is remembered.

Each identity (a user id, or an anonymous id not linked to a user) has a ledger entry with its
latest profiling statement: the event time and the value of the latest event that carried
``context.consent.profiling`` as a JSON boolean. An event without a statement follows the entry,
else the purpose's default: ``opt_in`` (SPEC section 9: no profiling without consent) or
``opt_out``. So a withdrawal holds until the user grants again, whatever comes in between.

Events that reach a user through an identity link (an anonymous device the user logged in on)
follow the user's entry and cannot change it: an unauthenticated device may refuse for its own
event, but may not grant or withdraw for the person.

>>> book = ConsentBook("opt_in", ttl_ms=10_000)
>>> book.decide("u1", None, 1)        # never stated: opt-in means no
(False, False)
>>> book.decide("u1", True, 2), book.decide("u1", None, 3)   # granted, then remembered
((True, False), (True, False))
>>> book.decide("u1", False, 4), book.decide("u1", None, 5)  # withdrawn: remembered as well
((False, True), (False, False))
>>> book.decide("u1", True, 3)        # an older statement arriving late changes nothing
(False, False)
>>> book.decide("u1", True, 6, linked=True)  # a linked device cannot grant for the user
(False, False)
>>> book.decide("u9", True, 6, linked=True), len(book)  # (nor state anything, when none did)
((True, False), 1)
>>> book.expire(5 + 10_000 + 1); book.decide("u1", None, 20_000)  # forgotten: the default again
(False, False)
>>> ConsentBook("opt_out").decide("u2", None, 1)
(True, False)
"""
from __future__ import annotations

from flows.eviction import OldestFirst


class ConsentBook:
    __slots__ = ("default", "ttl_ms", "entries", "age")

    def __init__(self, policy: str = "opt_out", ttl_ms: int = 400 * 86_400_000):
        if policy not in ("opt_in", "opt_out"):
            raise ValueError(f"consent policy {policy!r} is not opt_in or opt_out")
        self.default = policy == "opt_out"
        self.ttl_ms = ttl_ms
        self.entries: dict[str, tuple[int, bool]] = {}  # identity -> (event time, value)
        self.age = OldestFirst()  # last event time of each identity with an entry

    def decide(self, ident: str, stated: bool | None, ts: int, linked: bool = False,
               device: bool | None = None) -> tuple[bool, bool]:
        """(may this event be profiled, does it withdraw consent that held until now).
        A linked event follows the user's statement; while the user has none (the user's own
        events and the link's merge come from other partitions, and may be applied after it),
        its own statement, else ``device``, the consent its device had, else the default."""
        entry = self.entries.get(ident)
        if linked and entry is None:
            base = stated if stated is not None else device if device is not None else self.default
            return base, False
        before = entry[1] if entry is not None else self.default
        if linked:
            return before and stated is not False, False
        if stated is not None and (entry is None or ts >= entry[0]):
            self.entries[ident] = entry = (ts, stated)
        if entry is not None:
            self.age.touch(ident, ts)
        now = entry[1] if entry is not None else self.default
        allowed = now if stated is None or entry[0] != ts else stated
        return allowed, before and not now

    def allows(self, ident: str) -> bool:
        entry = self.entries.get(ident)
        return entry[1] if entry is not None else self.default

    def statement(self, ident: str) -> tuple[int, bool] | None:
        return self.entries.get(ident)

    def adopt(self, ident: str, entry: tuple[int, bool] | None) -> None:
        """A merged visitor's statement counts for the user only when the user made none: the
        known user's own statement is never overridden by an anonymous one."""
        if entry is not None and ident not in self.entries:
            self.entries[ident] = entry
            self.age.touch(ident, entry[0])

    def take(self, ident: str) -> tuple[int, bool] | None:
        self.age.purge(ident)
        return self.entries.pop(ident, None)

    def expire(self, now_ms: int) -> None:
        """Entries of identities silent for the time to live go (bounded state)."""
        while (ident := self.age.pop_older_than(now_ms - self.ttl_ms)) is not None:
            self.entries.pop(ident, None)

    def __len__(self) -> int:
        return len(self.entries)
