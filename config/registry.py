"""The feature registry: typed loader and validation of ``config/features.yaml``.

Each YAML entry declares one feature, or one per window (``windows: [1h, 7d]`` on a count or sum
gives ``views_1h``, ``views_7d``). :func:`load_registry` expands and checks the entries and
returns a :class:`Registry` of :class:`Feature` records (name, type, source events, aggregation,
window, description, version), from which the flow builds its computation.

>>> reg = load_registry()
>>> f = reg.feature("views_7d")
>>> (f.type, f.aggregation, f.window_min, f.events[:2])
('int', 'count', 10080, ('page_view', 'product_viewed'))
>>> reg.feature("aov_30d").of
('revenue_30d', 'orders_30d')

Invalid registries are rejected with every problem named:

>>> load_registry(doc={"windows": {"1h": 60}, "features": [
...     {"name": "views", "aggregation": "count", "events": ["page_view"], "windows": ["2h"],
...      "description": "views"},
...     {"name": "aov", "aggregation": "ratio", "of": ["revenue_1h", "views_1h"], "description": "x"}]})
Traceback (most recent call last):
...
config.registry.RegistryError: invalid feature registry:
  views: unknown window '2h' (declared: 1h)
  aov: refers to unknown feature 'revenue_1h'
  aov: refers to unknown feature 'views_1h'

A derived feature may not depend on itself (it could never be computed):

>>> load_registry(doc={"windows": {"1h": 60}, "features": [
...     {"name": "views", "aggregation": "count", "events": ["page_view"], "windows": ["1h"],
...      "description": "views"},
...     {"name": "a", "aggregation": "ratio", "of": ["b", "views_1h"], "description": "x"},
...     {"name": "b", "aggregation": "ratio", "of": ["a", "views_1h"], "description": "y"}]})
Traceback (most recent call last):
...
config.registry.RegistryError: invalid feature registry:
  a: derived from itself (a -> b -> a)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REGISTRY_FILE = Path(__file__).resolve().parent / "features.yaml"
LIFETIME = "lifetime"

# aggregation -> value type written to Redis
TYPES = {
    "count": "int", "sum": "money", "ratio": "ratio", "first_time": "time_ms", "last_time": "time_ms",
    "days_since": "int", "rfm": "label", "lifecycle": "label", "activity": "label",
    "at_least": "flag", "session": "text", "cart": "int", "argmax": "label", "touch": "text",
    "model": "score",
}
PART_TYPES = {
    ("session", "id"): "text", ("session", "pages"): "int", ("session", "started_at"): "time_ms",
    ("session", "duration_s"): "int", ("cart", "items"): "int", ("cart", "value"): "money",
    ("cart", "updated_at"): "time_ms", ("cart", "checkout_pending"): "flag",
    ("rfm", "r"): "label", ("rfm", "f"): "label", ("rfm", "m"): "label", ("rfm", "tier"): "label",
    ("touch", "first"): "text", ("touch", "last"): "text",
    ("model", "version"): "int",  # the model version that gave the score (models/training.py)
}
# How many features `of` must name, per aggregation (None: any number >= 1).
OF_ARITY = {"ratio": 2, "days_since": None, "rfm": 3, "lifecycle": 3, "activity": 2,
            "at_least": 1, "argmax": None}
MODELS = ("purchase_propensity", "ctr", "churn_risk")  # declared in config/models.yaml
DEFAULT_PARAMS = {
    "session_gap_min": 30, "interactions_highly_active": 3, "new_user_days": 7, "growth_days": 30,
    "decline_ratio": 0.5, "rfm_recency_days": 30, "rfm_frequency_orders": 2, "rfm_monetary": 1000,
    "high_net_worth_spend_30d": 5000, "min_denominator": 1,
}


class RegistryError(Exception):
    """The registry is invalid; the message names each bad entry."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")
    aggregation: Literal["count", "sum", "ratio", "first_time", "last_time", "days_since", "rfm",
                         "lifecycle", "activity", "at_least", "session", "cart", "argmax",
                         "touch", "model"]
    type: str | None = None
    events: list[str] = []
    exclude: list[str] = []
    windows: list[str] = []
    property: str | None = None
    of: list[str] = []
    part: str | None = None
    param: str | None = None
    labels: list[str] = []
    model: str | None = None
    description: str = Field(min_length=1)
    version: int = Field(1, ge=1)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry_version: int = Field(1, ge=1)
    windows: dict[str, int] = {}
    params: dict[str, float] = {}
    features: list[_Entry] = Field(min_length=1)


@dataclass(frozen=True)
class Feature:
    name: str
    type: str  # int | money | ratio | time_ms | label | flag | text | score
    aggregation: str
    description: str
    version: int = 1
    events: tuple[str, ...] = ()  # ("*",) = every event name
    exclude: tuple[str, ...] = ()
    window: str | None = None  # "7d", "lifetime", or None for unwindowed features
    window_min: int | None = None  # None for lifetime / unwindowed
    prop: str | None = None  # the `property` summed
    of: tuple[str, ...] = ()
    part: str | None = None
    param: str | None = None
    labels: tuple[str, ...] = ()
    model: str | None = None

    @property
    def sparse(self) -> bool:
        """Counts and sums are not stored while 0 (most users have most counts at 0)."""
        return self.aggregation in ("count", "sum")

    def matches(self, event_name: str) -> bool:
        if event_name in self.exclude:
            return False
        return "*" in self.events or event_name in self.events

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v not in (None, ())}
        if "prop" in out:
            out["property"] = out.pop("prop")
        return out


@dataclass(frozen=True)
class Registry:
    version: int
    windows: dict[str, int]
    params: dict[str, float]
    features: tuple[Feature, ...]
    by_name: dict[str, Feature] = field(default_factory=dict, compare=False)

    def feature(self, name: str) -> Feature:
        return self.by_name[name]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_dict(self) -> dict[str, Any]:
        return {"registry_version": self.version, "windows": self.windows, "params": self.params,
                "features": [f.to_dict() for f in self.features]}


def parse_document(schema: type[BaseModel], path: str | Path | None, default: Path,
                   doc: dict | None, error: type[Exception], what: str):
    """A YAML document (``doc``, else the file at ``path``, else ``default``) validated by
    ``schema``; an unreadable file or every schema problem raises one ``error`` naming them."""
    if doc is None:
        file = Path(path) if path is not None else default
        try:
            doc = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise error(f"cannot read {what} {file}: {exc}") from None
    try:
        return schema.model_validate(doc)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise error(f"invalid {what}:\n" + "\n".join(lines)) from None


def load_registry(path: str | Path | None = None, doc: dict | None = None) -> Registry:
    """Read, expand and validate a registry (default: ``config/features.yaml``)."""
    parsed = parse_document(_Doc, path, REGISTRY_FILE, doc, RegistryError, "feature registry")
    errors: list[str] = []
    params = {**DEFAULT_PARAMS, **parsed.params}
    for name, minutes in parsed.windows.items():
        if minutes < 1 or name == LIFETIME:
            errors.append(f"windows.{name}: a window is a name other than 'lifetime' and >= 1 minute")
    features: list[Feature] = []
    for e in parsed.features:
        features.extend(_expand(e, parsed.windows, params, errors))
    by_name: dict[str, Feature] = {}
    for f in features:
        if f.name in by_name:
            errors.append(f"{f.name}: declared twice")
        by_name[f.name] = f
    for f in features:
        for ref in f.of:
            if ref not in by_name:
                errors.append(f"{f.name}: refers to unknown feature {ref!r}")
    errors.extend(_cycles(by_name))
    if errors:
        raise RegistryError("invalid feature registry:\n" + "\n".join(f"  {e}" for e in errors))
    return Registry(parsed.registry_version, dict(parsed.windows), params, tuple(features), by_name)


def _cycles(by_name: dict[str, Feature]) -> list[str]:
    """Derived features (``of``) that depend on themselves, one message per cycle found."""
    errors, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            errors.append(f"{name}: derived from itself ({' -> '.join(cycle)})")
            return
        if name in done or name not in by_name:
            return
        for ref in by_name[name].of:
            visit(ref, path + [name])
        done.add(name)

    for name in by_name:
        visit(name, [])
    return errors


def _expand(e: _Entry, windows: dict[str, int], params: dict, errors: list[str]) -> list[Feature]:
    agg = e.aggregation
    where = e.name
    start = len(errors)
    kind = PART_TYPES.get((agg, e.part), TYPES[agg])
    if e.type is not None and e.type != kind:
        errors.append(f"{where}: type {e.type!r} does not match aggregation {agg} ({kind})")
    if agg in ("count", "sum", "first_time", "last_time") and not e.events:
        errors.append(f"{where}: {agg} needs `events`")
    if agg in ("count", "sum") and not e.windows:
        errors.append(f"{where}: {agg} needs `windows`")
    if agg not in ("count", "sum") and e.windows:
        errors.append(f"{where}: only count and sum take `windows`")
    if agg == "sum" and not e.property:
        errors.append(f"{where}: sum needs `property`")
    if agg in OF_ARITY:
        arity = OF_ARITY[agg]
        if (arity is None and not e.of) or (arity is not None and len(e.of) != arity):
            errors.append(f"{where}: {agg} needs {arity or 'one or more'} features in `of`")
    elif e.of:
        errors.append(f"{where}: {agg} takes no `of`")
    if agg in ("session", "cart", "rfm", "touch") and (agg, e.part) not in PART_TYPES:
        parts = sorted(p for a, p in PART_TYPES if a == agg)
        errors.append(f"{where}: {agg} needs `part`, one of {parts}")
    if agg == "at_least" and e.param not in params:
        errors.append(f"{where}: at_least needs `param`, one of the declared params")
    if agg == "argmax" and len(e.labels) != len(e.of):
        errors.append(f"{where}: argmax needs one label per feature in `of`")
    if agg == "model" and e.model not in MODELS:
        errors.append(f"{where}: model must be one of {list(MODELS)}")
    if agg == "model" and e.part not in (None, "version"):
        errors.append(f"{where}: a model feature's `part` is 'version' or none (the score)")
    for w in e.windows:
        if w != LIFETIME and w not in windows:
            errors.append(f"{where}: unknown window {w!r} (declared: {', '.join(windows) or 'none'})")
    if len(errors) > start:
        return []
    common = dict(type=kind, aggregation=agg, description=e.description, version=e.version,
                  events=tuple(e.events), exclude=tuple(e.exclude), prop=e.property,
                  of=tuple(e.of), part=e.part, param=e.param, labels=tuple(e.labels), model=e.model)
    if not e.windows:
        return [Feature(name=e.name, **common)]
    return [Feature(name=f"{e.name}_{w}", window=w,
                    window_min=None if w == LIFETIME else windows[w], **common) for w in e.windows]
