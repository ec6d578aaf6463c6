"""What the synthetic marketing stream lets a model reach, read off the generated events
(JSON lines), with no code of the product: the test oracle of the models' end-to-end AUC.

The generator (connectors/synthetic.py) gives users one trait that matters: how active they are
(a known user is drawn as ``index = N * u ** 1.5``, low indices more often). Orders come from
sessions, so a more active user orders more often within a day; a user who is silent for days
is a rarely drawn one. A click or open depends only on the campaign's rate, so the most a model
that sees the channel but not the campaign can know is the channel's rate. The oracles:

- purchase propensity: the first view of a session (30 minutes), an order by the user within
  24 h; scored by the true activity (-index);
- CTR / open: each send or impression to a user, a click or open within 30 minutes; scored by
  the channel's rate in the first half of the stream (and, for reference, the campaign's);
- churn: the first event of a user's day, silent for the horizon after; scored by +index.

Each AUC is exact (Mann-Whitney, ties one half) over the second half of the stream, where the
product's rolling AUC is read too.

>>> auc([(0.1, False), (0.4, True), (0.35, False), (0.8, True)])
(1.0, 2, 2)
>>> auc([(1, True), (1, False)])[0]
0.5
"""
from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from datetime import datetime
from pathlib import Path

DAY, MIN = 86_400_000, 60_000
SENDS = {"ad_impression", "push_sent", "sms_sent", "email_sent"}
RESPONSES = {"ad_click", "push_opened", "sms_clicked", "email_opened"}


def auc(pairs) -> tuple[float, int, int]:
    """(exact ROC AUC, positives, negatives) of (score, label) pairs."""
    pairs = sorted(pairs, key=lambda p: p[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return math.nan, n_pos, n_neg
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank_sum += (i + 1 + j) / 2 * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), n_pos, n_neg


def null_sd(n_pos: int, n_neg: int) -> float:
    """The standard deviation of the AUC of random scores (Hanley & McNeil, AUC = 0.5)."""
    return math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))


def _ms(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            return None
    return None


def read_events(path: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(time, event name, user id, campaign id) of the well-formed records, once each."""
    out, seen = [], set()
    with path.open("rb") as f:
        for line in f:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if not isinstance(d, dict) or d.get("event_id") in seen:
                continue
            ts = _ms(d.get("timestamp"))
            if ts is None:
                continue
            seen.add(d.get("event_id"))
            kind = d.get("type")
            name = d.get("event") if kind == "track" else "page_view" if kind == "page" else kind
            props = d.get("properties") if isinstance(d.get("properties"), dict) else {}
            user = d.get("user_id") if isinstance(d.get("user_id"), str) else None
            out.append((ts, name, user, props.get("campaign_id")))
    out.sort(key=lambda e: e[0])
    return out


def _index(user: str) -> int:
    return int(user[1:]) if user[:1] == "u" and user[1:].isdigit() else 10**6


def oracles(path: Path, churn_horizon_ms: int = 2 * DAY) -> dict[str, tuple[float, int, int]]:
    events = read_events(path)
    first, last = events[0][0], events[-1][0]
    half = (first + last) // 2
    by_user: dict[str, list] = defaultdict(list)
    for e in events:
        if e[2]:
            by_user[e[2]].append(e)
    out = {}

    points = []
    for user, es in by_user.items():
        orders = [e[0] for e in es if e[1] == "order_completed"]
        previous, fresh = None, True
        for ts, name, _, _ in es:
            if previous is None or ts - previous > 30 * MIN:
                fresh = True
            previous = ts
            if fresh and name in ("page_view", "product_viewed", "screen"):
                fresh = False
                if half <= ts and ts + DAY <= last:
                    i = bisect.bisect_right(orders, ts)
                    points.append((-_index(user), i < len(orders) and orders[i] <= ts + DAY))
    out["purchase_propensity"] = auc(points)

    rows = []
    for user, es in by_user.items():
        responses = [e[0] for e in es if e[1] in RESPONSES]
        for ts, name, _, campaign in es:
            if name in SENDS and ts + 30 * MIN <= last:
                i = bisect.bisect_right(responses, ts)
                rows.append((ts, name, campaign, i < len(responses) and responses[i] <= ts + 30 * MIN))
    channel, campaign = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    for ts, name, camp, y in rows:
        if ts < half:
            for table, key in ((channel, name), (campaign, camp)):
                table[key][0] += y
                table[key][1] += 1
    later = [r for r in rows if r[0] >= half]
    out["ctr"] = auc([(channel[n][0] / max(1, channel[n][1]), y) for _, n, _, y in later])
    out["ctr_by_campaign"] = auc([(campaign[c][0] / max(1, campaign[c][1]), y) for _, _, c, y in later])

    points = []
    for user, es in by_user.items():
        times = [e[0] for e in es]
        day = None
        for k, ts in enumerate(times):
            if ts // DAY != day:
                day = ts // DAY
                if half <= ts and ts + churn_horizon_ms <= last:
                    nxt = times[k + 1] if k + 1 < len(times) else None
                    points.append((_index(user), nxt is None or nxt > ts + churn_horizon_ms))
    out["churn_risk"] = auc(points)
    return out
