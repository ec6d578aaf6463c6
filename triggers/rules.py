"""Trigger rules: marketing automation that reacts to one user's behaviour.

``SessionPageViews`` fires once per session, at the n-th page view, with an idempotency key
derived from the rule, the user and the session, so a replay emits the same action id.

>>> rule = SessionPageViews(pages=3, channel="push")
>>> [rule.check("u1", "s1", pages) is not None for pages in (1, 2, 3, 4)]
[False, False, True, False]
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

VIEW_EVENTS = frozenset({"page_view", "product_viewed", "screen"})


@dataclass(frozen=True, slots=True)
class Action:
    action_id: str
    rule: str
    user: str
    channel: str
    campaign: str
    session_id: str
    ts_ms: int  # event time of the event that fired it

    def to_dict(self) -> dict:
        return {
            "action_id": self.action_id, "rule": self.rule, "user_id": self.user,
            "channel": self.channel, "campaign": self.campaign, "session_id": self.session_id,
            "event_ts_ms": self.ts_ms,
        }


def idempotency_key(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


class SessionPageViews:
    name = "session_page_views"

    def __init__(self, pages: int = 3, channel: str = "push"):
        self.pages = pages
        self.channel = channel

    def check(self, user: str, session_id: str, pages_in_session: int) -> str | None:
        """The action id when this page view is the n-th of the session, else None."""
        if pages_in_session != self.pages:
            return None
        return idempotency_key(self.name, user, session_id)

    def action(self, user: str, session_id: str, pages: int, campaign: str, ts_ms: int) -> Action | None:
        action_id = self.check(user, session_id, pages)
        if action_id is None:
            return None
        return Action(action_id, self.name, user, self.channel, campaign or "default", session_id, ts_ms)
