"""PII minimisation (privacy/pii.py) without the engine: e-mails and phones planted by an
independent generator at every depth, under key names, in free text, as list items and as keys,
never survive a scrub; ordinary values do; IPs are masked as ipaddress says; dead letters keep the
raw bytes only sealed; entity alerts name no IP and no user."""
from __future__ import annotations

import base64
import copy
import ipaddress
import logging

import orjson
import pytest
from hypothesis import assume, given, settings, strategies as st

from alerts.entities import EntityRules, Signal, public_entity
from alerts.rules import load_rules
from flows.events import DeadLetter, reset_dead_letter_keys
from privacy.pii import (is_pii_key, keyed_hash, mask_ip, mask_ips_in_text, scrub, scrub_raw,
                         scrub_text, seal, subjects_of, unseal, warn_if_no_key)
from privacy.subjects import subject_hash

KEY = b"test-pii-key"

# Values an event carries that hold no PII: none may change (false positives).
ORDINARY = [
    "2026-11-23", "2026-11-23T10:00:00Z", "2026-11-23 10:00:00", "2026-11-23T10:00:00.250+01:00",
    "23.11.2026", "11/23/2026", "2026.11.23", "20261123", "20261123100000", "1795428000000",
    "1795428000", "10:00:00", "19.99", "1299.00", "12345.67", "1234567.89", "€1.234.567,89",
    "$1,234,567.00", "12,345,678", "3.14159265", "1.5e10", "o-1234", "ORD-2026-000123",
    "ord_20261123_001", "order #12345678", "SKU-12345678", "AB-1234-5678", "sku_10023456",
    "p-10023456", "550e8400-e29b-41d4-a716-446655440000", "12345678-1234-1234-1234-123456789012",
    "sizes 36 38 40 42", "page 3 of 12", "/p/12345678", "v1.2.3", "1.234.567",
    "52.5200 13.4050", "lat 52.520008 lon 13.404954", "web", "push", "c-spring-2026", "p1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36", "https://shop.example/deals?utm_source=news&id=42",
    "Asia/Shanghai", "zh-CN", "", "a:b", "user@", "@home", "x@y",
]

# -- an independent generator of e-mails and phones ----------------------------------------------

EMAILS = st.emails()  # hypothesis' own RFC 5322 addresses: not our pattern


@st.composite
def phones(draw) -> str:
    """Phone numbers as people write them (8 to 15 digits), from national conventions."""
    d = lambda n: draw(st.text("0123456789", min_size=n, max_size=n))  # noqa: E731
    nz = lambda: draw(st.sampled_from("123456789"))  # noqa: E731
    sep = draw(st.sampled_from([" ", "-", ""]))
    form = draw(st.sampled_from(["intl", "us", "us_dots", "zero_zero", "cn_mobile", "cn_intl",
                                 "local", "fr", "uk"]))
    if form == "intl":  # +CC then groups
        groups = [nz() + d(draw(st.integers(0, 2)))]
        groups += [d(draw(st.integers(2, 4))) for _ in range(draw(st.integers(2, 4)))]
        text = "+" + sep.join(groups) if sep else "+" + " ".join(groups)
    elif form == "us":
        text = f"({nz()}{d(2)}) {nz()}{d(2)}-{d(4)}"
    elif form == "us_dots":
        text = f"{nz()}{d(2)}.{nz()}{d(2)}.{d(4)}"
    elif form == "zero_zero":
        text = f"00{nz()}{d(draw(st.integers(0, 2)))}-{nz()}{d(draw(st.integers(0, 3)))}-{d(draw(st.integers(5, 8)))}"
    elif form == "cn_mobile":
        text = "1" + draw(st.sampled_from("3456789")) + d(9)
    elif form == "cn_intl":
        text = f"+86 1{draw(st.sampled_from('3456789'))}{d(1)} {d(4)} {d(4)}"
    elif form == "local":
        text = f"0{nz()}{d(draw(st.integers(0, 3)))}{sep or ' '}{nz()}{d(draw(st.integers(4, 7)))}"
    elif form == "fr":
        s = draw(st.sampled_from([" ", "."]))
        text = "0" + nz() + s + s.join(d(2) for _ in range(4))
    else:
        text = f"+44 {nz()}{d(1)} {d(4)} {d(4)}"
    digits = sum(c.isdigit() for c in text)
    assume(8 <= digits <= 15)
    return text


PII_NAMES = ["email", "Email", "E-Mail", "e_mail", "mail", "emailAddress", "contact_email",
             "user_email", "billingEmail", "phone", "Phone", "phone_number", "phoneNumber", "mobile",
             "mobile_number", "MobilePhone", "tel", "Tel", "telephone", "msisdn", "cell", "fax"]
NAMES = ["sku", "note", "items", "meta", "a", "b", "comment", "address", "text", "tags", "order"]
WORDS = st.text("abcdefghijklmnopqrstuvwxyz ,;!?()'\"", max_size=12)
FILLER_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.sampled_from(ORDINARY),
                        WORDS)
FILLER = st.recursive(FILLER_LEAF, lambda c: st.lists(c, max_size=3) |
                      st.dictionaries(st.sampled_from(NAMES), c, max_size=3), max_leaves=12)


@st.composite
def planted_docs(draw):
    """(document, [clear PII planted]): e-mails and phones under key names, in free text, as
    list items and as dict keys, at depths 1 to 16, among ordinary filler."""
    root = {"props": draw(FILLER)}
    plants: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        pii = draw(st.one_of(EMAILS, phones()))
        plants.append(pii)
        depth = draw(st.integers(1, 15))
        node = root
        for level in range(depth - 1):  # a chain of dicts and lists down to the planting spot
            name = draw(st.sampled_from(NAMES))
            if draw(st.booleans()):
                child = node.setdefault(f"{name}{level}", {})
                if not isinstance(child, dict):
                    child = node[f"{name}{level}"] = {}
                node = child
            else:
                lst = node.setdefault(f"{name}{level}", [])
                if not isinstance(lst, list):
                    lst = node[f"{name}{level}"] = []
                lst.append({})
                node = lst[-1]
        how = draw(st.sampled_from(["named", "named_list", "named_int", "text", "item", "bare",
                                    "key", "text_item"]))
        if how == "named_int" and pii.isdigit():
            node[draw(st.sampled_from(PII_NAMES))] = int(pii)  # a phone as a JSON number
        elif how in ("named", "named_int"):
            node[draw(st.sampled_from(PII_NAMES))] = pii
        elif how == "named_list":
            node[draw(st.sampled_from(PII_NAMES))] = [draw(WORDS), pii]
        elif how == "text":
            node[draw(st.sampled_from(NAMES))] = f"{draw(WORDS)} {pii} {draw(WORDS)}"
        elif how == "text_item":
            node.setdefault("lines", []).append(f"{draw(WORDS)}: {pii}.")
        elif how == "item":
            node.setdefault("tags", []).append(pii)
        elif how == "bare":
            node[draw(st.sampled_from(NAMES)) + "_x"] = pii
        else:
            node[pii] = draw(FILLER_LEAF)
    return root, plants


def strings_of(value) -> list:
    """Every string, key and integer of a structure (what could hold PII)."""
    out, stack = [], [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            out += list(v.keys())
            stack += list(v.values())
        elif isinstance(v, list):
            stack += v
        elif isinstance(v, (str, int)) and not isinstance(v, bool):
            out.append(v)
    return out


def assert_no_clear(value, plants: list[str]) -> None:
    found = strings_of(value)
    texts = [s for s in found if isinstance(s, str)]
    for pii in plants:
        digits = "".join(c for c in pii if c.isdigit())
        assert not any(pii in s for s in texts), (pii, value)
        if "@" not in pii:  # a phone: neither as written nor as its digits, nor as a number
            assert not any(digits in "".join(filter(str.isdigit, s)) for s in texts), (pii, value)
            assert int(digits) not in found, (pii, value)


@settings(max_examples=300, deadline=None)
@given(planted_docs(), st.sampled_from([KEY, None]))
def test_scrub_leaves_no_planted_email_or_phone_anywhere(case, key):
    doc, plants = case
    before = copy.deepcopy(doc)
    out = scrub(doc, key)
    assert doc == before  # the input is not changed
    assert_no_clear(out, plants)
    assert_no_clear(orjson.loads(orjson.dumps(out)), plants)
    if key is not None:  # idempotent: a hash or a mask is not PII (without a key, an e-mail
        assert scrub(out, key) == out  # used as a dict key becomes "[email]": a PII name)


@settings(max_examples=200, deadline=None)
@given(EMAILS, phones(), WORDS, WORDS)
def test_text_hashes_each_occurrence_with_the_key(email, phone, left, right):
    text = f"{left} {email} {right} {phone} {left}"
    out = scrub_text(text, KEY)
    assert email not in out and phone not in out
    assert keyed_hash(phone, KEY) in out
    if not set(email.split("@")[0]) & set("/?=&"):  # (there an address in a URL is cut)
        assert keyed_hash(email, KEY) in out
    assert scrub_text(text, None).count("[email]") == 1


@settings(max_examples=200, deadline=None)
@given(FILLER)
def test_ordinary_structures_are_unchanged(value):
    assert scrub({"props": value}, KEY) == {"props": value}


@pytest.mark.parametrize("value", ORDINARY)
def test_no_false_positive(value):
    assert scrub_text(value, KEY) == value
    assert scrub({"note": value, "items": [value]}, None) == {"note": value, "items": [value]}


@pytest.mark.parametrize("text", ["+86 138 0000 0000", "(555) 123-4567", "0049-30-1234567",
                                  "13800000000", "+1 (555) 123-4567", "555.123.4567",
                                  "06 12 34 56 78", "+44 20 7946 0958", "１３８００００００００"])
def test_phone_forms(text):
    assert scrub_text(f"call {text}, thanks", None) == "call [phone], thanks"
    assert scrub_text(f"tel:{text}", KEY) == "tel:" + keyed_hash(text, KEY)


def test_a_phone_next_to_a_date_or_a_price_is_still_found():
    assert scrub_text("13800000000 2026-11-23", None) == "[phone] 2026-11-23"
    assert scrub_text("12.50 13800000000", None) == "12.50 [phone]"
    assert scrub_text("2026-11-23 138 0000 0000", None) == "2026-11-23 [phone]"


def test_key_names():
    assert all(is_pii_key(k) for k in PII_NAMES)
    assert not any(is_pii_key(k) for k in NAMES + ["hotel", "tele", "cellar", "intel"])


def test_key_named_values_without_a_key_are_removed_and_with_a_key_hashed():
    doc = {"a": {"b": [{"Phone": ["+86 138 0000 0000", 5], "msisdn": 8613800000000, "x": 1}]}}
    assert scrub(doc, None) == {"a": {"b": [{"x": 1}]}}
    assert scrub(doc, KEY) == {"a": {"b": [{"Phone": [keyed_hash("+86 138 0000 0000", KEY)], "x": 1}]}}


def test_deeper_than_any_event_is_dropped_not_recursed():
    doc: dict = {}
    node = doc
    for _ in range(500):
        node["n"] = {}
        node = node["n"]
    node["mail"] = "a@b.cn"
    assert "a@b.cn" not in orjson.dumps(scrub(doc, None)).decode()


# -- IP addresses ---------------------------------------------------------------------------------

def oracle(ip: str) -> str:
    """What the former warehouse.raw_events.mask_ip gave: ipaddress' network address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    return str(ipaddress.ip_network(f"{ip}/{24 if addr.version == 4 else 48}", strict=False)
               .network_address)


@settings(max_examples=2000, deadline=None)
@given(st.ip_addresses())
def test_mask_ip_equals_ipaddress(addr):
    assert mask_ip(str(addr)) == oracle(str(addr))


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text("0123456789.:abcdefABCDEF% x", max_size=24),
                 st.lists(st.integers(-5, 300).map(str), min_size=3, max_size=5).map(".".join),
                 st.text(max_size=12)))
def test_mask_ip_on_odd_input_equals_ipaddress(text):
    assert mask_ip(text) == oracle(text)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), WORDS, WORDS)
def test_ips_in_text_are_masked(addr, left, right):
    ip = str(addr)
    assume(mask_ip(ip) != ip)  # an address that is its own mask (x.y.z.0) shows nothing more
    for out in (mask_ips_in_text(f"{left} {ip} {right}"), scrub_text(f"{left} from {ip}, {right}", KEY)):
        assert ip not in out and mask_ip(ip) in out


# -- dead letters ---------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(min_size=1, max_size=40))
def test_seal_round_trip_and_tamper_detection(raw, secret):
    sealed = seal(raw, secret)
    assert sealed.startswith("v1:") and unseal(sealed, secret) == raw
    assert seal(raw, secret) != sealed  # a fresh nonce each time
    blob = bytearray(base64.b64decode(sealed[3:]))
    blob[len(blob) // 2] ^= 1
    with pytest.raises(ValueError):
        unseal("v1:" + base64.b64encode(bytes(blob)).decode(), secret)
    with pytest.raises(ValueError):
        unseal(sealed, secret + b"x")
    with pytest.raises(ValueError):
        unseal(sealed[:20], secret)


def test_subjects_of():
    raw = b'{"user_id":"u1","anonymous_id":"a1","event":"x"}'
    assert subjects_of(raw, KEY) == [subject_hash("u1", KEY), subject_hash("a1", KEY)]
    assert subjects_of(b'{"user_id": 5, "anonymous_id": ""}', KEY) == []
    assert subjects_of(b"\xff\xfe", KEY) == [] and subjects_of(b"null", KEY) == []


def test_warning_without_a_key(caplog):
    log = logging.getLogger("test.pii")
    with caplog.at_level(logging.WARNING):
        assert warn_if_no_key(log, env={}) is False
        assert warn_if_no_key(log, env={"SURGEFLOW_PII_KEY": "s"}) is True
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "SURGEFLOW_PII_KEY is not set" in caplog.records[0].getMessage()


@pytest.fixture
def dead_letter_keys():
    reset_dead_letter_keys({"SURGEFLOW_PII_KEY": KEY.decode(), "SURGEFLOW_DEAD_LETTER_KEY": "dl-secret"})
    yield
    reset_dead_letter_keys()


def planted_raw(email: str, phone: str, ip: str) -> list[bytes]:
    doc = {"event_id": "e1", "user_id": "u1", "anonymous_id": "a1", "event": "signup",
           "context": {"ip": ip, "traits": {"email": email, "deep": [{"mobile": phone}]}},
           "properties": {"note": f"reach me at {email} or {phone} (from {ip})"}}
    valid = orjson.dumps(doc)
    return [valid, valid[:-7],  # invalid JSON
            valid.replace(b"@", b"\\u0040")[:-3],  # invalid, with the @ escaped
            valid + b"\xff"]  # not UTF-8: nothing masked, only sealed


@settings(max_examples=100, deadline=None)
@given(EMAILS, phones(), st.ip_addresses(v=4))
def test_dead_letter_json_has_no_pii_in_clear_and_unseals_to_the_raw_bytes(email, phone, addr):
    ip = str(addr)
    assume(mask_ip(ip) != ip)
    reset_dead_letter_keys({"SURGEFLOW_PII_KEY": KEY.decode(), "SURGEFLOW_DEAD_LETTER_KEY": "dl"})
    try:
        for raw in planted_raw(email, phone, ip):
            dl = DeadLetter("invalid_json", f"bad record from {ip}: {email}", raw,
                            key=phone.encode(), source="events:0@12")
            text = dl.to_json().decode()
            for pii in (email, phone, ip, email.replace("@", "\\u0040")):
                assert pii not in text, (pii, text)
            doc = orjson.loads(text)
            assert unseal(doc["raw_sealed"], b"dl") == raw
            assert "raw_b64" not in doc and "raw_text" not in doc
            assert doc["at_ms"] > 0 and doc["reason"] == "invalid_json"
            if raw.endswith(b"}"):
                assert doc["subjects"] == [subject_hash("u1", KEY), subject_hash("a1", KEY)]
    finally:
        reset_dead_letter_keys()


def test_dead_letter_without_a_sealing_key_keeps_only_the_masked_copy():
    reset_dead_letter_keys({})
    try:
        doc = orjson.loads(DeadLetter("bad_field", "x", b'{"user_id":"u1","email":"a@b.cn"}').to_json())
    finally:
        reset_dead_letter_keys()
    assert "raw_sealed" not in doc and doc["raw_masked"] == '{"user_id":"u1"}'
    assert doc["subjects"] == [subject_hash("u1", None)]


def test_dead_letter_keys_are_read_once(monkeypatch, dead_letter_keys):
    monkeypatch.setenv("SURGEFLOW_DEAD_LETTER_KEY", "another")
    doc = orjson.loads(DeadLetter("bad_field", "x", b"{}").to_json())
    assert unseal(doc["raw_sealed"], b"dl-secret") == b"{}"


def test_scrub_raw_limits():
    assert scrub_raw(b"x" * 4097, None) is None and scrub_raw(b"x" * 4096, None) == "x" * 4096


# -- alerts ---------------------------------------------------------------------------------------

def test_entity_alerts_name_no_ip_and_no_user():
    """Two IPs of one /24 flood: two alerts, distinct and stable series, no full IP in any
    message; a user's failed logins: the subject hash, not the id. The lifecycle still resolves."""
    rules = EntityRules(load_rules().entity_rules)
    alerts = []
    for i in range(240):
        ip = "198.51.100.23" if i % 2 else "198.51.100.24"
        alerts += rules.observe(Signal(1_000_000 + i * 4, "page", f"anon-{i}", ip, "NL"))
    for i in range(60):
        alerts += rules.observe(Signal(2_000_000 + i * 1000, "login_failed", "victim@example.com", "", "NL"))
    alerts += rules.tick(10_000_000)
    text = orjson.dumps([a.to_dict() for a in alerts]).decode()
    assert "198.51.100.23" not in text and "198.51.100.24" not in text and "victim@" not in text
    floods = [a for a in alerts if a.rule == "ip_request_flood"]
    assert {a.series for a in floods} == {f"ip={public_entity('ip', '198.51.100.23')}",
                                         f"ip={public_entity('ip', '198.51.100.24')}"}
    assert sorted(a.status for a in floods) == ["firing", "firing", "resolved", "resolved"]
    for a in floods:
        assert a.series.startswith("ip=198.51.100.0#")
        assert a.detail == (a.series[3:] if a.status == "firing" else "")  # the IP that crossed
        assert a.alert_id == f"{a.rule}|{a.series}|{a.first_seen_ms}"
    logins = [a for a in alerts if a.rule == "user_failed_logins"]
    assert logins and {a.series for a in logins} == {"user=" + public_entity("user", "victim@example.com")}
