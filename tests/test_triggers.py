"""The trigger engine's language, guards and operations: validation errors, each kind of rule,
caps, quiet hours, consent, fallback, re-entry, priority, shadow mode, hot reload, restarts, and
properties over random streams (hypothesis) checked against oracles written here."""
from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from surgeflow.cli import app
from triggers.book import RuleFile
from triggers.simulate import Simulation, replay
from triggers.spec import TriggerRuleError, load_trigger_rules, parse_trigger_rules

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = 1_795_428_000_000  # 2026-11-23 10:00:00 UTC
_n = iter(range(10**9))


def ev(user, name, at, props=None, *, marketing=True, tz="UTC") -> bytes:
    ctx = {"timezone": tz}
    if marketing is not None:
        ctx["consent"] = {"marketing": marketing}
    return orjson.dumps({"event_id": f"e{next(_n)}", "user_id": user, "event": name,
                         "timestamp": at, "properties": props or {}, "context": ctx})


def rules_file(tmp_path: Path, rules: list, name="rules.yaml", **guards) -> Path:
    doc = {"guards": {"consent": "opt_in", "quiet_hours": None, "caps": [], **guards},
           "rules": rules}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def absence(name="cart", timeout="30m", channel="push", **kw) -> dict:
    return {"name": name, "kind": "absence", "start": {"events": ["add_to_cart"]},
            "stop": {"events": ["checkout_started"]}, "timeout": timeout,
            "action": {"channel": channel, "message": kw.pop("message", name)}, **kw}


# -- the language ----------------------------------------------------------------------------------
def test_every_error_names_the_rule_and_the_field():
    bad = {"rules": [
        {"name": "ok", "kind": "count", "events": ["page_view"], "count": 2,
         "action": {"channel": "push", "message": "m"}},
        {"name": "no_timeout", "kind": "absence", "start": {"events": ["a"]},
         "stop": {"events": ["b"]}, "action": {"channel": "push", "message": "m"}},
        {"name": "bad_step", "kind": "schedule", "start": {"events": ["signup"]},
         "steps": [{"after_days": 1, "at_local": "25:00"}], "action": {"channel": "push",
                                                                       "message": "m"}},
        {"name": "bad_op", "kind": "condition", "start": {"events": ["x"]},
         "when": [{"feature": "p", "op": ">", "value": "high"}],
         "action": {"channel": "push", "message": "m"}},
        {"kind": "count", "events": ["x"], "count": 0, "action": {"channel": "push",
                                                                  "message": "m"}}]}
    with pytest.raises(TriggerRuleError) as err:
        parse_trigger_rules(bad)
    text = str(err.value)
    assert "rule 'no_timeout': timeout: Field required" in text
    assert "rule 'bad_step': steps.0: '25:00' is not a time of day" in text
    assert "rule 'bad_op': when.0: op '>' needs a number" in text
    assert "rule #5: name: Field required" in text and "rule #5: count:" in text
    assert "'ok'" not in text


def test_unknown_channels_and_duplicate_names_are_refused():
    with pytest.raises(TriggerRuleError, match="rule 'a': action: unknown channel 'fax'"):
        parse_trigger_rules({"rules": [absence("a", channel="fax")]})
    with pytest.raises(TriggerRuleError, match="rule names must be unique: a"):
        parse_trigger_rules({"rules": [absence("a"), absence("a")]})


def test_settings_refuse_a_bad_rule_file_at_start_up(tmp_path):
    from config.settings import ConfigError, load_settings
    path = tmp_path / "r.yaml"
    path.write_text("rules: [{name: x, kind: absence}]")
    with pytest.raises(ConfigError, match="rule 'x'"):
        load_settings(None, trigger__rules=str(path))


def test_triggers_list_and_test_commands(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["triggers", "list"])
    assert listed.exit_code == 0, listed.output
    for name in ("abandoned_cart", "winback_drip", "near_store", "push_per_day"):
        assert name in listed.output
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join([ev("u1", "add_to_cart", T0), ev("u2", "add_to_cart", T0),
                                   ev("u2", "checkout_started", T0 + MIN),
                                   ev("u3", "add_to_cart", T0, marketing=False), b"{broken"]))
    rules = rules_file(tmp_path, [absence()])
    done = runner.invoke(app, ["triggers", "test", "--rules", str(rules), "--events", str(events),
                               "--run-on", "1h", "--json"])
    assert done.exit_code == 0, done.output
    rows = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["user_id"], r["decision"], r["time_ms"]) for r in rows] == [
        ("u1", "sent", T0 + 30 * MIN), ("u3", "no_consent", T0 + 30 * MIN)]
    bad = runner.invoke(app, ["triggers", "test", "--rules", str(events), "--events", str(events)])
    assert bad.exit_code == 2


# -- kinds -------------------------------------------------------------------------------------------
def test_sequence_a_then_b_within_t_joined_on_a_field(tmp_path):
    rules = rules_file(tmp_path, [{
        "name": "search_then_view", "kind": "sequence", "within": "10m", "correlate": ["q"],
        "steps": [{"events": ["search"]}, {"events": ["product_viewed"]}],
        "action": {"channel": "in_app", "message": "m"}}])
    r = replay([ev("u1", "search", T0, {"q": "shoes"}),
                ev("u1", "product_viewed", T0 + MIN, {"q": "hats"}),  # another query: no
                ev("u1", "product_viewed", T0 + 2 * MIN, {"q": "shoes"}),  # fires
                ev("u2", "search", T0, {"q": "x"}),
                ev("u2", "product_viewed", T0 + 11 * MIN, {"q": "x"})],  # too late
               rules, run_on_ms=HOUR)
    assert [(a["user_id"], a["event_ts_ms"]) for a in r.actions] == [("u1", T0 + 2 * MIN)]


def test_count_within_a_rolling_window_and_its_default_cooldown(tmp_path):
    rules = rules_file(tmp_path, [{
        "name": "three_searches", "kind": "count", "events": ["search"], "count": 3,
        "within": "1h", "action": {"channel": "in_app", "message": "m"}}])
    times = [0, 10, 50, 55, 70, 130, 135, 140]  # minutes
    r = replay([ev("u", "search", T0 + t * MIN) for t in times], rules, run_on_ms=0)
    # fires at 50 (0, 10, 50); again not before 50 + 1 h, and the window (t - 1 h, t] holds three
    # only at 140 (130, 135, 140: 70 is exactly an hour before 130 and has left it)
    assert [(a["event_ts_ms"] - T0) // MIN for a in r.actions] == [50, 140]


def test_reentry_once_and_after_a_cooldown(tmp_path):
    rules = rules_file(tmp_path, [absence("once", reentry="once"),
                                  absence("daily", reentry="24h", message="d")],
                       max_actions_per_event=5)
    carts = [ev("u", "add_to_cart", T0 + h * HOUR) for h in (0, 2, 26)]
    r = replay(carts, rules, run_on_ms=DAY)
    got = sorted((a["rule"], (a["event_ts_ms"] - T0) // MIN) for a in r.actions)
    assert got == [("daily", 30), ("daily", 26 * 60 + 30), ("once", 30)]


# -- guards ------------------------------------------------------------------------------------------
def test_push_cap_per_calendar_day_in_the_users_time_zone(tmp_path):
    """3 pushes a day in Tokyo: the fourth at 23:00 local is capped, the fifth at 00:30 local
    (still the same UTC day) is a new day and goes."""
    rules = rules_file(tmp_path, [absence(timeout="1m", reentry="always")], caps=[
        {"name": "push_day", "channel": "push", "max": 3, "window": "calendar_day"}])
    tokyo = ZoneInfo("Asia/Tokyo")
    start = int(dt.datetime(2026, 11, 24, 19, 0, tzinfo=tokyo).timestamp() * 1000)
    minutes = [0, 60, 120, 240, 329]  # 19:00, 20:00, 21:00, 23:00, 00:29 (+1 min timeout)
    r = replay([ev("u", "add_to_cart", start + m * MIN, tz="Asia/Tokyo") for m in minutes],
               rules, run_on_ms=HOUR)
    decided = [(d["decision"], dt.datetime.fromtimestamp(d["time_ms"] / 1000, tokyo).strftime("%H:%M"))
               for d in r.audit]
    assert decided == [("sent", "19:01"), ("sent", "20:01"), ("sent", "21:01"), ("capped", "23:01"),
                       ("sent", "00:30")]


def test_over_cap_defer_and_fallback_policies(tmp_path):
    rules = rules_file(tmp_path, [absence(timeout="1m", reentry="always")], caps=[
        {"name": "one_push_per_hour", "channel": "push", "max": 1, "window": "1h",
         "over_cap": "fallback", "fallback_channel": "email"},
        {"name": "one_mail_per_hour", "channel": "email", "max": 1, "window": "1h",
         "over_cap": "defer"}])
    r = replay([ev("u", "add_to_cart", T0 + m * MIN) for m in (0, 10, 20)], rules, run_on_ms=DAY)
    # the third (at 21): push capped -> falls back to e-mail, capped too -> deferred until the
    # e-mail hour frees (71); released, every guard again from its own channel: push is free
    assert [(a["channel"], (a["event_ts_ms"] - T0) // MIN) for a in r.actions] == [
        ("push", 1), ("email", 11), ("push", 71)]
    third = [d["decision"] for d in r.audit if d["action_id"] == r.actions[-1]["action_id"]]
    assert third == ["deferred", "sent"]


def test_quiet_hours_defer_then_release_spread_under_the_rate_limit(tmp_path):
    rules = rules_file(tmp_path, [absence()], quiet_hours={"start": "21:00", "end": "09:00"},
                       release_rate_per_s={"push": 2})
    night = T0 + 12 * HOUR  # 22:00 UTC
    r = replay([ev(f"u{i}", "add_to_cart", night) for i in range(6)], rules, run_on_ms=DAY)
    morning = T0 + DAY - HOUR  # 09:00 UTC next day
    assert sorted(a["event_ts_ms"] - morning for a in r.actions) == [0, 500, 1000, 1500, 2000, 2500]
    assert {d["decision"] for d in r.audit} == {"deferred", "sent"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4000),
                          st.sampled_from(["page_view", "checkout_started"])), max_size=8))
def test_rate_limit_slots_do_not_depend_on_the_users_own_events(tmp_path_factory, morning):
    """Six releases at 09:00 share the push rate limit (2 per s). Whatever the users send after
    09:00, and in whatever order it arrives relative to the watermark, each release takes the
    slot the watermark's order gives it (due time, user): the same as with no events at all. A
    stop event after 09:00 does not cancel a release that only waits for its slot."""
    tmp = tmp_path_factory.mktemp("slots")
    rules = rules_file(tmp, [absence()], quiet_hours={"start": "21:00", "end": "09:00"},
                       release_rate_per_s={"push": 2})
    night = [ev(f"u{i}", "add_to_cart", T0 + 12 * HOUR) for i in range(6)]
    nine = T0 + DAY - HOUR
    later = [ev(f"u{u}", name, nine + ms) for u, ms, name in sorted(morning, key=lambda m: m[1])]

    def slots(records):
        return sorted((a["user_id"], a["event_ts_ms"] - nine)
                      for a in replay(records, rules, run_on_ms=DAY).actions)

    # the oracle: releases in user order, one every 500 ms from 09:00
    assert slots(night) == [(f"u{i}", 500 * i) for i in range(6)]
    assert slots(night + later) == slots(night)


def test_a_release_checks_every_guard_again(tmp_path):
    """Deferred by quiet hours; by 09:00 the user has withdrawn consent: nothing is sent."""
    rules = rules_file(tmp_path, [absence()], quiet_hours={"start": "21:00", "end": "09:00"})
    r = replay([ev("u", "add_to_cart", T0 + 12 * HOUR),
                ev("u", "page_view", T0 + 18 * HOUR, marketing=False)], rules, run_on_ms=DAY)
    assert r.actions == []
    assert [d["decision"] for d in r.audit] == ["deferred", "no_consent"]


def test_channel_fallback_push_not_opened_then_sms(tmp_path):
    rule = absence(timeout="1m")
    rule["action"]["fallback"] = {"channel": "sms", "after": "2h", "unless": ["push_opened"]}
    rules = rules_file(tmp_path, [rule])
    r = replay([ev("opens", "add_to_cart", T0), ev("ignores", "add_to_cart", T0),
                ev("opens", "push_opened", T0 + HOUR),
                ev("other_open", "add_to_cart", T0),
                # an open of another message (it says which) does not cancel this fallback
                ev("other_open", "push_opened", T0 + HOUR, {"action_id": "not-this-one"})],
               rules, run_on_ms=DAY)
    got = sorted((a["user_id"], a["channel"], (a["event_ts_ms"] - T0) // MIN, a["step"])
                 for a in r.actions)
    assert got == [("ignores", "push", 1, 0), ("ignores", "sms", 121, 1000),
                   ("opens", "push", 1, 0), ("other_open", "push", 1, 0),
                   ("other_open", "sms", 121, 1000)]
    assert [d["decision"] for d in r.audit if d["user_id"] == "opens"] == ["sent",
                                                                          "fallback_cancelled"]


def test_shadow_mode_records_would_fire_and_consumes_no_cap(tmp_path):
    shadow = absence("shadow_cart", timeout="1m", mode="shadow")
    live = absence("live_cart", timeout="2m", message="live")  # after the shadow one
    rules = rules_file(tmp_path, [shadow, live], max_actions_per_event=2,
                       caps=[{"name": "one", "channel": "push", "max": 1, "window": "1h"}])
    r = replay([ev("u", "add_to_cart", T0)], rules, run_on_ms=HOUR)
    assert [a["rule"] for a in r.actions] == ["live_cart"]
    modes = sorted((d["rule"], d["decision"], d["mode"]) for d in r.audit)
    assert modes == [("live_cart", "sent", "live"), ("shadow_cart", "shadow", "shadow")]


# -- operations ----------------------------------------------------------------------------------------
def test_hot_reload_a_match_in_progress_finishes_on_its_version(tmp_path):
    path = rules_file(tmp_path, [absence(timeout="30m")])
    live = RuleFile(path, reload_s=0.0)
    sim = Simulation(path)
    sim.store.triggers.use(live.get())
    sim.feed(ev("before", "add_to_cart", T0))
    time.sleep(0.01)
    rules_file(tmp_path, [absence(timeout="60m")])
    book = live.get()
    assert book.version == 2
    sim.store.triggers.use(book)
    sim.feed(ev("after", "add_to_cart", T0 + MIN))
    sim.run_to(T0 + 3 * HOUR)
    got = sorted((a["user_id"], (a["event_ts_ms"] - T0) // MIN) for a in sim.result.actions)
    assert got == [("after", 61), ("before", 30)]
    versions = {a["user_id"]: a["rule_version"] for a in sim.result.actions}
    assert versions["before"] != versions["after"]


def test_a_reload_that_does_not_validate_keeps_the_running_rules(tmp_path):
    path = rules_file(tmp_path, [absence()])
    live = RuleFile(path, reload_s=0.0)
    first = live.get()
    path.write_text("rules: [{name: broken}]")
    assert live.get() is first


def test_restart_from_a_snapshot_replays_to_the_same_keys_and_nothing_is_lost():
    """Snapshots at every point of a stream through the whole catalogue: the run that crashed
    after its snapshot and the resumed run together send exactly the clean run's keys."""
    rng = random.Random(5)
    names = ["add_to_cart", "checkout_started", "page_view", "push_opened", "order_completed",
             "login", "signup", "sms_clicked", "product_viewed"]
    events, t = [], T0
    for _ in range(160):
        t += rng.randrange(0, 40 * MIN)
        events.append(ev(f"u{rng.randrange(6)}", rng.choice(names), t,
                         {"product_id": f"p{rng.randrange(3)}", "dwell_ms": 4000, "revenue": 5},
                         marketing=rng.random() > 0.1, tz=rng.choice(["UTC", "Asia/Tokyo"])))
    clean = replay(events, run_on_ms=50 * DAY)
    keys = {a["action_id"] for a in clean.actions}
    assert len(keys) > 30
    for cut in range(0, len(events), 16):
        sim = Simulation()
        for raw in events[:cut]:
            sim.feed(raw)
        snap = sim.snapshot()
        sent_before_snapshot = {a["action_id"] for a in sim.result.actions}
        resumed = Simulation.resume(snap)
        for raw in events[cut:]:
            resumed.feed(raw)
        resumed.run_to(resumed.now + 50 * DAY)
        after = {a["action_id"] for a in resumed.result.actions}
        assert sent_before_snapshot | after == keys, cut
        assert not sent_before_snapshot & after, cut


# -- properties (hypothesis) --------------------------------------------------------------------------
ZONES = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin"]
GUARDED = None


def _guarded_rules(tmp_path_factory) -> Path:
    """The shipped catalogue with a defer policy on the daily push cap, so that releases from
    both quiet hours and caps are exercised."""
    global GUARDED
    if GUARDED is None:
        doc = yaml.safe_load(open("config/trigger_rules.yaml"))
        doc["guards"]["caps"][0]["over_cap"] = "defer"
        GUARDED = tmp_path_factory.mktemp("rules") / "guarded.yaml"
        GUARDED.write_text(yaml.safe_dump(doc))
    return GUARDED


stream = st.lists(st.tuples(
    st.integers(0, 3),  # user
    st.sampled_from(["add_to_cart", "checkout_started", "page_view", "push_opened", "login",
                     "order_completed", "sms_clicked", "product_viewed", "signup"]),
    st.integers(0, 6 * HOUR),  # gap to the previous event
    st.sampled_from([True, True, True, False, None]),  # marketing consent
    st.sampled_from(ZONES)), min_size=1, max_size=60)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream)
def test_caps_quiet_hours_and_consent_hold_for_any_stream(tmp_path_factory, items):
    rules = _guarded_rules(tmp_path_factory)
    t, raws, timeline, index = T0, [], {}, {}
    for i, (user, name, gap, consent, tz) in enumerate(items):
        t += gap
        u = f"u{user}"
        raw = ev(u, name, t, {"product_id": "p", "dwell_ms": 5000, "revenue": 3},
                 marketing=consent, tz=tz)
        raws.append(raw)
        index[orjson.loads(raw)["event_id"]] = i
        timeline.setdefault(u, []).append((t, consent, tz, i))
    r = replay(raws, rules, run_on_ms=60 * DAY)
    for a in r.actions:
        at, user, ch = a["event_ts_ms"], a["user_id"], a["channel"]
        # The user's consent and zone as of the send: their events before it. A timer due at t
        # fires before the user's events at t; an event's own action sees that event.
        if a["trigger"].startswith("t"):
            seen = [(ts, c, z) for ts, c, z, _ in timeline[user] if ts < at]
        else:
            upto = index[a["trigger"]]
            seen = [(ts, c, z) for ts, c, z, i in timeline[user] if i <= upto]
        consent = [c for _, c, _ in seen if c is not None]
        assert consent and consent[-1] is True, a
        zone = ZoneInfo(seen[-1][2])
        local = dt.datetime.fromtimestamp(at / 1000, zone)
        if ch in ("push", "sms", "email"):
            assert 9 <= local.hour < 21, a  # never in quiet hours
    by_user: dict[str, list] = {}
    for a in r.actions:
        by_user.setdefault(a["user_id"], []).append(a)
    for user, acts in by_user.items():
        zone_at = lambda ts: ZoneInfo([z for s, _, z, _ in timeline[user] if s <= ts][-1])
        days: dict = {}
        for a in acts:
            if a["channel"] == "push":
                day = dt.datetime.fromtimestamp(a["event_ts_ms"] / 1000,
                                                zone_at(a["event_ts_ms"])).date()
                days[day] = days.get(day, 0) + 1
        assert max(days.values(), default=0) <= 3, user  # push <= 3 a day
        msgs = sorted((a["message"], a["event_ts_ms"]) for a in acts)
        for (m1, t1), (m2, t2) in zip(msgs, msgs[1:]):
            assert m1 != m2 or t2 - t1 >= DAY, (user, m1)  # the same message not within 24 h


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream, st.floats(0, 1), st.floats(0, 1))
def test_kill_and_restart_sends_the_clean_runs_keys_for_any_stream(tmp_path_factory, items, at,
                                                                   crash):
    """A snapshot at any point, a crash any time after it, a restart from the snapshot: the
    keys sent before the crash and after the restart are the clean run's (0 missing, 0 extra),
    and what the crashed run sent after its snapshot is sent again with the same keys."""
    rules = _guarded_rules(tmp_path_factory)
    t, raws = T0, []
    for user, name, gap, consent, tz in items:
        t += gap
        raws.append(ev(f"u{user}", name, t, {"product_id": "p", "dwell_ms": 5000, "revenue": 3},
                       marketing=consent, tz=tz))
    end = t + 60 * DAY
    clean = replay(raws, rules, until_ms=end)
    cut = int(at * len(raws))
    dies = cut + int(crash * (len(raws) - cut))
    sim = Simulation(rules)
    for raw in raws[:cut]:
        sim.feed(raw)
    snap = sim.snapshot()
    before = {a["action_id"] for a in sim.result.actions}
    for raw in raws[cut:dies]:
        sim.feed(raw)
    crashed = {a["action_id"] for a in sim.result.actions}
    resumed = Simulation.resume(snap, rules)
    for raw in raws[cut:]:
        resumed.feed(raw)
    resumed.run_to(end)
    after = {a["action_id"] for a in resumed.result.actions}
    keys = {a["action_id"] for a in clean.actions}
    assert crashed | after == keys
    assert crashed - before <= after  # sent again after the restart, same keys


def test_trigger_state_stays_bounded_whatever_one_user_sends(tmp_path):
    """A hostile user: 3,000 distinct searches in ten minutes (sequences), 500 carts at night
    (deferred sends): the open matches and pending sends of the user stay capped."""
    from triggers.engine import MAX_PENDING_SENDS
    from triggers.rules import MAX_MATCHES_PER_RULE
    rules = rules_file(tmp_path, [
        {"name": "seq", "kind": "sequence", "within": "1h", "correlate": ["q"],
         "steps": [{"events": ["search"]}, {"events": ["product_viewed"]}],
         "action": {"channel": "in_app", "message": "m"}},
        absence(timeout="1m", reentry="always", correlate=["cart_id"], max_open=1000)],
        quiet_hours={"start": "21:00", "end": "09:00"})
    sim = Simulation(rules)
    night = T0 + 12 * HOUR
    for i in range(3000):
        sim.feed(ev("h", "search", night + i * 200, {"q": f"q{i}"}))
    for i in range(500):
        sim.feed(ev("h", "add_to_cart", night + 600_000 + i, {"cart_id": f"c{i}"}))
    sim.run_to(night + HOUR)
    st = sim.store.triggers.users["h"]
    assert sum(1 for k in st.matches if k[0].startswith("seq@")) <= MAX_MATCHES_PER_RULE
    assert len(st.sends) <= MAX_PENDING_SENDS
    assert sum(d["reason"].startswith(f"{MAX_PENDING_SENDS} sends") for d in sim.result.audit) \
        == 500 - MAX_PENDING_SENDS
