"""The alert lifecycle: firing -> updates -> resolved, one alert at a time per rule and series.

A rule's detector says, at each evaluation, whether a series breaches. :class:`Lifecycle` turns
those decisions into alert messages:

* **sustained**: a breach fires only once it has lasted ``for_ms`` ("CVR down for 15 min"); a
  single good evaluation, or a breach the other way, in between starts the count again (once
  fired, the alert keeps the direction it fired with);
* **updates**: while firing, an ``update`` every ``update_ms`` with the current value;
* **resolve**: after ``resolve_ms`` without a breach, the alert is ``resolved``;
* **cool-down**: after a resolve, the same rule and series do not fire again for ``cooldown_ms``.

The dedupe key is the rule and the series: while an alert is open nothing else fires for them,
and every message of one alert has the same ``alert_id`` (rule, series, first breach) with ``seq``
counting its messages, so sinks and receivers can drop repeats.

Time is event time in milliseconds, given by the caller (a minute's end, an event's time, the
watermark): a replay of history produces the same alerts as the live run.

>>> life = Lifecycle("cvr_drop", severity="II", response="check the checkout", for_ms=120_000)
>>> def at(minute, breach):
...     verdict = Verdict(0.02 if breach else 0.05, 0.05, 0.005, 3.0, -6.0 if breach else 0.0, breach)
...     return [(a.status, a.seq) for a in life.step("campaign=c1", (minute + 1) * 60_000, minute * 60_000, verdict)]
>>> [at(m, b) for m, b in enumerate([True, True, True, False])]
[[], [('firing', 0)], [], [('resolved', 1)]]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a rule's detector said about one value of one series."""

    value: float
    mu: float  # the baseline (or the threshold of a static rule)
    sigma: float  # NaN for a static threshold
    k: float
    z: float  # NaN for a static threshold
    breach: bool
    score: float = 0.0
    n: float | None = None  # sample size behind a ratio
    detail: str = ""  # e.g. the IP whose event crossed the threshold
    baseline: str = ""  # what the value was judged against, in words (SPEC section 7)

    def __setstate__(self, state) -> None:
        _set_with_defaults(self, state)


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str
    rule: str
    series: str
    status: str  # "firing", "update" or "resolved"
    seq: int  # 0 for firing, then one more per message of this alert
    at_ms: int  # event time of this message
    value: float
    mu: float
    sigma: float
    k: float
    z: float
    window: str  # what the value covers, e.g. "1m", "60m", "1s"
    severity: str  # I minor .. IV major
    first_seen_ms: int  # event time the breach began
    response: str
    area: str = ""
    direction: str = ""  # "up" or "down"
    score: float = 0.0
    n: float | None = None
    detail: str = ""
    # the baseline that judged the value: "time of day", "cycle of 7.25 h", "shift from level",
    # "static threshold"; with mu, sigma, k and z it says what was crossed
    baseline: str = ""

    def __setstate__(self, state) -> None:
        _set_with_defaults(self, state)

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for f in ("mu", "sigma", "k", "z", "value", "score"):
            v = d[f]
            if v is not None and not math.isfinite(v):
                d[f] = None  # JSON has no NaN or infinity
        return d

    @property
    def key(self) -> str:
        """The receiver's dedupe key of this message."""
        return f"{self.alert_id}:{self.status}:{self.seq}"


def _set_with_defaults(obj, state: list) -> None:
    """Unpickles a frozen dataclass; a field added since the pickle was written (a flow
    snapshot of an earlier version) takes its default."""
    for i, f in enumerate(fields(obj)):
        object.__setattr__(obj, f.name, state[i] if i < len(state) else f.default)


@dataclass(slots=True)
class _Open:
    first_ms: int  # when the current breach run began (event time)
    up: bool = True  # the run's direction: a breach the other way starts a new run
    alert: Alert | None = None  # the firing alert, once fired
    last_sent_ms: int = 0
    good_since_ms: int | None = None


class Lifecycle:
    """Per-series state machine of one rule (see the module docstring)."""

    def __init__(self, rule: str, *, severity: str, response: str, area: str = "", window: str = "",
                 for_ms: int = 0, resolve_ms: int = 0, cooldown_ms: int = 0, update_ms: int = 0):
        if min(for_ms, resolve_ms, cooldown_ms, update_ms) < 0:
            raise ValueError("durations must be >= 0")
        self.rule, self.severity, self.response, self.area = rule, severity, response, area
        self.window = window
        self.for_ms, self.resolve_ms = for_ms, resolve_ms
        self.cooldown_ms, self.update_ms = cooldown_ms, update_ms
        self.open: dict[str, _Open] = {}  # series breaching or firing
        self.quiet_until: dict[str, int] = {}  # series in cool-down after a resolve

    def firing_since(self, series: str) -> int | None:
        """When the breach of the firing alert on ``series`` began, else None."""
        o = self.open.get(series)
        return o.first_ms if o is not None and o.alert is not None else None

    def step(self, series: str, now_ms: int, since_ms: int, v: Verdict) -> list[Alert]:
        """The verdict on ``series`` at event time ``now_ms``; ``since_ms`` is where the judged
        value begins (a minute's start; the event's time for a count crossing its threshold)."""
        o = self.open.get(series)
        if v.breach:
            up = v.value >= v.mu
            if o is None or (o.alert is None and o.up != up):
                o = self.open[series] = _Open(since_ms, up)
            o.good_since_ms = None
            if o.alert is None:
                if now_ms - o.first_ms < self.for_ms or now_ms < self.quiet_until.get(series, 0):
                    return []
                self.quiet_until.pop(series, None)
                o.alert = self._message(series, "firing", 0, now_ms, o.first_ms, v, o.up)
                o.last_sent_ms = now_ms
                return [o.alert]
            if self.update_ms and now_ms - o.last_sent_ms >= self.update_ms:
                o.alert = self._message(series, "update", o.alert.seq + 1, now_ms, o.first_ms, v, o.up)
                o.last_sent_ms = now_ms
                return [o.alert]
            return []
        if o is None:
            return []
        if o.alert is None:  # a breach that never lasted long enough
            del self.open[series]
            return []
        if o.good_since_ms is None:
            o.good_since_ms = since_ms
        if now_ms - o.good_since_ms < self.resolve_ms:
            return []
        del self.open[series]
        if self.cooldown_ms:
            self.quiet_until[series] = now_ms + self.cooldown_ms
        return [self._message(series, "resolved", o.alert.seq + 1, now_ms, o.first_ms, v, o.up)]

    def expire_quiet(self, now_ms: int) -> None:
        """Forget cool-downs that are over (bounded memory with many series)."""
        done = [s for s, until in self.quiet_until.items() if until <= now_ms]
        for s in done:
            del self.quiet_until[s]

    def _message(self, series: str, status: str, seq: int, now_ms: int, first_ms: int,
                 v: Verdict, up: bool) -> Alert:
        # the direction of the breach that fired: an update or the resolve keeps it
        return Alert(f"{self.rule}|{series}|{first_ms}", self.rule, series, status, seq, now_ms,
                     v.value, v.mu, v.sigma, v.k, v.z, self.window, self.severity, first_ms,
                     self.response, self.area, "up" if up else "down", v.score, v.n, v.detail,
                     v.baseline)
