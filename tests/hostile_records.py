"""Hostile records for the fuzz tests: valid events mutated in depth, size, types, unicode,
numbers and timestamps, plus raw byte damage. Seeded and fast (about 100,000 records a second),
so the CI test and bench/bench_fuzz.py draw from the same generator at different sizes.

Whatever the flow does with a mutated record, it must either accept it (the event is stored) or
dead-letter its exact bytes with a reason. Nothing here decides which: that is the flow's call,
and the tests check it kept its word. Only the valid ones are known good.
"""
from __future__ import annotations

import json
import random
from typing import Iterator

TS = 1_795_392_000_000  # 2026-11-23T00:00Z
NAMES = ["page_view", "product_viewed", "add_to_cart", "order_completed", "login", "ad_click",
         "search", "push_opened", "signup", "coupon_redeemed"]
CHANNELS = ["app", "web", "push", "sms", "email", "ad", "store", "mini_program"]
WEIRD_STRINGS = ["", " ", "\x00", "\u202e\u202d", "\ud7ff", "\U0001f4a9" * 40, "' OR 1=1 --",
                 "sf:v2:user:*", "a" * 5000, "é" * 129, "\n\r\t", "{}", "null", "NaN", "-0",
                 "\u0000\u0001\u001f", "\ufeff", "x" * 128, "..", "%s%n", "<script>"]
WEIRD_NUMBERS = [0, -0.0, 1e308, -1e308, 2**63, -2**63 - 1, 2**64, 10**30, 1e-320, 5e-324, 3.14,
                 -1, 999_999_999.99, 1e9 + 1, 12345678901234567890123, 0.1 + 0.2]
WEIRD_TIMESTAMPS = [0, -1, 1e300, 2**63, "2026-11-23T00:00:00Z", "2026-11-23", "2026-13-45T99:99Z",
                    "yesterday", "", "1795392000000", True, None, [], {}, 946_684_799_999,
                    4_102_444_800_000, "9999-12-31T23:59:59Z", "2026-11-23T00:00:00+14:00",
                    "2026-11-23T00:00:00.123456789Z", 1.795392e12]


def valid_event(rng: random.Random, i: int, base_ms: int = TS) -> dict:
    user = f"u{rng.randrange(5000):05d}"
    doc = {
        "event_id": f"fz-{i}",
        "type": "track",
        "event": rng.choice(NAMES),
        "user_id": user if rng.random() < 0.7 else None,
        "anonymous_id": f"anon-{rng.randrange(20000)}",
        "timestamp": base_ms + i * 37 + rng.randrange(3000),
        "properties": {"price": round(rng.uniform(1, 500), 2), "quantity": rng.randrange(1, 5),
                       "campaign_id": f"c{rng.randrange(8)}", "page": f"/p/{rng.randrange(50)}"},
        "context": {"channel": rng.choice(CHANNELS), "ip": f"198.51.100.{rng.randrange(256)}",
                    "geo": {"country": rng.choice(["CN", "US", "DE"])}},
    }
    if doc["event"] == "order_completed":
        doc["properties"]["revenue"] = round(rng.uniform(5, 900), 2)
    if doc["user_id"] is None:
        del doc["user_id"]
    return doc


def _nest(depth: int, leaf) -> object:
    for _ in range(depth):
        leaf = {"a": leaf} if depth % 2 else [leaf]
    return leaf


def _weird_value(rng: random.Random):
    pick = rng.randrange(7)
    if pick == 0:
        return rng.choice(WEIRD_STRINGS)
    if pick == 1:
        return rng.choice(WEIRD_NUMBERS)
    if pick == 2:
        return _nest(rng.choice([3, 15, 16, 17, 40, 300]), rng.choice(WEIRD_STRINGS))
    if pick == 3:
        return [rng.choice(WEIRD_NUMBERS) for _ in range(rng.choice([1, 10, 600]))]
    if pick == 4:
        return {f"k{j}": j for j in range(rng.choice([1, 50, 513, 2000]))}
    if pick == 5:
        return rng.choice([True, False, None])
    value = rng.choice(WEIRD_TIMESTAMPS)
    # a fresh [] or {}: a shared one would be mutated by later records until it held itself
    return type(value)() if isinstance(value, (list, dict)) else value


FIELDS = [("event_id",), ("type",), ("event",), ("user_id",), ("anonymous_id",), ("timestamp",),
          ("properties",), ("context",), ("properties", "price"), ("properties", "revenue"),
          ("properties", "quantity"), ("properties", "campaign_id"), ("properties", "page"),
          ("properties", "cost"), ("properties", "creative_id"), ("properties", "email"),
          ("context", "channel"), ("context", "ip"), ("context", "geo"), ("context", "consent"),
          ("context", "campaign"), ("context", "geo", "country"), ("properties", "new")]


def _mutate_doc(rng: random.Random, doc: dict) -> dict:
    for _ in range(rng.choice([1, 1, 2, 3])):
        path = rng.choice(FIELDS)
        target = doc
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        if rng.random() < 0.1:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = _weird_value(rng)
    return doc


def _damage(rng: random.Random, raw: bytes) -> bytes:
    pick = rng.randrange(6)
    if pick == 0:
        return raw[: rng.randrange(len(raw))]  # truncated
    if pick == 1:
        # flipped bytes (often not UTF-8), in the event id: a flipped digit of a timestamp would
        # make a valid event from the future, which may legitimately make real ones late
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(min(len(b), 24))] = rng.randrange(256)
        return bytes(b)
    if pick == 2:
        return raw + b" " * rng.choice([10, 32_800])  # padding up to oversized
    if pick == 3:
        return rng.choice([b"", b"null", b"[]", b"[1,2]", b'"text"', b"{}", b"\xff\xfe", b"{" * 5000,
                           b"1e999", b'{"event_id": 1e999}'])
    if pick == 4:
        return raw.replace(b"{", b"{\"event_id\":\"dup\",", 1)  # a duplicate key
    return raw.replace(b'"', b"'", 2)


def hostile_records(n: int, seed: int = 0, valid_share: float = 0.3, base_ms: int = TS
                    ) -> Iterator[tuple[str, bytes, dict | None]]:
    """(kind, record bytes, the valid document or None) for n records: a valid_share of them
    are left "valid", the others "mutated" as documents (two in three) or "damaged" as bytes."""
    rng = random.Random(seed)
    for i in range(n):
        doc = valid_event(rng, i, base_ms)
        roll = rng.random()
        if roll < valid_share:
            yield "valid", json.dumps(doc).encode(), doc
        elif roll < valid_share + (1 - valid_share) * 2 / 3:
            yield "mutated", json.dumps(_mutate_doc(rng, doc), ensure_ascii=rng.random() < 0.5
                                        ).encode("utf-8", "surrogatepass"), None
        else:
            yield "damaged", _damage(rng, json.dumps(doc).encode()), None
