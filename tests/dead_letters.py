"""The exact bytes of a dead letter, unsealed with the tests' key (tests/conftest.py)."""
from __future__ import annotations

import os

from privacy.pii import unseal


def raw_of(dead_letter: dict) -> bytes:
    return unseal(dead_letter["raw_sealed"], os.environ["SURGEFLOW_DEAD_LETTER_KEY"].encode())
