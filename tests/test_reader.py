"""The feature reader against a real Redis holding hashes in the flow's layout (features.layout)."""
import asyncio
import time
from dataclasses import replace

import pytest
import redis
import redis.asyncio as aioredis

from config.registry import load_registry
from features.layout import alias_key, profile_key, registry_key, user_key
from features.reader import AsyncFeatureReader, FeatureReader

REG = load_registry()
P = "rd"
# one stored text per Feature.type, and what the reader must make of it
SAMPLES = {"int": ("3", 3), "money": ("129.90", 129.9), "ratio": ("0.2500", 0.25),
           "time_ms": ("1795392000000", 1795392000000), "label": ("important-value", "important-value"),
           "text": ("s-ab:c d", "s-ab:c d"), "flag": ("1", 1), "score": ("0.123456", 0.123456)}


def now_ms() -> int:
    return int(time.time() * 1000)


def store(client, user_id, fields, updated_at=None, as_of=1795392000000, prefix=P, anonymous=False):
    """Write one hash as the flow does (sparse fields + as_of + updated_at): a user's, or an
    anonymous visitor's (its own namespace)."""
    mapping = {**fields, "as_of": as_of, "updated_at": now_ms() if updated_at is None else updated_at}
    client.hset(profile_key(prefix, user_id, anonymous), mapping=mapping)


def full_hash() -> dict:
    return {f.name: SAMPLES[f.type][0] for f in REG.features}


def test_every_feature_typed_and_meta(redis_client):
    store(redis_client, "u1", full_hash())
    got = FeatureReader(redis_client, P).get("u1")
    for f in REG.features:
        assert got[f.name] == SAMPLES[f.type][1], f.name
        assert type(got[f.name]) is type(SAMPLES[f.type][1]), f.name
    assert got["as_of"] == 1795392000000 and abs(got["updated_at"] - now_ms()) < 5000
    assert got["stale"] is False and got["user_id"] == "u1" and got["alias_of"] is None
    assert set(got) == set(REG.names) | {"as_of", "updated_at", "stale", "user_id", "alias_of"}


def test_sparse_hash_defaults_and_unknown_fields(redis_client):
    store(redis_client, "u2", {"views_1h": "2", "last_seen": "1795392000000", "old_feature_x": "7.5"})
    got = FeatureReader(redis_client, P).get("u2")
    assert got["views_1h"] == 2 and got["last_seen"] == 1795392000000
    assert got["views_7d"] == 0 and type(got["views_7d"]) is int
    assert got["revenue_30d"] == 0.0 and type(got["revenue_30d"]) is float
    assert got["aov_30d"] is None and got["rfm_tier"] is None and got["p_purchase_24h"] is None
    assert got["checkout_pending"] is None and got["session_id"] is None
    assert got["old_feature_x"] == "7.5"  # unknown field: raw text, not an error
    # a value the type cannot parse stays text instead of failing the read
    redis_client.hset(user_key(P, "u2"), "orders_7d", "n/a")
    assert FeatureReader(redis_client, P).get("u2")["orders_7d"] == "n/a"


@pytest.mark.parametrize("options", [{"protocol": 2}, {"protocol": 3}, {"decode_responses": True},
                                     {"protocol": 2, "decode_responses": True}])
def test_any_client_reads_the_same(redis_client, redis_url, options):
    store(redis_client, "u1", full_hash(), updated_at=1)
    store(redis_client, "u2", {"views_1h": "2", "old_x": "é"}, updated_at=1)
    expected = FeatureReader(redis_client, P).get_many(["u1", "u2"])
    assert expected["u2"]["old_x"] == "é" and expected["u1"]["rfm_tier"] == "important-value"
    with redis.Redis.from_url(redis_url, **options) as other:
        assert FeatureReader(other, P).get_many(["u1", "u2"]) == expected
        assert FeatureReader(other, P).get("u1") == expected["u1"]


def test_missing_users_and_get_many(redis_client):
    store(redis_client, "u1", {"views_1h": "3"})
    store(redis_client, "u2", {"views_1h": "4"})
    reader = FeatureReader(redis_client, P)
    assert reader.get("nobody") is None
    many = reader.get_many(["u1", "nobody", "u2", "u1"])
    assert list(many) == ["u1", "nobody", "u2"]
    assert many["u1"]["views_1h"] == 3 and many["u2"]["views_1h"] == 4 and many["nobody"] is None
    assert reader.get_many([]) == {}


def test_get_many_asks_aliases_only_for_missing_anonymous_hashes(redis_client):
    ids = [f"u{i}" for i in range(100)]
    for u in ids:
        store(redis_client, u, {"views_1h": "1"})
        store(redis_client, u, {"views_1h": "1"}, anonymous=True)
    reader = FeatureReader(redis_client, P)
    for anonymous in (False, True):
        redis_client.config_resetstat()
        assert all(v is not None for v in reader.get_many(ids, anonymous=anonymous).values())
        stats = redis_client.info("commandstats")
        assert stats["cmdstat_hgetall"]["calls"] == 100 and "cmdstat_get" not in stats
    redis_client.config_resetstat()
    reader.get_many(ids + ["gone1", "gone2"])  # user ids: a missing hash is the answer
    assert "cmdstat_get" not in redis_client.info("commandstats")
    redis_client.config_resetstat()
    reader.get_many(ids + ["gone1", "gone2"], anonymous=True)
    assert redis_client.info("commandstats")["cmdstat_get"]["calls"] == 2


def test_anonymous_lookup_follows_an_alias_once(redis_client):
    store(redis_client, "user-9", {"orders_lifetime": "2"})
    redis_client.set(alias_key(P, "anon-1"), "user-9")
    redis_client.set(alias_key(P, "anon-2"), "anon-1")  # alias of an alias: not followed
    redis_client.set(alias_key(P, "anon-3"), "deleted-user")
    reader = FeatureReader(redis_client, P)
    got = reader.get("anon-1", anonymous=True)
    assert got["orders_lifetime"] == 2 and got["user_id"] == "user-9" and got["alias_of"] == "anon-1"
    # a user id is no anonymous id: the user's hash is in another namespace
    assert reader.get("user-9", anonymous=True) is None
    assert reader.get("anon-2", anonymous=True) is None and reader.get("anon-3", anonymous=True) is None
    many = reader.get_many(["anon-1", "user-9", "anon-2", "anon-3"], anonymous=True)
    assert many["anon-1"] == {**reader.get("user-9"), "alias_of": "anon-1"}
    assert many["anon-2"] is None and many["anon-3"] is None
    # the anonymous profile's own hash, while it still exists, wins over the alias
    store(redis_client, "anon-1", {"orders_lifetime": "0"}, anonymous=True)
    assert reader.get("anon-1", anonymous=True)["user_id"] == "anon-1"
    with pytest.raises(TypeError):  # keyword-only: a stray positional True cannot switch modes
        reader.get("anon-1", True)


def test_user_id_lookup_never_follows_an_alias(redis_client):
    """The attack: an unauthenticated event {"user_id": "attacker", "anonymous_id": "victim:2"}
    made the flow write alias:victim:2 -> attacker; victim:2's own hash is missing (consent
    withdrawn, expired, not written yet). Asked by user id, the answer is "unknown", never the
    attacker's features; only a lookup by anonymous id follows the alias."""
    store(redis_client, "attacker", {"views_1h": "666"})
    redis_client.set(alias_key(P, "victim:2"), "attacker")
    reader = FeatureReader(redis_client, P)
    assert reader.get("victim:2") is None
    assert reader.get("victim:2", anonymous=False) is None
    assert reader.get_many(["victim:2", "attacker"])["victim:2"] is None
    by_anon = reader.get("victim:2", anonymous=True)
    assert by_anon["user_id"] == "attacker" and by_anon["alias_of"] == "victim:2"
    assert reader.get_many(["victim:2"], anonymous=True)["victim:2"] == by_anon
    # once the user victim:2 has a hash, a lookup by user id reads it; the anonymous visitor
    # "victim:2" is someone else (another namespace), whose alias still names the attacker
    store(redis_client, "victim:2", {"views_1h": "1"})
    got = reader.get("victim:2")
    assert got["user_id"] == "victim:2" and got["alias_of"] is None and got["views_1h"] == 1
    assert reader.get("victim:2", anonymous=True)["user_id"] == "attacker"
    store(redis_client, "victim:2", {"views_1h": "7"}, anonymous=True)  # the visitor's own hash
    got = reader.get("victim:2", anonymous=True)
    assert got["user_id"] == "victim:2" and got["alias_of"] is None and got["views_1h"] == 7


def test_stale_after_max_age(redis_client):
    store(redis_client, "fresh", {}, updated_at=now_ms() - 5_000)
    store(redis_client, "old", {}, updated_at=now_ms() - 120_000)
    redis_client.hset(user_key(P, "never"), "views_1h", "1")  # no updated_at at all
    reader = FeatureReader(redis_client, P)  # default max_age_s = 60
    assert reader.get("fresh")["stale"] is False and reader.get("old")["stale"] is True
    assert reader.get("never")["stale"] is True and reader.get("never")["updated_at"] is None
    assert FeatureReader(redis_client, P, max_age_s=300).get("old")["stale"] is False
    assert FeatureReader(redis_client, P, max_age_s=1).get("fresh")["stale"] is True


def test_hostile_ids_cannot_reach_other_keys(redis_client):
    store(redis_client, "u1", {"views_1h": "1"})
    store(redis_client, "a:b*", {"views_1h": "7"})
    redis_client.set(registry_key(P), "{}")
    reader = FeatureReader(redis_client, P)
    assert reader.get("a:b*")["views_1h"] == 7 and reader.get("a:b*")["user_id"] == "a:b*"
    for probe in ["*", "u*", "u?", "u[1]", "a", "a:b", "a:b?", "u1 ", " u1", "U1", "u1\n", "u1\x00",
                  "../u1", f"{P}:v2:user:u1", ":u1", "x" * 129, "x" * 10_000, ""]:
        assert reader.get(probe) is None and reader.get(probe, anonymous=True) is None, repr(probe)
    # the registry key is not reachable as a user either, nor through a crafted alias id
    assert reader.get("../registry") is None and reader.get_many(["*", "?"]) == {"*": None, "?": None}


def test_invalid_ids_do_not_reach_redis(redis_client):
    reader = FeatureReader(redis_client, P)
    redis_client.config_resetstat()
    bad = ["", "x" * 129, "a\nb", "tab\t"]
    assert reader.get_many(bad) == reader.get_many(bad, anonymous=True) == dict.fromkeys(bad)
    assert "cmdstat_hgetall" not in redis_client.info("commandstats")


def test_async_reader_matches_sync(redis_client, redis_url):
    store(redis_client, "u1", full_hash(), updated_at=1)
    redis_client.set(alias_key(P, "anon"), "u1")
    sync = FeatureReader(redis_client, P)
    ids = ["u1", "anon", "nobody"]

    async def read():
        client = aioredis.Redis.from_url(redis_url)
        try:
            reader = AsyncFeatureReader(client, P)
            return (await reader.get("u1"), await reader.get("anon"),
                    await reader.get("anon", anonymous=True), await reader.get_many(ids),
                    await reader.get_many(ids, anonymous=True), await reader.stored_registry())
        finally:
            await client.aclose()

    one, anon, anon_by_anon, many, many_by_anon, stored = asyncio.run(read())
    assert one == sync.get("u1") and stored is None
    assert anon is None and anon_by_anon == sync.get("anon", anonymous=True)
    assert many == sync.get_many(ids) and many_by_anon == sync.get_many(ids, anonymous=True)
    assert many["anon"] is None and many_by_anon["anon"]["alias_of"] == "anon"
    assert many["nobody"] is None and many_by_anon["nobody"] is None


def test_feature_names_may_not_clash_with_reader_fields(redis_client):
    feature = replace(REG.features[0], name="stale")
    clash = replace(REG, features=(feature,), by_name={"stale": feature})
    with pytest.raises(ValueError, match="clash"):
        FeatureReader(redis_client, P, registry=clash)


def test_killed_connection_is_retried_once(redis_client, redis_url):
    store(redis_client, "u1", {"views_1h": "3"})
    reader = FeatureReader(redis.Redis.from_url(redis_url, protocol=2), P)
    assert reader.get("u1")["views_1h"] == 3
    assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1  # the reader's too
    assert reader.get("u1")["views_1h"] == 3

    async def read_after_kill():
        client = aioredis.Redis.from_url(redis_url, protocol=2)
        try:
            areader = AsyncFeatureReader(client, P)
            await areader.get("u1")
            redis_client.client_kill_filter(_type="normal", skipme=True)
            return await areader.get("u1")
        finally:
            await client.aclose()

    assert asyncio.run(read_after_kill())["views_1h"] == 3


def test_error_reply_leaves_the_connection_usable(redis_client, redis_url):
    store(redis_client, "u1", {"views_1h": "3"})
    redis_client.set(user_key(P, "not-a-hash"), "x")  # WRONGTYPE for HGETALL
    reader = FeatureReader(redis.Redis.from_url(redis_url, protocol=2, max_connections=1), P)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        reader.get_many(["not-a-hash", "u1"])
    assert reader.get_many(["u1", "nobody"])["u1"]["views_1h"] == 3  # no reply left unread
