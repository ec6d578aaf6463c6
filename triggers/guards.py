"""Guards, checked at the moment of sending (and again when a deferred send is released):
marketing consent, quiet hours in the user's time zone, frequency caps per channel, tag or
message. Pure functions of the user's recent sends and the time: the engine applies them.

>>> from zoneinfo import ZoneInfo
>>> from triggers.spec import QuietHours
>>> q, tz = QuietHours(start="21:00", end="09:00"), ZoneInfo("Europe/Berlin")
>>> late = int(dt.datetime(2026, 12, 5, 23, 30, tzinfo=tz).timestamp() * 1000)
>>> release = quiet_until(q, late, tz)
>>> dt.datetime.fromtimestamp(release / 1000, tz).strftime("%d %H:%M")
'06 09:00'
>>> quiet_until(q, release, tz) is None
True
"""
from __future__ import annotations

import datetime as dt
import functools
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from triggers.spec import Cap, QuietHours, clock_minutes, duration_ms

DAY_MS = 86_400_000


@functools.lru_cache(maxsize=1024)
def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    """The user's time zone (``context.timezone``); an unknown name falls back to the default."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            pass
    return ZoneInfo(default)


def _local(ts_ms: int, tz: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz)


def _at(day: dt.date, minutes: int, tz: ZoneInfo) -> int:
    local = dt.datetime(day.year, day.month, day.day, minutes // 60, minutes % 60, tzinfo=tz)
    return int(local.timestamp() * 1000)


def quiet_until(q: QuietHours, ts_ms: int, tz: ZoneInfo) -> int | None:
    """When the quiet hours around ``ts_ms`` end (user-local), or None outside them."""
    start, end = clock_minutes(q.start), clock_minutes(q.end)
    if start == end:
        return None
    local = _local(ts_ms, tz)
    now = local.hour * 60 + local.minute
    day = local.date()
    if start < end:  # e.g. 01:00-06:00, within one day
        return _at(day, end, tz) if start <= now < end else None
    if now >= start:  # e.g. 21:00-09:00: the evening part, released tomorrow
        return _at(day + dt.timedelta(days=1), end, tz)
    if now < end:  # the morning part
        return _at(day, end, tz)
    return None


def day_start(ts_ms: int, tz: ZoneInfo) -> int:
    """Local midnight of the day of ``ts_ms``."""
    return _at(_local(ts_ms, tz).date(), 0, tz)


def next_day_start(ts_ms: int, tz: ZoneInfo) -> int:
    return _at(_local(ts_ms, tz).date() + dt.timedelta(days=1), 0, tz)


def applies(cap: Cap, channel: str, tags: tuple) -> bool:
    return (cap.channel is None or cap.channel == channel) and (cap.tag is None or cap.tag in tags)


def cap_breach(cap: Cap, history: list[tuple], ts_ms: int, channel: str, message: str,
               tags: tuple, tz: ZoneInfo) -> int | None:
    """None when one more send keeps the cap; else when the window frees a place (for defer).

    ``history``: (ts, channel, message, tags) of the user's sends, oldest first.

    >>> cap = Cap(name="push_per_day", channel="push", max=2, window="calendar_day")
    >>> utc = ZoneInfo("UTC")
    >>> h = [(1_000, "push", "a", ()), (2_000, "push", "b", ())]
    >>> cap_breach(cap, h, 3_000, "push", "c", (), utc)  # tomorrow, local midnight
    86400000
    >>> cap_breach(cap, h, 3_000, "sms", "c", (), utc) is None
    True
    """
    if not applies(cap, channel, tags):
        return None
    if cap.window == "calendar_day":
        since, frees = day_start(ts_ms, tz), None
    else:
        w = duration_ms(cap.window)
        since, frees = ts_ms - w, w
    counted = [t for t, ch, msg, tg in history
               if t > since - (1 if frees is None else 0) and t <= ts_ms
               and applies(cap, ch, tg) and (cap.per == "all" or msg == message)]
    if len(counted) < cap.max:
        return None
    if frees is None:
        return next_day_start(ts_ms, tz)
    return counted[-cap.max] + frees  # when the oldest send that keeps it full leaves the window


def history_horizon(caps: list[Cap]) -> int:
    """How long a send must be remembered for the caps (a calendar day: up to 26 h with DST)."""
    longest = 0
    for cap in caps:
        longest = max(longest, 26 * 3_600_000 if cap.window == "calendar_day"
                      else duration_ms(cap.window))
    return longest
