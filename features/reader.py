"""Read a user's features from Redis, typed. Any Redis client can read the hash directly; this
is the convenience for Python services.

    reader = FeatureReader(redis.Redis.from_url(url), prefix="sf")
    reader.get("u00042")   # {'views_1h': 3, 'revenue_24h': 129.9, 'last_seen': 1795..., ...} or None
"""
from __future__ import annotations

from features.layout import FLOAT_FIELDS, TIME_FIELDS, user_key


def parse_value(field: str, raw: str):
    """Type of a stored field, from its name.

    >>> parse_value("views_1h", "3"), parse_value("revenue_24h", "12.50"), parse_value("session_id", "ab")
    (3, 12.5, 'ab')
    """
    if field in TIME_FIELDS or field == "session_pages":
        return int(raw)
    if field in FLOAT_FIELDS:
        return float(raw)
    if field.rsplit("_", 1)[-1][-1:] in ("h", "d", "m") and field.rsplit("_", 1)[-1][:-1].isdigit():
        number = float(raw)
        return int(number) if number == int(number) else number
    return raw


class FeatureReader:
    def __init__(self, client, prefix: str = "sf"):
        self.client = client
        self.prefix = prefix

    def get(self, user_id: str) -> dict | None:
        raw = self.client.hgetall(user_key(self.prefix, user_id))
        return self._typed(raw) if raw else None

    def get_many(self, user_ids: list[str]) -> dict[str, dict | None]:
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hgetall(user_key(self.prefix, user_id))
        return {u: (self._typed(r) if r else None) for u, r in zip(user_ids, pipe.execute())}

    @staticmethod
    def _typed(raw: dict) -> dict:
        out = {}
        for k, v in raw.items():
            k = k.decode() if isinstance(k, bytes) else k
            v = v.decode() if isinstance(v, bytes) else v
            out[k] = parse_value(k, v)
        return out
