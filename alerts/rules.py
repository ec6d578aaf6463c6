"""The alert rule catalogue: rules declared as data (``config/alert_rules.yaml``), validated at
load, re-tunable without code changes.

A rule names a metric series (:mod:`alerts.metrics`) and how it is split (``by``), how it is
judged (a ``detector`` with its parameters, or a static ``threshold``), how long a breach must
last (``for``), when it resolves and stays quiet (``resolve_after``, ``cooldown``), how often a
firing alert is updated, its severity (I minor .. IV major) and the suggested response.

>>> catalogue = load_rules()
>>> sorted({r.area for r in catalogue.rules})
['ads', 'fraud', 'market', 'ops', 'security']
>>> flood = catalogue.rule("ip_request_flood")
>>> flood.metric, flood.window, flood.threshold.above, flood.severity
('requests_per_ip', '1s', 100.0, 'III')
>>> try:
...     RuleCatalogue.model_validate({"rules": [{"name": "x", "area": "ops", "metric": "events",
...         "by": "page", "severity": "II", "response": "look", "threshold": {"above": 1}}]})
... except ValueError as exc:
...     print(exc.errors()[0]["msg"])
Value error, metric 'events' cannot be split by 'page' (only all, channel, campaign)
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alerts import detectors
from alerts.adaptive import AdaptiveGaussian
from alerts.ensemble import AdaptiveEnsemble
from alerts.lifecycle import Lifecycle, Verdict
from alerts.metrics import ENTITY_METRICS, MINUTE_METRICS, RATIOS

RULES_FILE = Path(__file__).resolve().parent.parent / "config" / "alert_rules.yaml"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

# detector kind -> class (alerts.detectors); parameters are the class's keyword arguments
DETECTORS: dict[str, type] = {
    "windowed_gaussian": detectors.WindowedGaussian,
    "ew_gaussian": detectors.EWGaussian,
    "robust_gaussian": detectors.RobustGaussian,
    "seasonal_gaussian": detectors.SeasonalGaussian,
    "binomial_ratio": detectors.BinomialRatio,
    "adaptive_gaussian": AdaptiveGaussian,  # the NAB-tuned combination (alerts/adaptive.py)
    # the default of issue 17: AdaptiveGaussian beside a CUSUM for lasting shifts, the rarer
    # speaks (alerts/ensemble.py); the alert's baseline says which ("shift from time of day")
    "adaptive_ensemble": AdaptiveEnsemble,
}


def duration_ms(text: str) -> int:
    """``"15m"`` -> 900000.

    >>> duration_ms("1s"), duration_ms("24h"), duration_ms("0s")
    (1000, 86400000, 0)
    """
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration such as 500ms, 30s, 15m, 24h or 1d")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DetectorSpec(_Strict):
    kind: Literal["windowed_gaussian", "ew_gaussian", "robust_gaussian", "seasonal_gaussian",
                  "binomial_ratio", "adaptive_gaussian", "adaptive_ensemble"]
    params: dict[str, Any] = {}

    @model_validator(mode="after")
    def _builds(self) -> "DetectorSpec":
        try:
            self.factory()()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"detector {self.kind}: {exc}") from None
        return self

    def factory(self):
        """A picklable zero-argument constructor (detectors live in flow snapshots)."""
        return functools.partial(DETECTORS[self.kind], **self.params)


class ThresholdSpec(_Strict):
    """A static threshold: breach above ``above`` or below ``below``, judged only with at least
    ``min_n`` samples behind the value (ratios)."""

    above: float | None = None
    below: float | None = None
    min_n: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_side(self) -> "ThresholdSpec":
        if (self.above is None) == (self.below is None):
            raise ValueError("a threshold needs exactly one of above / below")
        return self

    def verdict(self, value: float, n: float | None) -> Verdict:
        """The value against the limit (mu is the limit; sigma and z do not apply: NaN).

        >>> ThresholdSpec(above=100).verdict(150, None).breach
        True
        >>> ThresholdSpec(below=0.01, min_n=100).verdict(0.0, 20).breach  # too few clicks
        False
        """
        limit = self.above if self.above is not None else self.below
        enough = n is None or n >= self.min_n
        if self.above is not None:
            breach = enough and value > limit
            score = value / (value + limit) if value > 0 and limit > 0 else float(breach)
        else:
            breach = enough and value < limit
            score = limit / (value + limit) if limit > 0 and value >= 0 else float(breach)
        return Verdict(value, limit, math.nan, math.nan, math.nan, breach,
                       min(max(score, 0.0), 1.0) if enough else 0.0, n,
                       baseline="static threshold")


class RuleSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    area: Literal["market", "ads", "ops", "security", "fraud"]
    metric: str
    by: str = "all"
    window: str = "1m"  # what one value covers: a minute, a sliding hour ("60m"), a second...
    detector: DetectorSpec | None = None
    threshold: ThresholdSpec | None = None
    for_: str = Field("0s", alias="for")  # the breach must last this long before firing
    resolve_after: str = "0s"  # without a breach this long: resolved
    cooldown: str = "30m"  # after a resolve, no new alert on the series for this long
    update_every: str = "15m"  # while firing, an update this often ("0s": none)
    learn_breaches: bool = False  # breaching values join the baseline at once
    # a breach lasting this long is the new normal: its values join the baseline again, so a
    # lasting level shift resolves once the baseline has caught up ("0s": never)
    adapt_after: str = "2h"
    severity: Literal["I", "II", "III", "IV"]
    response: str
    description: str = ""
    enabled: bool = True

    @field_validator("window", "for_", "resolve_after", "cooldown", "update_every", "adapt_after")
    @classmethod
    def _duration(cls, value: str) -> str:
        duration_ms(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "RuleSpec":
        if (self.detector is None) == (self.threshold is None):
            raise ValueError("a rule needs exactly one of detector / threshold")
        if self.metric in MINUTE_METRICS:
            splits = MINUTE_METRICS[self.metric]
            if self.by not in splits:
                raise ValueError(f"metric {self.metric!r} cannot be split by {self.by!r} "
                                 f"(only {', '.join(splits)})")
            w = duration_ms(self.window)
            if w % 60_000 or w == 0:
                raise ValueError(f"a minute metric's window is whole minutes, not {self.window}")
            if self.metric not in RATIOS and w != 60_000:
                raise ValueError(f"metric {self.metric!r} is per minute: window must be 1m")
        elif self.metric in ENTITY_METRICS:
            entity = ENTITY_METRICS[self.metric].entity
            if self.by != entity:
                raise ValueError(f"metric {self.metric!r} is counted per {entity}: by must be {entity!r}")
            if self.threshold is None:
                raise ValueError("entity metrics (counts per IP or user) use a static threshold")
            if duration_ms(self.window) < 1000:
                raise ValueError(f"an entity metric's window is at least 1s, not {self.window}")
        else:
            known = sorted([*MINUTE_METRICS, *ENTITY_METRICS])
            raise ValueError(f"unknown metric {self.metric!r} (known: {', '.join(known)})")
        return self

    @property
    def window_ms(self) -> int:
        return duration_ms(self.window)

    @property
    def adapt_after_ms(self) -> int:
        return duration_ms(self.adapt_after)

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.name, severity=self.severity, response=self.response, area=self.area,
                         window=self.window, for_ms=duration_ms(self.for_),
                         resolve_ms=duration_ms(self.resolve_after),
                         cooldown_ms=duration_ms(self.cooldown),
                         update_ms=duration_ms(self.update_every))


class RuleCatalogue(_Strict):
    rules: list[RuleSpec]

    @model_validator(mode="after")
    def _unique(self) -> "RuleCatalogue":
        names = [r.name for r in self.rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rule names must be unique: {', '.join(twice)}")
        return self

    def rule(self, name: str) -> RuleSpec:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def minute_rules(self) -> list[RuleSpec]:
        return [r for r in self.rules if r.enabled and r.metric in MINUTE_METRICS]

    @property
    def entity_rules(self) -> list[RuleSpec]:
        return [r for r in self.rules if r.enabled and r.metric in ENTITY_METRICS]


def load_rules(path: str | Path | None = None) -> RuleCatalogue:
    """The catalogue from YAML (default: the shipped ``config/alert_rules.yaml``). Raises
    ``ValueError`` naming the file and each bad rule."""
    from pydantic import ValidationError

    path = Path(path) if path is not None else RULES_FILE
    doc = yaml.safe_load(path.read_text()) or {}
    try:
        return RuleCatalogue.model_validate(doc)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ValueError(f"invalid alert rules in {path}:\n" + "\n".join(lines)) from None
