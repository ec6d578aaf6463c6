"""Pseudonymous references to a person: what the ledgers, audits and alerts keep instead of ids.

A subject hash is HMAC-SHA256 of the id under the PII key (``SURGEFLOW_PII_KEY``), 128 bits in
hex: the same id always gives the same reference, so an erasure can find every record of a
person, while nobody without the key can turn a reference back into an id (ids are short and
guessable: a plain hash would be reversed by trying them all). Without a key a fixed, public key
is used and the start-up warns (:func:`pii_key`): the references still join, but protect less.

>>> subject_hash("u00042", b"k") == subject_hash("u00042", b"k") != subject_hash("u00043", b"k")
True
>>> subject_hash("u00042", b"k").startswith("s:"), len(subject_hash("u00042", b"k"))
(True, 34)
>>> subject_hash("u1", b"k") != subject_hash("u1", b"other key")
True
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

UNKEYED = b"surgeflow-unkeyed-subjects"  # public: references made with it only join records
DEFAULT_KEY_ENV = "SURGEFLOW_PII_KEY"


def pii_key(env: Mapping[str, str] | None = None, name: str = DEFAULT_KEY_ENV) -> bytes | None:
    """The PII key from the environment, or None when it is not set."""
    value = (os.environ if env is None else env).get(name)
    return value.encode() if value else None


def subject_hash(value: str, key: bytes | None) -> str:
    return "s:" + hmac.new(key or UNKEYED, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
