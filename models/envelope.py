"""A model's snapshot in one versioned envelope: what a restore needs to continue exactly (the
River pipeline with its optimiser, the metrics and drift detector, the labels not learned yet,
the marks and the last versions), with what it was made under, so that a snapshot that no
longer fits is refused with a clear reason and the model starts fresh instead of scoring
nonsense.

>>> from models.spec import load_models
>>> from models.training import Training
>>> spec = load_models()["ctr"]
>>> blob = pack(spec, Training("ctr", shards=4, period_ms=3_600_000))
>>> restored, why = unpack(blob, spec)
>>> (type(restored).__name__, restored.shards, why)
('Training', 4, None)
>>> other = load_models()["purchase_propensity"]
>>> unpack(blob, other)[1]
"the snapshot is of model 'ctr', not 'purchase_propensity'"
"""
from __future__ import annotations

import pickle

import river

from models.spec import ModelSpec
from models.training import Training

FORMAT = 1


def _river_line(version: str) -> str:
    """Major.minor: a patch release keeps the pickled state's meaning."""
    return ".".join(version.split(".")[:2])


def pack(spec: ModelSpec, training: Training) -> bytes:
    return pickle.dumps({
        "format": FORMAT,
        "model": spec.name,
        "river": river.__version__,
        "schema": spec.schema_hash,
        "inputs": list(spec.input_names),
        "training": training,
    }, protocol=pickle.HIGHEST_PROTOCOL)


def model_of(blob: bytes) -> str | None:
    """The model a snapshot is of (None when it cannot be read)."""
    try:
        doc = pickle.loads(blob)
    except Exception:  # noqa: BLE001 - unpack says why
        return None
    return doc.get("model") if isinstance(doc, dict) else None


def unpack(blob: bytes, spec: ModelSpec) -> tuple[Training | None, str | None]:
    """(the restored state, None), or (None, why it was refused)."""
    try:
        doc = pickle.loads(blob)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign snapshot is refused, not fatal
        return None, f"the snapshot cannot be read ({type(exc).__name__}: {exc})"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        return None, f"the snapshot's format is {got!r}, this version reads {FORMAT}"
    if doc["model"] != spec.name:
        return None, f"the snapshot is of model {doc['model']!r}, not {spec.name!r}"
    if _river_line(doc["river"]) != _river_line(river.__version__):
        return None, (f"the snapshot was made with River {doc['river']}, this is River "
                      f"{river.__version__}: its pickled state may not mean the same")
    if doc["schema"] != spec.schema_hash:
        old, new = doc["inputs"], list(spec.input_names)
        gone = [n for n in old if n not in new]
        added = [n for n in new if n not in old]
        detail = "; ".join(filter(None, [f"inputs removed: {gone}" if gone else "",
                                         f"inputs added: {added}" if added else ""]))
        return None, ("the model's inputs changed since the snapshot"
                      + (f" ({detail})" if detail else " (their defaults or order)"))
    return doc["training"], None
