"""The feature reader against a real Redis holding what the sink wrote."""
import redis

from connectors.redis_features import RedisFeatureSink
from features.layout import user_key
from features.reader import FeatureReader


def test_sink_then_reader_round_trip_with_hostile_ids(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    part = RedisFeatureSink(redis_url, "rd", ttl_s=3600).build("s", 0, 1)
    hostile = "a:b*'; DROP TABLE x;--"
    part.write_batch([[("u1", {"views_1h": "3", "revenue_24h": "12.50", "last_seen": "1795392000000",
                              "session_id": "abc", "session_pages": "2", "p_purchase_24h": "0.250000",
                              "as_of": "1795392000000"}, 0),
                       (hostile, {"views_1h": "7", "as_of": "1"}, 0)]])
    reader = FeatureReader(client, "rd")
    u1 = reader.get("u1")
    assert u1["views_1h"] == 3 and u1["revenue_24h"] == 12.5 and u1["session_id"] == "abc"
    assert u1["p_purchase_24h"] == 0.25 and u1["last_seen"] == 1795392000000 and u1["updated_at"] > 0
    assert reader.get(hostile)["views_1h"] == 7
    # The hostile id lives under its own verbatim key and touched nothing else.
    assert client.exists(user_key("rd", hostile)) and client.dbsize() == 2
    assert reader.get("a") is None and reader.get("a:b") is None
    many = reader.get_many(["u1", "missing", hostile])
    assert many["missing"] is None and many["u1"] == u1 and many[hostile]["views_1h"] == 7
    assert 0 < client.ttl(user_key("rd", "u1")) <= 3600
