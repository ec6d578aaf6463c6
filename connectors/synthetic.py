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
import heapq
import math
import random
from bisect import bisect
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, count
from typing import Iterator

import orjson

__all__ = [
    "ANOMALY_KINDS",
    "CHANNELS",
    "DUPLICATE_WINDOW_MS",
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

ANOMALY_KINDS = ("traffic_spike", "cvr_drop", "click_fraud", "request_flood")
CHANNELS = ("app", "web", "mini_program", "sms", "email", "push", "store", "ad")
# Every reason flows.events.decode can give for a record (future_timestamp needs a wall clock).
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

_DEFAULT_MAGNITUDE = {
    "traffic_spike": 5.0,  # x session start rate
    "cvr_drop": 0.1,  # x order probability
    "click_fraud": 300.0,  # ad_clicks per minute from one IP
    "request_flood": 150.0,  # page views per second from one IP
}


@dataclass(frozen=True)
class Anomaly:
    """An injected incident in event time (seconds from ``SyntheticSpec.start_ms``).

    ``magnitude`` 0 means the default: traffic_spike x5 episode rate; cvr_drop x0.1 order
    probability; click_fraud 300 ad_clicks/min from one IP; request_flood 150 page views/s.

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


@lru_cache(maxsize=64)
def _catalog(seed: int) -> tuple:
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
    return tuple(ids), tuple(cats), prices


def _iso_second(sec: int) -> str:
    return dt.datetime.fromtimestamp(sec, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------------------------
# the simulation


class _User:
    __slots__ = ("uid", "anon", "channel", "home", "device", "geo", "consent", "locale", "tz",
                 "currency", "ip", "ua_web", "ua_app", "slot")

    def __init__(self) -> None:
        self.slot = -1


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
    """Population, campaigns and the episode planner. Planned events are tuples
    (ts_ms, type, event_name|None, user_id|None, anonymous_id|None, properties, context, iso, anomaly).
    """

    def __init__(self, spec: SyntheticSpec, rng: random.Random):
        self.spec = spec
        self.rng = rng
        self.camps = _campaigns(spec.seed, spec.campaigns)
        self.by_channel: dict[str, tuple[Campaign, ...]] = {}
        for c in self.camps:
            self.by_channel[c.channel] = self.by_channel.get(c.channel, ()) + (c,)
        self.utm = {(c.id, cr): c.utm(cr) for c in self.camps for cr in c.creatives}
        self.product_ids, self.product_cats, self.prices = _catalog(spec.seed)
        self.known: list[_User | None] = [None] * spec.users
        self.anon_pool: list[_User | None] = [None] * max(20, spec.users // 4)
        self.next_uid = spec.users + 1
        self.order_n = 0
        self.msg_n = 0
        self.cvr_windows = [
            (spec.start_ms + a.start_s * 1000.0, spec.start_ms + (a.start_s + a.duration_s) * 1000.0,
             a.effective_magnitude)
            for a in spec.anomalies if a.kind == "cvr_drop"
        ]

    # ---- population

    def _make_user(self, uid: str | None) -> _User:
        rng = self.rng
        rnd = rng.random
        u = _User()
        u.uid = uid
        u.anon = f"anon-{rng.getrandbits(48):012x}"
        u.channel = CHANNELS[bisect(_CHANNEL_CUM, rnd() * _CHANNEL_CUM[-1])]
        loc = _LOCALES[min(len(_LOCALES) - 1, bisect(_LOCALE_CUM, rnd() * _LOCALE_CUM[-1]))]
        region, city = rng.choice(loc[5])
        u.locale, u.tz, u.currency = loc[0], loc[1], loc[3]
        u.geo = {"country": loc[2], "region": region, "city": city}
        r = rnd()
        dtype = "mobile" if r < 0.62 else ("desktop" if r < 0.92 else "tablet")
        os_name = rng.choice(_OS[dtype])
        u.device = {"id": f"d-{rng.getrandbits(40):010x}", "type": dtype, "os": os_name}
        u.consent = {"profiling": rnd() >= 0.04, "marketing": rnd() >= 0.15}
        u.ip = f"{rng.choice(_IP_FIRST)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if dtype == "desktop":
            u.home = "web"
        elif loc[2] == "CN" and rnd() < 0.5:
            u.home = "mini_program"
        else:
            u.home = "app" if rnd() < 0.6 else "web"
        if os_name in ("iOS", "iPadOS"):
            u.ua_web = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
            u.ua_app = "SurgeShop/5.2.1 (iOS 17.4; iPhone14,2)"
        elif os_name == "Android":
            u.ua_web = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Mobile Safari/537.36"
            u.ua_app = "SurgeShop/5.2.1 (Android 14; Pixel 8)"
        elif os_name == "macOS":
            u.ua_web = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15"
            u.ua_app = u.ua_web
        else:
            u.ua_web = f"Mozilla/5.0 ({'Windows NT 10.0; Win64; x64' if os_name == 'Windows' else 'X11; Linux x86_64'}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
            u.ua_app = u.ua_web
        if loc[2] == "CN" and u.home == "mini_program":
            u.ua_web = u.ua_web + " MicroMessenger/8.0.47 MiniProgramEnv/" + os_name
        return u

    def known_user(self) -> _User:
        users = self.spec.users
        idx = int(users * self.rng.random() ** 1.5)  # mildly skewed activity: low ids more active
        u = self.known[idx]
        if u is None:
            n = idx + 1
            uid = _HOSTILE[(n // 250) % len(_HOSTILE)].format(n) if n % 250 == 137 else f"u{n:05d}"
            u = self.known[idx] = self._make_user(uid)
        return u

    def anon_user(self) -> _User:
        rng = self.rng
        slot = rng.randrange(len(self.anon_pool))
        u = self.anon_pool[slot]
        if u is None or rng.random() < 0.3:  # a new cookie
            u = self.anon_pool[slot] = self._make_user(None)
            u.slot = slot
        return u

    def register(self, u: _User) -> str:
        """An anonymous visitor signs up: it gets a user id and joins the known population."""
        u.uid = f"u{self.next_uid:05d}"
        self.next_uid += 1
        if 0 <= u.slot < len(self.anon_pool) and self.anon_pool[u.slot] is u:
            self.anon_pool[u.slot] = None
        self.known.append(u)
        return u.uid

    def cvr_factor(self, t: float) -> float:
        f = 1.0
        for lo, hi, mag in self.cvr_windows:
            if lo <= t < hi:
                f *= mag
        return f

    def ctx(self, u: _User, channel: str, utm: dict | None, device: bool = True) -> dict:
        c: dict = {"channel": channel}
        if utm is not None:
            c["campaign"] = utm
        if device:
            if channel == "store":
                store = sum(map(ord, u.geo["city"])) % 40 + 1  # the shop in the user's city
                c["ip"] = f"81.2.{store}.10"
                c["user_agent"] = f"SurgePOS/2.3 (store-{store:02d})"
                c["device"] = {"id": f"pos-{store:02d}", "type": "pos", "os": "Android"}
            else:
                ip = u.ip
                if self.rng.random() < 0.2:  # mobile networks hand out other addresses
                    ip = ip[: ip.rfind(".") + 1] + str(self.rng.randrange(1, 255))
                c["ip"] = ip
                c["user_agent"] = u.ua_app if channel == "app" else u.ua_web
                c["device"] = u.device
        c["geo"] = u.geo
        c["consent"] = u.consent
        c["locale"] = u.locale
        c["timezone"] = u.tz
        return c

    # ---- episodes

    def episode(self, out: list, t: float, anomaly: str | None) -> None:
        rng = self.rng
        rnd = rng.random
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
        if origin not in _ORGANIC and not camps:
            origin, camps = u.home, None
        if camps is None or origin in _ORGANIC:
            self.session(out, u, t, origin, None, "", anomaly)
        elif origin == "ad":
            self.ad(out, u, t, rng.choice(camps), anomaly)
        else:
            self.message(out, u, t, rng.choice(camps), anomaly)

    def ad(self, out: list, u: _User, t: float, camp: Campaign, anomaly: str | None) -> None:
        rng = self.rng
        rnd = rng.random
        creative = rng.choice(camp.creatives)
        ctx = self.ctx(u, "ad", self.utm[camp.id, creative])
        iso = rnd() < 0.5
        placement = ("feed", "search", "banner", "video")[rng.randrange(4)]
        n_imp = 1 + (rnd() < 0.4) + (rnd() < 0.15)
        for _ in range(n_imp):
            out.append((int(t), "track", "ad_impression", u.uid, u.anon,
                        {"campaign_id": camp.id, "creative_id": creative, "placement": placement},
                        ctx, iso, anomaly))
            if rnd() < camp.rate:
                t += 800 + rng.expovariate(1 / 5000)
                cost = round(rng.uniform(*camp.cpc), 2)
                out.append((int(t), "track", "ad_click", u.uid, u.anon,
                            {"campaign_id": camp.id, "creative_id": creative, "cost": cost,
                             "placement": placement}, ctx, iso, anomaly))
                t += 500 + rng.expovariate(1 / 2000)
                self.session(out, u, t, u.home, camp, creative, anomaly)
                return
            t += 2000 + rng.expovariate(1 / 30000)

    def message(self, out: list, u: _User, t: float, camp: Campaign, anomaly: str | None) -> None:
        rng = self.rng
        rnd = rng.random
        if u.uid is None:  # no address for an anonymous visitor
            self.session(out, u, t, u.home, None, "", anomaly)
            return
        creative = rng.choice(camp.creatives)
        utm = self.utm[camp.id, creative]
        ch = camp.channel
        self.msg_n += 1
        props = {"campaign_id": camp.id, "creative_id": creative, "message_id": f"msg-{self.spec.seed}-{self.msg_n}"}
        iso = rnd() < 0.5
        out.append((int(t), "track", ch + "_sent", u.uid, None, props,
                    self.ctx(u, ch, utm, device=False), iso, anomaly))
        if rnd() >= camp.rate:
            return
        if ch == "push":
            t += 5000 + rng.expovariate(1 / 180_000)
            name, follow, landing = "push_opened", 0.8, "app"
        elif ch == "email":
            t += 30_000 + rng.expovariate(1 / 600_000)
            name, follow, landing = "email_opened", 0.45, "web"
        else:
            t += 10_000 + rng.expovariate(1 / 120_000)
            name, follow, landing = "sms_clicked", 1.0, ("mini_program" if u.home == "mini_program" else "web")
        out.append((int(t), "track", name, u.uid, u.anon, props, self.ctx(u, ch, utm), iso, anomaly))
        if rnd() < follow:
            t += 800 + rng.expovariate(1 / 3000)
            self.session(out, u, t, landing, camp, creative, anomaly)

    def session(self, out: list, u: _User, t: float, channel: str, camp: Campaign | None,
                creative: str, anomaly: str | None) -> None:
        rng = self.rng
        rnd = rng.random
        expo = rng.expovariate
        append = out.append
        ctx = self.ctx(u, channel, self.utm[camp.id, creative] if camp is not None else None)
        iso = rnd() < 0.6
        cid = camp.id if camp is not None else None
        cur = u.currency
        prices = self.prices[cur]
        pids, pcats = self.product_ids, self.product_cats
        n_prod = len(pids)
        anon = u.anon
        store = channel == "store"
        uid = u.uid
        logged_out = uid is not None and channel in ("web", "mini_program") and rnd() < 0.2
        cur_uid = None if logged_out else uid

        def props(**kw) -> dict:
            if cid is not None:
                kw["campaign_id"] = cid
            return kw

        def gap() -> float:
            return 1000.0 + expo(1 / 15000)

        def identify(method: str) -> None:
            nonlocal t
            append((int(t), "identify", None, cur_uid, anon, props(method=method), ctx, iso, anomaly))
            t += 300 + expo(1 / 1000)

        # login (known users, sometimes after a failed attempt)
        if cur_uid is not None and not store and rnd() < 0.25:
            if rnd() < 0.08:
                append((int(t), "track", "login_failed", cur_uid, anon,
                        props(reason=("wrong_password", "expired_code")[rnd() < 0.3]), ctx, iso, anomaly))
                t += 3000 + expo(1 / 8000)
            append((int(t), "track", "login", cur_uid, anon,
                    props(method=("password", "sms_code", "wechat", "apple")[rng.randrange(4)]), ctx, iso, anomaly))
            t += gap()

        # browsing
        viewed: list[int] = []
        n_views = 1 + int(expo(1 / (0.8 if store else 3.2)))
        for _ in range(n_views):
            if not store and rnd() < 0.15:
                append((int(t), "track", "search", cur_uid, anon,
                        props(search_query=_QUERIES[rng.randrange(len(_QUERIES))], results=rng.randrange(121)),
                        ctx, iso, anomaly))
                t += 1500 + expo(1 / 4000)
            g = gap()
            r = rnd()
            if r < 0.45 and not store:
                page = _PAGES[rng.randrange(len(_PAGES))]
                if r < 0.25:
                    append((int(t), "page", None, cur_uid, anon, props(page=page, dwell_ms=int(g)), ctx, iso, anomaly))
                else:
                    append((int(t), "track", "page_view", cur_uid, anon, props(page=page, dwell_ms=int(g)),
                            ctx, iso, anomaly))
            else:
                p = int(n_prod * rnd() ** 2)  # popular products first
                viewed.append(p)
                append((int(t), "track", "product_viewed", cur_uid, anon,
                        props(product_id=pids[p], category=pcats[p], price=prices[p], currency=cur,
                              dwell_ms=int(g)), ctx, iso, anomaly))
                r = rnd()
                if r < 0.06:
                    t += 500 + expo(1 / 2000)
                    name = "favorite" if r < 0.04 else ("share" if r < 0.055 else _UNKNOWN_EVENTS[rng.randrange(4)])
                    append((int(t), "track", name, cur_uid, anon,
                            props(product_id=pids[p], category=pcats[p]), ctx, iso, anomaly))
            t += g

        coupon = None
        if rnd() < 0.04:
            coupon = f"cpn-{rng.randrange(1, 50):03d}"
            append((int(t), "track", "coupon_claimed", cur_uid, anon,
                    props(coupon_id=coupon, discount=(5, 10, 20)[rng.randrange(3)]), ctx, iso, anomaly))
            t += gap()

        # funnel: cart -> checkout -> order
        cart_p = (0.6 if store else 0.30) * (camp.cart_mult if camp is not None else 1.0)
        if not viewed or rnd() >= cart_p:
            return
        cart: list[tuple[int, int]] = []
        value = 0.0
        for _ in range(1 + (rnd() < 0.3)):
            p = viewed[rng.randrange(len(viewed))]
            qty = 1 + (rnd() < 0.2) + (rnd() < 0.05)
            cart.append((p, qty))
            value += prices[p] * qty
            append((int(t), "track", "add_to_cart", cur_uid, anon,
                    props(product_id=pids[p], category=pcats[p], price=prices[p], quantity=qty,
                          currency=cur, cart_value=round(value, 2)), ctx, iso, anomaly))
            t += 2000 + expo(1 / 10000)
        if rnd() < 0.10:
            p, qty = cart.pop()
            value -= prices[p] * qty
            append((int(t), "track", "remove_from_cart", cur_uid, anon,
                    props(product_id=pids[p], category=pcats[p], price=prices[p], quantity=qty,
                          currency=cur, cart_value=round(max(value, 0.0), 2)), ctx, iso, anomaly))
            t += gap()
            if not cart:
                return
        if rnd() >= (0.85 if store else 0.5):
            return
        if logged_out:
            cur_uid = uid
            append((int(t), "track", "login", cur_uid, anon, props(method="password"), ctx, iso, anomaly))
            t += 500 + expo(1 / 1500)
            identify("login")
        elif uid is None and rnd() < 0.35:
            cur_uid = uid = self.register(u)
            append((int(t), "track", "signup", cur_uid, anon,
                    props(method=("email", "phone", "wechat")[rng.randrange(3)]), ctx, iso, anomaly))
            t += 500 + expo(1 / 1500)
            identify("signup")
        quantity = sum(q for _, q in cart)
        total = round(sum(prices[p] * q for p, q in cart), 2)
        p_order = min(0.98, (0.9 if store else 0.7) * (camp.order_mult if camp is not None else 1.0))
        draw = rnd()
        ordered = draw < p_order * self.cvr_factor(t)
        lost = draw < p_order and not ordered  # this order was lost to a cvr_drop incident
        append((int(t), "track", "checkout_started", cur_uid, anon,
                props(cart_value=total, items=len(cart), quantity=quantity, currency=cur), ctx, iso,
                "cvr_drop" if lost and anomaly is None else anomaly))
        t += 5000 + expo(1 / 40000)
        reasons = ("card_declined", "insufficient_funds", "timeout", "3ds_failed")
        if not ordered:
            if rnd() < 0.3 or lost:
                append((int(t), "track", "payment_failed", cur_uid, anon,
                        props(reason=reasons[rng.randrange(4)], amount=total, currency=cur), ctx, iso,
                        "cvr_drop" if lost and anomaly is None else anomaly))
            return
        if rnd() < 0.08:
            append((int(t), "track", "payment_failed", cur_uid, anon,
                    props(reason=reasons[rng.randrange(4)], amount=total, currency=cur), ctx, iso, anomaly))
            t += 4000 + expo(1 / 15000)
        self.order_n += 1
        order_id = f"o-{self.spec.seed}-{self.order_n}"
        order = props(order_id=order_id, revenue=total, currency=cur, quantity=quantity,
                      products=[pids[p] for p, _ in cart])
        redeemed = coupon is not None and rnd() < 0.6
        if redeemed:
            order["coupon_id"] = coupon
        append((int(t), "track", "order_completed", cur_uid, anon, order, ctx, iso, anomaly))
        if redeemed:
            t += 200 + expo(1 / 1000)
            append((int(t), "track", "coupon_redeemed", cur_uid, anon,
                    props(coupon_id=coupon, order_id=order_id), ctx, iso, anomaly))
        if rnd() < 0.05:
            t += 60_000 + expo(1 / 120_000)
            append((int(t), "track", "feedback", cur_uid, anon,
                    props(order_id=order_id, rating=rng.choice((1, 2, 3, 4, 4, 5, 5, 5))), ctx, iso, anomaly))


@lru_cache(maxsize=256)
def _events_per_episode(seed: int, users: int, n_campaigns: int, anonymous_share: float) -> float:
    """Mean planned events per episode, measured on a throwaway population (fixed sample)."""
    spec = SyntheticSpec(seed=seed, users=users, campaigns=n_campaigns, anonymous_share=anonymous_share)
    sim = _Sim(spec, random.Random(f"{seed}:calibration"))
    out: list = []
    episodes = 4000
    t = float(spec.start_ms)
    for _ in range(episodes):
        sim.episode(out, t, None)
        t += 1000.0
    return len(out) / episodes


class _Burst:
    """An anomaly that emits its own events (click_fraud, request_flood)."""

    __slots__ = ("kind", "end", "rate", "ip", "camp", "creative", "ctx", "n", "anon", "iso")

    def __init__(self, spec: SyntheticSpec, a: Anomaly, index: int, sim: _Sim):
        rng = random.Random(f"{spec.seed}:anomaly:{index}")
        self.kind = a.kind
        self.end = spec.start_ms + (a.start_s + a.duration_s) * 1000.0
        self.n = 0
        self.anon = ""
        self.iso = rng.random() < 0.5
        if a.kind == "click_fraud":
            self.rate = a.effective_magnitude / 60.0
            self.ip = f"203.0.113.{66 + index % 180}"
            pool = sim.by_channel.get("ad") or sim.camps
            self.camp = pool[rng.randrange(len(pool))]
            self.creative = self.camp.creatives[0]
            self.ctx = {"channel": "ad", "campaign": self.camp.utm(self.creative), "ip": self.ip,
                        "user_agent": _FRAUD_UA,
                        "device": {"id": f"d-{rng.getrandbits(40):010x}", "type": "mobile", "os": "Android"},
                        "geo": {"country": "VN", "region": "Hanoi", "city": "Hanoi"},
                        "consent": {"profiling": True, "marketing": True},
                        "locale": "en-US", "timezone": "Asia/Ho_Chi_Minh"}
        else:
            self.rate = a.effective_magnitude
            self.ip = f"198.51.100.{23 + index % 200}"
            self.camp = None
            self.creative = ""
            self.ctx = {"channel": "web", "ip": self.ip, "user_agent": _FLOOD_UAS[index % len(_FLOOD_UAS)],
                        "geo": {"country": "NL", "region": "Noord-Holland", "city": "Amsterdam"},
                        "consent": {"profiling": False, "marketing": False},
                        "locale": "en-US", "timezone": "UTC"}

    def event(self, rng: random.Random, t: int) -> tuple:
        self.n += 1
        if self.kind == "click_fraud":  # a fresh cookie for every click
            anon = f"anon-{rng.getrandbits(48):012x}"
            cost = round(rng.uniform(*self.camp.cpc), 2)
            props = {"campaign_id": self.camp.id, "creative_id": self.creative, "cost": cost,
                     "placement": "feed"}
            return (t, "track", "ad_click", None, anon, props, self.ctx, self.iso, self.kind)
        if self.n % 25 == 1:  # the scraper drops its cookie now and then
            self.anon = f"anon-{rng.getrandbits(48):012x}"
        page = _PAGES[rng.randrange(len(_PAGES))]
        return (t, "page", None, None, self.anon, {"page": page}, self.ctx, self.iso, self.kind)


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
        return (b"[" + value + b"]") if pick < 3 else b'"' + value.replace(b'"', b"'") + b'"', key
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
        bad = (base * 40)[:300] if pick < 2 else (base + "\n" if pick == 2 else "\x00" + base)
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


def generate(spec: SyntheticSpec) -> Iterator[SyntheticRecord]:
    """Records in generation order, deterministic for equal specs.

    Timestamps never run backwards by more than ``max_disorder_ms`` (0: non-decreasing) except
    for duplicates, which re-send an ok record from at most :data:`DUPLICATE_WINDOW_MS` of
    generation time ago.

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
    expo = rng.expovariate
    sim = _Sim(spec, rng)
    heap: list = []
    push, pop = heapq.heappush, heapq.heappop
    seq = count()
    dumps = orjson.dumps
    Rec = SyntheticRecord

    start = spec.start_ms
    end = math.inf if spec.duration_s is None else start + spec.duration_s * 1000.0
    bad_p = spec.malformed_share
    dup_p = spec.duplicate_share / (1.0 - spec.duplicate_share)
    max_delay = spec.max_disorder_ms
    per_episode = _events_per_episode(spec.seed, spec.users, spec.campaigns, spec.anonymous_share)
    base = spec.events_per_s * (1.0 - spec.duplicate_share) / per_episode  # episodes / s at rhythm 1
    spikes = [
        (start + a.start_s * 1000.0, start + (a.start_s + a.duration_s) * 1000.0, a.effective_magnitude)
        for a in spec.anomalies if a.kind == "traffic_spike"
    ]
    lam_max = base * 1.5
    for _, _, mag in spikes:
        lam_max *= max(1.0, mag)

    def next_episode(t: float) -> tuple[float, str | None]:
        """Thinning: the next episode start of the inhomogeneous Poisson process after t."""
        while True:
            t += expo(lam_max) * 1000.0
            if t >= end:
                return t, None
            u = rnd() * lam_max
            lam = base * rhythm(t)
            if u < lam:
                return t, None
            if spikes:
                mult = 1.0
                for lo, hi, mag in spikes:
                    if lo <= t < hi:
                        mult *= mag
                if u < lam * mult:
                    return t, "traffic_spike"

    t0, tag = next_episode(float(start))
    push(heap, (t0, next(seq), 1, tag))
    for i, a in enumerate(spec.anomalies):
        if a.kind in ("click_fraud", "request_flood") and a.duration_s > 0:
            burst = _Burst(spec, a, i, sim)
            t1 = start + a.start_s * 1000.0 + expo(burst.rate) * 1000.0
            if t1 < burst.end:
                push(heap, (t1, next(seq), 2, burst))

    prefix = f"{spec.seed}-"
    n = 0
    n_bad = 0
    reasons = list(MALFORMED_REASONS)
    random.Random(f"{spec.seed}:reasons").shuffle(reasons)
    last_sec = -1
    sec_text = ""
    recent: deque = deque(maxlen=64)
    planned: list = []

    while heap:
        clock, _, code, ev = pop(heap)
        if clock >= end:
            return
        if code == 1:  # start an episode, schedule the next one
            planned.clear()
            sim.episode(planned, clock, ev)
            delay = int(rnd() * (max_delay + 1)) if max_delay and rnd() < 0.15 else 0
            for p in planned:
                push(heap, (p[0] + delay, next(seq), 0, p))
            t1, tag = next_episode(clock)
            if t1 < end:
                push(heap, (t1, next(seq), 1, tag))
            continue
        if code == 2:  # an anomaly burst emits one event now and schedules its next
            t1 = clock + expo(ev.rate) * 1000.0
            if t1 < ev.end:
                push(heap, (t1, next(seq), 2, ev))
            ev = ev.event(rng, int(clock))

        ts = ev[0]
        if ev[7]:
            sec, ms = divmod(ts, 1000)
            if sec != last_sec:
                last_sec = sec
                sec_text = _iso_second(sec)
            tsv = f"{sec_text}.{ms:03d}Z"
        else:
            tsv = ts
        n += 1
        uid = ev[3]
        doc = {"event_id": f"{prefix}{n}", "type": ev[1]}
        if ev[2] is not None:
            doc["event"] = ev[2]
        if uid is not None:
            doc["user_id"] = uid
            key = uid.encode()
        else:
            key = ev[4].encode()
        if ev[4] is not None:
            doc["anonymous_id"] = ev[4]
        doc["timestamp"] = tsv
        doc["properties"] = ev[5]
        doc["context"] = ev[6]
        value = dumps(doc)
        if bad_p and rnd() < bad_p:
            reason = reasons[n_bad % len(reasons)]
            n_bad += 1
            value, key = _malform(rng, reason, doc, value, key)
            yield Rec(int(clock), key, value, "malformed:" + reason, ev[8])
        else:
            rec = Rec(ts, key, value, "ok", ev[8])
            yield rec
            if dup_p:
                recent.append((clock, rec))
        if dup_p and recent and rnd() < dup_p:
            when, orig = recent[rng.randrange(len(recent))]
            if clock - when > DUPLICATE_WINDOW_MS:
                when, orig = recent[-1]
            if clock - when <= DUPLICATE_WINDOW_MS:
                yield Rec(orig.ts_ms, orig.key, orig.value, "duplicate", orig.anomaly)
