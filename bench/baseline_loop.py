"""The baseline a user would write instead of surgeflow: a plain consumer loop, no Bytewax.

    .venv/bin/python -m bench.baseline_loop --bootstrap HOST:PORT --topic T --redis-url redis://...

A confluent-kafka consumer reads the topic from the beginning to its end in batches
(``consume(num_messages=batch_size)``), decodes each record with orjson and keeps per-user
sliding-window counts in a plain dict of minute buckets; after each batch it writes one Redis hash
per user touched (``HSET <prefix>:user:<id>``) through one redis-py pipeline. The features are a
subset of the registry's (config/features.yaml):

    views_1h / views_24h             page_view (or type "page"), product_viewed, screen
    add_to_cart_1h / add_to_cart_24h add_to_cart
    orders_1h / orders_24h           order_completed
    revenue_1h / revenue_24h         properties.revenue of order_completed, summed in cents
    as_of                            the latest event time of the user (epoch ms)

The window ``w`` as of a user's latest event minute M holds the minutes in ``(M - w, M]`` (as in
features/buckets.py); buckets older than 24 h are dropped. The user is user_id, else
anonymous_id. Records that are not JSON objects, have no user or no usable timestamp (outside
2000..2100 included) are skipped
(counted in ``skipped``). What it leaves out, as such a loop usually does: no de-duplication of
producer retries, no dead letters, no consent / PII handling, no recovery, no ClickHouse
aggregates, no triggers or alerts; it ends at the end of the topic (every assigned partition has
reported ``_PARTITION_EOF``).

``run_baseline`` returns {"events", "seconds" (wall), "cpu_s" (process CPU, librdkafka's threads
included), "events_per_s", "cpu_us_per_event", "users", "skipped", "batches"}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid

import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

__all__ = ["run_baseline", "main"]

MINUTE_MS = 60_000
WINDOWS = (("1h", 60), ("24h", 1440))  # minutes
LONGEST = 1440
MIN_TS_MS, MAX_TS_MS = 946_684_800_000, 4_102_444_800_000  # 2000..2100: beyond, a clock is broken
VIEWS = frozenset({"page_view", "product_viewed", "screen"})
# metric index in a bucket: views, add_to_cart, orders, revenue (cents)
METRIC = {name: 0 for name in VIEWS} | {"add_to_cart": 1, "order_completed": 2}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_EPOCH_NAIVE = dt.datetime(1970, 1, 1)
_MS = dt.timedelta(milliseconds=1)


def parse_ts(value) -> int:
    """Event time in epoch ms from epoch ms or ISO-8601 text (naive = UTC); ValueError else.

    >>> parse_ts(1795428000000), parse_ts("2026-11-23T10:00:00.250+01:00"), parse_ts("2026-11-23T09:00:00.250Z")
    (1795428000000, 1795424400250, 1795424400250)
    """
    t = type(value)
    if t is int or t is float:
        return int(value)
    if t is str:
        d = dt.datetime.fromisoformat(value)  # Python 3.11 reads "Z" and offsets
        return (d - (_EPOCH if d.tzinfo is not None else _EPOCH_NAIVE)) // _MS
    raise ValueError(f"timestamp of type {t.__name__}")


def _money(c: int) -> str:
    sign = "-" if c < 0 else ""
    c = abs(c)
    return f"{sign}{c // 100}.{c % 100:02d}"


def _features(as_of: int, buckets: dict) -> dict:
    """Window sums as of the user's latest minute; drops the buckets older than 24 h."""
    now = as_of // MINUTE_MS
    h1 = [0, 0, 0, 0]
    d1 = [0, 0, 0, 0]
    old = []
    for minute, vals in buckets.items():
        if minute <= now - LONGEST:
            old.append(minute)
            continue
        d1[0] += vals[0]; d1[1] += vals[1]; d1[2] += vals[2]; d1[3] += vals[3]
        if minute > now - 60:
            h1[0] += vals[0]; h1[1] += vals[1]; h1[2] += vals[2]; h1[3] += vals[3]
    for minute in old:
        del buckets[minute]
    return {
        "views_1h": h1[0], "views_24h": d1[0],
        "add_to_cart_1h": h1[1], "add_to_cart_24h": d1[1],
        "orders_1h": h1[2], "orders_24h": d1[2],
        "revenue_1h": _money(h1[3]), "revenue_24h": _money(d1[3]),
        "as_of": as_of,
    }


def run_baseline(bootstrap: str, topic: str, redis_url: str, *, batch_size: int = 1000,
                 prefix: str = "baseline", timeout_s: float = 1.0, idle_limit_s: float = 60.0) -> dict:
    """Reads ``topic`` from the beginning to its end; writes ``<prefix>:user:<id>`` hashes."""
    loads = orjson.loads
    state: dict[str, list] = {}  # user -> [as_of ms, {minute: [views, carts, orders, cents]}]
    events = skipped = batches = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"baseline-{uuid.uuid4().hex[:8]}",  # required; offsets are neither read nor committed
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    r = redis.Redis.from_url(redis_url)
    try:
        meta = consumer.list_topics(topic, timeout=10)
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise RuntimeError(f"topic {topic!r} not found on {bootstrap}")
        partitions = set(info.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
        at_eof: set[int] = set()
        idle_since = time.monotonic()
        while at_eof != partitions:
            msgs = consumer.consume(num_messages=batch_size, timeout=timeout_s)
            if not msgs:
                if time.monotonic() - idle_since > idle_limit_s:
                    raise TimeoutError(f"no end of topic after {idle_limit_s} s idle "
                                       f"(at EOF: {sorted(at_eof)} of {sorted(partitions)})")
                continue
            idle_since = time.monotonic()
            touched = set()
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_eof.add(msg.partition())
                        continue
                    raise KafkaException(err)
                at_eof.discard(msg.partition())
                events += 1
                try:
                    doc = loads(msg.value())
                    user = doc.get("user_id")
                    if user is None:
                        user = doc.get("anonymous_id")
                    if not isinstance(user, str) or not user:
                        raise ValueError("no user")
                    ts = parse_ts(doc.get("timestamp"))
                    if not MIN_TS_MS <= ts < MAX_TS_MS:
                        raise ValueError("absurd timestamp")
                    etype = doc.get("type", "track")
                    name = doc.get("event") if etype == "track" else ("page_view" if etype == "page" else etype)
                    metric = METRIC.get(name) if isinstance(name, str) else None
                    revenue = 0
                    if metric == 2:
                        props = doc.get("properties")
                        v = props.get("revenue") if isinstance(props, dict) else None
                        if (type(v) is int or type(v) is float) and v == v:
                            revenue = round(v * 100)
                except (ValueError, TypeError, AttributeError, OverflowError):  # JSONDecodeError is a ValueError
                    skipped += 1
                    continue
                st = state.get(user)
                if st is None:
                    st = state[user] = [ts, {}]
                elif ts > st[0]:
                    st[0] = ts
                touched.add(user)
                if metric is None:
                    continue
                minute = ts // MINUTE_MS
                if minute <= st[0] // MINUTE_MS - LONGEST:
                    continue  # older than every window already
                b = st[1].get(minute)
                if b is None:
                    b = st[1][minute] = [0, 0, 0, 0]
                b[metric] += 1
                b[3] += revenue
            if touched:
                pipe = r.pipeline(transaction=False)
                for user in touched:
                    st = state[user]
                    pipe.hset(f"{prefix}:user:{user}", mapping=_features(st[0], st[1]))
                pipe.execute()
                batches += 1
    finally:
        consumer.close()
        r.close()
    seconds = time.perf_counter() - wall0
    cpu_s = time.process_time() - cpu0
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "cpu_s": round(cpu_s, 3),
        "events_per_s": round(events / seconds, 1) if seconds else None,
        "cpu_us_per_event": round(cpu_s * 1e6 / events, 1) if events else None,
        "users": len(state),
        "skipped": skipped,
        "batches": batches,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, host:port")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--redis-url", required=True, help="e.g. redis://127.0.0.1:6379/0")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--prefix", default="baseline")
    a = ap.parse_args(argv)
    res = run_baseline(a.bootstrap, a.topic, a.redis_url, batch_size=a.batch_size, prefix=a.prefix)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
