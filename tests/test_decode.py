"""Decoder: every input ends as an Event or a DeadLetter with a reason; never an exception."""
import orjson
from hypothesis import given, settings, strategies as st

from flows.events import DeadLetter, Event, decode

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
    assert isinstance(dl, DeadLetter) and dl.reason == "future_timestamp"


def test_hostile_but_printable_ids_are_kept_verbatim():
    for uid in ["a:b", "*", "'; DROP TABLE users;--", "{x}", "sf:v1:user:other"]:
        assert decode(orjson.dumps({**GOOD, "user_id": uid})).user == uid


def test_dead_letter_keeps_original_bytes():
    import base64
    raw = b'{"event_id": 1\xff'
    dl = decode(raw)
    assert base64.b64decode(orjson.loads(dl.to_json())["raw_b64"]) == raw


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
