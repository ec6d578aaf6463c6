"""The Redis layout of per-user features, versioned: one hash per user.

Key: ``<prefix>:v1:user:<user id>``; the user id is the rest of the key, verbatim, so two ids can
never share a key whatever characters they hold (``:``, ``*``, spaces). The flow never builds a
key pattern from user input (no KEYS / SCAN MATCH on ids), so ids cannot address other keys.

>>> user_key("sf", "u1")
'sf:v1:user:u1'
>>> user_key("sf", "a:b*") != user_key("sf", "a") and user_key("sf", "a:b*").endswith(":user:a:b*")
True
"""
from __future__ import annotations

LAYOUT_VERSION = "v1"


def user_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:{LAYOUT_VERSION}:user:{user_id}"


def user_key_pattern(prefix: str) -> str:
    """Pattern of all user hashes (for operators counting them; never built from an id)."""
    return f"{prefix}:{LAYOUT_VERSION}:user:*"


# Fields read as floats and as epoch-ms integers; window counts are typed by their suffix.
FLOAT_FIELDS = frozenset({"p_purchase_24h"})
TIME_FIELDS = frozenset({"last_seen", "as_of", "updated_at"})
