"""Identity namespaces, link policy and consent (issue 14).

The takeover sequences a reviewer found on the v1 layout, replayed through the real flow into
Redis; a hypothesis search over event sequences that a known user's hash changes only with their
own events; and the engine against the independent reference (tests/reference_profiles.py) under
the product's privacy defaults (opt-in consent, links only from login / signup / identify, at
most three users per anonymous id)."""
from __future__ import annotations

import orjson
import redis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from config.registry import load_registry
from config.settings import load_settings
from features.layout import alias_key, anon_key, user_key
from features.reader import FeatureReader
from flows.events import decode
from flows.runner import run
from flows.shard import ShardConfig
from tests.engine_harness import Harness
from tests.reference_profiles import expected_profiles

T0 = 1_795_428_000_000
MIN = 60_000
SECURE = dict(profiling_consent="opt_in", marketing_consent="opt_in",
              link_events=frozenset({"login", "signup", "identify"}), max_users_per_anonymous=3)


def doc(i, name="page_view", *, user=None, anon=None, ts=None, profiling=None, source=None):
    d = {"event_id": f"e{i}", "type": "track", "event": name,
         "timestamp": ts if ts is not None else T0 + i * 1000, "context": {"channel": "web"}}
    if name == "identify":
        d = {**d, "type": "identify"}
        d.pop("event")
    if user is not None:
        d["user_id"] = user
    if anon is not None:
        d["anonymous_id"] = anon
    if profiling is not None:
        d["context"]["consent"] = {"profiling": profiling}
    if source is not None:
        d["context"]["source"] = source
    return orjson.dumps(d)


VICTIM = [doc(1, user="u00042", profiling=True), doc(2, "product_viewed", user="u00042"),
          doc(3, "add_to_cart", user="u00042")]
ATTACK = [doc(10, anon="u00042", profiling=True),                       # anonymous id = the user id
          doc(11, "login", user="attacker", anon="u00042", profiling=True),  # links it to the attacker
          doc(12, "search", anon="u00042"),                            # now the attacker's device
          doc(13, anon="u00042", profiling=False),                     # a refusal under that id
          doc(14, "signup", user="attacker2", anon="u00042", profiling=True)]


def replay(tmp_path, redis_url, chdb_dsn, ch_database, prefix, lines, **privacy):
    f = tmp_path / f"{prefix}.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    settings = load_settings(
        None, env={}, source__kind="file", source__file={"paths": [str(f)]},
        output__dir=str(tmp_path / prefix), redis__url=redis_url, redis__key_prefix=prefix,
        clickhouse__dsn=chdb_dsn, clickhouse__database=ch_database, flow__max_clock_skew_s=None,
        flow__max_lookback_s=None, flow__recovery_dir=None, trigger__rules=None,
        privacy__erasure__inbox=str(tmp_path / prefix / "inbox"), **privacy)
    run(settings, redis_url)
    return redis.Redis.from_url(redis_url)


def without_time(h: dict) -> dict:
    return {k: v for k, v in h.items() if k != b"updated_at"}


def test_the_takeover_sequences_leave_the_known_user_untouched(tmp_path, redis_url, chdb_dsn,
                                                                 ch_database):
    tick = [doc(99, "push_sent", user="clock", ts=T0 + 30_000)]  # "now" at the end: the same
    r = replay(tmp_path, redis_url, chdb_dsn, ch_database, "clean", VICTIM + tick)
    clean = without_time(r.hgetall(user_key("clean", "u00042")))
    assert clean and clean[b"views_1h"] == b"2"  # a page and a product view
    r = replay(tmp_path, redis_url, chdb_dsn, ch_database, "attacked", VICTIM + ATTACK + tick)
    assert without_time(r.hgetall(user_key("attacked", "u00042"))) == clean
    # the anonymous id "u00042" is another person: linked to the attacker, its own hash moved
    assert r.get(alias_key("attacked", "u00042")) == b"attacker2"  # the latest of 2 users (<= 3)
    assert not r.exists(anon_key("attacked", "u00042"))
    reader = FeatureReader(r, "attacked")
    assert reader.get("u00042")["views_1h"] == 2  # a user-id lookup never follows an alias
    assert reader.get("u00042", anonymous=True)["user_id"] == "attacker2"


def test_links_only_from_link_events_of_trusted_sources(tmp_path, redis_url, chdb_dsn, ch_database):
    lines = [doc(1, anon="d1", profiling=True), doc(2, "search", anon="d1"),
             doc(3, "page_view", user="U1", anon="d1", profiling=True),  # not a link event
             doc(4, "login", user="U1", anon="d1", source="browser"),  # untrusted source
             doc(5, "page_view", anon="d2", profiling=True),
             doc(6, "identify", user="U2", anon="d2", source="backend", profiling=True)]
    r = replay(tmp_path, redis_url, chdb_dsn, ch_database, "policy", lines,
               privacy__identity__link_sources=["backend"])
    assert r.get(alias_key("policy", "d1")) is None and r.exists(anon_key("policy", "d1"))
    assert r.get(alias_key("policy", "d2")) == b"U2" and not r.exists(anon_key("policy", "d2"))
    assert r.hget(user_key("policy", "U2"), "views_1h") == b"1"  # the visitor's view merged in


def test_opt_in_by_default_and_a_withdrawal_is_remembered(tmp_path, redis_url, chdb_dsn, ch_database):
    lines = [doc(1, user="silent"),                                  # never stated: nothing
             doc(2, user="u1", profiling=True), doc(3, user="u1"),   # granted, then remembered
             doc(4, user="u2", profiling=True), doc(5, user="u2", profiling=False),
             doc(6, user="u2"), doc(7, user="u2")]                   # withdrawn: remembered
    r = replay(tmp_path, redis_url, chdb_dsn, ch_database, "consent", lines)
    assert not r.exists(user_key("consent", "silent")) and not r.exists(user_key("consent", "u2"))
    assert r.hget(user_key("consent", "u1"), "views_1h") == b"2"


# -- property: a known user's hash changes only with their own events -------------------------

ATTACKER_STEP = st.tuples(
    st.sampled_from(["page_view", "search", "login", "signup", "identify", "add_to_cart"]),
    st.sampled_from([None, "attacker", "u1:x"]),                  # user_id of the attacker
    # anonymous ids: one equal to the victim's user id, another visitor's. (The victim's own
    # device id is the victim's: whoever holds it acts as them, so it is not an attacker's.)
    st.sampled_from([None, "victim", "a1"]),
    st.sampled_from([None, True, False]))                          # consent statement
VICTIM_STEP = st.tuples(st.sampled_from(["page_view", "product_viewed", "order_completed", "login"]),
                        st.sampled_from([None, True, False]))


def _engine(raws, config):
    h = Harness(config)
    events = [decode(r) for r in raws]
    for i in range(0, len(events), 7):
        h.feed(events[i:i + 7])
    h.finish()
    return h


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(VICTIM_STEP, min_size=1, max_size=12), st.lists(ATTACKER_STEP, max_size=25),
       st.randoms(use_true_random=False))
def test_a_known_users_features_change_only_with_their_own_events(victim, attack, rnd):
    own = [doc(i, name, user="victim", anon="victim-dev" if name == "login" else None,
               profiling=p, ts=T0 + i * MIN) for i, (name, p) in enumerate(victim)]
    other = []
    for j, (name, user, anon, p) in enumerate(attack):
        if user is None and anon is None:
            anon = "a1"
        other.append(doc(1000 + j, name, user=user, anon=anon, profiling=p,
                         ts=T0 + rnd.randrange(0, len(victim) + 2) * MIN + 1))
    mixed = own + other
    rnd.shuffle(mixed)  # interleaved in any order (event times stay the same)
    mixed.sort(key=lambda raw: orjson.loads(raw)["timestamp"])
    config = ShardConfig(lateness_ms=60_000, ingest_shards=2, profile_shards=3, **SECURE)
    tick = doc(9999, "push_sent", user="clock", ts=T0 + (len(victim) + 5) * MIN)
    alone = _engine(own + [tick], config).stored.get(("user", "victim"))
    attacked = _engine(mixed + [tick], config).stored.get(("user", "victim"))
    assert attacked == alone


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["u1", "u2", "d1", "d2", "u1!"]),
                          st.sampled_from(["page_view", "search", "login", "identify", "order_completed"]),
                          st.sampled_from([None, None, "d1", "d2", "u1"]),
                          st.sampled_from([None, None, True, False])), min_size=1, max_size=50),
       st.integers(1, 9))
def test_engine_equals_the_reference_under_the_privacy_defaults(steps, batch):
    raws = []
    for i, (who, name, anon, p) in enumerate(steps):
        user = who if who.startswith("u") else None
        raws.append(doc(i, name, user=user, anon=anon if user else who, profiling=p,
                        ts=T0 + i * 30_000))
    h = Harness(ShardConfig(lateness_ms=60_000, ingest_shards=2, profile_shards=3, **SECURE))
    events = [decode(r) for r in raws]
    for i in range(0, len(events), batch):
        h.feed(events[i:i + batch])
    h.finish()
    profiles, aliases = expected_profiles(
        ((0, r) for r in raws), load_registry(), link_events=SECURE["link_events"],
        profiling="opt_in", max_users_per_anonymous=3, namespaced=True)
    got = {k: {f: v for f, v in h.stored[k].items() if f != "p_purchase_24h"} for k in h.stored}
    assert got == profiles
    assert h.aliases == aliases


def test_marketing_consent_policy_gates_every_action():
    """The rule file says opt_out; privacy.consent.marketing: opt_in is a floor under it: without
    a grant nothing is sent, with one the action goes."""
    from tests.engine_harness import PAGES_ONLY

    def actions(policy, marketing):
        h = Harness(ShardConfig(lateness_ms=0, ingest_shards=2, profile_shards=3,
                                trigger_rules=PAGES_ONLY, marketing_consent=policy))
        raws = []
        for i in range(3):
            d = orjson.loads(doc(i, user="m1", ts=T0 + i * 1000))
            d["context"]["consent"] = {"profiling": True,
                                       **({"marketing": marketing} if marketing is not None else {})}
            raws.append(orjson.dumps(d))
        h.feed([decode(r) for r in raws])
        h.feed([decode(doc(9, "push_sent", user="clock", ts=T0 + 3_600_000))])
        h.finish()
        return [a["user_id"] for a in h.actions], {d["decision"] for d in h.audit}

    assert actions("opt_out", None)[0] == ["m1"]  # the rule's opt-out alone: sent
    sent, decisions = actions("opt_in", None)
    assert sent == [] and "no_consent" in decisions
    assert actions("opt_in", True)[0] == ["m1"]
    assert actions("opt_in", False)[0] == [] and actions("opt_out", False)[0] == []
