"""Synthetic marketing tracking traffic: deterministic raw records for tests, demos and benchmarks.

:func:`generate` simulates a population of users (SPEC sections 3-4) in event time and yields the
raw bytes a producer would send to the ``events`` topic, in generation order:

* users ``u00001``... (a few with hostile-but-valid ids such as ``u00138'; DROP TABLE users;--``)
  and anonymous visitors ``anon-<hex>``; each with a preferred channel, locale, timezone, geo,
  device, user agent, IP and consent (a few % refuse profiling);
* *episodes* start as a Poisson process whose rate follows a daily rhythm (:func:`rhythm`): an
  organic session, an ad impression (-> click -> session), a push / e-mail / SMS send (-> open
  -> session).  Sessions follow the funnel view -> cart -> checkout -> order with drop-off at
  each step and per-campaign multipliers; events within a session are seconds apart;
* optional malformed records (each rejected by :func:`flows.events.decode` with the reason in
  its ``kind``), producer-retry duplicates, bounded out-of-order delivery and anomalies.

Deterministic: equal specs give byte-identical streams.

>>> spec = SyntheticSpec(seed=3, events_per_s=20, duration_s=60)
>>> recs = list(generate(spec))
>>> recs == list(generate(spec))
True
>>> 600 < len(recs) < 2000            # ~20/s x rhythm(00:00 UTC) ~ 1.0 x 60 s
True
>>> from flows.events import Event, decode
>>> all(isinstance(decode(r.value), Event) for r in recs)
True
>>> campaign_ids(spec)
['cmp-01', 'cmp-02', 'cmp-03', 'cmp-04', 'cmp-05', 'cmp-06']

Malformed records carry the decoder's rejection reason:

>>> bad = SyntheticSpec(seed=3, events_per_s=20, duration_s=60, malformed_share=0.1)
>>> r = next(r for r in generate(bad) if r.kind.startswith("malformed:"))
>>> decode(r.value).reason == r.kind.split(":", 1)[1]
True
"""
from __future__ import annotations

import datetime as dt
import math
import random
from bisect import bisect
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from operator import itemgetter
from typing import Iterator

import orjson

__all__ = [
    "ANOMALY_KINDS",
    "CHANNELS",
    "DUPLICATE_WINDOW_MS",
    "WARMUP_MS",
    "MALFORMED_REASONS",
    "Anomaly",
    "Campaign",
    "SyntheticRecord",
    "SyntheticSpec",
    "campaign_ids",
    "campaigns",
    "expected_records",
    "generate",
    "rhythm",
]

ANOMALY_KINDS = ("traffic_spike", "cvr_drop", "click_fraud", "request_flood", "ingest_delay",
                 "tracking_bug")
# The page whose tag breaks in a tracking_bug incident: nothing is tracked after viewing it.
BUG_PAGE = "/deals"
CHANNELS = ("app", "web", "mini_program", "sms", "email", "push", "store", "ad")
# Every reason flows.events.decode can give for a record (future_event needs a wall clock).
MALFORMED_REASONS = (
    "invalid_json",
    "not_utf8",
    "not_an_object",
    "missing_event_id",
    "missing_user",
    "bad_id",
    "bad_type",
    "missing_event",
    "bad_timestamp",
    "absurd_timestamp",
    "oversized",
    "bad_field",
)
# A duplicate re-sends an ok record emitted at most this long ago (generation clock).
DUPLICATE_WINDOW_MS = 5_000
# The simulation starts this long before start_ms, so the stream opens in steady state (sessions
# under way, messages waiting to be opened); nothing before start_ms is emitted.
WARMUP_MS = 180_000

_DEFAULT_MAGNITUDE = {
    "traffic_spike": 5.0,  # x session start rate
    "cvr_drop": 0.1,  # x order probability
    "click_fraud": 300.0,  # ad_clicks per minute from one IP
    "request_flood": 150.0,  # page views per second from one IP
    "ingest_delay": 2400.0,  # seconds between an event and its sending (a stuck collector)
    "tracking_bug": 1.0,  # share of the visits whose tracking stops at BUG_PAGE
}


@dataclass(frozen=True)
class Anomaly:
    """An injected incident in event time (seconds from ``SyntheticSpec.start_ms``).

    ``magnitude`` 0 means the default: traffic_spike x5 episode rate; cvr_drop x0.1 order
    probability; click_fraud 300 ad_clicks/min from one IP; request_flood 150 page views/s;
    ingest_delay: records are sent 2,400 s after their event time (only ``sent_ms`` changes);
    tracking_bug: nothing more of a visit is tracked after a view of ``BUG_PAGE`` (share 1.0).

    >>> Anomaly("traffic_spike", 600, 300).effective_magnitude
    5.0
    """

    kind: str
    start_s: float
    duration_s: float
    magnitude: float = 0.0

    @property
    def effective_magnitude(self) -> float:
        return self.magnitude if self.magnitude else _DEFAULT_MAGNITUDE[self.kind]


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Rates are in event-time seconds; the stream itself is as fast as it goes.

    ``events_per_s`` is the mean record rate (all kinds, anomalies excluded) before the daily
    rhythm; ``malformed_share`` records replace events, ``duplicate_share`` records are extra
    (the event rate is scaled down so the total still matches).

    >>> SyntheticSpec(duration_s=None).duration_s is None
    True
    """

    seed: int = 7
    users: int = 2000
    start_ms: int = 1_795_392_000_000  # 2026-11-23T00:00:00Z
    events_per_s: float = 50.0
    duration_s: float | None = 3600.0
    campaigns: int = 6
    malformed_share: float = 0.0
    duplicate_share: float = 0.0
    max_disorder_ms: int = 0
    anonymous_share: float = 0.1
    anomalies: tuple[Anomaly, ...] = ()


@dataclass(frozen=True, slots=True)
class SyntheticRecord:
    """One raw record. ``ts_ms`` is the event's timestamp (malformed: the generation time);
    ``kind`` is "ok", "duplicate" or "malformed:<decoder reason>"; ``anomaly`` the kind of the
    anomaly that produced it, else None."""

    ts_ms: int
    key: bytes | None
    value: bytes
    kind: str
    anomaly: str | None
    sent_ms: int = 0  # when a producer would send it: event time plus delivery delay


@dataclass(frozen=True, slots=True)
class Campaign:
    """A marketing campaign. ``rate`` is the per-impression CTR (ad), open rate (push, email) or
    click rate (sms); ``cart_mult`` / ``order_mult`` scale the funnel of sessions it brings."""

    id: str
    name: str
    channel: str  # ad | push | email | sms
    source: str
    medium: str
    creatives: tuple[str, ...]
    term: str
    rate: float
    cpc: tuple[float, float]
    cart_mult: float
    order_mult: float

    def utm(self, creative: str) -> dict:
        return {
            "source": self.source,
            "medium": self.medium,
            "name": self.name,
            "content": creative,
            "term": self.term,
        }


# --------------------------------------------------------------------------------------------
# rhythm and expected volume


def rhythm(ts_ms: float) -> float:
    """Daily traffic factor at event time ``ts_ms`` (UTC clock), mean 1 over a day.

    A sinusoid warped so that the trough (0.5) is at 04:00 and the peak (1.5) at 20:00: it rises
    over 16 hours and falls over 8, so peak / trough = 3.

    >>> [round(rhythm(h * 3_600_000), 2) for h in (0, 4, 12, 20)]
    [1.0, 0.5, 1.0, 1.5]
    """
    h = (ts_ms / 3_600_000.0) % 24.0
    if 4.0 <= h < 20.0:
        return 1.0 - 0.5 * math.cos(math.pi * (h - 4.0) / 16.0)
    return 1.0 + 0.5 * math.cos(math.pi * ((h - 20.0) % 24.0) / 8.0)


def expected_records(spec: SyntheticSpec, start_s: float = 0.0, end_s: float | None = None) -> float:
    """Expected number of records (anomaly records excluded) between two event-time offsets.

    >>> round(expected_records(SyntheticSpec(events_per_s=10, duration_s=86_400)))
    864000
    """
    if end_s is None:
        if spec.duration_s is None:
            raise ValueError("endless spec: give end_s")
        end_s = spec.duration_s
    steps = max(1, int((end_s - start_s) / 60.0))
    width = (end_s - start_s) / steps
    total = 0.0
    for i in range(steps):  # midpoint rule on minutes; the rhythm is smooth
        total += rhythm(spec.start_ms + (start_s + (i + 0.5) * width) * 1000.0)
    return spec.events_per_s * total * width


# --------------------------------------------------------------------------------------------
# static tables

_CHANNEL_WEIGHTS = (0.30, 0.22, 0.15, 0.05, 0.06, 0.08, 0.04, 0.10)  # same order as CHANNELS
_CHANNEL_CUM = tuple(accumulate(_CHANNEL_WEIGHTS))
_ORGANIC = frozenset({"app", "web", "mini_program", "store"})
_ORIGIN_MIX = (("ad", 0.40), ("push", 0.65), ("email", 0.85), ("sms", 1.0))

# locale, timezone, country, currency, weight, ((region, city), ...)
_LOCALES = (
    ("zh-CN", "Asia/Shanghai", "CN", "CNY", 0.34,
     (("Shanghai", "Shanghai"), ("Beijing", "Beijing"), ("Guangdong", "Guangzhou"),
      ("Guangdong", "Shenzhen"), ("Zhejiang", "Hangzhou"), ("Sichuan", "Chengdu"))),
    ("en-US", "America/New_York", "US", "USD", 0.14,
     (("NY", "New York"), ("MA", "Boston"), ("FL", "Miami"), ("GA", "Atlanta"))),
    ("en-US", "America/Los_Angeles", "US", "USD", 0.10,
     (("CA", "Los Angeles"), ("CA", "San Francisco"), ("WA", "Seattle"))),
    ("en-GB", "Europe/London", "GB", "GBP", 0.08,
     (("England", "London"), ("England", "Manchester"), ("Scotland", "Edinburgh"))),
    ("de-DE", "Europe/Berlin", "DE", "EUR", 0.09,
     (("Berlin", "Berlin"), ("Bayern", "München"), ("Nordrhein-Westfalen", "Köln"))),
    ("fr-FR", "Europe/Paris", "FR", "EUR", 0.07,
     (("Île-de-France", "Paris"), ("Auvergne-Rhône-Alpes", "Lyon"))),
    ("ja-JP", "Asia/Tokyo", "JP", "JPY", 0.08, (("Tokyo", "Tokyo"), ("Osaka", "Osaka"))),
    ("pt-BR", "America/Sao_Paulo", "BR", "BRL", 0.06,
     (("SP", "São Paulo"), ("RJ", "Rio de Janeiro"))),
    ("es-ES", "Europe/Madrid", "ES", "EUR", 0.04, (("Madrid", "Madrid"), ("Cataluña", "Barcelona"))),
)
_LOCALE_CUM = tuple(accumulate(loc[4] for loc in _LOCALES))
_FX = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "CNY": 7.2, "JPY": 150.0, "BRL": 5.0}

_CATEGORIES = ("shoes", "apparel", "electronics", "beauty", "home", "toys", "sports", "books",
               "grocery", "jewelry")
_PAGES = ("/", "/deals", "/new", "/category/shoes", "/category/apparel", "/category/electronics",
          "/category/beauty", "/category/home", "/brand/story", "/help/shipping", "/account",
          "/wishlist", "/blog/gift-guide")
_QUERIES = ("running shoes", "winter jacket", "wireless earbuds", "lipstick", "air fryer",
            "lego", "yoga mat", "gift for dad", "black friday deals", "phone case", "coffee",
            "smart watch", "sneakers sale", "牛仔裤", "Kopfhörer")
_UNKNOWN_EVENTS = ("wishlist_shared", "video_played", "live_chat_opened", "ar_try_on")
_THEMES = ("black_friday", "winter_sale", "new_arrivals", "loyalty_boost", "flash_deal",
           "cyber_monday", "holiday_gifts", "vip_preview", "clearance", "free_shipping")
_AD_SOURCES = (("google", "cpc"), ("facebook", "paid_social"), ("tiktok", "paid_social"),
               ("baidu", "cpc"), ("wechat", "display"), ("bing", "cpc"))
_TERMS = ("", "sale", "gift", "discount", "new")
_CHANNEL_CYCLE = ("ad", "push", "email", "sms", "ad", "ad")
_OS = {"mobile": ("iOS", "Android"), "desktop": ("Windows", "macOS", "Linux"),
       "tablet": ("iPadOS", "Android")}
_IP_FIRST = (23, 31, 37, 46, 58, 61, 77, 81, 91, 101, 112, 113, 117, 121, 140, 171, 183, 185,
             188, 212, 213, 217, 220, 222)
_HOSTILE = ("u{:05d}*", "u:{:05d}:admin", "u{{{:05d}}}", "u{:05d}'; DROP TABLE users;--",
            "user:*:{:05d}")
_FRAUD_UA = "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36"
_FLOOD_UAS = ("python-requests/2.31.0", "curl/8.4.0", "Go-http-client/1.1")


@lru_cache(maxsize=64)
def _campaigns(seed: int, n: int) -> tuple[Campaign, ...]:
    rng = random.Random(f"{seed}:campaigns")
    out = []
    for i in range(1, n + 1):
        channel = _CHANNEL_CYCLE[(i - 1) % len(_CHANNEL_CYCLE)]
        if channel == "ad":
            source, medium = rng.choice(_AD_SOURCES)
            rate = rng.uniform(0.015, 0.06)
        elif channel == "push":
            source, medium, rate = "app", "push", rng.uniform(0.06, 0.14)
        elif channel == "email":
            source, medium, rate = "newsletter", "email", rng.uniform(0.15, 0.30)
        else:
            source, medium, rate = "sms_gateway", "sms", rng.uniform(0.03, 0.09)
        lo = round(rng.uniform(0.2, 1.0), 2)
        cid = f"cmp-{i:02d}"
        out.append(Campaign(
            id=cid,
            name=f"{_THEMES[(i - 1) % len(_THEMES)]}_{i:02d}",
            channel=channel,
            source=source,
            medium=medium,
            creatives=tuple(f"cr-{i:02d}-{c}" for c in "abcd"[: rng.randint(2, 4)]),
            term=rng.choice(_TERMS),
            rate=round(rate, 4),
            cpc=(lo, round(rng.uniform(lo + 0.2, 2.0), 2)),
            cart_mult=round(rng.uniform(0.7, 1.4), 2),
            order_mult=round(rng.uniform(0.8, 1.25), 2),
        ))
    return tuple(out)


def campaigns(spec: SyntheticSpec) -> list[Campaign]:
    """The campaigns of a spec (deterministic per seed).

    >>> c = campaigns(SyntheticSpec(campaigns=2))
    >>> [(x.id, x.channel) for x in c]
    [('cmp-01', 'ad'), ('cmp-02', 'push')]
    """
    return list(_campaigns(spec.seed, spec.campaigns))


def campaign_ids(spec: SyntheticSpec) -> list[str]:
    """Campaign ids ``cmp-01``, ``cmp-02``...

    >>> campaign_ids(SyntheticSpec(campaigns=3))
    ['cmp-01', 'cmp-02', 'cmp-03']
    """
    return [c.id for c in _campaigns(spec.seed, spec.campaigns)]


# --------------------------------------------------------------------------------------------
# the simulation
#
# A planned event is a tuple (t_ms, head, who, key, properties, tail, anomaly) of ready JSON
# fragments: head b'"type":"track","event":"x",', who b'"user_id":"u1","anonymous_id":"a",',
# properties b'{...}', tail b',"context":{...}}'. Splicing fragments (every string that needs
# escaping goes through orjson once) is several times faster than a dict and a dumps per event.

_dumps = orjson.dumps
_log = math.log
_H = {
    name: b'"type":"track","event":%b,' % _dumps(name)
    for name in sorted(
        {"page_view", "product_viewed", "search", "add_to_cart", "remove_from_cart",
         "checkout_started", "order_completed", "payment_failed", "signup", "login",
         "login_failed", "ad_impression", "ad_click", "push_sent", "push_opened", "sms_sent",
         "sms_clicked", "email_sent", "email_opened", "coupon_claimed", "coupon_redeemed", "share",
         "favorite", "feedback", *_UNKNOWN_EVENTS}
    )
}
_H_PAGE = b'"type":"page",'
_H_IDENTIFY = b'"type":"identify",'
_PAGES_B = tuple(_dumps(p) for p in _PAGES)
_BUG_PAGE_INDEX = _PAGES.index(BUG_PAGE)
_QUERIES_B = tuple(_dumps(q) for q in _QUERIES)
_LOGIN_METHODS = (b"password", b"sms_code", b"wechat", b"apple")
_PAY_FAIL = (b"card_declined", b"insufficient_funds", b"timeout", b"3ds_failed")
_PLACEMENTS = (b"feed", b"search", b"banner", b"video")
_RATINGS = (1, 2, 3, 4, 4, 5, 5, 5)
_first = itemgetter(0)
_VALUE_ISO = b'{"event_id":"%b%d",%b%b"timestamp":%b.%03dZ","properties":%b%b'
_VALUE_MS = b'{"event_id":"%b%d",%b%b"timestamp":%d,"properties":%b%b'


@lru_cache(maxsize=64)
def _catalog(seed: int) -> tuple:
    """Products: JSON fragments per currency b'"product_id":"p0001","category":..,"price":..,
    "currency":..', the id+category fragment, quoted ids, and prices per currency."""
    rng = random.Random(f"{seed}:catalog")
    ids, cats, usd = [], [], []
    for i in range(1, 401):
        ids.append(f"p{i:04d}")
        cats.append(_CATEGORIES[(i * 7 + rng.randrange(3)) % len(_CATEGORIES)])
        usd.append(min(2000.0, max(1.0, rng.lognormvariate(3.2, 0.8))))
    prices = {
        cur: tuple(round(p * fx) if cur == "JPY" else round(p * fx, 2) for p in usd)
        for cur, fx in _FX.items()
    }
    bodies = {
        cur: tuple(
            _dumps({"product_id": i, "category": c, "price": p, "currency": cur})[1:-1]
            for i, c, p in zip(ids, cats, prices[cur])
        )
        for cur in _FX
    }
    short = tuple(_dumps({"product_id": i, "category": c})[1:-1] for i, c in zip(ids, cats))
    quoted = tuple(_dumps(i) for i in ids)
    return prices, bodies, short, quoted


def _iso_second(sec: int) -> bytes:
    return dt.datetime.fromtimestamp(sec, dt.timezone.utc).strftime('"%Y-%m-%dT%H:%M:%S').encode()


class _User:
    __slots__ = ("uid", "anon", "channel", "home", "device", "geo", "consent", "locale", "tz",
                 "currency", "ip", "ua_web", "ua_app", "ua_mini", "slot", "who_full", "who_anon",
                 "who_uid", "key_uid", "key_anon", "tails")

    def set_ids(self) -> None:
        anon = _dumps(self.anon)
        self.who_anon = b'"anonymous_id":%b,' % anon
        self.key_anon = self.anon.encode()
        if self.uid is not None:
            uid = _dumps(self.uid)
            self.who_uid = b'"user_id":%b,' % uid
            self.who_full = b'"user_id":%b,"anonymous_id":%b,' % (uid, anon)
            self.key_uid = self.uid.encode()


def _validate(spec: SyntheticSpec) -> None:
    if spec.users < 1:
        raise ValueError("users must be >= 1")
    if not spec.events_per_s > 0:
        raise ValueError("events_per_s must be > 0")
    if spec.duration_s is not None and not spec.duration_s >= 0:
        raise ValueError("duration_s must be >= 0 or None")
    if spec.campaigns < 0:
        raise ValueError("campaigns must be >= 0")
    for name in ("malformed_share", "duplicate_share", "anonymous_share"):
        if not 0.0 <= getattr(spec, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]")
    if spec.malformed_share + spec.duplicate_share >= 1.0:
        raise ValueError("malformed_share + duplicate_share must be < 1")
    if spec.max_disorder_ms < 0:
        raise ValueError("max_disorder_ms must be >= 0")
    for a in spec.anomalies:
        if a.kind not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {a.kind!r}")
        if a.duration_s < 0 or a.magnitude < 0:
            raise ValueError("anomaly duration and magnitude must be >= 0")
        if a.kind == "click_fraud" and spec.campaigns < 1:
            raise ValueError("click_fraud needs at least one campaign")


class _Sim:
    """Population, campaigns and the episode planner (one random stream: deterministic)."""

    def __init__(self, spec: SyntheticSpec, rng: random.Random):
        self.spec = spec
        self.rng = rng
        self.rnd = rng.random
        self.camps = _campaigns(spec.seed, spec.campaigns)
        self.by_channel: dict[str, tuple[Campaign, ...]] = {}
        for c in self.camps:
            self.by_channel[c.channel] = self.by_channel.get(c.channel, ()) + (c,)
        self.utm = {(c.id, cr): c.utm(cr) for c in self.camps for cr in c.creatives}
        self.cid_b = {c.id: b',"campaign_id":%b' % _dumps(c.id) for c in self.camps}
        self.creative_b = {
            (c.id, cr): _dumps({"campaign_id": c.id, "creative_id": cr})[1:-1]
            for c in self.camps for cr in c.creatives
        }
        self.prices, self.pbody, self.pshort, self.pquoted = _catalog(spec.seed)
        self.known: list[_User | None] = [None] * spec.users
        self.anon_pool: list[_User | None] = [None] * max(20, spec.users // 4)
        self.next_uid = spec.users + 1
        self.order_n = 0
        self.msg_n = 0
        self.bug_windows = [
            (spec.start_ms + a.start_s * 1000.0, spec.start_ms + (a.start_s + a.duration_s) * 1000.0,
             a.effective_magnitude)
            for a in spec.anomalies if a.kind == "tracking_bug"
        ]
        self.cvr_windows = [
            (spec.start_ms + a.start_s * 1000.0, spec.start_ms + (a.start_s + a.duration_s) * 1000.0,
             a.effective_magnitude)
            for a in spec.anomalies if a.kind == "cvr_drop"
        ]

    # ---- population

    def _make_user(self, uid: str | None) -> _User:
        rng = self.rng
        rnd = self.rnd
        u = _User()
        u.slot = -1
        u.tails = {}
        u.uid = uid
        u.anon = f"anon-{rng.getrandbits(48):012x}"
        u.channel = CHANNELS[bisect(_CHANNEL_CUM, rnd() * _CHANNEL_CUM[-1])]
        loc = _LOCALES[min(len(_LOCALES) - 1, bisect(_LOCALE_CUM, rnd() * _LOCALE_CUM[-1]))]
        region, city = loc[5][int(rnd() * len(loc[5]))]
        u.locale, u.tz, u.currency = loc[0], loc[1], loc[3]
        u.geo = {"country": loc[2], "region": region, "city": city}
        r = rnd()
        dtype = "mobile" if r < 0.62 else ("desktop" if r < 0.92 else "tablet")
        oses = _OS[dtype]
        os_name = oses[int(rnd() * len(oses))]
        u.device = {"id": f"d-{rng.getrandbits(40):010x}", "type": dtype, "os": os_name}
        u.consent = {"profiling": rnd() >= 0.04, "marketing": rnd() >= 0.15}
        bits = rng.getrandbits(24)
        u.ip = f"{_IP_FIRST[int(rnd() * len(_IP_FIRST))]}.{bits >> 16}.{(bits >> 8) & 255}.{(bits & 255) % 254 + 1}"
        if dtype == "desktop":
            u.home = "web"
        elif loc[2] == "CN" and rnd() < 0.5:
            u.home = "mini_program"
        else:
            u.home = "app" if rnd() < 0.6 else "web"
        if os_name in ("iOS", "iPadOS"):
            u.ua_web = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
                        "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")
            u.ua_app = "SurgeShop/5.2.1 (iOS 17.4; iPhone14,2)"
        elif os_name == "Android":
            u.ua_web = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                        "Chrome/124.0 Mobile Safari/537.36")
            u.ua_app = "SurgeShop/5.2.1 (Android 14; Pixel 8)"
        else:
            system = {"macOS": "Macintosh; Intel Mac OS X 14_4", "Windows": "Windows NT 10.0; Win64; x64"}
            u.ua_web = (f"Mozilla/5.0 ({system.get(os_name, 'X11; Linux x86_64')}) AppleWebKit/537.36 "
                        "(KHTML, like Gecko) Chrome/124.0 Safari/537.36")
            u.ua_app = u.ua_web
        u.ua_mini = u.ua_web + " MicroMessenger/8.0.47 MiniProgramEnv/" + os_name
        u.set_ids()
        return u

    def known_user(self) -> _User:
        # mildly skewed activity: low ids are more active; signed-up visitors join at the end
        idx = int(len(self.known) * self.rnd() ** 1.5)
        u = self.known[idx]
        if u is None:
            n = idx + 1
            uid = _HOSTILE[(n // 250) % len(_HOSTILE)].format(n) if n % 250 == 137 else f"u{n:05d}"
            u = self.known[idx] = self._make_user(uid)
        return u

    def anon_user(self) -> _User:
        slot = int(self.rnd() * len(self.anon_pool))
        u = self.anon_pool[slot]
        if u is None or self.rnd() < 0.3:  # a new cookie
            u = self.anon_pool[slot] = self._make_user(None)
            u.slot = slot
        return u

    def register(self, u: _User) -> None:
        """An anonymous visitor signs up: it gets a user id and joins the known population."""
        u.uid = f"u{self.next_uid:05d}"
        self.next_uid += 1
        u.set_ids()
        if 0 <= u.slot < len(self.anon_pool) and self.anon_pool[u.slot] is u:
            self.anon_pool[u.slot] = None
        self.known.append(u)

    def tracking_broken(self, t: float) -> bool:
        return any(lo <= t < hi and self.rnd() < share for lo, hi, share in self.bug_windows)

    def cvr_factor(self, t: float) -> float:
        f = 1.0
        for lo, hi, mag in self.cvr_windows:
            if lo <= t < hi:
                f *= mag
        return f

    def tail(self, u: _User, channel: str, camp_key: tuple | None, device: bool = True) -> bytes:
        """b',"context":{...}}' for events of this user on this channel (cached per user unless
        the IP changes)."""
        fresh_ip = device and channel != "store" and self.rnd() < 0.2  # mobile networks
        if not fresh_ip:
            cached = u.tails.get((channel, camp_key, device))
            if cached is not None:
                return cached
        c: dict = {"channel": channel}
        if camp_key is not None:
            c["campaign"] = self.utm[camp_key]
        if device:
            if channel == "store":
                store = sum(map(ord, u.geo["city"])) % 40 + 1  # the shop in the user's city
                c["ip"] = f"81.2.{store}.10"
                c["user_agent"] = f"SurgePOS/2.3 (store-{store:02d})"
                c["device"] = {"id": f"pos-{store:02d}", "type": "pos", "os": "Android"}
            else:
                ip = u.ip
                if fresh_ip:
                    ip = ip[: ip.rfind(".") + 1] + str(int(self.rnd() * 254) + 1)
                c["ip"] = ip
                c["user_agent"] = (u.ua_app if channel == "app" else
                                   u.ua_mini if channel == "mini_program" else u.ua_web)
                c["device"] = u.device
        c["geo"] = u.geo
        c["consent"] = u.consent
        c["locale"] = u.locale
        c["timezone"] = u.tz
        tail = b',"context":%b}' % _dumps(c)
        if not fresh_ip:
            u.tails[channel, camp_key, device] = tail
        return tail

    # ---- episodes

    def episode(self, out: list, t: float, anomaly: str | None) -> None:
        """Plan one episode starting at t (ms): an organic session, an ad impression chain or a
        message send, appending planned events (in time order) to ``out``."""
        rnd = self.rnd
        if rnd() < self.spec.anonymous_share:
            u = self.anon_user()
            origin = "ad" if rnd() < 0.35 else u.home
        else:
            u = self.known_user()
            pc = u.channel
            if pc in _ORGANIC:
                if rnd() < 0.75:
                    origin = pc if pc != "store" or rnd() < 0.6 else u.home
                else:
                    r = rnd()
                    origin = next(ch for ch, cum in _ORIGIN_MIX if r < cum)
            else:
                origin = pc if rnd() < 0.55 else u.home
        camps = self.by_channel.get(origin)
        if origin in _ORGANIC or not camps:
            self.session(out, u, t, origin if origin in _ORGANIC else u.home, None, "", anomaly)
        elif origin == "ad":
            self.ad(out, u, t, camps[int(rnd() * len(camps))], anomaly)
        else:
            self.message(out, u, t, camps[int(rnd() * len(camps))], anomaly)

    def ad(self, out: list, u: _User, t: float, camp: Campaign, anomaly: str | None) -> None:
        rnd = self.rnd
        creative = camp.creatives[int(rnd() * len(camp.creatives))]
        tail = self.tail(u, "ad", (camp.id, creative))
        who, key = (u.who_full, u.key_uid) if u.uid is not None else (u.who_anon, u.key_anon)
        ids = self.creative_b[camp.id, creative]
        placement = _PLACEMENTS[int(rnd() * 4)]
        imp = b'{%b,"placement":"%b"}' % (ids, placement)
        for _ in range(1 + (rnd() < 0.4) + (rnd() < 0.15)):
            out.append((t, _H["ad_impression"], who, key, imp, tail, anomaly))
            if rnd() < camp.rate:
                t += 800.0 - 5000.0 * _log(1.0 - rnd())
                lo, hi = camp.cpc
                cost = round(lo + (hi - lo) * rnd(), 2)
                out.append((t, _H["ad_click"], who, key,
                            b'{%b,"cost":%a,"placement":"%b"}' % (ids, cost, placement), tail, anomaly))
                t += 500.0 - 2000.0 * _log(1.0 - rnd())
                self.session(out, u, t, u.home, camp, creative, anomaly)
                return
            t += 2000.0 - 30000.0 * _log(1.0 - rnd())

    def message(self, out: list, u: _User, t: float, camp: Campaign, anomaly: str | None) -> None:
        rnd = self.rnd
        if u.uid is None:  # no address for an anonymous visitor
            self.session(out, u, t, u.home, None, "", anomaly)
            return
        creative = camp.creatives[int(rnd() * len(camp.creatives))]
        utm = (camp.id, creative)
        ch = camp.channel
        self.msg_n += 1
        props = b'{%b,"message_id":"msg-%d-%d"}' % (self.creative_b[camp.id, creative], self.spec.seed, self.msg_n)
        out.append((t, _H[ch + "_sent"], u.who_uid, u.key_uid, props, self.tail(u, ch, utm, device=False), anomaly))
        if rnd() >= camp.rate:
            return
        if ch == "push":
            t += 5000.0 - 180_000.0 * _log(1.0 - rnd())
            name, follow, landing = "push_opened", 0.8, "app"
        elif ch == "email":
            t += 30_000.0 - 600_000.0 * _log(1.0 - rnd())
            name, follow, landing = "email_opened", 0.45, "web"
        else:
            t += 10_000.0 - 120_000.0 * _log(1.0 - rnd())
            name, follow, landing = "sms_clicked", 1.0, ("mini_program" if u.home == "mini_program" else "web")
        out.append((t, _H[name], u.who_full, u.key_uid, props, self.tail(u, ch, utm), anomaly))
        if rnd() < follow:
            t += 800.0 - 3000.0 * _log(1.0 - rnd())
            self.session(out, u, t, landing, camp, creative, anomaly)

    def session(self, out: list, u: _User, t: float, channel: str, camp: Campaign | None,
                creative: str, anomaly: str | None) -> None:
        """A visit: login?, page / product views (with searches, favourites, shares), maybe a
        coupon, then the funnel add_to_cart -> checkout_started -> order_completed."""
        rnd = self.rnd
        log = _log
        A = out.append
        H = _H
        tail = self.tail(u, channel, (camp.id, creative) if camp is not None else None)
        cidp = self.cid_b[camp.id] if camp is not None else b""
        cur = u.currency
        curb = cur.encode()
        prices = self.prices[cur]
        pbody = self.pbody[cur]
        pshort = self.pshort
        n_prod = len(prices)
        store = channel == "store"
        uid = u.uid
        logged_out = uid is not None and (channel == "web" or channel == "mini_program") and rnd() < 0.2
        if uid is None or logged_out:
            who, key = u.who_anon, u.key_anon
        else:
            who, key = u.who_full, u.key_uid
            if not store and rnd() < 0.25:  # explicit login, sometimes after a failed attempt
                if rnd() < 0.08:
                    A((t, H["login_failed"], who, key, b'{"reason":"%b"%b}'
                       % (b"wrong_password" if rnd() < 0.7 else b"expired_code", cidp), tail, anomaly))
                    t += 3000.0 - 8000.0 * log(1.0 - rnd())
                A((t, H["login"], who, key, b'{"method":"%b"%b}' % (_LOGIN_METHODS[int(rnd() * 4)], cidp),
                   tail, anomaly))
                t += 1000.0 - 15000.0 * log(1.0 - rnd())

        # browsing
        viewed = []
        n_views = 1 + int((0.8 if store else 3.2) * -log(1.0 - rnd()))
        for _ in range(n_views):
            r = rnd()
            if r < 0.15 and not store:  # the uniform, rescaled, also picks the query
                A((t, H["search"], who, key, b'{"search_query":%b,"results":%d%b}'
                   % (_QUERIES_B[int(r / 0.15 * len(_QUERIES_B))], int(rnd() * 121), cidp), tail, anomaly))
                t += 1500.0 - 4000.0 * log(1.0 - rnd())
            d = rnd()
            g = 1000.0 - 15000.0 * log(1.0 - d)  # time on this page
            r = rnd()
            if r < 0.45 and not store:  # a page: its path from the same uniform, rescaled
                page = int(r / 0.45 * len(_PAGES_B)) % len(_PAGES_B)
                A((t, _H_PAGE if r < 0.25 else H["page_view"], who, key, b'{"page":%b,"dwell_ms":%d%b}'
                   % (_PAGES_B[page], g, cidp), tail, anomaly))
                if page == _BUG_PAGE_INDEX and self.bug_windows and self.tracking_broken(t):
                    return  # the page's broken tag: nothing after it reaches the collector
            else:
                p = int(n_prod * ((r - 0.45) / 0.55 if not store else r) ** 2) % n_prod  # popular first
                viewed.append(p)
                A((t, H["product_viewed"], who, key, b'{%b,"dwell_ms":%d%b}' % (pbody[p], g, cidp), tail, anomaly))
                if d > 0.94:  # the longest looks end in a favourite, a share, ...
                    r = (d - 0.94) / 0.06
                    name = ("favorite" if r < 0.67 else "share" if r < 0.92 else
                            _UNKNOWN_EVENTS[int((r - 0.92) / 0.08 * len(_UNKNOWN_EVENTS)) % len(_UNKNOWN_EVENTS)])
                    A((t + 300.0 + g * 0.5 * r, H[name], who, key, b'{%b%b}' % (pshort[p], cidp), tail, anomaly))
            t += g

        coupon = b""
        if rnd() < 0.04:
            coupon = b"cpn-%03d" % (int(rnd() * 50) + 1)
            A((t, H["coupon_claimed"], who, key, b'{"coupon_id":"%b","discount":%d%b}'
               % (coupon, (5, 10, 20)[int(rnd() * 3)], cidp), tail, anomaly))
            t += 1000.0 - 15000.0 * log(1.0 - rnd())

        # funnel: cart -> checkout -> order
        if not viewed or rnd() >= (0.6 if store else 0.30) * (camp.cart_mult if camp is not None else 1.0):
            return
        cart = []
        value = 0.0
        for _ in range(1 + (rnd() < 0.3)):
            p = viewed[int(rnd() * len(viewed))]
            qty = 1 + (rnd() < 0.2) + (rnd() < 0.05)
            cart.append((p, qty))
            value += prices[p] * qty
            A((t, H["add_to_cart"], who, key, b'{%b,"quantity":%d,"cart_value":%a%b}'
               % (pbody[p], qty, round(value, 2), cidp), tail, anomaly))
            t += 2000.0 - 10000.0 * log(1.0 - rnd())
        if rnd() < 0.10:
            p, qty = cart.pop()
            value -= prices[p] * qty
            A((t, H["remove_from_cart"], who, key, b'{%b,"quantity":%d,"cart_value":%a%b}'
               % (pbody[p], qty, round(max(value, 0.0), 2), cidp), tail, anomaly))
            t += 1000.0 - 15000.0 * log(1.0 - rnd())
            if not cart:
                return
        if rnd() >= (0.85 if store else 0.5):
            return
        if logged_out:  # checkout needs an account: log in, the SDK identifies the visitor
            who, key = u.who_full, u.key_uid
            A((t, H["login"], who, key, b'{"method":"password"%b}' % cidp, tail, anomaly))
            t += 500.0 - 1500.0 * log(1.0 - rnd())
            A((t, _H_IDENTIFY, who, key, b'{"method":"login"%b}' % cidp, tail, anomaly))
            t += 300.0 - 1000.0 * log(1.0 - rnd())
        elif uid is None and rnd() < 0.35:  # a new customer signs up (else: guest checkout)
            self.register(u)
            who, key = u.who_full, u.key_uid
            A((t, H["signup"], who, key, b'{"method":"%b"%b}'
               % ((b"email", b"phone", b"wechat")[int(rnd() * 3)], cidp), tail, anomaly))
            t += 500.0 - 1500.0 * log(1.0 - rnd())
            A((t, _H_IDENTIFY, who, key, b'{"method":"signup"%b}' % cidp, tail, anomaly))
            t += 300.0 - 1000.0 * log(1.0 - rnd())
        quantity = sum(q for _, q in cart)
        total = round(sum(prices[p] * q for p, q in cart), 2)
        p_order = min(0.98, (0.9 if store else 0.7) * (camp.order_mult if camp is not None else 1.0))
        draw = rnd()
        ordered = draw < p_order * self.cvr_factor(t)
        lost = draw < p_order and not ordered  # this order was lost to a cvr_drop incident
        tag = "cvr_drop" if lost and anomaly is None else anomaly
        A((t, H["checkout_started"], who, key, b'{"cart_value":%a,"items":%d,"quantity":%d,"currency":"%b"%b}'
           % (total, len(cart), quantity, curb, cidp), tail, tag))
        t += 5000.0 - 40000.0 * log(1.0 - rnd())
        if not ordered:
            if lost or rnd() < 0.3:
                A((t, H["payment_failed"], who, key, b'{"reason":"%b","amount":%a,"currency":"%b"%b}'
                   % (_PAY_FAIL[int(rnd() * 4)], total, curb, cidp), tail, tag))
            return
        if rnd() < 0.08:  # a failed attempt before the payment goes through
            A((t, H["payment_failed"], who, key, b'{"reason":"%b","amount":%a,"currency":"%b"%b}'
               % (_PAY_FAIL[int(rnd() * 4)], total, curb, cidp), tail, anomaly))
            t += 4000.0 - 15000.0 * log(1.0 - rnd())
        self.order_n += 1
        order_id = b"o-%d-%d" % (self.spec.seed, self.order_n)
        redeemed = bool(coupon) and rnd() < 0.6
        products = b",".join([self.pquoted[p] for p, _ in cart])
        A((t, H["order_completed"], who, key,
           b'{"order_id":"%b","revenue":%a,"currency":"%b","quantity":%d,"products":[%b]%b%b}'
           % (order_id, total, curb, quantity, products,
              b',"coupon_id":"%b"' % coupon if redeemed else b"", cidp), tail, anomaly))
        if redeemed:
            t += 200.0 - 1000.0 * log(1.0 - rnd())
            A((t, H["coupon_redeemed"], who, key, b'{"coupon_id":"%b","order_id":"%b"%b}'
               % (coupon, order_id, cidp), tail, anomaly))
        if rnd() < 0.05:
            t += 60_000.0 - 120_000.0 * log(1.0 - rnd())
            A((t, H["feedback"], who, key, b'{"order_id":"%b","rating":%d%b}'
               % (order_id, _RATINGS[int(rnd() * 8)], cidp), tail, anomaly))


@lru_cache(maxsize=256)
def _events_per_episode(seed: int, users: int, n_campaigns: int, anonymous_share: float) -> float:
    """Mean planned events per episode, measured on a throwaway population (fixed sample)."""
    spec = SyntheticSpec(seed=seed, users=users, campaigns=n_campaigns, anonymous_share=anonymous_share)
    sim = _Sim(spec, random.Random(f"{seed}:calibration"))
    out: list = []
    episodes = 3000
    t = float(spec.start_ms)
    for _ in range(episodes):
        sim.episode(out, t, None)
        t += 1000.0
    return len(out) / episodes


class _Burst:
    """An anomaly that emits its own events (click_fraud, request_flood): a Poisson stream from
    one IP inside its window."""

    __slots__ = ("kind", "next", "end", "rate", "ip", "camp", "ids", "tail", "n", "who", "key")

    def __init__(self, spec: SyntheticSpec, a: Anomaly, index: int, sim: _Sim):
        rng = random.Random(f"{spec.seed}:anomaly:{index}")
        self.kind = a.kind
        self.end = spec.start_ms + (a.start_s + a.duration_s) * 1000.0
        self.n = 0
        self.who = self.key = b""
        if a.kind == "click_fraud":
            self.rate = a.effective_magnitude / 60_000.0  # per ms
            self.ip = f"203.0.113.{66 + index % 180}"
            pool = sim.by_channel.get("ad") or sim.camps
            self.camp = pool[rng.randrange(len(pool))]
            creative = self.camp.creatives[0]
            self.ids = sim.creative_b[self.camp.id, creative]
            ctx = {"channel": "ad", "campaign": self.camp.utm(creative), "ip": self.ip,
                   "user_agent": _FRAUD_UA,
                   "device": {"id": f"d-{rng.getrandbits(40):010x}", "type": "mobile", "os": "Android"},
                   "geo": {"country": "VN", "region": "Hanoi", "city": "Hanoi"},
                   "consent": {"profiling": True, "marketing": True},
                   "locale": "en-US", "timezone": "Asia/Ho_Chi_Minh"}
        else:
            self.rate = a.effective_magnitude / 1000.0
            self.ip = f"198.51.100.{23 + index % 200}"
            self.camp = None
            self.ids = b""
            ctx = {"channel": "web", "ip": self.ip, "user_agent": _FLOOD_UAS[index % len(_FLOOD_UAS)],
                   "geo": {"country": "NL", "region": "Noord-Holland", "city": "Amsterdam"},
                   "consent": {"profiling": False, "marketing": False},
                   "locale": "en-US", "timezone": "UTC"}
        self.tail = b',"context":%b}' % _dumps(ctx)
        self.next = spec.start_ms + a.start_s * 1000.0 - _log(1.0 - rng.random()) / self.rate

    def event(self, rng: random.Random) -> tuple:
        """The event at ``self.next``; advances ``self.next``."""
        t = self.next
        rnd = rng.random
        self.next = t - _log(1.0 - rnd()) / self.rate
        self.n += 1
        if self.kind == "click_fraud":  # a fresh cookie for every click
            anon = b"anon-%012x" % rng.getrandbits(48)
            lo, hi = self.camp.cpc
            props = b'{%b,"cost":%a,"placement":"feed"}' % (self.ids, round(lo + (hi - lo) * rnd(), 2))
            return (t, _H["ad_click"], b'"anonymous_id":"%b",' % anon, anon, props, self.tail, self.kind)
        if self.n % 25 == 1:  # the scraper drops its cookie now and then
            self.key = b"anon-%012x" % rng.getrandbits(48)
            self.who = b'"anonymous_id":"%b",' % self.key
        props = b'{"page":%b}' % _PAGES_B[int(rnd() * len(_PAGES_B))]
        return (t, _H_PAGE, self.who, self.key, props, self.tail, self.kind)


# --------------------------------------------------------------------------------------------
# malformed records


def _malform(rng: random.Random, reason: str, doc: dict, value: bytes, key: bytes | None) -> tuple[bytes, bytes | None]:
    """Corrupt one event the way a buggy or hostile producer would; decode() rejects it with
    exactly ``reason``."""
    d = dict(doc)
    pick = rng.randrange(4)
    if reason == "invalid_json":
        cut = rng.randrange(1, len(value))
        return value[:cut].decode("utf-8", "ignore").encode("utf-8"), key
    if reason == "not_utf8":
        at = rng.randrange(1, len(value) - 1)
        return value[:at] + b"\xff\xfe" + value[at:], key
    if reason == "not_an_object":
        # an array of events, or the event JSON-encoded twice (a string)
        return (b"[" + value + b"]") if pick < 3 else orjson.dumps(value.decode("utf-8")), key
    if reason == "missing_event_id":
        if pick == 0:
            del d["event_id"]
        else:
            d["event_id"] = (None, "", 12345)[pick - 1]
    elif reason == "missing_user":
        d.pop("user_id", None)
        d.pop("anonymous_id", None)
        key = None
    elif reason == "bad_id":
        base = d.get("user_id") or d.get("anonymous_id") or "u00000"
        bad = (base * 60)[:300] if pick < 2 else (base + "\n" if pick == 2 else "\x00" + base)
        d["user_id"] = bad
        key = bad.encode("utf-8")
    elif reason == "bad_type":
        d["type"] = ("trak", "TRACK", "click", 7)[pick]
    elif reason == "missing_event":
        d["type"] = "track"
        if pick < 2:
            d.pop("event", None)
        else:
            d["event"] = ""
    elif reason == "bad_timestamp":
        ts = d["timestamp"]
        d["timestamp"] = ({"seconds": ts}, "yesterday", True, "23/11/2026 10:00")[pick]
    elif reason == "absurd_timestamp":
        ts = d["timestamp"]
        ms = ts if isinstance(ts, int) else None
        d["timestamp"] = (
            "1970-01-01T00:00:12Z",
            "2999-12-31T23:59:59Z",
            (ms // 1000) if ms is not None else 1_795_392_000,  # seconds sent as milliseconds
            32_503_680_000_000,  # year 3000
        )[pick]
    elif reason == "oversized":
        d["properties"] = dict(d["properties"], search_query="x" * (33_000 + rng.randrange(8_000)))
    elif reason == "bad_field":
        props = dict(d["properties"])
        if pick < 3:
            props["revenue"] = ("12.5", "€12,50", "NaN")[pick]
        else:
            props["cost"] = "0.50"
        d["properties"] = props
    return orjson.dumps(d), key


# --------------------------------------------------------------------------------------------
# the stream

# SyntheticRecord is frozen; its generated __init__ sets each field through object.__setattr__,
# which costs more than building the JSON. The slot descriptors set the same fields directly.
_new_record = object.__new__
_set_ts, _set_key, _set_value, _set_kind, _set_anomaly, _set_sent = (
    SyntheticRecord.__dict__[f].__set__
    for f in ("ts_ms", "key", "value", "kind", "anomaly", "sent_ms")
)


def generate(spec: SyntheticSpec) -> Iterator[SyntheticRecord]:
    """Records in generation order, deterministic for equal specs.

    Timestamps never run backwards by more than ``max_disorder_ms`` (0: non-decreasing), except
    duplicates: they re-send an ok record from at most :data:`DUPLICATE_WINDOW_MS` of
    generation time earlier. The generation clock runs from ``start_ms`` to ``start_ms +
    duration_s``; a late event may carry a timestamp up to ``max_disorder_ms`` before it.

    >>> recs = list(generate(SyntheticSpec(seed=1, events_per_s=5, duration_s=120)))
    >>> {r.kind for r in recs}
    {'ok'}
    >>> all(a.ts_ms <= b.ts_ms for a, b in zip(recs, recs[1:]))
    True
    >>> len({r.value for r in recs}) == len(recs)
    True
    """
    _validate(spec)
    return _stream(spec)


def _stream(spec: SyntheticSpec) -> Iterator[SyntheticRecord]:
    rng = random.Random(spec.seed)
    rnd = rng.random
    sim = _Sim(spec, rng)
    start = spec.start_ms
    end = math.inf if spec.duration_s is None else start + spec.duration_s * 1000.0
    bad_p = spec.malformed_share
    dup_p = spec.duplicate_share / (1.0 - spec.duplicate_share)
    max_delay = spec.max_disorder_ms
    per_episode = _events_per_episode(spec.seed, spec.users, spec.campaigns, spec.anonymous_share)
    base = spec.events_per_s * (1.0 - spec.duplicate_share) / per_episode / 1000.0  # episodes/ms
    spikes = [
        (start + a.start_s * 1000.0, start + (a.start_s + a.duration_s) * 1000.0, a.effective_magnitude)
        for a in spec.anomalies if a.kind == "traffic_spike"
    ]
    stuck = [
        (start + a.start_s * 1000.0, start + (a.start_s + a.duration_s) * 1000.0,
         int(a.effective_magnitude * 1000))
        for a in spec.anomalies if a.kind == "ingest_delay"
    ]
    lam_max = base * 1.5  # rhythm() <= 1.5
    for _, _, mag in spikes:
        lam_max *= max(1.0, mag)

    def next_episode(t: float) -> tuple[float, str | None]:
        """Thinning: the next start of the inhomogeneous Poisson process of episodes after t."""
        while True:
            t -= _log(1.0 - rnd()) / lam_max
            if t >= end:
                return t, None
            u = rnd() * lam_max
            lam = base * rhythm(t)
            mult = 1.0
            for lo, hi, mag in spikes:
                if lo <= t < hi:
                    mult *= mag
            if u < lam * min(mult, 1.0):
                return t, None
            if u < lam * mult:  # the extra episodes of a spike
                return t, "traffic_spike"

    if end <= start:
        return
    next_ep, ep_tag = next_episode(float(start - WARMUP_MS))
    bursts = [
        _Burst(spec, a, i, sim)
        for i, a in enumerate(spec.anomalies)
        if a.kind in ("click_fraud", "request_flood") and a.duration_s > 0
    ]

    prefix = f"{spec.seed}-".encode()
    n = 0
    n_bad = 0
    reasons = list(MALFORMED_REASONS)
    random.Random(f"{spec.seed}:reasons").shuffle(reasons)
    iso_cache: dict[int, bytes] = {}
    recent: deque = deque(maxlen=64)
    # Calendar queue: records wait in one bucket per second of generation clock (event time plus
    # delivery delay). Once every episode starting before a second's end has been planned, that
    # bucket is complete: sorted (stable, so ties keep planning order) and emitted.
    buckets: dict[int, list] = {}
    batches: list = []
    second = int((start - WARMUP_MS) // 1000)
    # hot-loop globals as locals
    first_key, value_iso, value_ms, iso_second = _first, _VALUE_ISO, _VALUE_MS, _iso_second
    new, Rec = _new_record, SyntheticRecord
    set_ts, set_key, set_value, set_kind, set_anomaly = _set_ts, _set_key, _set_value, _set_kind, _set_anomaly
    set_sent = _set_sent

    while second * 1000 < end:
        horizon = (second + 1) * 1000
        batches.clear()
        while next_ep < horizon:
            planned: list = []
            sim.episode(planned, next_ep, ep_tag)
            delay = int(rnd() * (max_delay + 1)) if max_delay and rnd() < 0.15 else 0
            batches.append((planned, rnd() < 0.6, delay))
            next_ep, ep_tag = next_episode(next_ep)
        for b in bursts:
            if b.next < horizon and b.next < b.end:
                planned = []
                while b.next < horizon and b.next < b.end:
                    planned.append(b.event(rng))
                batches.append((planned, b.kind == "click_fraud", 0))
        for planned, iso, delay in batches:
            for t, head, who, key, props, tail, anomaly in planned:
                ts = int(t)
                k = ts + delay
                if k < start:  # warm-up
                    continue
                n += 1
                if iso:
                    sec = ts // 1000
                    pre = iso_cache.get(sec)
                    if pre is None:
                        if len(iso_cache) > 100_000:
                            iso_cache.clear()
                        pre = iso_cache[sec] = iso_second(sec)
                    value = value_iso % (prefix, n, head, who, pre, ts - sec * 1000, props, tail)
                else:
                    value = value_ms % (prefix, n, head, who, ts, props, tail)
                rec = new(Rec)
                if bad_p and rnd() < bad_p:
                    reason = reasons[n_bad % 12]
                    n_bad += 1
                    value, key = _malform(rng, reason, orjson.loads(value), value, key)
                    set_ts(rec, k)
                    set_kind(rec, "malformed:" + reason)
                else:
                    set_ts(rec, ts)
                    set_kind(rec, "ok")
                set_key(rec, key)
                set_value(rec, value)
                set_anomaly(rec, anomaly)
                sent = k
                for lo, hi, extra in stuck:
                    if lo <= k < hi:
                        sent += extra
                set_sent(rec, sent)
                b = k // 1000
                slot = buckets.get(b)
                if slot is None:
                    buckets[b] = [(k, rec)]
                else:
                    slot.append((k, rec))
        due = buckets.pop(second, None)
        if due:
            due.sort(key=first_key)
            for k, rec in due:
                if k >= end:
                    return
                yield rec
                if dup_p:
                    if rec.kind == "ok":
                        recent.append((k, rec))
                    if recent and rnd() < dup_p:
                        when, orig = recent[int(rnd() * len(recent))]
                        if k - when > DUPLICATE_WINDOW_MS:
                            when, orig = recent[-1]
                        if k - when <= DUPLICATE_WINDOW_MS:
                            dup = new(Rec)
                            set_ts(dup, orig.ts_ms)
                            set_key(dup, orig.key)
                            set_value(dup, orig.value)
                            set_kind(dup, "duplicate")
                            set_anomaly(dup, orig.anomaly)
                            set_sent(dup, max(rec.sent_ms, orig.sent_ms))
                            yield dup
        second += 1
        if not buckets:  # nothing pending: jump over quiet seconds
            nxt = min([next_ep] + [b.next for b in bursts if b.next < b.end])
            if nxt >= end:
                return
            if nxt >= horizon:
                second = int(nxt // 1000)
