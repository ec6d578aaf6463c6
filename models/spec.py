"""The online models as data: typed loader and validation of ``config/models.yaml``.

Each model says when it scores, what it predicts within which horizon, and its fixed input
vector: every input has a default, and may have a missing indicator, so the vector a model sees
always has the same keys, whatever the profile holds.

>>> specs = load_models()
>>> m = specs["purchase_propensity"]
>>> (m.score_field, m.horizon_ms, m.once_per, m.label_rule.positive)
('p_purchase_24h', 86400000, 'session', 'target')
>>> x = m.vector({"views_1h": 3, "days_since_last_order": None}, "page_view")
>>> import math  # (counts and days enter as log(1 + value))
>>> (round(math.expm1(x["views_1h"]), 9), round(math.expm1(x["days_since_last_order"]), 9),
...  x["days_since_last_order_missing"], x["orders_30d"])
(3.0, 365.0, 1.0, 0.0)
>>> list(x) == list(m.input_names)  # always the same keys, in the declared order
True
>>> ctr = specs["ctr"].vector({}, "push_sent")
>>> (ctr["event=push_sent"], ctr["event=email_sent"])
(1.0, 0.0)

A bad file is refused with every problem named:

>>> load_models(doc={"models": [{"name": "m", "score_field": "views_1h", "description": "d",
...     "predict_on": ["page_view"], "once_per": "session", "target": ["order_completed"],
...     "horizon": "2w", "inputs": [{"name": "nope", "default": 0}, {"name": "lifecycle", "default": 0}]}]})
Traceback (most recent call last):
...
models.spec.ModelSpecError: invalid models file:
  m: horizon '2w' is not a duration like 30m, 24h or 30d
  m: input 'nope' is not a feature of the registry
  m: input 'lifecycle' is a label feature, not a number
  m: the registry must declare 'views_1h' as the model's score (aggregation: model, model: m)
  m: the registry must declare 'views_1h_version' as the model's version (aggregation: model, model: m, part: version)
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from config.registry import Registry, load_registry, parse_document
from features.profile import point_in_time_error
from models.labels import LabelRule

MODELS_FILE = Path(__file__).resolve().parents[1] / "config" / "models.yaml"
NUMERIC = ("int", "money", "ratio", "flag", "score")
UNITS_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}


class ModelSpecError(Exception):
    """The models file is invalid; the message names each problem."""


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    default: float = 0.0
    missing: bool = False
    log: bool = False  # the input is log(1 + value): counts and amounts have long tails


class _Learner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(0.01, gt=0)
    intercept_lr: float = Field(0.01, ge=0)
    l2: float = Field(0.0, ge=0)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")
    score_field: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")
    description: str = Field(min_length=1)
    predict_on: list[str] = Field(min_length=1)
    once_per: Literal["event", "session", "day"]
    target: list[str] = Field(min_length=1)
    positive: Literal["target", "timeout"] = "target"
    horizon: str
    inputs: list[_Input] = Field(min_length=1)
    by_event: bool = False
    # close: a label is learned when its prediction's horizon closes (no delayed-feedback bias;
    # the learner keeps it until then); label: when it resolves
    learn_at: Literal["close", "label"] = "close"
    learner: _Learner = _Learner()


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models_version: int = Field(1, ge=1)
    models: list[_Model] = []


@dataclass(frozen=True)
class ModelSpec:
    name: str
    score_field: str
    description: str
    predict_on: frozenset[str]
    once_per: str
    horizon_ms: int
    label_rule: LabelRule
    inputs: tuple[tuple[str, float, bool], ...]  # (feature, default, has a missing indicator)
    by_event: tuple[str, ...]  # predict_on names with an input each (empty: none)
    learning_rate: float
    intercept_lr: float
    l2: float
    log: frozenset[str] = frozenset()  # inputs taken as log(1 + value)
    learn_at: str = "close"  # "close": at the horizon's close; "label": when it resolves

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        names = []
        for name, _, missing in self.inputs:
            names.append(name)
            if missing:
                names.append(f"{name}_missing")
        names.extend(f"event={e}" for e in self.by_event)
        return tuple(names)

    @property
    def schema_hash(self) -> str:
        """Changes exactly when the meaning of the vector changes (inputs, defaults,
        indicators, event inputs), not with the learner's parameters."""
        doc = {"inputs": [list(i) for i in self.inputs], "by_event": list(self.by_event)}
        if self.log:
            doc["log"] = sorted(self.log)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def predicts_on(self, event_name: str) -> bool:
        return event_name in self.predict_on or "*" in self.predict_on

    def vector_of(self, values: list, event_name: str) -> dict[str, float]:
        """:meth:`vector` from the inputs' values in the spec's order (None: no value)."""
        return dict(zip(self.input_names, self.row_of(values, event_name)))

    @cached_property
    def _row_plan(self) -> tuple[tuple[float, bool, bool], ...]:
        return tuple((default, name in self.log, missing) for name, default, missing in self.inputs)

    def row_of(self, values: list, event_name: str) -> tuple[float, ...]:
        """The vector's values in :attr:`input_names` order (what a prediction freezes, and
        what :meth:`models.learner.Weights.predict_row` scores), without building a dict.

        >>> m = load_models()["ctr"]
        >>> m.row_of([None] * len(m.inputs), "push_sent") == tuple(m.vector({}, "push_sent").values())
        True
        """
        row: list[float] = []
        for (default, log, missing), v in zip(self._row_plan, values):
            absent = v is None or v.__class__ is str
            value = default if absent else float(v)
            if log:
                value = math.log1p(value) if value > 0 else 0.0
            row.append(value)
            if missing:
                row.append(1.0 if absent else 0.0)
        for e in self.by_event:
            row.append(1.0 if e == event_name else 0.0)
        return tuple(row)

    def vector(self, values, event_name: str) -> dict[str, float]:
        """The fixed input vector from the profile's values as of the scoring time (``values``:
        a mapping, None or absent for "no value")."""
        x: dict[str, float] = {}
        for name, default, missing in self.inputs:
            v = values.get(name)
            value = default if v is None else float(v)
            if name in self.log:
                value = math.log1p(value) if value > 0 else 0.0
            x[name] = value
            if missing:
                x[f"{name}_missing"] = 1.0 if v is None else 0.0
        for e in self.by_event:
            x[f"event={e}"] = 1.0 if e == event_name else 0.0
        return x


def duration_ms(text: str) -> int | None:
    """A horizon in milliseconds, None when the text is not one.

    >>> duration_ms("30m"), duration_ms("24h"), duration_ms("30d"), duration_ms("2w")
    (1800000, 86400000, 2592000000, None)
    """
    m = re.fullmatch(r"([1-9][0-9]{0,5})([mhd])", text)
    return int(m.group(1)) * UNITS_MS[m.group(2)] if m else None


def load_models(path: str | Path | None = None, doc: dict | None = None,
                registry: Registry | None = None) -> dict[str, ModelSpec]:
    """Read and validate the models (default: ``config/models.yaml``) against the registry."""
    parsed = parse_document(_Doc, path, MODELS_FILE, doc, ModelSpecError, "models file")
    registry = registry or load_registry()
    errors: list[str] = []
    specs: dict[str, ModelSpec] = {}
    fields: dict[str, str] = {}
    for m in parsed.models:
        horizon = duration_ms(m.horizon)
        if horizon is None:
            errors.append(f"{m.name}: horizon {m.horizon!r} is not a duration like 30m, 24h or 30d")
        seen: set[str] = set()
        for i in m.inputs:
            f = registry.by_name.get(i.name)
            if i.name in seen:
                errors.append(f"{m.name}: input {i.name!r} twice")
            seen.add(i.name)
            if f is None:
                errors.append(f"{m.name}: input {i.name!r} is not a feature of the registry")
            elif f.type not in NUMERIC:
                errors.append(f"{m.name}: input {i.name!r} is a {f.type} feature, not a number")
            elif (why := point_in_time_error(registry, i.name)) is not None:
                errors.append(f"{m.name}: input {why}")
        for name, part in ((m.score_field, None), (f"{m.score_field}_version", "version")):
            f = registry.by_name.get(name)
            if f is None or f.aggregation != "model" or f.model != m.name or f.part != part:
                what = "score" if part is None else "version"
                errors.append(f"{m.name}: the registry must declare {name!r} as the model's {what} "
                              f"(aggregation: model, model: {m.name}"
                              + (", part: version)" if part else ")"))
        if m.score_field in fields:
            errors.append(f"{m.name}: score_field {m.score_field!r} is also {fields[m.score_field]}'s")
        fields[m.score_field] = m.name
        if m.name in specs:
            errors.append(f"{m.name}: declared twice")
        if m.by_event and "*" in m.predict_on:
            errors.append(f"{m.name}: by_event needs the predict_on events named, not '*'")
        if errors:
            continue
        specs[m.name] = ModelSpec(
            name=m.name, score_field=m.score_field, description=m.description,
            predict_on=frozenset(m.predict_on), once_per=m.once_per, horizon_ms=horizon,
            label_rule=LabelRule(horizon, frozenset(m.target), m.positive),
            inputs=tuple((i.name, i.default, i.missing) for i in m.inputs),
            by_event=tuple(m.predict_on) if m.by_event else (),
            learning_rate=m.learner.learning_rate, intercept_lr=m.learner.intercept_lr,
            l2=m.learner.l2, log=frozenset(i.name for i in m.inputs if i.log),
            learn_at=m.learn_at)
    if errors:
        raise ModelSpecError("invalid models file:\n" + "\n".join(f"  {e}" for e in errors))
    return specs
