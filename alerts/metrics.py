"""Metric series for the alert rules, declared by name (the rule catalogue refers to them).

Two families:

* **minute metrics** (:data:`MINUTE_METRICS`), judged once per complete minute in minute order
  from :class:`flows.minutes.CompleteMinute`: traffic per channel, CTR / CVR / CPC per campaign
  over a sliding window, DAU pace against yesterday, ingest delay. :class:`MinuteSeries` keeps
  what they need across minutes.
* **entity metrics** (:data:`ENTITY_METRICS`), counted per IP, IP cluster or user over a sliding
  event-time window and judged on every event (abuse: floods, click fraud, credential stuffing),
  in :mod:`alerts.entities`.

Each series is a mapping ``series key -> (value, n)``: ``n`` is the sample size behind a ratio
(impressions behind a CTR), else None.

>>> from flows.minutes import CompleteMinute
>>> s = MinuteSeries(windows={60})
>>> s.add(CompleteMinute(100, [("ad", "c1", "", "ad_impression", 400, 0.0, 0.0, 0, []),
...                            ("ad", "c1", "", "ad_click", 10, 0.0, 7.5, 0, []),
...                            ("web", "c1", "", "order_completed", 2, 90.0, 0.0, 2, ["u1", "u2"])]))
>>> s.series("ctr", "campaign", 60)
{'campaign=c1': (0.025, 400.0)}
>>> s.series("cpc", "campaign", 60)
{'campaign=c1': (0.75, 10.0)}
>>> s.series("events", "channel", 1)
{'channel=ad': (410, None), 'channel=web': (2, None)}

Distinct series are capped per split (channel, campaign, page): at most ``max_series`` keys each.
Beyond, the key least recently active (its last minute with data; ties: the smallest key) is
forgotten with all its sums, a key with an open alert (``protected``) only when every key is one;
each counts ``evictions{minute_series}`` and is listed in :attr:`MinuteSeries.evicted`.

>>> s = MinuteSeries(windows={60}, max_series=2)
>>> for minute, campaign in enumerate(["c1", "c2", "c1", "c3"]):
...     s.add(CompleteMinute(minute, [("ad", campaign, "", "ad_click", 1, 0.0, 0.0, 0, [])]))
>>> sorted(s.series("events", "campaign", 1)), s.evicted  # c2 was the least recently active
(['campaign=c1', 'campaign=c3'], ['campaign=c2'])
"""
from __future__ import annotations

import ipaddress
import math
import zlib
from array import array
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from flows.eviction import OldestFirst
from privacy.pii import CANONICAL_IPV4
from surgeflow.stats import STATS

DAY_MINUTES = 1440
MAX_SERIES = 10_000  # default cap on keys per split (config: limits.max_series)
SPLITS = ("channel", "campaign", "page")  # how series are split, besides "all"

# Counters kept per campaign (and "all") and minute, summed over sliding windows.
(IMPRESSIONS, AD_CLICKS, CLICKS, COST, ORDERS, CHECKOUTS, PRODUCT_VIEWS, VIEWS, BOUNCES,
 REVENUE) = range(10)
_SLOTS = 10
_COUNTED = {"ad_impression": IMPRESSIONS, "ad_click": AD_CLICKS, "checkout_started": CHECKOUTS,
            "product_viewed": PRODUCT_VIEWS}
_CLICK_EVENTS = {"ad_click", "sms_clicked"}  # a paid or messaged click (as in warehouse KPIs)


@dataclass(frozen=True)
class RatioMetric:
    numerator: int
    denominator: int
    doc: str
    sample: int | None = None  # the sample size n, when it is not the denominator


# ratio = numerator / denominator over the window; n = the denominator
RATIOS = {
    "ctr": RatioMetric(AD_CLICKS, IMPRESSIONS, "ad clicks / ad impressions"),
    "click_cvr": RatioMetric(ORDERS, CLICKS, "orders / clicks (ad and SMS clicks)"),
    "checkout_cvr": RatioMetric(ORDERS, CHECKOUTS, "orders / checkouts started"),
    "product_cvr": RatioMetric(ORDERS, PRODUCT_VIEWS, "orders / product page views"),
    "cpc": RatioMetric(COST, AD_CLICKS, "ad cost / ad clicks"),
    # the views of the window's minutes, known 10 minutes later (flows/shard.py: bounces)
    "bounce_rate": RatioMetric(BOUNCES, VIEWS, "page views with no interaction of the visitor in "
                                                "the next 10 minutes / page views"),
    # CAC / LTV with what the stream knows: cost per order over revenue per order (no LTV model)
    "spend_to_revenue": RatioMetric(COST, REVENUE, "ad cost / attributed revenue; n = orders",
                                    sample=ORDERS),
}
# metric -> the series keys it can be split by
MINUTE_METRICS: dict[str, tuple[str, ...]] = {
    "events": ("all", "channel", "campaign"),  # events per minute
    **{name: ("all", "campaign") for name in RATIOS if name != "bounce_rate"},
    "bounce_rate": ("all", "page"),
    "dau_pace": ("all",),  # users since local midnight / users by the same time yesterday
    # ms from event time to the record's send time (Kafka record time), per minute
    "ingest_delay_p50": ("all",),
    "ingest_delay_p95": ("all",),
}


@dataclass(frozen=True)
class EntityMetric:
    entity: str  # "ip", "ip_cluster" or "user"
    events: frozenset[str] | None  # event names counted; None = every event
    distinct: str | None = None  # count distinct values of this field instead of events
    doc: str = ""


ENTITY_METRICS: dict[str, EntityMetric] = {
    "requests_per_ip": EntityMetric("ip", None, doc="events from one IP"),
    "clicks_per_ip_cluster": EntityMetric("ip_cluster", frozenset({"ad_click"}),
                                          doc="ad clicks from one /24 (IPv4) or /48 (IPv6)"),
    "failed_logins_per_user": EntityMetric("user", frozenset({"login_failed"})),
    "failed_logins_per_ip": EntityMetric("ip", frozenset({"login_failed"})),
    "login_countries_per_user": EntityMetric("user", frozenset({"login", "login_failed"}),
                                             distinct="country", doc="countries a user logs in from"),
    "orders_per_user": EntityMetric("user", frozenset({"order_completed"})),
}


class MinuteSeries:
    """Everything the minute metrics need, updated one complete minute at a time."""

    def __init__(self, windows: set[int], day_offset_min: int = 0, max_series: int = MAX_SERIES):
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        self.windows = sorted(windows | {1})
        self.queues: dict[int, deque[int]] = {w: deque() for w in self.windows}  # minutes in w
        self.rows: dict[int, dict[str, list[float]]] = {}  # queued minute -> key -> counters
        self.sums: dict[int, dict[str, list[float]]] = {w: {} for w in self.windows}
        self.minute: int | None = None
        self.events: dict[str, int] = {}
        # channels and campaigns seen -> last minute with events: a quiet one counts as zero
        self.known: dict[str, int] = {}
        self.day_offset_min = day_offset_min  # local midnight for DAU (reporting time zone)
        self.day: int | None = None
        self.today: set[int] = set()  # crc32 of today's users
        self.today_curve: list[int] = []  # users so far, per minute of today
        self.yesterday_curve: list[int] = []
        self.delays: dict[int, int] = {}
        self._bound(max_series)

    def _bound(self, max_series: int) -> None:
        """The state of the cap (also rebuilt for a snapshot from before it)."""
        self.max_series = max_series
        # split -> key -> last minute with data (eviction order)
        self.recency: dict[str, OldestFirst] = {split: OldestFirst() for split in SPLITS}
        # key -> the queued minutes it has counts in, so an evicted key leaves every window
        self.key_minutes: dict[str, array] = {}
        self.peaks: dict[int, int] = {}  # queued minute -> most keys its counts held (compaction)
        self.evicted: list[str] = []  # keys evicted by the latest add
        for minute, counts in self.rows.items():
            self.peaks[minute] = len(counts)
            for key in counts:
                if key != "all":
                    self.key_minutes.setdefault(key, array("q")).append(minute)
                    self.recency[key.split("=", 1)[0]].touch(key, minute)
        for key, last in self.known.items():
            self.recency[key.split("=", 1)[0]].touch(key, last)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "recency" not in state:  # a snapshot from before the cap: (minute, counts) queues
            self.rows = {minute: counts for minute, counts in self.queues[self.windows[-1]]}
            self.queues = {w: deque(minute for minute, _ in q) for w, q in self.queues.items()}
            self._bound(MAX_SERIES)

    def size(self) -> int:
        """Keys kept, over every split (figures, gauges)."""
        return sum(len(r) for r in self.recency.values())

    def add(self, m, protected: frozenset[str] | set[str] = frozenset()) -> None:
        """One complete minute. ``protected`` keys (open alerts) are evicted last."""
        minute = m.minute
        self.minute = minute
        counts: dict[str, list[float]] = {}
        events: dict[str, int] = {"all": 0}
        users: set[int] = set()
        for channel, campaign, _creative, name, n, revenue, cost, orders, row_users in m.rows:
            events["all"] += n
            for key in (f"channel={channel}", f"campaign={campaign}" if campaign else None):
                if key is not None:
                    events[key] = events.get(key, 0) + n
                    self.known[key] = minute
            for key in ("all", f"campaign={campaign}" if campaign else None):
                if key is None:
                    continue
                c = counts.get(key)
                if c is None:
                    c = counts[key] = [0.0] * _SLOTS
                slot = _COUNTED.get(name)
                if slot is not None:
                    c[slot] += n
                if name in _CLICK_EVENTS:
                    c[CLICKS] += n
                c[COST] += cost
                c[ORDERS] += orders
                c[REVENUE] += revenue
            users.update(zlib.crc32(u.encode()) for u in row_users)
        for page, (views, bounced) in m.bounces.items():
            for key in ("all", f"page={page}"):
                c = counts.get(key)
                if c is None:
                    c = counts[key] = [0.0] * _SLOTS
                c[VIEWS] += views
                c[BOUNCES] += bounced
        self.events = events
        self._admit(minute, counts, protected)
        self._slide(minute, dict(counts) if self.evicted else counts)
        self._users(minute, users)
        self.delays = m.delays

    def _admit(self, minute: int, counts: dict[str, list[float]], protected) -> None:
        """Mark this minute's keys active; beyond the cap per split, evict the least recently
        active (ties: the smallest key), keys with an open alert last."""
        self.evicted = []
        touched = set()
        for key in (*self.events, *counts):
            if key != "all":
                split = key.split("=", 1)[0]
                self.recency[split].touch(key, minute)
                touched.add(split)
        for split in sorted(touched):
            recency = self.recency[split]
            if len(recency) <= self.max_series:
                continue
            lasts = {k: recency.last[k] for k in protected if k in recency.last}
            held: list[str] = []  # protected keys popped on the way, oldest first
            while len(recency) + len(held) > self.max_series:
                key = recency.pop_oldest()
                if key is None:  # every key left has an open alert: the oldest of them goes
                    key = held.pop(0)
                elif key in lasts:
                    held.append(key)
                    continue
                self._purge(key, counts)
                self.evicted.append(key)
                STATS.add_labeled("evictions", "minute_series")
            for key in held:
                recency.touch(key, lasts[key])

    def _purge(self, key: str, counts: dict[str, list[float]]) -> None:
        """Forget everything of one key: it no longer counts in any window."""
        self.known.pop(key, None)
        self.events.pop(key, None)
        counts.pop(key, None)
        for sums in self.sums.values():
            sums.pop(key, None)
        rows, peaks = self.rows, self.peaks
        for minute in self.key_minutes.pop(key, ()):
            row = rows[minute]
            del row[key]
            if 4 * len(row) < peaks[minute]:  # a dict keeps its size: copy it once mostly empty
                rows[minute] = dict(row)
                peaks[minute] = len(row)

    def _slide(self, minute: int, counts: dict[str, list[float]]) -> None:
        self.rows[minute] = counts
        self.peaks[minute] = len(counts)
        for key in counts:
            if key != "all":
                minutes = self.key_minutes.get(key)
                if minutes is None:
                    minutes = self.key_minutes[key] = array("q")
                minutes.append(minute)
        widest = self.windows[-1]
        for w in self.windows:
            queue, sums = self.queues[w], self.sums[w]
            queue.append(minute)
            for key, c in counts.items():
                s = sums.get(key)
                if s is None:
                    if any(c):
                        sums[key] = list(c)
                else:
                    for i, v in enumerate(c):
                        s[i] += v
            while queue[0] <= minute - w:
                gone = queue.popleft()
                leaving = self.rows[gone]
                for key, c in leaving.items():
                    if w == widest and key != "all":
                        minutes = self.key_minutes[key]
                        del minutes[0]  # (this minute: the oldest it has counts in)
                        if not minutes:
                            del self.key_minutes[key]
                    s = sums.get(key)
                    if s is None:  # nothing counted for it in the window
                        continue
                    for i, v in enumerate(c):
                        s[i] -= v
                    if not any(abs(v) > 1e-9 for v in s):
                        del sums[key]
                if w == widest:
                    del self.rows[gone], self.peaks[gone]

    def forget_idle(self, before: int) -> None:
        """Keys without data since ``before`` are forgotten: a channel or campaign is no longer
        judged as zero (their windows are empty by then)."""
        if self.minute is not None:  # (never a key still in a window)
            before = min(before, self.minute - self.windows[-1] + 1)
        for recency in self.recency.values():
            while (key := recency.pop_older_than(before)) is not None:
                self._purge(key, {})

    def _users(self, minute: int, users: set[int]) -> None:
        local = minute + self.day_offset_min
        day = local // DAY_MINUTES
        if day != self.day:
            if self.day is not None and day == self.day + 1:
                self.yesterday_curve = self.today_curve
            else:
                self.yesterday_curve = []
            self.day, self.today, self.today_curve = day, set(), []
        self.today |= users
        of_day = local % DAY_MINUTES
        while len(self.today_curve) <= of_day:  # minutes without data keep the count
            self.today_curve.append(len(self.today))
        self.today_curve[of_day] = len(self.today)

    def series(self, metric: str, by: str, window: int) -> dict[str, tuple[float, float | None]]:
        if metric == "events":
            keys = ["all"] if by == "all" else sorted(k for k in self.known if k.startswith(by + "="))
            return {k: (self.events.get(k, 0), None) for k in keys}
        ratio = RATIOS.get(metric)
        if ratio is not None:
            out = {}
            prefix = by + "="
            for key, s in self.sums[window].items():
                if key != "all" if by == "all" else not key.startswith(prefix):
                    continue
                d = s[ratio.denominator]
                if d > 0:  # no sample: nothing to judge
                    n = s[ratio.sample] if ratio.sample is not None else d
                    out[key] = (s[ratio.numerator] / d, n)
            return out
        if metric == "dau_pace":
            of_day = (self.minute + self.day_offset_min) % DAY_MINUTES if self.minute is not None else 0
            if of_day >= len(self.yesterday_curve):
                return {}
            before = self.yesterday_curve[of_day]
            return {"all": (self.today_curve[of_day] / before if before else 0.0, float(before))}
        if metric.startswith("ingest_delay_p"):
            q = delay_quantile(self.delays, int(metric[len("ingest_delay_p"):]) / 100)
            return {} if q is None else {"all": (q, None)}
        raise KeyError(metric)


# -- ingest delay histogram: 8 buckets per doubling (about 9 % wide), merged by addition ------

def delay_bucket(delay_ms: int) -> int:
    """Histogram bucket of an ingest delay.

    >>> [delay_bucket(d) for d in (0, 1, 1000, 2000, 1_800_000)]
    [0, 1, 80, 88, 166]
    """
    if delay_ms <= 0:
        return 0
    mantissa, exponent = math.frexp(delay_ms)  # delay = mantissa * 2**exponent, 0.5 <= m < 1
    return 1 + (exponent - 1) * 8 + int((mantissa - 0.5) * 16)


def bucket_upper(bucket: int) -> float:
    """The largest delay in a bucket (ms), the value reported for a quantile in it.

    >>> bucket_upper(delay_bucket(2000)) >= 2000 > bucket_upper(delay_bucket(2000) - 1)
    True
    """
    if bucket <= 0:
        return 0.0
    exponent, part = divmod(bucket - 1, 8)
    return (0.5 + (part + 1) / 16) * 2.0 ** (exponent + 1)


def delay_quantile(hist: dict[int, int], q: float) -> float | None:
    """The q-quantile of a delay histogram (upper edge of its bucket); None when empty.

    >>> delay_quantile({delay_bucket(50): 95, delay_bucket(60_000): 5}, 0.95) < 100
    True
    >>> delay_quantile({delay_bucket(50): 90, delay_bucket(60_000): 10}, 0.95) >= 60_000
    True
    """
    total = sum(hist.values())
    if total == 0:
        return None
    need = q * total
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= need:
            return bucket_upper(b)
    return bucket_upper(max(hist))


@lru_cache(maxsize=65_536)
def normal_ip(ip: str) -> str:
    """The canonical text of an IP address; an IPv4 address mapped into IPv6 is the IPv4 one;
    "" for what is not an IP (the per-IP rules skip it).

    >>> normal_ip("::ffff:203.0.113.7"), normal_ip("2001:DB8::1"), normal_ip("203.0.113.066")
    ('203.0.113.7', '2001:db8::1', '')
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


@lru_cache(maxsize=65_536)
def ip_cluster(ip: str) -> str:
    """The network a (canonical) IP belongs to, for click-fraud counting: /24 for IPv4, /48 for
    IPv6; "" for what is not an IP.

    >>> ip_cluster("203.0.113.66"), ip_cluster("2001:db8:1:2::7"), ip_cluster("nope")
    ('203.0.113.0/24', '2001:db8:1::/48', '')
    """
    if type(ip) is str and (v4 := CANONICAL_IPV4.fullmatch(ip)):  # most IPs: no ipaddress
        return v4[1] + "0/24"
    ip = normal_ip(ip)
    if not ip:
        return ""
    bits = 24 if "." in ip else 48
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))
