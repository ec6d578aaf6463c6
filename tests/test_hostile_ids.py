"""Hostile ids (very long, control characters, glob characters, ``:``, newlines, non-strings,
lookalikes, ids spelled like keys) can neither read nor write another user's key.

End to end on the real services: the whole flow (``flows.runner.run``) replays one JSON-lines
file mixing ordinary victims with hostile records into real Redis and chDB, and a control run with
the victims alone (another key prefix) gives the victims' expected hashes. Then the Redis keys,
the dead letters, the reader and the HTTP API are checked against an explicit expectation of what
each hostile record must become (rejected with a reason, or stored under its own key).
"""
from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from urllib.parse import quote

import orjson
import pytest
import redis
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from config.settings import load_settings
from connectors.redis_features import RedisFeatureSink
from config.settings import AccessSettings
from features.http import create_app
from features.layout import alias_key, is_valid_id, profile_key, registry_key, user_key
from features.reader import FeatureReader
from flows.events import Event, decode
from flows.runner import run
from flows.shard import Write
from tests.services import http_call, serve_app
from tests.dead_letters import raw_of

# one client reads many ids here: the per-client rate limit is not what is tested
UNLIMITED = AccessSettings(rate_per_s=1e6, burst=1_000_000, max_body_bytes=1 << 24)

CTL, HST = "ctl", "hst"  # key prefixes of the control run and of the hostile run
T0 = 1_795_392_000_000
MIN = 60_000
MISSING = object()  # a field left out of the event (unlike JSON null)

VICTIMS = {"victim", "victim:2", "victim-anon"}  # ids that own a hash in the control run
VICTIM_ALIASES = {"victim-login": "victim"}  # the victim's device id, merged at login
VICTIM_ANON = {"victim-anon"}  # the visitor who never logs in: an anonymous hash
VICTIM_USERS = {"victim", "victim:2"}
ATTACKED = ("victim:2", "victim")  # victims' user ids a hostile record claims as its device id


def victim_events() -> list[dict]:
    """Ordinary users: an anonymous visit then a login, a second user whose id contains ':',
    and an anonymous visitor who never logs in. Orders only here (see hostile_records)."""
    evs = [
        (0, "page_view", {"anonymous_id": "victim-login"}, {}),
        (1, "product_viewed", {"anonymous_id": "victim-login"}, {}),
        (2, "page_view", {"anonymous_id": "victim-anon"}, {}),
        (3, "login", {"user_id": "victim", "anonymous_id": "victim-login"}, {}),
        (4, "page_view", {"user_id": "victim"}, {}),
        (5, "page_view", {"user_id": "victim:2"}, {"campaign_id": "c1"}),
        (6, "add_to_cart", {"user_id": "victim"}, {"revenue": 59.9}),
        (7, "product_viewed", {"anonymous_id": "victim-anon"}, {}),
        (8, "ad_click", {"user_id": "victim:2"}, {"campaign_id": "c1"}),
        (10, "checkout_started", {"user_id": "victim"}, {}),
        (11, "order_completed", {"user_id": "victim"}, {"revenue": 59.9}),
        (14, "page_view", {"user_id": "victim:2"}, {}),
        (16, "add_to_cart", {"anonymous_id": "victim-anon"}, {"revenue": 12.5}),
        (20, "page_view", {"user_id": "victim"}, {}),
        (25, "page_view", {"anonymous_id": "victim-anon"}, {}),
        (30, "page_view", {"user_id": "victim:2"}, {}),  # the last event time of the file
    ]
    return [{"event_id": f"v{i}", "type": "track", "event": name, **ids, "timestamp": T0 + m * MIN,
             "properties": props, "context": {"channel": "web"}}
            for i, (m, name, ids, props) in enumerate(evs)]


# -- the hostile records and what each must become ---------------------------------------------
CONTROL = ["victim\x00", "victim\r", "victim\n", "\nvictim", "victim\r\n", "vic\ttim", "\x1b[2Jvictim",
           "victim\x7f", "victim\x85", "victim\u2028", "victim\u200b", "victim\xa0", "\u202evictim",
           "\ufeffvictim", "\t", "\n", "\x00", "*\n", "victim:*\x00", "victim\u3000", "victim\ue000"]
NON_STRINGS = [0, 42, -1, 1.5, True, False, ["victim"], [], {"$ne": None}, {"victim": 1}]
# Printable, at most 128 characters: valid ids (is_valid_id), each stored under its own key.
WEIRD_VALID = ["victim:*", "victim*", "victim?", "vict[i]m", "[a-z]*", "[a-z]", "*", "?", "[", "]",
               "victim:", ":victim", "victim:2:", "victim:2*", "victim::2", f"{HST}:v2:user:victim",
               f"{HST}:v2:alias:victim-login", f"{HST}:v2:registry", f"{CTL}:v2:user:victim",
               "../victim", "victim/..", "victim\\n", "victim\\x00", "victim%0A", "victim ",
               " victim", " ", "   ", "VICTIM", "v\u0456ctim", "\uff56\uff49\uff43\uff54\uff49\uff4d",
               "victim\u0301", "x" * 128, "\u2603" * 128, "$victim", "{victim}", "victim{}",
               "' OR 1=1 --", "null", "0"]


def hostile_records() -> list[tuple[dict | bytes, tuple]]:
    """(event fields, or a raw bytes template, and the expectation): ("dead", reason), ("raw",
    reason) or ("ok",): stored under its own key (see expected_owners).
    No hostile user orders (the propensity model of a profile shard is shared, and must see the
    same examples in both runs) and no hostile event is later than the victims' last one."""
    dead = [
        ({"user_id": "v" * 10_000}, "bad_id"),
        ({"user_id": "victim" + "x" * 40_000}, "oversized"),  # > flow.max_event_bytes
        ({"user_id": "x" * 129}, "bad_id"),
        ({"user_id": "\u2603" * 129}, "bad_id"),
        ({"anonymous_id": "victim-anon" + "x" * 118}, "bad_id"),
        *[({"user_id": s}, "bad_id") for s in CONTROL],
        *[({"anonymous_id": s}, "bad_id") for s in ["victim-anon\n", "victim-anon\x00*", "\x1b"]],
        ({"user_id": ""}, "missing_user"),
        ({"anonymous_id": ""}, "missing_user"),
        ({"user_id": None, "anonymous_id": None}, "missing_user"),
        ({}, "missing_user"),
        *[({"user_id": v}, "missing_user") for v in NON_STRINGS],
        *[({"anonymous_id": v}, "missing_user") for v in (["victim-anon"], 7, {"id": "victim-anon"})],
        # link attempts: a hostile device id for a user, a victim's device id for a hostile user
        ({"user_id": "attacker", "anonymous_id": "victim-anon\x00"}, "bad_id"),
        ({"user_id": "victim", "anonymous_id": "a" * 200}, "bad_id"),
        ({"user_id": "victim", "anonymous_id": "victim-login\n"}, "bad_id"),
        ({"user_id": "victim\n", "anonymous_id": "victim-anon"}, "bad_id"),
        ({"user_id": "\x1b", "anonymous_id": "victim-login"}, "bad_id"),
        ({"user_id": "v" * 10_000, "anonymous_id": "victim-anon"}, "bad_id"),
        ({"user_id": ["victim"], "anonymous_id": "victim-anon"}, "missing_user"),
        ({"user_id": 7, "anonymous_id": "victim-anon"}, "missing_user"),
        ({"user_id": "", "anonymous_id": "victim-anon"}, "missing_user"),  # "" is not "anonymous"
        *[({"user_id": "attacker", "anonymous_id": v}, "missing_user") for v in (0, False, {"$gt": ""})],
    ]
    # Records whose bytes no JSON encoder would write: raw control character, lone surrogate,
    # invalid UTF-8 inside the id.
    raw = [
        (b'{"event_id":"%s","event":"page_view","user_id":"victim\x1b","timestamp":%d}', "invalid_json"),
        (b'{"event_id":"%s","event":"page_view","user_id":"victim\n","timestamp":%d}', None),
        (b'{"event_id":"%s","event":"page_view","user_id":"victim\\ud800","timestamp":%d}', "invalid_json"),
        (b'{"event_id":"%s","event":"page_view","user_id":"victim\xff","timestamp":%d}', "not_utf8"),
    ]
    ok = [
        *[{"user_id": s} for s in WEIRD_VALID],
        *[{"anonymous_id": s} for s in ("victim-anon*", "victim-anon:", "victim-anon:*", "*victim-anon")],
        {"anonymous_id": "victim-anon:*"},  # a second visit, then the login below merges it
        {"user_id": "?", "anonymous_id": "victim-anon:*"},  # weird device id merged into "?"
        {"user_id": "[a-z]*", "anonymous_id": "victim-anon?"},  # alias only (no visit before)
        {"user_id": "attacker", "anonymous_id": ""},  # empty device id: ignored, not an error
        {"user_id": "attacker", "anonymous_id": "attacker"},  # same id: no link
        # a victim's USER id sent as a device id: writes alias:<victim> -> attacker (events are
        # not authenticated); a user-id lookup must never follow it (test_victims_user_ids...)
        *[{"user_id": "attacker", "anonymous_id": v} for v in ATTACKED],
    ]
    out: list[tuple[dict | bytes, tuple]] = [(f, ("dead", r)) for f, r in dead]
    out += [(t, ("raw", r)) for t, r in raw]
    out += [(f, ("ok",)) for f in ok]
    return out


def build_file(path, with_hostile: bool):
    """The victims' events, with the hostile records spread between them (each at the time of
    the victim event before it). Returns (victim lines, [(hostile line, expected reason | None)])."""
    victims = victim_events()
    hostile = hostile_records() if with_hostile else []
    lines, vlines, hlines = [], [], []
    per = -(-len(hostile) // (len(victims) - 1)) if hostile else 0
    for i, v in enumerate(victims):
        line = orjson.dumps(v)
        lines.append(line)
        vlines.append(line)
        if i == len(victims) - 1:
            break  # nothing after the last victim event: both runs end at the same event time
        for j, (spec, expect) in enumerate(hostile[i * per:(i + 1) * per]):
            eid = f"h{i}-{j}"
            if expect[0] == "raw":
                raw = spec % (eid.encode(), v["timestamp"])
                parts = raw.split(b"\n")  # a raw newline splits the record: one dead letter each
                for p in parts:
                    hlines.append((p, "invalid_json" if len(parts) > 1 else expect[1]))
                lines.append(raw)
                continue
            doc = {"event_id": eid, "type": "track", "event": "page_view", **spec,
                   "timestamp": v["timestamp"], "context": {"channel": "web"}}
            line = orjson.dumps(doc)
            assert b"\n" not in line  # JSON escapes control characters in strings
            lines.append(line)
            hlines.append((line, expect[1] if expect[0] == "dead" else None))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return vlines, hlines


def run_flow(tmp_path, name, prefix, redis_url, chdb_dsn, database, with_hostile):
    f = tmp_path / f"{name}.jsonl"
    vlines, hlines = build_file(f, with_hostile)
    settings = load_settings(
        None, env={}, source__kind="file", source__file={"paths": [str(f)]},
        output__dir=str(tmp_path / name), redis__url=redis_url, redis__key_prefix=prefix,
        clickhouse__dsn=chdb_dsn, clickhouse__database=database, flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None,
        # the identity rules this module's expectations are written for: any event links, no
        # consent needed (the privacy defaults have their own tests: test_identity_and_consent)
        privacy__consent__profiling="opt_out", privacy__identity__link_events=None,
        privacy__identity__max_users_per_anonymous=1)
    run(settings, redis_url)
    dead_file = tmp_path / name / "dead_letters.jsonl"
    # split on b"\n" only: str.splitlines would also cut at U+2028 or \x85 inside a JSON string
    dead = ([json.loads(x) for x in dead_file.read_bytes().split(b"\n") if x]
            if dead_file.exists() else [])
    return vlines, hlines, dead


def keys_of(client: redis.Redis, prefix: str) -> dict[str, set[str]]:
    """Keys under a prefix by kind, each id decoded strictly (a key must be valid UTF-8)."""
    out: dict[str, set[str]] = {"user": set(), "anon": set(), "alias": set(), "other": set()}
    for raw in client.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode("utf-8")
        m = re.fullmatch(rf"{re.escape(prefix)}:v2:(user|anon|alias):(.+)", key, re.DOTALL)
        if m:
            out[m.group(1)].add(m.group(2))
        else:
            out["other"].add(key)
    return out


def expected_owners() -> tuple[set[str], set[str], dict[str, str]]:
    """The hostile run's own keys, from the identity rules: (user hashes, anonymous hashes,
    links). An event's profile is its user id (user namespace), else its device id (anonymous
    namespace); a user id with another device id links (aliases) that device id, whose anonymous
    profile (if any) merges into the user's (a user's profile never does: ATTACKED)."""
    users, anons, links = set(), set(), {}
    for spec, expect in hostile_records():
        if expect[0] != "ok":
            continue
        uid, anon = spec.get("user_id"), spec.get("anonymous_id") or ""
        if uid is not None:
            users.add(uid)
        else:
            anons.add(anon)
        if uid is not None and anon and anon != uid:
            links.setdefault(anon, uid)
    return users, anons - set(links), links


@pytest.fixture(scope="module")
def runs(tmp_path_factory, redis_url, chdb_dsn, chdb_client):
    """The control run (victims only, prefix ctl) and the hostile run (prefix hst), each with its
    own chDB database; run once for the module's tests (nothing here writes under these prefixes)."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    client = redis.Redis.from_url(redis_url)
    for prefix in (CTL, HST):
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    dbs = [f"t_hostile_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        ctl = run_flow(tmp_path, "ctl", CTL, redis_url, chdb_dsn, dbs[0], with_hostile=False)
        hst = run_flow(tmp_path, "hst", HST, redis_url, chdb_dsn, dbs[1], with_hostile=True)
        events = tuple(chdb_client.command(f"SELECT sum(events) FROM {db}.events_minute FINAL")
                       for db in dbs)
        yield {"ctl": ctl, "hst": hst, "events": events, "client": client}
    finally:
        for db in dbs:
            chdb_client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()


def test_hostile_ids_end_to_end(runs):
    redis_client = runs["client"]
    (vlines, _, ctl_dead), (_, hlines, dead) = runs["ctl"], runs["hst"]
    ctl_keys, hst_keys = keys_of(redis_client, CTL), keys_of(redis_client, HST)

    # The control run is what it should be: the three victims, the login alias, no dead letter.
    assert ctl_dead == []
    assert ctl_keys == {"user": VICTIM_USERS, "anon": VICTIM_ANON, "alias": set(VICTIM_ALIASES),
                        "other": {registry_key(CTL), f"{CTL}:model_versions"}}

    # 1. Every victim's hash (and alias) is exactly the control run's, field by field.
    for v in sorted(VICTIMS):
        want = redis_client.hgetall(profile_key(CTL, v, v in VICTIM_ANON))
        got = redis_client.hgetall(profile_key(HST, v, v in VICTIM_ANON))
        assert want.pop(b"updated_at") and got.pop(b"updated_at")
        assert got == want, v
        assert redis_client.ttl(profile_key(HST, v, v in VICTIM_ANON)) > 0
    for anon, user in VICTIM_ALIASES.items():
        assert redis_client.get(alias_key(HST, anon)) == redis_client.get(alias_key(CTL, anon)) == user.encode()

    # 2. Every key under the prefix is in the layout, for a valid id, and is exactly the set the
    #    identity rules give: the victims' keys plus the accepted hostile ids' own keys.
    users, anons, links = expected_owners()
    assert hst_keys["other"] == {registry_key(HST), f"{HST}:model_versions"}  # the models' stream
    assert hst_keys["user"] == VICTIM_USERS | users
    assert hst_keys["anon"] == VICTIM_ANON | anons
    assert hst_keys["alias"] == set(VICTIM_ALIASES) | set(links)
    assert set(ATTACKED) <= set(links) and set(ATTACKED) <= hst_keys["user"]  # alias and own hash
    for anon, user in links.items():
        assert redis_client.get(alias_key(HST, anon)) == user.encode()
    # So a key holds control or glob characters only when its id is valid (is_valid_id) and
    # was sent by a record the expectation table accepts.
    assert all(is_valid_id(i) for i in hst_keys["user"] | hst_keys["anon"] | hst_keys["alias"])
    raw_keys = list(redis_client.scan_iter(match=f"{HST}:*", count=1000))
    assert not [k for k in raw_keys if not k.decode().isprintable()]  # no control char in a key
    assert max(len(k.decode()) for k in raw_keys) <= len(user_key(HST, "x" * 128))

    # 3. Each rejected hostile record is a dead letter with its exact bytes and a clear reason;
    #    nothing else is dead-lettered (no victim event lost, none late).
    expected = Counter((line, reason) for line, reason in hlines if reason)
    got_dead = Counter((raw_of(d), d["reason"]) for d in dead)
    assert got_dead == expected
    assert len(dead) == sum(1 for _, reason in hlines if reason) > 60
    for d in dead:
        assert d["detail"], d
        if d["reason"] == "bad_id":
            assert re.search(r"longer than 128 characters|contains control characters", d["detail"])
        if d["reason"] == "missing_user":
            assert re.search(r"missing or not a string|neither user_id nor anonymous_id", d["detail"])
    # All accepted events were counted once (minute aggregates in chDB).
    accepted = len(vlines) + sum(1 for _, reason in hlines if reason is None)
    assert runs["events"] == (len(vlines), accepted)


def hostile_probes() -> list:
    """Every id a hostile record carried, plus near misses of the victims' ids and keys."""
    ids = []
    for spec, _ in hostile_records():
        if isinstance(spec, dict):
            ids += [v for k, v in spec.items() if k in ("user_id", "anonymous_id")]
    ids += ["victim\n", "victim-login\x00", "victim-log*", "victim-anon\r", "victim-*", "victim:?",
            "victim:[2]", user_key(HST, "victim"), alias_key(HST, "victim-login"), registry_key(HST),
            "victim:2\t", "VICTIM:2", "v" * 40_000, None, b"victim", ("victim",)]
    unique, seen = [], set()
    for i in ids:
        k = repr(i)
        if k not in seen and (not isinstance(i, str) or i not in VICTIMS | set(VICTIM_ALIASES)):
            seen.add(k)
            unique.append(i)
    return unique


def check_answer(client: redis.Redis, reader: FeatureReader, ident, got, anonymous: bool) -> None:
    """An answer for a hostile id is None or the id's own hash; by anonymous id it may also be
    the hash of the user the id's alias names. Never a victim's."""
    users, anons, links = expected_owners()
    if not is_valid_id(ident):
        target = None
    elif anonymous:  # the visitor's own hash, else the user its alias names
        target = ident if ident in anons else links.get(ident)
    else:  # a user id never follows an alias, whoever wrote it
        target = ident if ident in users else None
    if target is None:
        assert got is None, (ident, anonymous)
        return
    assert got is not None and got["user_id"] == target, (ident, anonymous)
    assert target not in VICTIMS and target not in VICTIM_ALIASES
    assert got["alias_of"] == (None if target == ident else ident)
    raw = client.hgetall(profile_key(HST, target, anonymous and target == ident))
    assert {k: v for k, v in got.items() if k != "stale"} == {
        k: v for k, v in reader.typed(raw, target, got["alias_of"]).items() if k != "stale"}


def victims_read_their_own(got: dict, want: dict) -> None:
    for v, answer in got.items():
        assert {**answer, "stale": None} == {**want[v], "stale": None}, v


def test_reader_and_http_never_answer_a_victim_for_a_hostile_id(runs, redis_url):
    redis_client = runs["client"]
    reader = FeatureReader(redis.Redis.from_url(redis_url, protocol=2), HST)
    # the victims' own answers: user ids by user id, the login device id by anonymous id
    victims = {**{v: reader.get(v, anonymous=v in VICTIM_ANON) for v in VICTIMS},
               **reader.get_many(sorted(VICTIM_ALIASES), anonymous=True)}
    assert all(v is not None for v in victims.values())
    assert all(victims[a]["user_id"] == u for a, u in VICTIM_ALIASES.items())
    assert reader.get_many(sorted(VICTIM_ALIASES)) == dict.fromkeys(VICTIM_ALIASES)
    probes = hostile_probes()
    hashable = [p for p in probes if not isinstance(p, (list, dict))]

    for anonymous in (False, True):
        for p in hashable:
            check_answer(redis_client, reader, p, reader.get(p, anonymous=anonymous), anonymous)
        many = reader.get_many(hashable + sorted(VICTIMS), anonymous=anonymous)
        for p in hashable:
            check_answer(redis_client, reader, p, many[p], anonymous)
        # the victims in the same batch still read their own (each by its kind of id)
        victims_read_their_own({v: many[v] for v in VICTIMS if (v in VICTIM_ANON) == anonymous},
                               victims)
    for p in probes:
        if isinstance(p, (list, dict)):  # unhashable: a clear error, no Redis lookup
            with pytest.raises(TypeError):
                reader.get(p)
            with pytest.raises(TypeError):
                reader.get_many(["victim", p], anonymous=True)

    # HTTP on a real uvicorn (Starlette's TestClient decodes the path twice: %250A reads "\n").
    strings = [p for p in hashable if isinstance(p, str)]
    with serve_app(create_app(redis_url, HST, access=UNLIMITED, max_batch=1000)) as port:
        for anonymous, query in ((False, ""), (False, "?anonymous=false"), (True, "?anonymous=true")):
            for p in strings:
                status, body = call(port, "GET", "/features/" + quote(p, safe="") + query)
                if status == 200:
                    check_answer(redis_client, reader, p, body, anonymous)
                else:
                    assert (status, body) == (404, {"detail": "unknown user"}), (p, query)
                    check_answer(redis_client, reader, p, None, anonymous)
            status, body = call(port, "POST", "/features",
                                {"user_ids": strings[:1000], "anonymous": anonymous})
            assert status == 200 and len(body["features"]) == len(strings)
            for p, got in body["features"].items():
                check_answer(redis_client, reader, p, got, anonymous)
        for bad in ([7], [None], [["victim"]], [{"$ne": None}], "victim"):
            assert call(port, "POST", "/features", {"user_ids": bad})[0] == 422


def test_victims_user_ids_never_read_the_attackers_alias(runs, redis_url):
    """The flow wrote alias:<victim user id> -> attacker (hostile records with the victims' user
    ids as device ids). By user id a victim reads their own hash; and when that hash is missing
    (expired, consent withdrawn: simulated by moving it away) the answer is "unknown", never the
    attacker's. Only a lookup by anonymous id follows the alias, to the attacker."""
    client = runs["client"]
    reader = FeatureReader(redis.Redis.from_url(redis_url, protocol=2), HST)
    with serve_app(create_app(redis_url, HST, access=UNLIMITED, max_batch=1000)) as port:
        for v in ATTACKED:
            assert client.get(alias_key(HST, v)) == b"attacker"
            own = reader.typed(client.hgetall(user_key(HST, v)), v)
            got = reader.get(v)  # by user id: the user's own hash
            assert {**got, "stale": None} == {**own, "stale": None}, v
            # by anonymous id: the visitor "victim" (another namespace), linked to the attacker
            assert reader.get(v, anonymous=True)["user_id"] == "attacker"
            moved = f"moved:{uuid.uuid4().hex}"
            client.rename(user_key(HST, v), moved)
            try:
                assert reader.get(v) is None and reader.get_many([v, "attacker"])[v] is None
                path = "/features/" + quote(v, safe="")
                assert call(port, "GET", path) == (404, {"detail": "unknown user"})
                status, body = call(port, "POST", "/features", {"user_ids": [v]})
                assert status == 200 and body["features"][v] is None
                got = reader.get(v, anonymous=True)
                assert got["user_id"] == "attacker" and got["alias_of"] == v
                status, body = call(port, "GET", path + "?anonymous=true")
                assert status == 200 and body["user_id"] == "attacker"
            finally:
                client.rename(moved, user_key(HST, v))


def call(port: int, method: str, path: str, body=None) -> tuple[int, object]:
    """(status, JSON body) of one request; ``path`` is sent as given (pre-encoded)."""
    status, _, got = http_call(port, method, path, body)
    return status, got


# -- properties ---------------------------------------------------------------------------------
ids = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=140),
    st.text(st.sampled_from("victim:*?[]-\x00\n\r\t\x1b \u2028\u200b\xa0\u0456"), max_size=12),
    st.sampled_from(["x" * 128, "x" * 129, "", " "]),
    st.integers(-(2**63), 2**63 - 1), st.booleans(), st.none(), st.just(MISSING),
    st.lists(st.text(max_size=3), max_size=2),
)


@hsettings(max_examples=400, deadline=None)
@given(uid=ids, anon=ids)
def test_decoder_accepts_exactly_the_ids_the_layout_can_store(uid, anon):
    """The decoder and features.layout.is_valid_id agree on every id, and an accepted id is kept
    verbatim (no trimming or normalisation that could fold it onto another user's id)."""
    doc = {"event_id": "e1", "event": "page_view", "timestamp": T0}
    for name, value in (("user_id", uid), ("anonymous_id", anon)):
        if value is not MISSING:
            doc[name] = value
    ev = decode(orjson.dumps(doc), max_bytes=1 << 20)
    has_uid = uid is not MISSING and uid is not None
    has_anon = anon is not MISSING and anon is not None
    owner = uid if has_uid else anon if has_anon else None
    ok = (is_valid_id(owner) and (not has_anon or anon == "" or is_valid_id(anon)))
    assert isinstance(ev, Event) is ok, (uid, anon, getattr(ev, "reason", None))
    if ok:
        assert ev.user == owner and ev.identified is has_uid
        assert ev.anon == (anon if has_anon else "")
    else:
        assert ev.reason in ("bad_id", "missing_user"), ev


# Python's non-printable categories (str.isprintable); " " is the one printable separator.
NON_PRINTABLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")


@pytest.fixture(scope="module")
def hyp_redis(redis_url):
    """A client and the one victim hash under prefix 'hyp' (written by the flow's own sink)."""
    client = redis.Redis.from_url(redis_url)
    sink = RedisFeatureSink(redis_url, "hyp", 3600).build("features", 0, 1)
    client.delete(*client.keys("hyp:*") or ["hyp:none"])
    sink.write_batch([([Write("victim", {"views_1h": "3", "as_of": str(T0)}, (), True)],
                       [("victim-anon", "victim")])])
    yield client, sink, FeatureReader(client, "hyp")  # built once: it parses the registry YAML
    client.delete(*client.keys("hyp:*") or ["hyp:none"])
    sink.close()
    client.close()


@hsettings(max_examples=200, deadline=None)
@given(ident=st.text(st.characters(exclude_categories=NON_PRINTABLE) | st.sampled_from(" :*?[]{}\\"),
                    min_size=1, max_size=124).filter(lambda s: s not in ("victim", "victim-anon")))
def test_sink_writes_any_valid_id_only_under_its_own_key(hyp_redis, ident):
    """Whatever a valid id holds, the flow's Redis sink writes exactly its own two keys, and the
    reader then answers that id with its own values and the victim with the victim's."""
    client, sink, reader = hyp_redis
    assert is_valid_id(ident)
    before = set(client.keys("hyp:*"))
    victim = client.hgetall(user_key("hyp", "victim"))
    sink.write_batch([([Write(ident, {"views_1h": "9", "as_of": str(T0)}, (), True)],
                       [(ident + "-dev", ident)])])
    try:
        new = set(client.keys("hyp:*")) - before
        assert new == {user_key("hyp", ident).encode(), alias_key("hyp", ident + "-dev").encode()}
        assert client.hgetall(user_key("hyp", "victim")) == victim
        ids = [ident, ident + "-dev", "victim", "victim-anon"]
        got, by_anon = reader.get_many(ids), reader.get_many(ids, anonymous=True)
        assert got[ident]["views_1h"] == 9 and got[ident]["user_id"] == ident
        assert got[ident + "-dev"] is None and by_anon[ident + "-dev"]["user_id"] == ident
        assert got["victim"]["views_1h"] == 3 and by_anon["victim"] is None  # not a visitor
        assert got["victim-anon"] is None and by_anon["victim-anon"]["user_id"] == "victim"
    finally:
        client.delete(*new)
