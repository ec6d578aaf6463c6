"""The fast paths of the decoder, the PII scrubber and the IP helpers give what the plain code
gives, on generated inputs (hostile ones included).

Each fast path skips work it can prove useless: the walk over a decoded document when the raw
bytes alone prove every limit holds (flows/events.py ``_fits_limits``), the substitution passes
over a text that cannot hold PII (privacy/pii.py ``_plain_text``), the copy of properties that
need no scrubbing (``scrub_json``), ipaddress for a canonical IPv4 address (``mask_ip``,
``ip_cluster``, ``SignalRouter.route``). Here the plain path is reached by turning the fast test
off, or, for the decoder's small helpers, is the code as it was before, kept below."""
from __future__ import annotations

import datetime as dt
import json
import re

import orjson
import pytest
from hypothesis import given, settings, strategies as st

import alerts.metrics as metrics
import flows.entity_alerts as entity_alerts
import flows.events as events
import privacy.pii as pii
from alerts.rules import load_rules
from flows.events import MAX_ID_CHARS, MAX_TS_MS, MIN_TS_MS, MONEY_FIELDS, Event, Limits, Reject, decode

NEVER = re.compile(r"(?!x)x")  # a CANONICAL_IPV4 that matches nothing: the plain path
GOOD = {"event_id": "e1", "type": "track", "event": "add_to_cart", "user_id": "u1",
        "timestamp": 1795428000000, "properties": {"price": 3.5}, "context": {"channel": "app"}}

# -- the decoder's walk over the document -----------------------------------------------------

leaf = (st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12) | st.sampled_from(["[{", "x" * 30, "9" * 19, "1" * 18]))
json_doc = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                        max_leaves=30)
limits = st.builds(Limits, max_depth=st.integers(0, 8), max_keys=st.integers(0, 80),
                   max_string_chars=st.integers(0, 60))


def _raw(props, ctx, indent: bool) -> bytes:
    doc = {**GOOD, "properties": props, "context": ctx}
    return json.dumps(doc, indent=1 if indent else None).encode()  # any integer, any layout


@settings(max_examples=500, deadline=None)
@given(props=json_doc, ctx=json_doc, lim=limits, indent=st.booleans())
def test_fits_limits_only_when_the_walk_passes(props, ctx, lim, indent):
    raw = _raw(props, ctx, indent)
    if events._fits_limits(raw, lim):
        events._check_shape(orjson.loads(raw), lim)  # does not raise


@settings(max_examples=500, deadline=None)
@given(props=json_doc, ctx=json_doc, lim=limits | st.just(events.DEFAULT_LIMITS), indent=st.booleans())
def test_decode_with_and_without_the_shape_fast_path(props, ctx, lim, indent, monkeypatch_module):
    raw = _raw(props, ctx, indent)
    fast = decode(raw, limits=lim)
    with monkeypatch_module.context() as m:
        m.setattr(events, "_fits_limits", lambda raw, limits: False)
        assert decode(raw, limits=lim) == fast


def test_fits_limits_edges():
    assert events._fits_limits(orjson.dumps(GOOD), events.DEFAULT_LIMITS)
    deep = b'{"a":' * 16 + b"1" + b"}" * 16
    assert events._fits_limits(deep, Limits(max_depth=16)) and not events._fits_limits(deep, Limits(max_depth=15))
    assert not events._fits_limits(b'{"n":9223372036854775807}', events.DEFAULT_LIMITS)  # 19 digits: walk
    assert not events._fits_limits(bytearray(orjson.dumps(GOOD)), events.DEFAULT_LIMITS)  # not bytes: walk
    big = orjson.dumps({**GOOD, "properties": {"note": "x" * 2000}})
    assert not events._fits_limits(big, events.DEFAULT_LIMITS)  # longer than 2 * max_keys + 1 bytes


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


# -- the decoder's helpers, as they were ------------------------------------------------------

def _text_before(obj, name, default=""):
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise Reject("bad_field", f"{name} is not a string")
    return value[:MAX_ID_CHARS]


def _number_before(props, name):
    value = props.get(name, 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Reject("bad_field", f"properties.{name} is not a number")
    return float(value)


def _parse_timestamp_before(value):
    if isinstance(value, bool):
        raise Reject("bad_timestamp", "timestamp is a boolean")
    if isinstance(value, (int, float)):
        ts = int(value)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise Reject("bad_timestamp", f"unparsable timestamp {value[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.timezone.utc)
        ts = int(parsed.timestamp() * 1000)
    else:
        raise Reject("bad_timestamp", f"timestamp of type {type(value).__name__}")
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise Reject("absurd_timestamp", f"timestamp {ts} outside 2000..2100")
    return ts


def _check_amounts_before(props, limits):
    for name in MONEY_FIELDS:
        v = props.get(name)
        if type(v) in (int, float) and not -limits.max_money <= v <= limits.max_money:
            raise Reject("bad_number", f"properties.{name} beyond +/-{limits.max_money:g}")
    v = props.get("quantity")
    if type(v) in (int, float) and not -limits.max_quantity <= v <= limits.max_quantity:
        raise Reject("bad_number", f"properties.quantity beyond +/-{limits.max_quantity:g}")


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Reject as rej:
        return "reject", rej.reason, rej.detail


class _Str(str):
    pass


values = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=140)
          | st.text(max_size=5).map(_Str) | st.lists(st.integers(), max_size=2)
          | st.integers(MIN_TS_MS - 5, MAX_TS_MS + 5)
          | st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2200, 1, 1),
                         timezones=st.none() | st.just(dt.timezone.utc)).map(dt.datetime.isoformat))
names = st.sampled_from([*MONEY_FIELDS, "quantity", "campaign_id", "x"])


@settings(max_examples=500, deadline=None)
@given(props=st.dictionaries(names, values, max_size=5), name=names)
def test_decoder_helpers_as_before(props, name):
    lim = Limits()
    assert _outcome(events._text, props, name) == _outcome(_text_before, props, name)
    assert _outcome(events._text, props, name, "d") == _outcome(_text_before, props, name, "d")
    assert _outcome(events._number, props, name) == _outcome(_number_before, props, name)
    value = props.get(name)
    assert _outcome(events.parse_timestamp, value) == _outcome(_parse_timestamp_before, value)
    before = _outcome(_check_amounts_before, props, lim)
    named = any(n in props for n in (*MONEY_FIELDS, "quantity"))  # what it now also tells
    assert _outcome(events._check_amounts, props, lim) == (before if before[0] == "reject" else ("ok", named))


# -- PII: texts, structures -------------------------------------------------------------------

tokens = st.sampled_from(["1", "23", "456", "7890", "٣", ".", ":", "-", " ", "\u00a0", "(", ")", "+",
                          "@", "%", "%40", "%2B", "a", "b.cn", "x", "/", "#", "_", "hmac:", "T", "Z",
                          "ab12", "2026-11-23", "::", "ff", "(12)", "(+86)", ") (", ")-("])
texts = st.lists(tokens, max_size=14).map("".join) | st.text(max_size=30)


@settings(max_examples=1000, deadline=None)
@given(text=texts, key=st.sampled_from([None, b"k"]))
def test_scrub_text_with_and_without_the_plain_text_fast_path(text, key, monkeypatch_module):
    fast = pii.scrub_text(text, key)
    with monkeypatch_module.context() as m:
        m.setattr(pii, "_plain_text", lambda text: False)
        assert pii.scrub_text(text, key) == fast
    if pii._plain_text(text):
        assert fast == text


def test_plain_text_never_hides_pii():
    for text in ["(12) (34) (56) (78)", "(12)(34)(56)(78)", "(+86) 138-0000-0000", "+86 138 0000 0000",
                 "(555) 123-4567", "١٢٣٤٥٦٧٨٩٠", "13800000000", "see 1.2.3.4", "a@b.cn", "ann%40example.com",
                 "2001:db8::1", "::1"]:
        assert not pii._plain_text(text) and pii.scrub_text(text, None) != text, text


keys = st.sampled_from(["sku", "note", "email", "E-Mail", "tel", "hotel", "a@b.cn", "203.0.113.7"]) | st.text(max_size=5)
pii_json = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**65) | st.floats() | texts,
                        lambda c: st.lists(c, max_size=3) | st.tuples(c) | st.dictionaries(keys, c, max_size=4),
                        max_leaves=20)


def _dumped(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the same error either way
        return type(exc), str(exc)


@settings(max_examples=500, deadline=None)
@given(value=pii_json, key=st.sampled_from([None, b"k"]))
def test_scrub_json_is_dumps_of_scrub(value, key):
    assert _dumped(lambda: pii.scrub_json(value, key)) == _dumped(lambda: orjson.dumps(pii.scrub(value, key)))


def test_scrub_json_beyond_the_depth_scrub_keeps():
    deep: list = ["a"]
    for _ in range(80):
        deep = [deep]
    assert pii.scrub_json(deep, None) == orjson.dumps(pii.scrub(deep, None))
    for odd in ({1: "x"}, {"n": 2**64}, {"s": {1, 2}}):  # orjson's own error, as before
        assert _dumped(lambda: pii.scrub_json(odd, None)) == _dumped(lambda: orjson.dumps(pii.scrub(odd, None)))


# -- IPs ----------------------------------------------------------------------------------------

octet = st.integers(0, 999).map(str) | st.sampled_from(["00", "01", "010", "255", "256", "٣", " 1", "1 "])
ips = (st.ip_addresses().map(str) | st.lists(octet, min_size=3, max_size=5).map(".".join)
       | st.text(alphabet="0123456789.:abcdefABCDEF%f", max_size=20) | st.text(max_size=8))


@settings(max_examples=1000, deadline=None)
@given(ip=ips)
def test_ip_fast_paths_as_ipaddress(ip, monkeypatch_module):
    fast = (pii.mask_ip(ip), metrics.ip_cluster.__wrapped__(ip))
    with monkeypatch_module.context() as m:
        m.setattr(pii, "CANONICAL_IPV4", NEVER)
        m.setattr(metrics, "CANONICAL_IPV4", NEVER)
        assert (pii.mask_ip(ip), metrics.ip_cluster.__wrapped__(ip)) == fast


ROUTER = entity_alerts.SignalRouter(load_rules().entity_rules, shards=4)


@settings(max_examples=500, deadline=None)
@given(ip=ips | st.sampled_from(["", None]), name=st.sampled_from(["login", "login_failed", "ad_click", "order_completed",
                                                    "page_view"]), user=st.sampled_from(["u1", "u2", "u3"]))
def test_route_fast_path_as_before(ip, name, user, monkeypatch_module):
    e = Event("e1", "track", name, user, 1_000, "web", "", 0.0, 0.0, ip, country="US")
    fast = ROUTER.route(e)
    with monkeypatch_module.context() as m:
        m.setattr(entity_alerts, "CANONICAL_IPV4", NEVER)
        assert ROUTER.route(e) == fast
