"""Rows of the raw events table (``events_raw``): what is kept of an event for drill-down.

Data minimisation (SPEC section 9, rules in :mod:`privacy.pii`): the IP address is masked (IPv4:
last octet zeroed; IPv6: all but the first 48 bits zeroed); e-mail addresses and phone numbers in
the properties, under a key naming them at any depth or anywhere in text, are replaced by a keyed
hash (HMAC-SHA256 with the secret ``SURGEFLOW_PII_KEY``), or dropped when no key is configured,
so they are never stored in clear; IPs in the properties are masked too; events of users who
refused profiling keep no user ids.

>>> mask_ip("203.0.113.77"), mask_ip("2001:db8:abcd:12::1"), mask_ip("not an ip")
('203.0.113.0', '2001:db8:abcd::', '')
>>> clean_properties({"email": "Ann@Example.com", "sku": "p1"}, key=b"k")
{'email': 'hmac:812b5e65283998e47b49528ef531aea6', 'sku': 'p1'}
>>> clean_properties({"buyer": {"contact": {"phone_number": "+86 138 0000 0000"}},
...                   "note": "write to a@b.cn or call (555) 123-4567"}, key=None)
{'buyer': {'contact': {}}, 'note': 'write to [email] or call [phone]'}
"""
from __future__ import annotations

from typing import Any

from privacy.pii import keyed_hash, mask_ip, scrub, scrub_json

__all__ = ["clean_properties", "keyed_hash", "mask_ip", "raw_row"]


def clean_properties(props: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """The properties without e-mails or phones in clear, IPs masked (a new dict)."""
    return scrub(props, key)


def raw_row(e, key: bytes | None) -> tuple:
    """(event_time ms, event_id, type, event_name, user_id, anonymous_id, channel, campaign,
    creative, revenue, cost, ip_masked, country, properties JSON); event_time is converted by the
    sink. The properties are clean_properties' as JSON (scrub_json: without a copy when
    nothing in them needs scrubbing)."""
    consent = e.consent is not False
    user = e.user if e.identified and consent else ""
    anon = e.anon if consent else ""
    if not e.identified and consent:
        anon = e.anon or e.user
    return (e.ts_ms, e.event_id, e.type, e.name, user, anon, e.channel, e.campaign, e.creative,
            e.revenue, e.cost, mask_ip(e.ip) if e.ip else "", e.country,
            scrub_json(e.properties, key).decode() if e.properties else "{}")
