"""Rows of the raw events table (``events_raw``): what is kept of an event for drill-down.

Data minimisation (SPEC section 9): the IP address is masked (IPv4: last octet zeroed; IPv6: all
but the first 48 bits zeroed); e-mail addresses and phone numbers in the properties are replaced
by a keyed hash (HMAC-SHA256 with the secret ``SURGEFLOW_PII_KEY``), or dropped when no key is
configured, so they are never stored in clear; events of users who refused profiling keep no
user ids.

>>> mask_ip("203.0.113.77"), mask_ip("2001:db8:abcd:12::1"), mask_ip("not an ip")
('203.0.113.0', '2001:db8:abcd::', '')
>>> clean_properties({"email": "Ann@Example.com", "sku": "p1"}, key=b"k")
{'email': 'hmac:812b5e65283998e47b49528ef531aea6', 'sku': 'p1'}
>>> clean_properties({"phone": "+86 138 0000 0000", "note": "write to a@b.cn"}, key=None)
{'note': '[redacted]'}
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from typing import Any

import orjson

PII_KEYS = frozenset({"email", "e_mail", "mail", "phone", "phone_number", "mobile", "tel"})
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def mask_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def keyed_hash(value: str, key: bytes) -> str:
    """Normalised (trimmed, lower case) then HMAC-SHA256, 128 bits: joins without the clear text."""
    digest = hmac.new(key, value.strip().lower().encode(), hashlib.sha256).hexdigest()
    return "hmac:" + digest[:32]


def clean_properties(props: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in props.items():
        if name.lower() in PII_KEYS:
            if key is not None and isinstance(value, str):
                out[name] = keyed_hash(value, key)
        elif isinstance(value, str) and _EMAIL.search(value):
            out[name] = "[redacted]"
        else:
            out[name] = value
    return out


def raw_row(e, key: bytes | None) -> tuple:
    """(event_time ms, event_id, type, event_name, user_id, anonymous_id, channel, campaign,
    creative, revenue, cost, ip_masked, country, properties JSON); event_time is converted by the
    sink."""
    consent = e.consent is not False
    user = e.user if e.identified and consent else ""
    anon = e.anon if consent else ""
    if not e.identified and consent:
        anon = e.anon or e.user
    return (e.ts_ms, e.event_id, e.type, e.name, user, anon, e.channel, e.campaign, e.creative,
            e.revenue, e.cost, mask_ip(e.ip) if e.ip else "", e.country,
            orjson.dumps(clean_properties(e.properties, key)).decode() if e.properties else "{}")
