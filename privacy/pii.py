"""PII minimisation: what leaves the engine carries no e-mail, phone or full IP in clear.

* A dict key naming an e-mail or a phone (``email``, ``contact_email``, ``phone_number``, ``tel``,
  ``msisdn``, ...: see :func:`is_pii_key`), at any depth: its text is replaced by a keyed hash
  (HMAC-SHA256 under ``SURGEFLOW_PII_KEY``), or the entry is removed when no key is set.
* Every other string (values, list items, dict keys; percent-encoded text also decoded) is
  scanned: e-mail addresses and phone numbers (8 to 15 digits) become their keyed hash (or
  ``[email]`` / ``[phone]``), IP addresses their masked form (IPv4 /24, IPv6 /48). Dates,
  prices, order ids, SKUs and UUIDs are left alone; numbers are not scanned (only strings).
* Dead letters keep the raw bytes only sealed (AES-GCM, key from ``SURGEFLOW_DEAD_LETTER_KEY``),
  plus a masked copy and the subject hashes an erasure looks for.

>>> scrub({"user": {"contact_email": "Ann@Example.com", "note": "call +86 138 0000 0000"},
...        "ip": "203.0.113.77", "sku": "SKU-12345678"}, key=None)
{'user': {'note': 'call [phone]'}, 'ip': '203.0.113.0', 'sku': 'SKU-12345678'}
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.subjects import DEFAULT_KEY_ENV, pii_key, subject_hash

DEAD_LETTER_KEY_ENV = "SURGEFLOW_DEAD_LETTER_KEY"
MAX_DEPTH = 64  # decoded events are at most 16 deep; anything deeper is dropped, not scanned

# -- IP addresses -------------------------------------------------------------------------------


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# An IPv4 address exactly as ipaddress accepts and writes it (four octets of 1-3 ASCII digits,
# no leading zero, <= 255): its own canonical form, its first three octets (and their dots)
# group 1. One C call instead of ipaddress's parsing, for the most common kind of address.
CANONICAL_IPV4 = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET}\.){_OCTET}")


def mask_ip(ip: str) -> str:
    """IPv4: the last octet zeroed; IPv6: all but the first 48 bits zeroed; "" for a non-IP.

    >>> mask_ip("203.0.113.77"), mask_ip("2001:db8:abcd:12::1"), mask_ip("::ffff:1.2.3.4")
    ('203.0.113.0', '2001:db8:abcd::', '::')
    >>> mask_ip("203.0.113.066"), mask_ip("256.1.1.1"), mask_ip("not an ip")
    ('', '', '')
    """
    if type(ip) is str and (v4 := CANONICAL_IPV4.fullmatch(ip)):  # most IPs: one C call
        return v4[1] + "0"
    parts = ip.split(".")
    if len(parts) == 4 and ":" not in ip:  # the common case, without ipaddress (about 10x faster)
        for p in parts:  # what ipaddress accepts: 1-3 ASCII digits, no leading zero, <= 255
            if not (p.isascii() and p.isdigit() and len(p) <= 3 and (p[0] != "0" or p == "0")
                    and int(p) <= 255):
                return ""
        return f"{parts[0]}.{parts[1]}.{parts[2]}.0"
    if ":" not in ip:
        return ""
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ""
    return str(ipaddress.IPv6Address(int(addr) >> 80 << 80))


_IP4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
# a candidate only (hex groups and colons, maybe an IPv4 tail and a zone); ipaddress decides
_IP6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})"
                  r"(?:%[\w.]+)?(?![\w:])")


def _masked(m: re.Match) -> str:
    return mask_ip(m.group()) or m.group()  # not a valid address: not an IP, left as it is


def mask_ips_in_text(text: str) -> str:
    """Every IP address in a log line or an alert detail masked.

    >>> mask_ips_in_text("login from 198.51.100.23 and 2001:db8:abcd:12::1, at 10:00:00")
    'login from 198.51.100.0 and 2001:db8:abcd::, at 10:00:00'
    """
    if text.count(":") >= 2:
        text = _IP6.sub(_masked, text)
    if "." in text:
        text = _IP4.sub(_masked, text)
    return text


# -- hashing ------------------------------------------------------------------------------------


def keyed_hash(value: str, key: bytes) -> str:
    """Normalised (trimmed, lower case) then HMAC-SHA256, 128 bits: joins without the clear text.

    >>> keyed_hash(" Ann@Example.com", b"k") == keyed_hash("ann@example.com", b"k")
    True
    >>> keyed_hash("ann@example.com", b"k")
    'hmac:812b5e65283998e47b49528ef531aea6'
    """
    digest = hmac.new(key, value.strip().lower().encode(), hashlib.sha256).hexdigest()
    return "hmac:" + digest[:32]


# -- e-mails and phones by key name -------------------------------------------------------------

_PII_NAMES = frozenset({"mail", "tel", "cell", "msisdn", "fax", "telephone", "cellphone",
                        "mobilenumber", "emailaddress", "telno", "phoneno"})
_PII_PARTS = ("email", "phone", "mobile", "msisdn", "telephone")
_NOT_ALNUM = re.compile(r"[\W_]+")


def is_pii_key(name: str) -> bool:
    """Whether a dict key names an e-mail or a phone (case and punctuation ignored).

    >>> [is_pii_key(k) for k in ("E-Mail", "contact_email", "phoneNumber", "tel", "hotel", "sku")]
    [True, True, True, True, False, False]
    """
    n = _NOT_ALNUM.sub("", name.lower())
    return n in _PII_NAMES or any(p in n for p in _PII_PARTS)


# -- e-mails and phones in text -----------------------------------------------------------------

# RFC 5322 local-part characters but / ? = & (they separate URL parts and parameters: an
# address in "?email=ann@example.com" starts after the "=")
_LOCAL = r"[\w.!#$%'*+^`{|}~-]"
# starts where a local part starts (the lookbehind), so a long word is scanned once; then any
# address left (a local part of those four alone: "=@example.com") with every RFC character
_EMAIL = re.compile(rf"(?<!{_LOCAL}){_LOCAL}++@(?:[\w-]+\.)+[\w-]{{2,}}")
_RFC_LOCAL = r"[\w.!#$%&'*+/=?^`{|}~-]"
_EMAIL_RFC = re.compile(rf"(?<!{_RFC_LOCAL}){_RFC_LOCAL}++@(?:[\w-]+\.)+[\w-]{{2,}}")
# A run of digit groups joined by one separator (space, no-break spaces, '.', '-'), groups maybe
# in parentheses, maybe after a '+'. Not inside a word, a number, a path, an e-mail or a hash.
_SEP = "[ \u00a0\u2009\u202f.\\-]"
_PHONE_RUN = re.compile(rf"(?<![\w+.\-/#@])(?<!hmac:)(?:\+ ?)?(?:\(\+?\d{{1,5}}\)|\d)"
                        rf"(?:{_SEP}?(?:\(\d{{1,5}}\)|\d))*+")
_GROUP = re.compile(r"\d+")
_DIGIT = re.compile(r"\d").search
_DATE = re.compile(r"(\d{4})[-./ ](\d{1,2})[-./ ](\d{1,2})(?!\d)|(\d{1,2})[-./ ](\d{1,2})[-./ ](\d{4})(?!\d)")


def _is_date(y: str, m: str, d: str) -> bool:
    return 1900 <= int(y) <= 2199 and 1 <= int(m) <= 12 and 1 <= int(d) <= 31


def _looks_like_date(s: str) -> bool:
    m = _DATE.match(s)
    if m is None:
        return False
    if m.group(1):
        return _is_date(m.group(1), m.group(2), m.group(3))
    a, b, y = m.group(4), m.group(5), m.group(6)
    return _is_date(y, b, a) or _is_date(y, a, b)  # day first or month first


def _is_phone(s: str) -> bool:
    """Whether a run of digit groups is a phone number (8 to 15 digits, E.164) rather than a
    date, a decimal, a price, an IP address, a timestamp or a list of small numbers."""
    groups = _GROUP.findall(s)
    n = sum(map(len, groups))
    if not 8 <= n <= 15:
        return False
    if s[0] in "+(":
        return True
    if len(groups) == 1:  # bare digits: epoch seconds / ms, compact dates are not phones
        if n in (10, 13) and s[0] == "1":
            return False
        return not (n in (8, 12, 14) and _is_date(s[:4], s[4:6], s[6:8]))
    if "." in s:
        seps = {c for c in s if not c.isdigit() and c not in "()"}
        if seps != {"."} or len(groups) == 2 or all(len(g) == 3 for g in groups[1:]) \
                or (len(groups) == 4 and max(map(len, groups)) <= 3):
            return False  # decimals, thousands separators, an IP address
    if s[0] != "0" and max(map(len, groups)) <= 2:
        return False  # "sizes 36 38 40 42"
    return not _looks_like_date(s)


def _end_ok(text: str, i: int) -> bool:
    """A phone may end before ``text[i]``: not glued to a word, an e-mail or an id's suffix."""
    if i >= len(text):
        return True
    c = text[i]
    if c.isalnum() or c in "_@":
        return False
    return not (c in ".-" and i + 1 < len(text) and text[i + 1].isalnum())


def _phone_spans(text: str, run: re.Match) -> list[tuple[int, int]]:
    """The phones in a run: the whole run, else the longest valid stretches between spaces (a
    phone next to a date or a price in one run: "13800000000 2026-11-23"). Hopeless stretches
    are skipped without a check, so a hostile run costs O(its length)."""
    a, b = run.span()
    if _end_ok(text, b) and _is_phone(text[a:b]):
        return [(a, b)]
    pieces = []  # (start, end, digits, longest group, has a '.')
    for p in re.finditer(r"\S+", text[a:b]):
        groups = _GROUP.findall(p.group())
        pieces.append((a + p.start(), a + p.end(), sum(map(len, groups)),
                       max(map(len, groups), default=0), "." in p.group()))
    out, i = [], 0
    while i < len(pieces):
        start, found, digits, longest = pieces[i][0], None, 0, 0
        prefixed = text[start] in "+(0"
        for j in range(i, len(pieces)):
            digits += pieces[j][2]
            longest = max(longest, pieces[j][3])
            if digits > 15 or (j > i and (pieces[j][4] or pieces[i][4])):
                break  # too long, or '.' mixed with spaces: no longer stretch can do
            if digits < 8 or not (prefixed or longest > 2):
                continue
            end = pieces[j][1]
            if (end < b or _end_ok(text, b)) and _is_phone(text[start:end]):
                found = j
        if found is None:
            i += 1
        else:
            out.append((start, pieces[found][1]))
            i = found + 1
    return out


def scrub_text(text: str, key: bytes | None) -> str:
    """E-mails and phones replaced by their keyed hash (``[email]`` / ``[phone]`` without a
    key), IP addresses masked. Percent-encoded text (URLs) is read decoded: when it holds any,
    it comes back decoded and scrubbed.

    >>> scrub_text("mail ann@example.com or call (555) 123-4567 from 203.0.113.77", None)
    'mail [email] or call [phone] from 203.0.113.0'
    >>> scrub_text("order o-1234 on 2026-11-23T10:00:00Z, 19.99 EUR, sku AB-1234-5678", None)
    'order o-1234 on 2026-11-23T10:00:00Z, 19.99 EUR, sku AB-1234-5678'
    >>> scrub_text("/signup?email=ann%40example.com&tel=%2B86%20138%200000%200000&x=a%2Fb", None)
    '/signup?email=[email]&tel=[phone]&x=a/b'
    >>> scrub_text("13800000000", b"k") == keyed_hash("13800000000", b"k")
    True
    """
    if _plain_text(text):  # most values: a few C-level checks, no substitution pass
        return text
    text = _scrub_text(text, key)
    if "%" in text and _PERCENT.search(text):  # then what its decoded form may still show
        decoded = unquote(text, errors="replace")
        scrubbed = _scrub_text(decoded, key)
        if scrubbed != decoded:
            return scrubbed
    return text


_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
# Digits an IPv4 address or a phone needs: "1.2" (an IPv4's first dot), or 8 digits none more
# than 3 characters from the next (a phone run: digits, one separator, parentheses).
_DIGIT_PII = re.compile(r"\d(?:\.\d|(?:\D{0,3}\d){7})").search


def _plain_text(text: str) -> bool:
    """Whether a text surely holds nothing scrub_text changes: no e-mail ('@'), no IPv6 (two
    ':'), no percent escape, no IPv4 or phone (see _DIGIT_PII); False when unsure.

    >>> _plain_text("black friday deals"), _plain_text("cr-01-a"), _plain_text("tel 1380000")
    (True, True, True)
    >>> _plain_text("tel 13800000"), _plain_text("1.2.3.4"), _plain_text("a@b.cn")
    (False, False, False)
    """
    if len(text) < 6:  # shorter than "a@b.cn" or an IP: nothing but an IPv6 ("::1")
        return ":" not in text
    return "@" not in text and "%" not in text and text.count(":") < 2 and _DIGIT_PII(text) is None


def _scrub_text(text: str, key: bytes | None) -> str:
    if "@" in text:
        text = _EMAIL.sub(lambda m: keyed_hash(m.group(), key) if key else "[email]", text)
        if "@" in text:
            text = _EMAIL_RFC.sub(lambda m: keyed_hash(m.group(), key) if key else "[email]", text)
    if text.count(":") >= 2:
        text = _IP6.sub(_masked, text)
    if _DIGIT(text) is None:  # no IPv4 and no phone without a digit (most values: fast path)
        return text
    if "." in text:
        text = _IP4.sub(_masked, text)
    pos, parts = 0, []
    for run in _PHONE_RUN.finditer(text):
        if run.end() - run.start() < 8:
            continue
        for a, b in _phone_spans(text, run):
            parts += (text[pos:a], keyed_hash(text[a:b], key) if key else "[phone]")
            pos = b
    if parts:
        parts.append(text[pos:])
        return "".join(parts)
    return text


# -- structures ---------------------------------------------------------------------------------


_HASHED = re.compile(r"hmac:[0-9a-f]{32}")


def _hash_once(value: str, key: bytes) -> str:
    return value if _HASHED.fullmatch(value) else keyed_hash(value, key)  # scrub is idempotent


def _hashed(value: Any, key: bytes | None) -> Any:
    """The value under an e-mail / phone key: its hash, or _DROP."""
    if key is None:
        return _DROP
    if isinstance(value, str):
        return _hash_once(value, key)
    if isinstance(value, list):
        return [_hash_once(v, key) for v in value if isinstance(v, str)]
    return _DROP  # a number, a dict...: nothing to join on, not kept


_DROP = object()


def scrub(value: Any, key: bytes | None, _depth: int = 0) -> Any:
    """A copy of a JSON-like value with the PII rules of the module applied at every depth
    (the input is not changed).

    >>> h = keyed_hash("a@b.cn", b"k")  # under a key name (lists element-wise) and in text alike
    >>> scrub({"Contact": {"E-Mail": ["a@b.cn", 7]}, "tags": ["vip", "a@b.cn"]}, b"k") == \\
    ...     {"Contact": {"E-Mail": [h]}, "tags": ["vip", h]}
    True
    >>> scrub({"mobile": 13800000000, "n": 13800000000, "text": "tel 13800000000"}, key=None)
    {'n': 13800000000, 'text': 'tel [phone]'}
    """
    t = type(value)
    if t is str:
        return scrub_text(value, key)
    if t is not dict and t is not list:  # (exact types first: the common case, fast)
        if isinstance(value, str):
            return scrub_text(str(value), key)
        if isinstance(value, Mapping):
            value, t = dict(value), dict
        elif isinstance(value, (list, tuple)):
            t = list
        else:
            return value
    if _depth >= MAX_DEPTH:
        return None
    if t is list:
        return [scrub(v, key, _depth + 1) for v in value]
    out = {}
    for name, v in value.items():
        kind = _name_kind(name) if type(name) is str else _PLAIN
        if kind == _PII_NAME:
            v = _hashed(v, key)
            if v is not _DROP:
                out[scrub_text(name, key)] = v
            continue
        if kind == _PII_IN_NAME:
            name = scrub_text(name, key)
        t = type(v)
        if t is str:
            v = scrub_text(v, key)
        elif t in _SCALARS:  # (most values: spares the isinstance checks, slow with an ABC)
            pass
        elif t is dict or t is list or isinstance(v, (str, Mapping, list, tuple)):
            v = scrub(v, key, _depth + 1)
        out[name] = v
    return out


_PLAIN, _PII_NAME, _PII_IN_NAME = 0, 1, 2  # what a dict key is
_SCALARS = frozenset({int, float, bool, type(None)})  # never scanned: kept as they are


def scrub_json(value: Any, key: bytes | None) -> bytes:
    """``orjson.dumps(scrub(value, key))``. A value scrub would only copy (most events'
    properties) is written as it is: checking it costs less than copying it.

    >>> scrub_json({"sku": "p1", "n": [1, 2.5, None]}, None), scrub_json({"mail": "a@b.cn"}, None)
    (b'{"sku":"p1","n":[1,2.5,null]}', b'{}')
    """
    return orjson.dumps(value if _kept(value, 0) else scrub(value, key))


def _kept(value: Any, depth: int) -> bool:
    """Whether scrub would return a value equal to this one, and orjson write both alike:
    exact JSON types only, no container as deep as MAX_DEPTH, every key a plain name, every
    text plain (:func:`_plain_text`). False when unsure: scrub then decides."""
    t = type(value)
    if t is str:
        return _plain_text(value)
    if t in _SCALARS:
        return True
    if depth >= MAX_DEPTH:
        return False
    if t is list:
        for v in value:
            if not _kept(v, depth + 1):
                return False
        return True
    if t is not dict:
        return False
    for name, v in value.items():
        if type(name) is not str or _name_kind(name) != _PLAIN:
            return False
        t = type(v)  # (strings and scalars tested here: one call less for most values)
        if t is str:
            if not _plain_text(v):
                return False
        elif t not in _SCALARS and not _kept(v, depth + 1):
            return False
    return True


@functools.lru_cache(maxsize=4096)  # property names repeat: judge each once
def _name_kind(name: str) -> int:
    if is_pii_key(name):
        return _PII_NAME
    return _PLAIN if scrub_text(name, None) == name else _PII_IN_NAME


_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})")


def scrub_raw(raw: bytes, key: bytes | None, max_chars: int = 4096) -> str | None:
    """A raw record as text with the PII rules applied; None when it is not UTF-8 or longer than
    ``max_chars``. A JSON document is scrubbed as a structure (key names count), anything else
    as text, its ``\\uXXXX`` escapes decoded first (they could spell an address).

    >>> scrub_raw(b'{"user": {"phone": "13800000000"}, "ip": "203.0.113.7"}', None)
    '{"user":{},"ip":"203.0.113.0"}'
    >>> scrub_raw(rb'{"note": "ann\\u0040example.com", ', None), scrub_raw(b"\\xff", None)
    ('{"note": "[email]", ', None)
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) > max_chars:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, (dict, list)):
        return orjson.dumps(scrub(doc, key)).decode()
    if "\\u" in text:
        text = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    return scrub_text(text, key)


# -- dead letters -------------------------------------------------------------------------------

_SEALED = "v1:"  # the version of the sealing: key derivation, cipher and layout


def dead_letter_key(env: Mapping[str, str] | None = None, name: str = DEAD_LETTER_KEY_ENV) -> bytes | None:
    """The secret that seals dead letters' raw bytes, from the environment; None when not set."""
    value = (os.environ if env is None else env).get(name)
    return value.encode() if value else None


@functools.lru_cache(maxsize=8)  # one derivation per secret, not per dead letter
def _aead(secret: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"surgeflow dead letters v1").derive(secret)
    return AESGCM(key)


def seal(raw: bytes, key: bytes) -> str:
    """The bytes encrypted and authenticated (AES-256-GCM, a random 96-bit nonce, the key
    derived from the secret with HKDF-SHA256), as ``v1:`` + base64 of nonce + ciphertext.

    >>> sealed = seal(b'{"email":"ann@example.com"}', b"secret")
    >>> sealed.startswith("v1:"), "ann" in sealed, unseal(sealed, b"secret")
    (True, False, b'{"email":"ann@example.com"}')
    """
    nonce = os.urandom(12)
    return _SEALED + base64.b64encode(nonce + _aead(key).encrypt(nonce, raw, _SEALED.encode())).decode()


def unseal(text: str, key: bytes) -> bytes:
    """The bytes :func:`seal` sealed; ValueError when the text was altered or the key is not
    the one it was sealed with.

    >>> unseal(seal(b"x", b"secret"), b"other")
    Traceback (most recent call last):
    ...
    ValueError: sealed text altered, or sealed with another key
    """
    if not text.startswith(_SEALED):
        raise ValueError("not a sealed text (v1)")
    try:
        blob = base64.b64decode(text[len(_SEALED):], validate=True)
    except binascii.Error:
        raise ValueError("sealed text is not base64") from None
    if len(blob) < 12 + 16:
        raise ValueError("sealed text too short")
    try:
        return _aead(key).decrypt(blob[:12], blob[12:], _SEALED.encode())
    except InvalidTag:
        raise ValueError("sealed text altered, or sealed with another key") from None


def subjects_of(raw: bytes, key: bytes | None) -> list[str]:
    """Subject hashes of a raw record's ``user_id`` and ``anonymous_id`` (best effort, never
    raises): an erasure finds the record's dead letter without reading it.

    >>> subjects_of(b'{"user_id":"u1","anonymous_id":"a1"}', b"k") == \\
    ...     [subject_hash("u1", b"k"), subject_hash("a1", b"k")]
    True
    >>> subjects_of(b'{"user_id": ', b"k"), subjects_of(b'[1]', b"k")
    ([], [])
    """
    try:
        doc = orjson.loads(raw)
    except Exception:  # noqa: BLE001 - invalid JSON, invalid UTF-8: nothing to find
        return []
    if not isinstance(doc, dict):
        return []
    out = []
    for name in ("user_id", "anonymous_id"):
        v = doc.get(name)
        if isinstance(v, str) and v and (h := subject_hash(v, key)) not in out:
            out.append(h)
    return out


def warn_if_no_key(logger: logging.Logger, env: Mapping[str, str] | None = None,
                   name: str = DEFAULT_KEY_ENV) -> bool:
    """Warn (at start-up) when the PII key is not set; whether it is.

    >>> warn_if_no_key(logging.getLogger("doctest"), env={"SURGEFLOW_PII_KEY": "s3cret"})
    True
    """
    if pii_key(env, name) is not None:
        return True
    logger.warning("%s is not set: e-mail addresses and phone numbers are removed instead of "
                   "hashed, and subject references use a public key (they still join records but "
                   "protect less); set it to a random secret of 32+ bytes", name)
    return False
