"""The trigger rule language: rules as typed data (``config/trigger_rules.yaml``), validated at
load with the rule and the field named in every error.

A rule has a ``kind`` (what it watches for), an ``action`` (channel, message, tags, an optional
channel fallback), a ``priority`` (between rules that fire on the same event), a re-entry policy,
a ``mode`` (``live`` sends, ``shadow`` only records what it would have sent) and optional
``when`` conditions on the user's features and model scores, checked when it fires.

Kinds (:mod:`triggers.rules` holds one small class per kind):

- ``count``: ``count`` events of ``events`` within the session or a window;
- ``sequence``: ``steps`` (A then B ...) within ``within``, joined on ``correlate`` fields;
- ``absence``: a ``start`` event, then no ``stop`` event of the same correlation for ``timeout``;
- ``schedule``: ``steps`` at offsets from a ``start`` event (``after``, or ``after_days`` at a
  user-local ``at_local`` time of day), until an ``exit_on`` event;
- ``drip``: ``steps`` each an offset after the previous one, entered on ``enter`` events and
  left on ``exit_on`` events (a state machine per user);
- ``condition``: a ``start`` event for which the ``when`` conditions hold.

>>> book = load_trigger_rules()
>>> book.rule("abandoned_cart").timeout, book.rule("abandoned_cart").action.channel
('30m', 'push')
>>> try:
...     parse_trigger_rules({"rules": [{"name": "x", "kind": "absence", "start": {"events": ["a"]},
...         "stop": {"events": ["b"]}, "timeout": "soon", "action": {"channel": "push",
...         "message": "m"}}]})
... except TriggerRuleError as exc:
...     print(exc)
invalid trigger rules:
  rule 'x': timeout: 'soon' is not a duration such as 500ms, 30s, 15m, 24h or 1d
"""
from __future__ import annotations

import functools

import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alerts.rules import duration_ms  # the same durations as the alert rules: 500ms .. 1d

RULES_FILE = Path(__file__).resolve().parent.parent / "config" / "trigger_rules.yaml"
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
OPS = ("<", "<=", ">", ">=", "==", "!=", "in", "not_in", "exists")


class TriggerRuleError(ValueError):
    """The rule file is not valid; the message names every rule and field at fault."""


@functools.lru_cache(maxsize=256)  # read on every quiet-hours check: a handful of distinct texts
def clock_minutes(text: str) -> int:
    """``"09:30"`` -> 570 (minutes after local midnight)."""
    m = _CLOCK.match(str(text))
    if m is None:
        raise ValueError(f"{text!r} is not a time of day such as 09:00")
    return int(m.group(1)) * 60 + int(m.group(2))


Duration = Annotated[str, Field(description="500ms, 30s, 15m, 24h, 1d")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_duration(value: str | None) -> str | None:
    if value is not None:
        duration_ms(value)
    return value


# -- conditions --------------------------------------------------------------------------------
class Condition(_Strict):
    """One test: a profile ``feature`` (model scores are features: ``p_purchase_24h``) or an event
    ``property`` compared with ``value``; or ``geo_within`` stores (the event's
    ``context.geo.lat`` / ``lon``)."""

    feature: str | None = None
    property: str | None = None
    op: Literal["<", "<=", ">", ">=", "==", "!=", "in", "not_in", "exists"] = "=="
    value: Any = None
    geo_within: "GeoWithin | None" = None

    @model_validator(mode="after")
    def _one_subject(self) -> "Condition":
        subjects = [s for s in (self.feature, self.property, self.geo_within) if s is not None]
        if len(subjects) != 1:
            raise ValueError("a condition names exactly one of feature, property, geo_within")
        if self.geo_within is None and self.op != "exists" and self.value is None:
            raise ValueError(f"op {self.op!r} needs a value")
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value")
        if self.op in ("<", "<=", ">", ">=") and not isinstance(self.value, (int, float)):
            raise ValueError(f"op {self.op!r} needs a number")
        return self


class GeoWithin(_Strict):
    stores: list[tuple[float, float]] = Field(min_length=1)  # (lat, lon)
    radius_km: float = Field(gt=0, le=100)

    @field_validator("stores")
    @classmethod
    def _coords(cls, value):
        for lat, lon in value:
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError(f"({lat}, {lon}) is not a latitude and longitude")
        return value


Condition.model_rebuild()


class EventMatch(_Strict):
    """Events by name (``"*"``: any event the user did) and optional conditions on the event's
    properties (a ``feature`` condition here reads the profile as of this event)."""

    events: list[str] = Field(min_length=1)
    where: list[Condition] = []
    session_start: bool = False  # only the first event of a session (e.g. a daily check)


# -- actions -------------------------------------------------------------------------------------
class Fallback(_Strict):
    """Channel fallback: unless one of ``unless`` (correlated by the action id when the event
    carries ``properties.action_id``) comes within ``after``, send on ``channel`` instead."""

    channel: str
    after: Duration
    unless: list[str] = Field(min_length=1)
    message: str | None = None

    _d = field_validator("after")(_check_duration)


class ActionSpec(_Strict):
    channel: str
    message: str
    tags: list[str] = []
    fallback: Fallback | None = None


# -- rules ---------------------------------------------------------------------------------------
class _Rule(_Strict):
    name: str
    description: str = ""
    priority: int = 0  # higher wins when several rules fire on one event
    mode: Literal["live", "shadow"] = "live"
    enabled: bool = True
    # once | once_per_session | always | a cooldown duration (again only after it)
    reentry: str | None = None
    when: list[Condition] = []  # on features / scores, checked when the rule fires
    exit_on: list[str] = []  # events that end the rule's pending matches and sends
    action: ActionSpec

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r}: lower-case letters, digits and _ (at most 64)")
        return value

    @field_validator("reentry")
    @classmethod
    def _reentry(cls, value: str | None) -> str | None:
        if value is not None and value not in ("once", "once_per_session", "always"):
            try:
                duration_ms(value)
            except ValueError:
                raise ValueError(f"{value!r} is not once, once_per_session, always or a "
                                 "duration") from None
        return value


class CountRule(_Rule):
    kind: Literal["count"]
    events: list[str] = Field(min_length=1)
    where: list[Condition] = []
    count: int = Field(ge=1, le=10_000)
    within: str = "session"  # "session" or a duration

    @field_validator("within")
    @classmethod
    def _within(cls, value: str) -> str:
        return value if value == "session" else _check_duration(value)


class SequenceRule(_Rule):
    kind: Literal["sequence"]
    steps: list[EventMatch] = Field(min_length=2, max_length=16)
    within: Duration
    correlate: list[str] = []

    _d = field_validator("within")(_check_duration)


class TimeoutOverride(_Strict):
    when: list[Condition] = Field(min_length=1)
    timeout: Duration

    _d = field_validator("timeout")(_check_duration)


class AbsenceRule(_Rule):
    kind: Literal["absence"]
    start: EventMatch
    stop: EventMatch
    timeout: Duration
    timeouts: list[TimeoutOverride] = []  # first whose conditions hold at the start
    correlate: list[str] = []
    restart: bool = False  # a new start event of an open match starts its clock again
    max_open: int = Field(20, ge=1, le=1000)  # open matches per user (oldest evicted)

    _d = field_validator("timeout")(_check_duration)


class Step(_Strict):
    after: Duration | None = None
    after_days: int | None = Field(None, ge=0, le=366)
    at_local: str | None = None  # with after_days: this time of day in the user's time zone
    message: str | None = None  # else the action's message

    @model_validator(mode="after")
    def _when(self) -> "Step":
        if (self.after is None) == (self.after_days is None):
            raise ValueError("a step has exactly one of after, after_days")
        if self.after is not None:
            duration_ms(self.after)
            if self.at_local is not None:
                raise ValueError("at_local goes with after_days, not after")
        if self.at_local is not None:
            clock_minutes(self.at_local)
        return self


class ScheduleRule(_Rule):
    kind: Literal["schedule"]
    start: EventMatch
    steps: list[Step] = Field(min_length=1, max_length=32)


class DripRule(_Rule):
    kind: Literal["drip"]
    enter: EventMatch
    steps: list[Step] = Field(min_length=1, max_length=32)


class ConditionRule(_Rule):
    kind: Literal["condition"]
    start: EventMatch


RuleSpec = Annotated[Union[CountRule, SequenceRule, AbsenceRule, ScheduleRule, DripRule,
                           ConditionRule], Field(discriminator="kind")]


# -- guards --------------------------------------------------------------------------------------
class Cap(_Strict):
    """At most ``max`` sends in ``window`` (``calendar_day`` in the user's time zone, or a
    rolling duration), counted per ``channel`` and / or ``tag``, or per message (``per``)."""

    name: str
    max: int = Field(ge=1)
    window: str
    channel: str | None = None
    tag: str | None = None
    per: Literal["all", "message"] = "all"
    over_cap: Literal["drop", "defer", "fallback"] = "drop"
    fallback_channel: str | None = None

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        return value if value == "calendar_day" else _check_duration(value)

    @model_validator(mode="after")
    def _fallback(self) -> "Cap":
        if (self.over_cap == "fallback") != (self.fallback_channel is not None):
            raise ValueError("over_cap fallback goes with fallback_channel (and only it)")
        return self


class QuietHours(_Strict):
    start: str = "21:00"  # user-local, may wrap past midnight
    end: str = "09:00"
    channels: list[str] = ["push", "sms", "email"]
    policy: Literal["defer", "drop"] = "defer"

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        clock_minutes(value)
        return value


class Guards(_Strict):
    # Marketing consent (context.consent.marketing): opt_in = no action until the user granted
    # it; opt_out = actions unless the user refused. A refusal is remembered until a grant.
    consent: Literal["opt_in", "opt_out"] = "opt_in"
    default_timezone: str = "UTC"  # for users whose events carry no context.timezone
    quiet_hours: QuietHours | None = QuietHours()
    caps: list[Cap] = []
    # Releases (quiet hours' end, a cap window freeing) are spread: at most this many sends per
    # second of event time per channel and profile shard.
    release_rate_per_s: dict[str, float] = {}
    max_actions_per_event: int = Field(1, ge=1)
    channels: list[str] = ["push", "sms", "email", "in_app", "task"]

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        if value not in zoneinfo.available_timezones():
            raise ValueError(f"unknown time zone {value!r}")
        return value


class TriggerBook(_Strict):
    """The whole file: guards and rules."""

    guards: Guards = Guards()
    rules: list[RuleSpec] = []

    def rule(self, name: str):
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    @model_validator(mode="after")
    def _consistent(self) -> "TriggerBook":
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique: {', '.join(dupes)}")
        known = set(self.guards.channels)
        for cap in self.guards.caps:
            for ch in (cap.channel, cap.fallback_channel):
                if ch is not None and ch not in known:
                    raise ValueError(f"cap {cap.name!r}: unknown channel {ch!r} (guards.channels)")
        for r in self.rules:
            for ch in (r.action.channel, r.action.fallback.channel if r.action.fallback else None):
                if ch is not None and ch not in known:
                    raise ValueError(f"rule {r.name!r}: action: unknown channel {ch!r} "
                                     f"(guards.channels: {', '.join(sorted(known))})")
        return self


def parse_trigger_rules(doc: Any) -> TriggerBook:
    """Validate a parsed rule file; every problem in one :class:`TriggerRuleError`, each line
    naming the rule (by name when it has one) and the field."""
    if not isinstance(doc, dict):
        raise TriggerRuleError("invalid trigger rules:\n  (top): the file must be a mapping")
    problems: list[str] = []
    rules = doc.get("rules") or []
    if not isinstance(rules, list):
        raise TriggerRuleError("invalid trigger rules:\n  rules: must be a list")
    for i, raw in enumerate(rules):
        name = raw.get("name") if isinstance(raw, dict) else None
        who = f"rule {name!r}" if isinstance(name, str) else f"rule #{i + 1}"
        try:
            TriggerBook.model_validate({"rules": [raw]})
        except ValidationError as err:
            for e in err.errors():
                loc = [str(p) for p in e["loc"][2:]]  # drop ("rules", i)
                if loc and loc[0] in ("count", "sequence", "absence", "schedule", "drip",
                                      "condition"):
                    loc = loc[1:]  # the discriminator's branch
                where = ".".join(loc) or "(rule)"
                problems.append(f"  {who}: {where}: {_msg(e)}")
    if not problems:
        try:
            return TriggerBook.model_validate(doc)
        except ValidationError as err:
            for e in err.errors():
                where = ".".join(str(p) for p in e["loc"]) or "(top)"
                problems.append(f"  {where}: {_msg(e)}")
    raise TriggerRuleError("invalid trigger rules:\n" + "\n".join(problems))


def _msg(e: dict) -> str:
    msg = e["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def load_trigger_rules(path: Path | str = RULES_FILE) -> TriggerBook:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TriggerRuleError(f"cannot read trigger rules {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TriggerRuleError(f"trigger rules {path} are not YAML: {exc}") from None
    return parse_trigger_rules(doc if doc is not None else {})
