"""The Redis layout of per-user features, versioned.

- ``<prefix>:v1:user:<id>``: one sparse hash per profile (registry features, ``as_of``,
  ``updated_at``);
- ``<prefix>:v1:alias:<anonymous id>``: string, the user id the anonymous profile was merged into;
- ``<prefix>:v1:registry``: string, JSON of ``Registry.to_dict()`` written by the flow.

The id is the rest of the key, verbatim, so two ids can never share a key whatever characters
they hold (``:``, ``*``, spaces). Nothing builds a key pattern from an id (no KEYS / SCAN MATCH
on ids), so an id cannot address other keys.

>>> user_key("sf", "u1")
'sf:v1:user:u1'
>>> user_key("sf", "a:b*") != user_key("sf", "a") and user_key("sf", "a:b*").endswith(":user:a:b*")
True
>>> alias_key("sf", "anon-7"), registry_key("sf")
('sf:v1:alias:anon-7', 'sf:v1:registry')
"""
from __future__ import annotations

LAYOUT_VERSION = "v1"
MAX_ID_CHARS = 128  # the flow rejects longer ids (flows/events.py)


def user_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:{LAYOUT_VERSION}:user:{user_id}"


def alias_key(prefix: str, anon_id: str) -> str:
    """Key of the string naming the user an anonymous profile was merged into."""
    return f"{prefix}:{LAYOUT_VERSION}:alias:{anon_id}"


def registry_key(prefix: str) -> str:
    """Key of the JSON registry the flow writes at start-up."""
    return f"{prefix}:{LAYOUT_VERSION}:registry"


def user_key_pattern(prefix: str) -> str:
    """Pattern of all user hashes (for operators counting them; never built from an id)."""
    return f"{prefix}:{LAYOUT_VERSION}:user:*"


def is_valid_id(user_id: object) -> bool:
    """Could the flow have stored this id? (non-empty str, <= 128 chars, printable). Readers
    answer "unknown" for anything else without asking Redis.

    >>> is_valid_id("a:b* c"), is_valid_id(""), is_valid_id("a\\nb"), is_valid_id("x" * 129)
    (True, False, False, False)
    """
    return isinstance(user_id, str) and 0 < len(user_id) <= MAX_ID_CHARS and user_id.isprintable()
