"""The Redis layout of per-user features, versioned (``v2``).

- ``<prefix>:v2:user:<user id>``: the hash of a known user (an id from ``user_id``);
- ``<prefix>:v2:anon:<anonymous id>``: the hash of an anonymous visitor (``anonymous_id`` only);
- ``<prefix>:v2:alias:<anonymous id>``: string, the user the visitor's profile was merged into;
- ``<prefix>:v2:registry``: string, JSON of ``Registry.to_dict()`` written by the flow;
- ``<prefix>:v2:erased``: hash, subject hash -> erasure time (epoch ms): who was erased, without
  their id, so a replay or a restart does not bring them back (privacy/erasure.py);
- ``<prefix>:v2:erasure:<request id>``: string, JSON receipt of an erasure request (no id).

Known users and anonymous visitors live in separate namespaces: events are not authenticated,
so an anonymous id that happens to equal a user id (or is chosen to) must never read, overwrite
or delete that user's hash. The id is the rest of the key, verbatim, so two ids can never share a
key whatever characters they hold (``:``, ``*``, spaces). Nothing builds a key pattern from an id
(no KEYS / SCAN MATCH on ids), so an id cannot address other keys.

Migration from ``v1`` (one ``user:`` namespace for both kinds of ids). A v1 hash cannot be told
to belong to a user or a visitor, and v1 aliases may have been forged (see SECURITY in the
README), so nothing is copied: the v2 flow rebuilds every profile from the stream (replay the
events topic from the start of its retention with an empty recovery store), readers read v2 only,
and the old keys expire with their time to live (``redis.ttl_days``), or are deleted at once
(``redis-cli --scan --pattern '<prefix>:v1:*' | xargs redis-cli unlink``).

>>> user_key("sf", "u1"), anon_key("sf", "u1")
('sf:v2:user:u1', 'sf:v2:anon:u1')
>>> user_key("sf", "a:b*") != user_key("sf", "a") and user_key("sf", "a:b*").endswith(":user:a:b*")
True
>>> alias_key("sf", "anon-7"), registry_key("sf"), erased_key("sf")
('sf:v2:alias:anon-7', 'sf:v2:registry', 'sf:v2:erased')
"""
from __future__ import annotations

LAYOUT_VERSION = "v2"
MAX_ID_CHARS = 128  # the flow rejects longer ids (flows/events.py)


def user_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:{LAYOUT_VERSION}:user:{user_id}"


def anon_key(prefix: str, anon_id: str) -> str:
    """Key of an anonymous visitor's own hash (before, or without, a login)."""
    return f"{prefix}:{LAYOUT_VERSION}:anon:{anon_id}"


def profile_key(prefix: str, ident: str, anonymous: bool) -> str:
    return anon_key(prefix, ident) if anonymous else user_key(prefix, ident)


def alias_key(prefix: str, anon_id: str) -> str:
    """Key of the string naming the user an anonymous profile was merged into."""
    return f"{prefix}:{LAYOUT_VERSION}:alias:{anon_id}"


def registry_key(prefix: str) -> str:
    """Key of the JSON registry the flow writes at start-up."""
    return f"{prefix}:{LAYOUT_VERSION}:registry"


def erased_key(prefix: str) -> str:
    """Key of the erasure ledger (subject hash -> erasure time in epoch ms)."""
    return f"{prefix}:{LAYOUT_VERSION}:erased"


def receipt_key(prefix: str, request_id: str) -> str:
    """Key of an erasure request's receipt (status and counts, no id)."""
    return f"{prefix}:{LAYOUT_VERSION}:erasure:{request_id}"


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
