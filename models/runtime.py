"""A profile shard's side of the online models: it scores with the versions the learner
published, keeps its users' open predictions, and sends the labels they resolve to the learner.

Scores do not depend on the workers, the batches or the order in which the partitions' events
came in, because a user's events are *noted* as they are applied and *played* later, in
event-time order, once the stream's watermark has passed them (nothing earlier can still come):

- the input vector is the profile's point-in-time value as of the start of the event's minute
  (``FeaturePlan.values_at``: what came in since, earlier or later, does not count);
- an event at ``t`` is scored with version ``version_for(t)`` (models/training.py), never with
  "whatever arrived last"; a user whose next event needs a version not here yet waits for it;
- sessions ("once per session") and days are decided in that order too, and so are the labels;
- a visitor's profile merged into the user's at a login counts from the login on: events before
  it are scored with the profile as it was before the merge (kept until the watermark passes
  the login, and fed the events before the login that come meanwhile).

The cost: a score lands about the allowed lateness after its event (one minute by default).

>>> from features.profile import FeaturePlan
>>> from config.registry import load_registry
>>> from models.spec import load_models
>>> from models.learner import Learner
>>> plan = FeaturePlan(load_registry())
>>> specs = {"purchase_propensity": load_models()["purchase_propensity"]}
>>> H = 3_600_000
>>> m = ShardModels(specs, shard=0, period_ms=H, grace_ms=0)
>>> users = {"u1": plan.new_profile()}
>>> for ts, name in ((10, "page_view"), (20, "page_view"), (30, "order_completed")):
...     m.note("u1", name, ts)
>>> m.advance(25, plan, users)  # the watermark passed the two views: the first one scores
set()
>>> m.blocked  # ... once the version its time needs is here
{'u1'}
>>> m.receive(Learner("purchase_propensity").publish(0, 5))  # the fresh model, versions 0-5
>>> m.advance(25, plan, users), m.scores("u1")
({'u1'}, {'p_purchase_24h': '0.500000', 'p_purchase_24h_version': '0'})
>>> m.mark(25), m.advance(31, plan, users)  # the order resolves the prediction
(25, set())
>>> [(b.shard, len(b.labels), b.labels[0].y) for _, b in m.send(mark_ms=31)]
[(0, 1, True)]
"""
from __future__ import annotations

import copy
import heapq
import operator

from models.labels import Label, OpenPredictions
from models.learner import Weights
from models.spec import ModelSpec
from models.training import LabelBatch, version_for
from privacy.subjects import subject_hash

DAY_MS = 86_400_000
SESSION_GAP_MS = 30 * 60_000  # a new session after this long without an event (as the features')
VERSIONS_KEPT = 4  # per model: an event may still need the version before the newest
NEVER = 2**62
_ORDER = operator.itemgetter(0, 1, 2)  # a noted event's place: (time, name, event id)


class ShardModels:
    def __init__(self, specs: dict[str, ModelSpec], shard: int, period_ms: int, grace_ms: int,
                 session_gap_ms: int = SESSION_GAP_MS, subject_key: bytes | None = None):
        self.subject_key = subject_key  # the labels' user: a subject hash (privacy/subjects.py)
        self.specs = specs
        self.shard, self.period_ms, self.grace_ms = shard, period_ms, grace_ms
        self.session_gap_ms = session_gap_ms
        self.versions: dict[str, list[Weights]] = {name: [] for name in specs}
        self.book = OpenPredictions({name: s.label_rule for name, s in specs.items()})
        self.outbox: dict[str, list[Label]] = {name: [] for name in specs}
        self.last: dict[str, dict[str, tuple[float, int]]] = {}  # user -> model -> (score, version)
        self.once: dict[str, dict[str, int]] = {}  # user -> model -> session start or day scored
        # user -> (ts, name, event id, Event or None) noted, not played yet
        self.noted: dict[str, list[tuple]] = {}
        self.seen: dict[str, int] = {}  # user -> time of the last event played (sessions)
        self.session: dict[str, int] = {}  # user -> start of the session of that event
        # user -> [(login time, the profile before that merge)], while events before it may play
        self.before: dict[str, list[tuple[int, object]]] = {}
        self.timers: list[tuple[int, str]] = []  # (time, user): the user has work once it passed
        self.due: dict[str, int] = {}  # user -> the time of its timer in force
        self.blocked: set[str] = set()  # users whose next event waits for a version
        self.watermark = -NEVER
        self.latest = -NEVER  # the latest event noted (the end of a bounded input)

    # -- versions ---------------------------------------------------------------------------
    def receive(self, w: Weights) -> None:
        """A version from the learner (a repeat after a restart is harmless: the same model)."""
        mine = self.versions.get(w.model)
        if mine is None:
            return  # a model this run does not declare
        if mine and w.version <= mine[-1].last_version:
            return  # known already
        mine.append(w)
        if len(mine) > VERSIONS_KEPT:
            del mine[0]

    def weights_for(self, model: str, ts: int) -> Weights | None:
        need = version_for(ts, self.period_ms, self.grace_ms)
        mine = self.versions[model]
        for w in reversed(mine):
            if w.version <= need <= w.last_version:
                return w
        if mine and need < mine[0].version and mine[0].learned == 0:
            return mine[0]  # before the first version: the same fresh model
        return None

    # -- events and time ---------------------------------------------------------------------
    def note(self, user: str, name: str, ts: int, event=None) -> None:
        """One of the user's own (identified) events, as the profile took it in (any order):
        played once the watermark has passed it. A device's anonymous events are not noted, even
        once its login linked them: whether one came before or after the login was read (and so
        merged with the visitor's profile, or linked) depends on the partitions' interleaving.
        They count in the inputs, from the login on. ``event``: handed back when played (the
        trigger rules that read a score react then)."""
        self.noted.setdefault(user, []).append(
            (ts, name, event.event_id if event is not None else "", event))
        if ts > self.latest:
            self.latest = ts
        if ts < self.due.get(user, NEVER) and user not in self.blocked:
            self._wake(user, ts)

    def merging(self, user: str, ts: int, p, plan) -> None:
        """A visitor's profile is about to merge into the user's ``p`` (None: no profile yet) at
        a login at ``ts``: keep the profile as it is, for the events before the login."""
        kept = self.before.setdefault(user, [])
        kept.append((ts, copy.deepcopy(p) if p is not None else plan.new_profile()))
        kept.sort(key=lambda k: k[0])
        if ts < self.due.get(user, NEVER) and user not in self.blocked:
            self._wake(user, ts)

    def merged(self, user: str, ts: int, other, plan) -> None:
        """The visitor's profile merged at ``ts``: the profiles kept for later logins get it."""
        for login, kept in self.before.get(user, ()):
            if ts < login:
                plan.merge(kept, copy.deepcopy(other))

    def visiting(self, user: str, login: int, p, plan) -> None:
        """A visitor's event from before its login at ``login`` comes after the login was
        applied: if the visitor had no profile to merge then, keep the user's as it is now."""
        if not any(k[0] == login for k in self.before.get(user, ())):
            self.merging(user, login, p, plan)

    def applied(self, e, plan) -> None:
        """An event applied to the live profile goes to the kept ones it is before (a visitor's
        event from before its login only to those of later logins, which have the visitor)."""
        for login, kept in self.before.get(e.user, ()):
            if e.ts_ms < login and (not e.linked or e.linked_at < login):
                plan.apply(kept, e)

    def advance(self, watermark: int, plan, profiles: dict, played=None) -> set[str]:
        """Play every noted event before ``watermark`` and resolve what it makes due, for users
        whose versions are here; ``played(user, event)`` after each event noted with one.
        Returns the users whose scores changed."""
        if watermark > self.watermark:
            self.watermark = watermark
        watermark = self.watermark
        users: set[str] = set()
        timers, due = self.timers, self.due
        while timers and timers[0][0] < watermark:
            when, user = heapq.heappop(timers)
            if due.get(user) == when:
                del due[user]
                users.add(user)
        if self.blocked and any(self.versions.values()):
            users |= self.blocked
            self.blocked = set()
        scored = set()
        for user in sorted(users):
            if self._play(user, watermark, plan, profiles.get(user), played):
                scored.add(user)
        return scored

    def _play(self, user: str, watermark: int, plan, p, played) -> bool:
        book, outbox = self.book, self.outbox
        items = self.noted.get(user)
        scored = False
        i = 0
        if items:
            items.sort(key=_ORDER)
            n = len(items)
            while i < n and items[i][0] < watermark:
                ts, name, _, event = items[i]
                for label in book.expire(user, ts):  # due before it: resolved first, as a timer
                    outbox[label.model].append(label)
                todo = self._scoring(user, name, ts)
                if todo is None:
                    self.blocked.add(user)
                    break
                for label in book.on_event(user, name, ts):
                    outbox[label.model].append(label)
                if todo:
                    self._score(user, name, ts, todo, self._inputs(user, ts, p, plan, todo))
                    scored = True
                previous = self.seen.get(user)
                if previous is None or ts - previous > self.session_gap_ms:
                    self.session[user] = ts
                self.seen[user] = ts
                i += 1
                if event is not None and played is not None:
                    played(user, event)
            del items[:i]
            if not items:
                del self.noted[user]
        if user in self.blocked:
            return scored
        for label in book.expire(user, watermark):
            outbox[label.model].append(label)
        kept = self.before.get(user)
        if kept:
            first = items[0][0] if items else watermark
            kept[:] = [k for k in kept if k[0] >= min(first, watermark)]
            if not kept:
                del self.before[user]
        nxt = min(items[0][0] if items else NEVER, book.next_due(user) or NEVER,
                  min((k[0] for k in self.before.get(user, ())), default=NEVER))
        if nxt < NEVER:
            self._wake(user, nxt)
        return scored

    def _scoring(self, user: str, name: str, ts: int) -> list | None:
        """The (model, weights) an event scores with ([]: none), None when a version is missing."""
        todo = []
        once = self.once.get(user, {})
        for model, spec in self.specs.items():
            if not spec.predicts_on(name):
                continue
            if spec.once_per == "session":
                previous = self.seen.get(user)
                start = ts if previous is None or ts - previous > self.session_gap_ms \
                    else self.session[user]
                if once.get(model) == start:
                    continue
            elif spec.once_per == "day" and once.get(model) == ts // DAY_MS:
                continue
            w = self.weights_for(model, ts)
            if w is None:
                return None
            todo.append((model, w))
        return todo

    def _score(self, user: str, name: str, ts: int, todo: list, values) -> None:
        once = self.once.setdefault(user, {})
        previous = self.seen.get(user)
        for model, w in todo:
            spec = self.specs[model]
            if spec.once_per == "session":
                once[model] = ts if previous is None or ts - previous > self.session_gap_ms \
                    else self.session[user]
            elif spec.once_per == "day":
                once[model] = ts // DAY_MS
            row = spec.row_of(values[model], name)
            score = w.predict_row(spec.input_names, row)
            # the version the time needs (one publication may stand for several); before the
            # first publication, the first (the same fresh model)
            version = max(w.version, version_for(ts, self.period_ms, self.grace_ms))
            self.last.setdefault(user, {})[model] = (score, version)
            # the input kept as a tuple in the spec's order: a fraction of a dict's memory
            self.book.open(user, model, ts, row, version, score)

    def profile_at(self, user: str, ts: int, p):
        """The profile an event at ``ts`` is seen with: as it was before the first later login
        merged a visitor's into it (if any), else ``p``."""
        for login, kept in self.before.get(user, ()):
            if ts < login:
                return kept
        return p

    def _inputs(self, user: str, ts: int, p, plan, todo: list) -> dict[str, list]:
        """Each scoring model's inputs, point in time (:meth:`profile_at`)."""
        p = self.profile_at(user, ts, p)
        if p is None:
            p = plan.new_profile()
        readers = self.__dict__.get("_readers")
        if readers is None or readers[0] is not plan:
            readers = self._readers = (plan, {m: plan.inputs_at(tuple(n for n, _, _ in s.inputs))
                                              for m, s in self.specs.items()})
        return {model: readers[1][model](user, p, ts) for model, _ in todo}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_readers", None)  # compiled for a plan: made again after a restore
        return state

    def _wake(self, user: str, when: int) -> None:
        self.due[user] = when
        heapq.heappush(self.timers, (when, user))

    def mark(self, watermark: int) -> int:
        """Every label before this time has been sent (or will be by a later batch's events):
        the watermark, or the first event still waiting for a version."""
        for user in self.blocked:
            items = self.noted.get(user)
            first = min(item[0] for item in items) if items else watermark
            if first < watermark:
                watermark = first
        return watermark

    def send(self, mark_ms: int) -> list[tuple[str, LabelBatch]]:
        """One batch per model: the labels resolved since the last call, and the mark (every
        label before it has been sent). Sent even when empty: the learner waits for every
        shard's mark. A label leaves with its user's subject hash, not the id: the learner
        keeps labels until their horizon closes, and an erasure does not reach it."""
        out = []
        key = self.subject_key
        for model, labels in self.outbox.items():
            for label in labels:
                label.user = subject_hash(label.user, key)
            out.append((model, LabelBatch(self.shard, mark_ms, labels, model)))
            self.outbox[model] = []
        return out

    def idle(self) -> bool:
        """Nothing noted is left to play (the end of a bounded input)."""
        return not self.noted

    # -- what the profile shows ------------------------------------------------------------
    def scores(self, user: str) -> dict[str, str]:
        """The user's last scores and their versions, as Redis fields."""
        out = {}
        for model, (score, version) in self.last.get(user, {}).items():
            field = self.specs[model].score_field
            out[field] = f"{score:.6f}"
            out[f"{field}_version"] = str(version)
        return out

    def score(self, user: str, field: str) -> float | None:
        """The last score in a field (a trigger rule's condition reads it)."""
        for model, (score, _) in self.last.get(user, {}).items():
            if self.specs[model].score_field == field:
                return score
        return None

    # -- the profile's life --------------------------------------------------------------------
    def take(self, user: str) -> tuple:
        """Everything of the user's, to move with the profile to another shard."""
        self.due.pop(user, None)
        self.blocked.discard(user)
        self.before.pop(user, None)
        return (self.book.take(user), self.last.pop(user, None), self.once.pop(user, None),
                self.noted.pop(user, None), self.seen.pop(user, None), self.session.pop(user, None))

    def adopt(self, user: str, moved: tuple | None) -> None:
        """A moved profile's state, merged into the user's (identity stitching)."""
        if not moved:
            return
        predictions, last, once, noted, seen, session = moved
        self.book.adopt(user, predictions)
        if last:
            mine = self.last.setdefault(user, {})
            for model, value in last.items():
                mine.setdefault(model, value)
        if once:
            self.once.setdefault(user, {}).update({m: k for m, k in once.items()
                                                    if m not in self.once[user]})
        for ts, name, _, event in noted or ():
            self.note(user, name, ts, event)
        if seen is not None and seen > self.seen.get(user, -NEVER):
            self.seen[user], self.session[user] = seen, session
        due = self.book.next_due(user)
        if due is not None and due < self.due.get(user, NEVER) and user not in self.blocked:
            self._wake(user, due)

    def erase(self, user: str) -> None:
        """Erasure: as :meth:`drop`, and the user's timer entries go too."""
        self.drop(user)
        if any(name == user for _, name in self.timers):
            self.timers = [t for t in self.timers if t[1] != user]
            heapq.heapify(self.timers)

    def drop(self, user: str) -> None:
        """The profile is gone (time to live, consent, erasure): its predictions go unlearned,
        and its events not yet played are not."""
        self.book.erase(user)
        for table in (self.last, self.once, self.noted, self.seen, self.session, self.before,
                      self.due):
            table.pop(user, None)
        self.blocked.discard(user)
