"""Tracking events: the decoded form, and the decoder that turns raw bytes into it.

Every raw record ends as exactly one of: an :class:`Event`, or a :class:`DeadLetter` that keeps
the original bytes and a machine-readable reason. Decoding never raises.

>>> ev = decode(b'{"event_id":"e1","type":"track","event":"page_view","user_id":"u1",'
...             b'"timestamp":"2026-11-23T10:00:00Z","context":{"channel":"web"}}')
>>> (ev.event_id, ev.user, ev.name, ev.ts_ms, ev.channel)
('e1', 'u1', 'page_view', 1795428000000, 'web')
>>> decode(b'{"event_id": "e2"').reason
'invalid_json'
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import operator
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from privacy.pii import dead_letter_key, scrub_raw, scrub_text, seal, subjects_of
from privacy.subjects import pii_key

EVENT_TYPES = frozenset({"track", "page", "screen", "identify"})
# Events that SPEC section 3 names; others are kept and counted as `unknown_event_names`.
KNOWN_EVENT_NAMES = frozenset(
    """page_view product_viewed search add_to_cart remove_from_cart checkout_started
    order_completed payment_failed signup login login_failed ad_impression ad_click push_sent
    push_opened sms_sent sms_clicked email_sent email_opened coupon_claimed coupon_redeemed share
    favorite feedback""".split()
)
# Event time must fall in this absolute range whatever the stream; beyond it a timestamp is absurd.
MIN_TS_MS = 946_684_800_000  # 2000-01-01
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01
MAX_ID_CHARS = 128
MAX_INT = 2**63  # orjson writes integers of 64 bits at most: beyond, raw_row could not store it
MONEY_FIELDS = ("revenue", "cost", "price")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one event may hold; beyond it the record is a dead letter (``too_deep``,
    ``too_many_keys``, ``string_too_long``, ``bad_number``, ``bad_field``). The defaults are
    config.settings.LimitSettings'.

    >>> deep = b'{"event_id":"e","user_id":"u","event":"x","timestamp":1795428000000,' \\
    ...        b'"properties":{"a":[[[[1]]]]}}'
    >>> decode(deep, limits=Limits(max_depth=4)).reason
    'too_deep'
    """

    max_depth: int = 16
    max_keys: int = 512
    max_string_chars: int = 4096
    max_money: float = 1e9
    max_quantity: float = 1e6


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class Event:
    """A validated tracking event. ``user`` is the profile key: user_id, else anonymous_id."""

    event_id: str
    type: str
    name: str  # the `event` name for track; the type itself ("page", "screen", "identify") else
    user: str
    ts_ms: int
    channel: str
    campaign: str
    revenue: float
    cost: float
    ip: str
    properties: dict[str, Any] = field(default_factory=dict)
    anon: str = ""  # anonymous_id, when given (identity stitching)
    identified: bool = False  # user_id given: ``user`` is the user id
    consent: bool | None = None  # context.consent.profiling; False = no profile
    partition: int = 0  # source partition, for the stream clock
    offset: int = 0  # position in its source partition: the profile shards apply in this order
    arrival_ms: int = 0  # wall time the record reached the system, for latency figures only
    raw: bytes = b""  # the original record, kept for a dead letter if the event turns out late
    creative: str = ""  # properties.creative_id, else the UTM content
    country: str = ""  # context.geo.country
    ingest_ms: int = 0  # the source's record time (Kafka timestamp), 0 when it has none
    marketing: bool | None = None  # context.consent.marketing (trigger actions)
    tz: str = ""  # context.timezone: quiet hours, calendar days and local times of triggers
    latlon: tuple[float, float] | None = None  # context.geo.lat / lon (geo trigger rules)
    origin: str = ""  # context.source, stamped by the collector: may this event link identities?
    linked: bool = False  # an anonymous event resolved to its user through an identity link
    linked_at: int = 0  # (linked) the time of the login that linked its device
    device_consent: bool | None = None  # (linked) its device's profiling consent when linked

    def __reduce__(self):
        """Pickled as its fields in order (cluster exchange, snapshots): 8.4 -> 5.3 us per event
        dumped and loaded, against the slots default. Older pickles still load (the class keeps
        dataclass' __setstate__); a field added at the end with a default keeps both readable."""
        return Event, _event_fields(self)


_event_fields = operator.attrgetter(*(f.name for f in fields(Event)))


@dataclass(slots=True)
class DeadLetter:
    """A record that could not be used, with its original bytes and why."""

    reason: str
    detail: str
    raw: bytes
    key: bytes | None = None
    source: str = ""
    ts_ms: int | None = None
    step: str = "decode_and_route"  # the dataflow step that gave up on the record

    def to_json(self) -> bytes:
        """The dead-letter file / message body. No PII in clear (SPEC section 9): the original
        bytes only sealed (``raw_sealed``, when ``SURGEFLOW_DEAD_LETTER_KEY`` is set), a masked
        copy (``raw_masked``: e-mails, phones and IPs hashed or masked), the subject hashes an
        erasure looks for, and ``at_ms`` (wall time written) for retention.

        >>> reset_dead_letter_keys({})  # no keys: nothing sealed, e-mails removed
        >>> doc = orjson.loads(DeadLetter("invalid_json", "x", b'{"user_id":"u1","mail":"a@b.cn"').to_json())
        >>> doc["raw_masked"], "raw_sealed" in doc, len(doc["subjects"])
        ('{"user_id":"u1","mail":"[email]"', False, 0)
        >>> reset_dead_letter_keys()
        """
        pii, sealing = _dead_letter_keys()
        doc: dict[str, Any] = {
            "reason": self.reason,
            "detail": scrub_text(self.detail, pii),
            "step": self.step,
            "source": self.source,
            "key": scrub_text(self.key.decode("utf-8", "replace"), pii) if self.key is not None else None,
            "at_ms": int(time.time() * 1000),
            "subjects": subjects_of(self.raw, pii),
            "raw_masked": scrub_raw(self.raw, pii),
        }
        if sealing is not None:
            doc["raw_sealed"] = seal(self.raw, sealing)
        try:
            return orjson.dumps(doc)
        except TypeError:  # a lone surrogate (a JSON "\ud800" escape) somewhere: replaced
            return orjson.dumps({k: _valid_text(v) for k, v in doc.items()})


def _valid_text(value):
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_valid_text(v) for v in value]
    return value


# (PII key, dead-letter key): read from the environment once per process, not per dead letter
_KEYS: tuple[bytes | None, bytes | None] | None = None


def _dead_letter_keys() -> tuple[bytes | None, bytes | None]:
    global _KEYS
    if _KEYS is None:
        _KEYS = (pii_key(), dead_letter_key())
    return _KEYS


def reset_dead_letter_keys(env: dict[str, str] | None = None) -> None:
    """Forget the keys read (tests): the next dead letter reads the environment again, or
    ``env`` when given."""
    global _KEYS
    _KEYS = None if env is None else (pii_key(env), dead_letter_key(env))


_failure_log = logging.getLogger("surgeflow.flow")
_failures: dict[str, int] = {}


def step_failure(step: str, exc: BaseException, raw: bytes, key: bytes | None = None,
                 ts_ms: int | None = None) -> DeadLetter:
    """A record a step could not handle (an error no validation foresaw) as a dead letter
    (``step_error``), so the flow goes on without it. The first failures of each step are logged
    with their traceback, then one in a thousand.

    >>> try:
    ...     1 / 0
    ... except ZeroDivisionError as exc:
    ...     dl = step_failure("profile_shards", exc, b"{}")
    >>> dl.reason, dl.step, dl.detail
    ('step_error', 'profile_shards', 'ZeroDivisionError: division by zero')
    """
    n = _failures[step] = _failures.get(step, 0) + 1
    if n <= 10 or n % 1000 == 0:
        _failure_log.error("step %s failed on a record (%d so far): %s: %s", step, n,
                           type(exc).__name__, exc, exc_info=exc)
    return DeadLetter("step_error", f"{type(exc).__name__}: {exc}"[:300], raw, key, "", ts_ms, step)


class Reject(Exception):
    """Raised inside the decoder only; turned into a DeadLetter."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_timestamp(value: Any) -> int:
    """Event time in epoch milliseconds from ISO-8601 text or epoch milliseconds.

    >>> parse_timestamp("2026-11-23T10:00:00.250+01:00")
    1795424400250
    >>> parse_timestamp(1795428000000)
    1795428000000
    """
    if type(value) is int:  # epoch milliseconds (half the events): no isinstance chain
        ts = value
    elif isinstance(value, bool):
        raise Reject("bad_timestamp", "timestamp is a boolean")
    elif isinstance(value, (int, float)):
        ts = int(value)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)  # 3.11 reads "Z" and offsets
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


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise Reject(f"missing_{what}", f"{what} missing or not a string")
    if len(value) > MAX_ID_CHARS:
        raise Reject("bad_id", f"{what} longer than {MAX_ID_CHARS} characters")
    if not value.isprintable():
        raise Reject("bad_id", f"{what} contains control characters")
    return value


def _number(props: dict, name: str) -> float:
    value = props.get(name, 0.0)
    if type(value) is float:  # (absent: the default 0.0) the common case, one test
        return value
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Reject("bad_field", f"properties.{name} is not a number")
    return float(value)


def _check_shape(doc: dict, limits: Limits) -> None:
    """Depth, key count, string length and integer size of the whole document, in one pass
    (iterative: a hostile depth cannot exhaust the stack). orjson parses 1,000 levels, but
    cannot write back more than 254, and every string is stored somewhere downstream."""
    max_depth, max_chars = limits.max_depth, limits.max_string_chars
    budget = limits.max_keys
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise Reject("too_deep", f"nested deeper than {max_depth} levels")
        budget -= len(node)
        if budget < 0:
            raise Reject("too_many_keys", f"more than {limits.max_keys} keys and items")
        if type(node) is dict:
            for key in node:
                if len(key) > max_chars:
                    raise Reject("string_too_long", f"a key longer than {max_chars} characters")
            values = node.values()
        else:
            values = node
        for v in values:
            t = type(v)
            if t is str:
                if len(v) > max_chars:
                    raise Reject("string_too_long", f"a string longer than {max_chars} characters")
            elif t is dict or t is list:
                stack.append((v, depth + 1))
            elif t is int and not -MAX_INT <= v < MAX_INT:
                raise Reject("bad_number", "an integer beyond 64 bits")


# For _fits_limits: digits -> "0", opening brackets -> "[", every other byte -> " ".
_SHAPE = bytes(48 if 48 <= b <= 57 else 91 if b in b"[{" else 32 for b in range(256))
_LONG_INT = b"0" * 19  # an integer beyond 64 bits (>= 2**63) has at least 19 digits


def _fits_limits(raw: bytes, limits: Limits) -> bool:
    """Whether the raw bytes alone prove that :func:`_check_shape` cannot fail, so the walk
    over the decoded document (the costliest check of a typical event) can be skipped. Each
    test is conservative (brackets and digits inside strings count too):

    * a string of n characters takes at least n + 2 bytes;
    * each key or item has a byte where its value starts and a byte after it (a comma or a
      closing bracket), all distinct, plus the opening '{': n of them take 2n + 1 bytes;
    * a node at depth d sits in d containers, each opened by its own '{' or '[';
    * an integer orjson reads beyond 63 bits is a run of 19 or more digits.

    >>> _fits_limits(b'{"a":[1,{"b":"c"}]}', DEFAULT_LIMITS)
    True
    >>> _fits_limits(b'{"a":[[1]]}', Limits(max_depth=2)), _fits_limits(b'[' * 9, Limits(max_depth=8))
    (False, False)
    """
    n = len(raw)
    if type(raw) is not bytes or n > 2 * limits.max_keys + 1 or n > limits.max_string_chars + 2:
        return False
    shape = raw.translate(_SHAPE)
    return shape.count(b"[") <= limits.max_depth and _LONG_INT not in shape


def _check_amounts(props: dict, limits: Limits) -> bool:
    """Money and quantities must be plausible: 1e308 is valid JSON and overflows every sum.
    Whether the properties name any (when not, revenue and cost are 0.0)."""
    if props.keys().isdisjoint(_AMOUNTS):  # most events name none: one C-level test
        return False
    for name in MONEY_FIELDS:
        v = props.get(name)
        if type(v) in (int, float) and not -limits.max_money <= v <= limits.max_money:
            raise Reject("bad_number", f"properties.{name} beyond +/-{limits.max_money:g}")
    v = props.get("quantity")
    if type(v) in (int, float) and not -limits.max_quantity <= v <= limits.max_quantity:
        raise Reject("bad_number", f"properties.quantity beyond +/-{limits.max_quantity:g}")
    return True


_AMOUNTS = frozenset((*MONEY_FIELDS, "quantity"))


def _latlon(geo) -> tuple[float, float] | None:
    """context.geo's coordinates, when both are numbers on the globe."""
    if not isinstance(geo, dict):
        return None
    lat, lon = geo.get("lat"), geo.get("lon")
    if type(lat) in (int, float) and type(lon) in (int, float) \
            and -90 <= lat <= 90 and -180 <= lon <= 180:
        return float(lat), float(lon)
    return None


def _text(obj: dict, name: str, default: str = "") -> str:
    value = obj.get(name)
    if type(value) is str:  # the common case first: one test instead of two
        return value[:MAX_ID_CHARS]
    if value is None:
        return default
    if not isinstance(value, str):
        raise Reject("bad_field", f"{name} is not a string")
    return value[:MAX_ID_CHARS]


def decode(
    raw: bytes,
    *,
    key: bytes | None = None,
    source: str = "",
    max_bytes: int = 32_768,
    max_future_ms: int | None = None,
    now_ms: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Event | DeadLetter:
    """Decode and validate one raw record; never raises.

    ``max_future_ms`` with ``now_ms`` rejects timestamps further ahead of the wall clock than the
    allowed clock skew (``future_event``): a device with a wrong clock must not move the stream's
    event time into the future. The wall clock only caps event time here; it never drives it.
    """
    try:
        if len(raw) > max_bytes:
            raise Reject("oversized", f"{len(raw)} bytes > {max_bytes}")
        try:
            doc = orjson.loads(raw)  # orjson also rejects invalid UTF-8: tell which it was
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as utf8:
                raise Reject("not_utf8", str(utf8)[:120]) from None
            raise Reject("invalid_json", str(exc)[:120]) from None
        if not isinstance(doc, dict):
            raise Reject("not_an_object", f"top level is {type(doc).__name__}")
        event_id = _check_id(doc.get("event_id"), "event_id")
        etype = doc.get("type", "track")
        if not isinstance(etype, str) or etype not in EVENT_TYPES:
            raise Reject("bad_type", f"type {str(etype)[:40]!r}")
        user_id, anon_id = doc.get("user_id"), doc.get("anonymous_id")
        if user_id is None and anon_id is None:
            raise Reject("missing_user", "neither user_id nor anonymous_id")
        user = _check_id(user_id if user_id is not None else anon_id, "user")
        anon = _check_id(anon_id, "user") if anon_id not in (None, "") else ""
        if etype == "track":
            name = _check_id(doc.get("event"), "event")
        else:
            name = etype if etype != "page" else "page_view"
        ts = parse_timestamp(doc.get("timestamp"))
        if not _fits_limits(raw, limits):  # (most records: their size alone proves it)
            _check_shape(doc, limits)  # after the ids, whose own reasons say more
        if max_future_ms is not None and now_ms is not None and ts > now_ms + max_future_ms:
            raise Reject("future_event", f"timestamp {ts} is more than {max_future_ms} ms ahead "
                                         f"of the wall clock {now_ms}")
        props = doc.get("properties") or {}
        ctx = doc.get("context") or {}
        if not isinstance(props, dict) or not isinstance(ctx, dict):
            raise Reject("bad_field", "properties and context must be objects")
        amounts = _check_amounts(props, limits)
        utm = ctx.get("campaign") or {}
        if not isinstance(utm, dict):
            raise Reject("bad_field", "context.campaign must be an object")
        campaign = _text(props, "campaign_id") or _text(utm, "name")
        geo = ctx.get("geo")
        consent = ctx.get("consent")
        profiling = consent.get("profiling") if isinstance(consent, dict) else None
        marketing = consent.get("marketing") if isinstance(consent, dict) else None
        tz = ctx.get("timezone")  # lenient: a bad one means the default zone, not a dead letter
        tz = tz if isinstance(tz, str) and len(tz) <= 64 else ""
        # positional arguments, in the order of Event's fields: 3x faster than keywords
        return Event(
            event_id,  # event_id
            etype,  # type
            name,  # name
            user,  # user
            ts,  # ts_ms
            _text(ctx, "channel", "unknown") or "unknown",  # channel
            campaign,  # campaign
            _number(props, "revenue") if amounts else 0.0,  # revenue
            _number(props, "cost") if amounts else 0.0,  # cost
            _text(ctx, "ip"),  # ip
            props,  # properties
            anon,  # anon
            user_id is not None,  # identified
            profiling if isinstance(profiling, bool) else None,  # consent
            0,  # partition
            0,  # offset
            0,  # arrival_ms
            raw,  # raw
            _text(props, "creative_id") or _text(utm, "content"),  # creative
            _text(geo, "country") if isinstance(geo, dict) else "",  # country
            0,  # ingest_ms
            marketing if isinstance(marketing, bool) else None,  # marketing
            tz,  # tz
            _latlon(geo),  # latlon
            _text(ctx, "source"),  # origin
        )
    except Reject as rej:
        return DeadLetter(rej.reason, rej.detail, raw, key, source)
    except Exception as exc:  # noqa: BLE001 - a shape no rule foresaw: keep it, never stop the flow
        return DeadLetter("undecodable", f"{type(exc).__name__}: {exc}"[:200], raw, key, source)
