"""Decoder: every input ends as an Event or a DeadLetter with a reason; never an exception."""
import json

import orjson
from hypothesis import given, settings, strategies as st

from flows.events import DeadLetter, Event, decode
from tests.dead_letters import raw_of

GOOD = {"event_id": "e1", "type": "track", "event": "add_to_cart", "user_id": "u1",
        "timestamp": 1795428000000, "properties": {"price": 3.5}, "context": {"channel": "app"}}


def bad(**changes):
    doc = {**GOOD, **changes}
    return decode(orjson.dumps({k: v for k, v in doc.items() if v is not ...}))


def test_good_event_fields():
    ev = decode(orjson.dumps(GOOD))
    assert isinstance(ev, Event)
    assert (ev.user, ev.name, ev.channel, ev.ts_ms) == ("u1", "add_to_cart", "app", 1795428000000)


def test_anonymous_and_page_types():
    ev = decode(orjson.dumps({**GOOD, "user_id": None, "anonymous_id": "a9", "type": "page"}))
    assert (ev.user, ev.name) == ("a9", "page_view")


def test_rejections_name_their_reason():
    assert bad(event_id=...).reason == "missing_event_id"
    assert bad(user_id=...).reason == "missing_user"
    assert bad(user_id="x" * 129).reason == "bad_id"
    assert bad(user_id="a\nb").reason == "bad_id"
    assert bad(type="nope").reason == "bad_type"
    assert bad(event=...).reason == "missing_event"
    assert bad(timestamp={"x": 1}).reason == "bad_timestamp"
    assert bad(timestamp="yesterday").reason == "bad_timestamp"
    assert bad(timestamp=0).reason == "absurd_timestamp"
    assert bad(properties={"revenue": "12"}).reason == "bad_field"
    assert decode(b"\xff\xfe{}").reason == "not_utf8"
    assert decode(b"[1, 2]").reason == "not_an_object"
    assert decode(b'{"a":').reason == "invalid_json"
    assert decode(b"{" + b" " * 40000 + b"}").reason == "oversized"


def test_future_timestamps_against_the_wall_clock():
    dl = decode(orjson.dumps(GOOD), max_future_ms=1000, now_ms=GOOD["timestamp"] - 5000)
    assert isinstance(dl, DeadLetter) and dl.reason == "future_event"


def test_hostile_but_printable_ids_are_kept_verbatim():
    for uid in ["a:b", "*", "'; DROP TABLE users;--", "{x}", "sf:v2:user:other"]:
        assert decode(orjson.dumps({**GOOD, "user_id": uid})).user == uid


def test_dead_letter_keeps_original_bytes():
    from tests.dead_letters import raw_of

    raw = b'{"event_id": 1\xff'
    dl = decode(raw)
    assert raw_of(orjson.loads(dl.to_json())) == raw


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_without_raising(raw):
    assert isinstance(decode(raw), (Event, DeadLetter))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(GOOD) + ["anonymous_id", "x"]), json_values, max_size=8))
def test_any_json_object_decodes_without_raising(doc):
    result = decode(orjson.dumps({**GOOD, **doc}, option=orjson.OPT_NON_STR_KEYS))
    assert isinstance(result, (Event, DeadLetter))
    if isinstance(result, Event):
        assert result.user and result.event_id and 946_684_800_000 <= result.ts_ms


def _nested(depth: int):
    doc: dict = {}
    node = doc
    for _ in range(depth - 1):
        node["a"] = {}
        node = node["a"]
    return doc


def test_limits_of_one_event_name_their_reason():
    """The poison pills of issue 12 and their neighbours: each is a dead letter, not a crash."""
    deep = orjson.dumps(GOOD)[:-1] + b',"x":' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}"
    assert len(deep) < 2500 and isinstance(orjson.loads(deep), dict)  # orjson reads what it cannot write
    assert decode(deep).reason == "too_deep"
    assert bad(properties={"revenue": 1e308}).reason == "bad_number"
    assert bad(properties={"cost": -2e9}).reason == "bad_number"
    assert bad(properties={"price": 1e10}).reason == "bad_number"
    assert bad(properties={"quantity": 10**7}).reason == "bad_number"
    assert decode(b'{"event_id":"e","user_id":"u","event":"x","timestamp":1795428000000,'
                  b'"properties":{"n":18446744073709551615}}').reason == "bad_number"
    assert bad(properties={f"k{i}": i for i in range(600)}).reason == "too_many_keys"
    assert bad(properties={"tags": list(range(600))}).reason == "too_many_keys"
    assert bad(properties={"note": "x" * 5000}).reason == "string_too_long"
    assert bad(context={"x" * 5000: 1}).reason == "string_too_long"
    # just inside every limit: kept
    assert isinstance(bad(properties={"revenue": 1e9, "quantity": 10**6, "note": "x" * 4096,
                                      "deep": _nested(14)}), Event)


def test_limits_are_configurable():
    from flows.events import Limits
    doc = orjson.dumps({**GOOD, "properties": {"revenue": 5e9, "a": {"b": {"c": 1}}}})
    assert decode(doc).reason == "bad_number"
    assert isinstance(decode(doc, limits=Limits(max_money=1e10)), Event)
    assert decode(doc, limits=Limits(max_money=1e10, max_depth=3)).reason == "too_deep"


leaf = (st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=50))
deep_json = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                         max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(props=deep_json, ctx=deep_json, money=st.floats(allow_nan=False, allow_infinity=False))
def test_every_accepted_event_can_be_stored(props, ctx, money):
    """Whatever decode accepts, the steps after it can handle: the raw row serialises, the
    amounts sum in cents, the feature code takes the event."""
    from features.profile import cents
    from warehouse.raw_events import raw_row
    doc = {**GOOD, "properties": props, "context": ctx}
    if isinstance(props, dict):
        doc["properties"] = {**props, "revenue": money}
    ev = decode(json.dumps(doc).encode())  # the standard library writes integers of any size
    if isinstance(ev, Event):
        row = raw_row(ev, b"k")
        assert orjson.loads(row[-1]) is not None
        assert isinstance(cents(ev.revenue), int) and isinstance(cents(ev.properties.get("price")), int)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20), st.integers(0, 2**62), st.booleans(), st.none() | st.booleans(),
       st.none() | st.tuples(st.floats(-90, 90), st.floats(-180, 180)))
def test_an_event_pickles_to_itself_and_older_pickles_still_load(user, ts, linked, consent, latlon):
    """Events cross processes (cluster mode) and sit in snapshots, pickled field by field."""
    import pickle

    from flows.events import Event

    e = Event("e1", "track", "page_view", user, ts, "web", "c", 1.5, 0.0, "10.0.0.1",
              {"sku": [1, 2]}, anon="a1", identified=True, consent=consent, raw=b'{"x":1}',
              latlon=latlon)
    e.linked, e.device_consent = linked, consent  # set after decoding, by the ingest shard
    assert pickle.loads(pickle.dumps(e, protocol=5)) == e


def test_an_event_pickled_by_an_earlier_version_still_loads():
    """Snapshots taken before Event.__reduce__ hold the slots default's pickle."""
    import pickle

    from flows.events import Event

    e = Event("e1", "track", "page_view", "u1", 5, "web", "", 0.0, 0.0, "", {"a": 1}, raw=b"{}")
    reduce = Event.__reduce__
    del Event.__reduce__
    try:
        old = pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        Event.__reduce__ = reduce
    assert pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL) != old
    assert pickle.loads(old) == e
