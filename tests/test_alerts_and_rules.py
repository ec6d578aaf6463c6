"""Alert rules without the engine: the catalogue, the lifecycle, minute series and rules, entity
rules, and the complete-minute merge they read."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from alerts.entities import BY_IP, EntityRules, Signal, public_entity
from alerts.lifecycle import Lifecycle, Verdict
from alerts.metrics import MinuteSeries, delay_bucket
from alerts.minute_rules import MinuteRules
from alerts.rules import RULES_FILE, RuleCatalogue, load_rules
from flows.minutes import CompleteMinute, MinuteCloser, MinutePart

MIN = 60_000


def verdict(breach: bool, value: float = 10.0) -> Verdict:
    return Verdict(value if breach else 1.0, 1.0, 0.5, 3.0, 18.0 if breach else 0.0, breach)


# -- the catalogue ------------------------------------------------------------------------------

def test_default_catalogue_covers_spec_section_7():
    c = load_rules()
    by_name = {r.name: r for r in c.rules}
    expected = {  # rule -> (area, metric, severity) as shipped
        "cvr_fluctuation": ("market", "checkout_cvr", "II"),
        "dau_down": ("market", "dau_pace", "III"),
        "product_page_cvr_low": ("market", "product_cvr", "II"),
        "conversion_drop": ("market", "checkout_cvr", "II"),
        "cpc_high": ("ads", "cpc", "I"),
        "campaign_cvr_low": ("ads", "click_cvr", "II"),
        "channel_traffic_anomaly": ("ops", "events", "II"),
        "ingest_latency": ("ops", "ingest_delay_p50", "II"),
        "data_delay": ("ops", "ingest_delay_p50", "III"),
        "ip_request_flood": ("security", "requests_per_ip", "III"),
        "ip_cluster_click_fraud": ("security", "clicks_per_ip_cluster", "III"),
        "user_failed_logins": ("security", "failed_logins_per_user", "III"),
        "ip_failed_logins": ("security", "failed_logins_per_ip", "III"),
        "user_login_countries": ("security", "login_countries_per_user", "III"),
        "user_orders_per_day": ("fraud", "orders_per_user", "II"),
    }
    for name, (area, metric, severity) in expected.items():
        r = by_name[name]
        assert (r.area, r.metric, r.severity) == (area, metric, severity), name
        assert r.response
    assert by_name["cvr_fluctuation"].for_ == "24h"
    assert by_name["cpc_high"].detector.params["min_change"] == 0.2
    assert by_name["product_page_cvr_low"].detector.params["min_change"] == 0.15
    assert by_name["ip_cluster_click_fraud"].threshold.above == 50


@pytest.mark.parametrize("change, message", [
    ({"metric": "nope"}, "unknown metric 'nope'"),
    ({"by": "page"}, "cannot be split by 'page'"),
    ({"window": "90x"}, "is not a duration"),
    ({"threshold": {"above": 1}}, "exactly one of detector / threshold"),
    ({"detector": {"kind": "ew_gaussian", "params": {"k": -1}}}, "k must be > 0"),
    ({"detector": {"kind": "ew_gaussian", "params": {"kk": 3}}}, "unexpected keyword argument 'kk'"),
    ({"severity": "V"}, "severity"),
])
def test_bad_rules_are_refused_with_a_clear_message(tmp_path, change, message):
    doc = yaml.safe_load(RULES_FILE.read_text())
    next(r for r in doc["rules"] if r["name"] == "channel_traffic_anomaly").update(change)
    bad = tmp_path / "rules.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as err:
        load_rules(bad)
    assert message in str(err.value) and str(bad) in str(err.value)


def test_rules_command_lists_the_catalogue_in_force(tmp_path):
    from typer.testing import CliRunner

    from surgeflow.cli import app

    doc = yaml.safe_load(RULES_FILE.read_text())
    doc["rules"] = [r for r in doc["rules"] if r["area"] == "security"]
    path = tmp_path / "security.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["rules"], env={"SURGEFLOW__ALERTS__RULES": str(path),
                                                    "COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "ip_request_flood" in result.output and "requests_per_ip by ip / 1s" in result.output
    assert "traffic_anomaly" not in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: x}]")
    result = CliRunner().invoke(app, ["rules"], env={"SURGEFLOW__ALERTS__RULES": str(bad)})
    assert result.exit_code != 0 and "invalid" in result.output


def test_duplicate_rule_names_are_refused():
    rule = {"name": "a", "area": "ops", "metric": "events", "severity": "I", "response": "r",
            "threshold": {"above": 1}}
    with pytest.raises(ValueError, match="unique: a"):
        RuleCatalogue.model_validate({"rules": [rule, rule]})


def test_a_rule_is_retuned_by_configuration_alone(tmp_path):
    """The same minutes, the shipped traffic rule and a copy of the catalogue with k raised:
    the spike fires with the first and not with the second."""
    minutes = [CompleteMinute(m, [("web", "", "", "page_view", 1000 + (m * 37) % 41 + (900 if m == 70 else 0),
                                   0.0, 0.0, 0, [])]) for m in range(80)]

    def fired(path):
        rules = MinuteRules(load_rules(path))
        return [a.rule for m in minutes for a in rules.judge(m) if a.status == "firing"]

    doc = yaml.safe_load(RULES_FILE.read_text())
    for r in doc["rules"]:
        if r["name"] in ("traffic_anomaly", "channel_traffic_anomaly"):
            r["for"] = "0s"
    relaxed = tmp_path / "relaxed.yaml"
    relaxed.write_text(yaml.safe_dump(doc))
    for r in doc["rules"]:
        if r["name"] in ("traffic_anomaly", "channel_traffic_anomaly"):
            r["detector"]["params"]["k"] = 500
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(doc))
    assert sorted(fired(relaxed)) == ["channel_traffic_anomaly", "traffic_anomaly"]
    assert fired(strict) == []


def test_an_alert_names_the_baseline_it_crossed():
    """SPEC section 7 and issue 17: a traffic spike says it crossed the level band (mu, sigma,
    z beyond k); a lasting shift that no single minute shows is the CUSUM's, and says so, with
    z its sum beyond k; a static rule says its threshold."""
    def alerts(values):
        rules = MinuteRules(load_rules(relaxed))
        return [a for m, x in enumerate(values)
                for a in rules.judge(CompleteMinute(m, [("web", "", "", "page_view", x, 0.0, 0.0, 0, [])]))
                if a.status == "firing" and a.rule == "traffic_anomaly"]

    import tempfile
    doc = yaml.safe_load(RULES_FILE.read_text())
    for r in doc["rules"]:
        if r["name"] == "traffic_anomaly":
            r["for"] = "0s"
            assert r["detector"]["kind"] == "adaptive_ensemble"  # the shipped default
    relaxed = Path(tempfile.mkdtemp()) / "relaxed.yaml"
    relaxed.write_text(yaml.safe_dump(doc))
    rng = random.Random(5)
    base = [1000 + rng.gauss(0, 30) for _ in range(400)]

    spike = alerts(base[:300] + [2000] + base[301:])
    assert len(spike) == 1 and spike[0].baseline == "level"
    assert spike[0].z > spike[0].k and abs(spike[0].mu - 1000) < 30

    # +1.5 sigmas for good: no minute is beyond k = 6, the sum is (min_change 0.3 relaxed)
    doc2 = yaml.safe_load(relaxed.read_text())
    for r in doc2["rules"]:
        if r["name"] == "traffic_anomaly":
            r["detector"]["params"]["min_change"] = 0.0
    relaxed.write_text(yaml.safe_dump(doc2))
    shift = alerts(base[:300] + [x + 45 for x in base[300:]])
    assert shift and shift[0].baseline == "shift from level", [a.baseline for a in shift]
    assert shift[0].z > shift[0].k and shift[0].direction == "up"
    assert abs(shift[0].mu - 1000) < 30  # judged against the level before the shift

    threshold = next(r for r in load_rules().rules if r.name == "user_orders_per_day").threshold
    assert threshold.verdict(120.0, None).baseline == "static threshold"


# -- the lifecycle ------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=120), st.integers(0, 5), st.integers(0, 4),
       st.integers(0, 10), st.integers(0, 6))
def test_lifecycle_invariants(breaches, for_min, resolve_min, cooldown_min, update_min):
    """Per series: firing, then updates, then resolved, in that order and one alert at a time;
    a firing only after `for` of uninterrupted breach; never during a cool-down; the same
    alert_id and an increasing seq for every message of an alert."""
    life = Lifecycle("r", severity="II", response="x", for_ms=for_min * MIN,
                     resolve_ms=resolve_min * MIN, cooldown_ms=cooldown_min * MIN,
                     update_ms=update_min * MIN)
    open_alert, run_start, last_resolve = None, None, None
    for m, breach in enumerate(breaches):
        start, end = m * MIN, (m + 1) * MIN
        run_start = (run_start if run_start is not None else start) if breach else None
        out = life.step("s", end, start, verdict(breach))
        assert len(out) <= 1
        for a in out:
            if a.status == "firing":
                assert open_alert is None and breach
                assert end - a.first_seen_ms >= for_min * MIN
                assert a.first_seen_ms >= run_start  # the breach run was not interrupted
                if last_resolve is not None:
                    assert end >= last_resolve + cooldown_min * MIN
                assert a.seq == 0 and a.alert_id == f"r|s|{a.first_seen_ms}"
                open_alert = a
            else:
                assert open_alert is not None and a.alert_id == open_alert.alert_id
                assert a.seq == open_alert.seq + 1
                if a.status == "update":
                    assert breach and update_min > 0
                    open_alert = a
                else:
                    assert a.status == "resolved" and not breach
                    open_alert, last_resolve = None, end
        if breach and open_alert is None and run_start is not None:
            quiet = last_resolve is not None and end < last_resolve + cooldown_min * MIN
            assert end - run_start < for_min * MIN or quiet  # nothing held back without a reason


def test_sustained_breach_and_direction_change():
    life = Lifecycle("r", severity="I", response="x", for_ms=3 * MIN)
    up, down = verdict(True, 10.0), verdict(True, -10.0)
    steps = [up, up, down, down, down]  # the run restarts when the direction flips
    out = [life.step("s", (m + 1) * MIN, m * MIN, v) for m, v in enumerate(steps)]
    assert [len(o) for o in out] == [0, 0, 0, 0, 1] and out[4][0].first_seen_ms == 2 * MIN
    assert out[4][0].direction == "down"


def test_alert_dict_has_every_field_and_no_nan():
    life = Lifecycle("r", severity="III", response="block", area="security", window="1s")
    a = life.step("ip=1.2.3.4", 5, 5, Verdict(101.0, 100.0, math.nan, math.nan, math.nan, True,
                                              0.5, None, "1.2.3.4"))[0].to_dict()
    assert {"rule", "series", "value", "mu", "sigma", "k", "z", "window", "severity",
            "first_seen_ms", "response", "status", "seq", "alert_id", "detail"} <= set(a)
    assert a["sigma"] is None and a["z"] is None and a["mu"] == 100.0 and a["detail"] == "1.2.3.4"


def test_an_alert_pickled_before_the_baseline_field_restores():
    """A flow snapshot of the version before alerts named their baseline (tests/data: a
    Lifecycle pickled at commit ffc30e4 with an alert firing on series "s") restores; its
    messages take an empty baseline, new verdicts bring theirs."""
    import pickle

    life = pickle.loads((Path(__file__).parent / "data" / "lifecycle_ffc30e4.pickle").read_bytes())
    restored = life.open["s"].alert
    assert restored.baseline == "" and restored.z == 9.0 and restored.to_dict()["baseline"] == ""
    out = life.step("s", 2 * MIN, MIN, Verdict(1.0, 1.0, 1.0, 3.0, 0.0, False, baseline="level"))
    assert [(a.alert_id, a.status, a.seq, a.baseline) for a in out] == [("r|s|0", "resolved", 1, "level")]


# -- minute series and rules -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["c1", "c2", ""]),
                                   st.sampled_from(["ad_impression", "ad_click", "checkout_started",
                                                    "order_completed", "sms_clicked"]),
                                   st.integers(1, 50)), max_size=6), min_size=1, max_size=40),
       st.integers(1, 15))
def test_sliding_ratio_windows_equal_brute_force(minutes, window):
    s = MinuteSeries({window})
    for m, rows in enumerate(minutes):
        s.add(CompleteMinute(m, [("ad", c, "", name, n, 0.0, 0.1 * n if name == "ad_click" else 0.0,
                                  n if name == "order_completed" else 0, []) for c, name, n in rows]))
        recent = [r for rr in minutes[max(0, m - window + 1): m + 1] for r in rr]
        for campaign in ("c1", "c2"):
            clicks = sum(n for c, name, n in recent if c == campaign and name == "ad_click")
            imps = sum(n for c, name, n in recent if c == campaign and name == "ad_impression")
            got = s.series("ctr", "campaign", window).get(f"campaign={campaign}")
            if imps:
                assert got == (pytest.approx(clicks / imps), imps)
            orders = sum(n for c, name, n in recent if c == campaign and name == "order_completed")
            any_click = sum(n for c, name, n in recent if c == campaign and name in ("ad_click", "sms_clicked"))
            cvr = s.series("click_cvr", "campaign", window).get(f"campaign={campaign}")
            if any_click:
                assert cvr == (pytest.approx(orders / any_click), any_click)
            if not (clicks or imps or orders or any_click):
                assert got is None and cvr is None


def campaign_minute(m: int, clicks: int, orders: int, campaign: str = "c1") -> CompleteMinute:
    return CompleteMinute(m, [("ad", campaign, "", "ad_click", clicks, 0.0, 0.5 * clicks, 0, []),
                              ("web", campaign, "", "checkout_started", clicks, 0.0, 0.0, 0, []),
                              ("web", campaign, "", "order_completed", orders, 10.0 * orders, 0.0,
                               orders, [])])


def test_a_tiny_campaign_does_not_alert_but_a_real_conversion_drop_does():
    rules = MinuteRules(load_rules())
    rng = random.Random(3)
    fired = []
    for m in range(400):
        big_rate = 0.7 if m < 300 else 0.3  # checkout conversion halves at minute 300
        big = sum(rng.random() < big_rate for _ in range(40))
        small = 1 if m % 97 == 0 else 0  # 3 checkouts in the last hours, none converting
        minute = campaign_minute(m, 40, big)
        minute.rows.extend(campaign_minute(m, small, 0, "tiny").rows)
        fired += [(a.rule, a.series, m) for a in rules.judge(minute) if a.status == "firing"]
    assert fired and all(m >= 300 for _, _, m in fired)
    assert ("conversion_drop", "all") in {(r, s) for r, s, _ in fired}
    assert not any("tiny" in s for _, s, _ in fired)
    first = min(m for r, _, m in fired if r == "conversion_drop")
    assert first <= 300 + 30  # the hourly window and "for 10m" bound the delay


def test_ingest_delay_rules_fire_on_a_stuck_collector():
    rules = MinuteRules(load_rules())
    out = []
    for m in range(30):
        delay = 45 * MIN if 10 <= m < 20 else 300
        cm = CompleteMinute(m, [("web", "", "", "page_view", 100, 0.0, 0.0, 0, [])],
                            delays={delay_bucket(delay): 100})
        out += [(a.rule, a.status, m) for a in rules.judge(cm)]
    firing = {(r, m) for r, s, m in out if s == "firing"}
    assert ("data_delay", 10) in firing and ("ingest_latency", 14) in firing
    assert {r for r, s, m in out if s == "resolved"} == {"data_delay", "ingest_latency"}


def test_dau_pace_compares_with_the_same_time_yesterday():
    rules = MinuteRules(load_rules(), "Asia/Shanghai")
    fired = []
    for m in range(0, 2 * 1440, 5):
        day = (m + 480) // 1440  # local day in Shanghai (UTC+8)
        per_minute = 60 if day < 1 else 20  # the second local day has a third of the users
        users = [f"d{day}-m{m}-u{i}" for i in range(per_minute)]
        cm = CompleteMinute(m, [("app", "", "", "screen", per_minute, 0.0, 0.0, 0, users)])
        fired += [(a.rule, m) for a in rules.judge(cm) if a.status == "firing"]
    dau = [m for r, m in fired if r == "dau_down"]
    assert dau and all((m + 480) // 1440 == 1 for m in dau)  # only on the day with the drop


# -- entity rules ------------------------------------------------------------------------------

def burst(start: int, n: int, every_ms: int, name: str, ip: str = "203.0.113.66", user: str = "",
          countries=("VN",)) -> list[Signal]:
    return [Signal(start + i * every_ms, name, user or f"anon-{i}", ip, countries[i % len(countries)])
            for i in range(n)]


def test_click_fraud_fires_at_the_51st_click_with_the_ip_and_resolves():
    rules = EntityRules(load_rules().entity_rules)
    alerts = []
    for s in burst(0, 300, 200, "ad_click"):  # 300 clicks a minute from one IP
        alerts += rules.observe(s)
    fired = [a for a in alerts if a.rule == "ip_cluster_click_fraud"]
    assert len(fired) == 1 and fired[0].first_seen_ms == 50 * 200
    assert fired[0].detail == public_entity("ip", "203.0.113.66")  # the IP, masked
    assert fired[0].series == "ip_cluster=203.0.113.0/24" and fired[0].severity == "III"
    assert rules.tick(30 * MIN) == []  # the hour has not passed
    resolved = rules.tick(61 * MIN + 60_000)
    assert [(a.rule, a.status) for a in resolved] == [("ip_cluster_click_fraud", "resolved")]


def test_failed_logins_countries_and_orders_per_user():
    rules = EntityRules(load_rules().entity_rules)
    alerts = []
    alerts += [a for s in burst(0, 60, 1000, "login_failed", ip="", user="victim") for a in rules.observe(s)]
    alerts += [a for s in burst(0, 5, 1000, "login", ip="", user="traveller",
                                countries=("CN", "US", "DE", "BR", "JP")) for a in rules.observe(s)]
    alerts += [a for s in burst(0, 100, 60_000, "order_completed", ip="", user="hoarder")
               for a in rules.observe(s)]
    fired = {(a.rule, a.series, a.first_seen_ms) for a in alerts if a.status == "firing"}
    user = lambda u: f"user={public_entity('user', u)}"  # noqa: E731 - ids leave as subject hashes
    assert fired == {("user_failed_logins", user("victim"), 50_000),
                     ("user_login_countries", user("traveller"), 3_000),
                     ("user_orders_per_day", user("hoarder"), 99 * 60_000)}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5_000), min_size=1, max_size=400))
def test_per_second_counts_equal_brute_force(offsets):
    """Events from one IP, in any order: the flood fires exactly when some second holds more
    than 100 of them, at the event that makes it 101 (as arrived)."""
    rules = EntityRules([load_rules().rule("ip_request_flood")])
    seen: dict[int, int] = {}
    expected_first = None
    fired = []
    for off in sorted(offsets) if len(offsets) % 2 else offsets:
        ts = 10_000 + off * 7 // 10
        seen[ts // 1000] = seen.get(ts // 1000, 0) + 1
        if expected_first is None and seen[ts // 1000] > 100:
            expected_first = ts
        fired += rules.observe(Signal(ts, "page", "a", "198.51.100.9", "NL", BY_IP))
    firing = [a for a in fired if a.status == "firing"]
    if expected_first is None:
        assert firing == []
    else:
        assert firing[0].first_seen_ms == expected_first


def test_a_signal_for_the_users_shard_only_is_not_counted_by_ip():
    rules = EntityRules(load_rules().entity_rules)
    for i in range(200):
        rules.observe(Signal(i, "page", "u", "198.51.100.9", "NL", scope=2))  # user scope only
    assert not any(r.entities for r in rules.rules if r.metric.entity != "user")


# -- complete minutes ---------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3),
                          st.dictionaries(st.integers(0, 3), st.integers(1, 9), max_size=3)),
                max_size=30))
def test_minutes_are_complete_only_when_all_shards_closed_them(steps):
    """Shards close minutes at their own pace (each minute once, as in the flow); every minute up
    to the slowest shard's is released exactly once, in order, with every shard's events and
    ingest delays."""
    closer = MinuteCloser(3)
    closed = {0: 99, 1: 99, 2: 99}  # minutes start at 100
    sent: dict[int, int] = {}
    released = []
    for shard, advance, counts in steps:
        through = closed[shard] + advance
        parts, delays = {}, {}
        for offset, n in counts.items():
            minute = closed[shard] + 1 + offset
            if minute <= through:
                parts[minute] = {("web", "c", "", "page_view"): [n, 0.0, 0.0, 0, {f"u{shard}"}]}
                delays[minute] = {delay_bucket(100): n}
                sent[minute] = sent.get(minute, 0) + n
        closed[shard] = through
        released += closer.add(MinutePart(shard, through, parts, delays=delays))
    minutes = [m.minute for m in released]
    assert minutes == sorted(set(minutes))
    if released:
        assert minutes == list(range(minutes[0], min(closed.values()) + 1))
        assert minutes[0] == min(sent)
    for m in released:
        assert sum(row[4] for row in m.rows) == sent.get(m.minute, 0)
        assert sum(m.delays.values()) == sent.get(m.minute, 0)
        assert not m.partial


# -- page bounces in the ingest shards ------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["anon-a", "anon-b", "anon-c"]),
                          st.sampled_from(["page_view", "page_view", "add_to_cart", "push_sent"]),
                          st.sampled_from(["/", "/deals?utm=1"]), st.integers(0, 40 * 60),
                          st.integers(0, 50_000)),
                min_size=1, max_size=40))
def test_bounces_equal_a_brute_force_count(steps):
    """Every page view is counted once in its minute's cohort, reported 10 minutes after it; it
    bounced when its visitor did nothing (a message sent to them does not count) in the next 10
    minutes. Events arrive out of order, up to 50 s (within the allowed lateness)."""
    from flows.shard import Chunk, IngestShard, ShardConfig, ShardOut
    from tests.engine_harness import Harness, event

    t0 = 1_795_392_000_000
    shard = IngestShard(0, ShardConfig(lateness_ms=60_000, profile_shards=1, ingest_shards=1),
                        Harness().plan)
    # distinct times (+ i ms); arrival order: time plus up to 50 s of delay
    events = [(t0 + sec * 1000 + i, v, name, page, jitter)
              for i, (v, name, page, sec, jitter) in enumerate(steps)]
    arrival = sorted(events, key=lambda e: (e[0] + e[4], e[0]))
    reported: dict[tuple[int, str], list[int]] = {}
    end = (t0 + 3 * 3600_000, "anon-z", "add_to_cart", "", 0)
    for i, (ts, v, name, page, _) in enumerate(arrival + [end]):
        out = ShardOut(0)
        shard.ingest(Chunk(0, [event(i, v, name, ts, props={"page": page})], {0: ts}, 1), out)
        assert not out.dead  # never late here
        if out.minutes is not None:
            for minute, pages in out.minutes.bounces.items():
                for p, (views, bounced) in pages.items():
                    t = reported.setdefault((minute - 10, p), [0, 0])
                    t[0] += views
                    t[1] += bounced
    expected: dict[tuple[int, str], list[int]] = {}
    by_time = sorted(events)
    for j, (ts, v, name, page, _) in enumerate(by_time):
        if name != "page_view":
            continue
        later = [t for t, w, n, _, _ in by_time[j + 1:] if w == v and n != "push_sent"]
        bounced = not later or later[0] - ts > 10 * 60_000
        t = expected.setdefault((ts // 60_000, page.split("?")[0]), [0, 0])
        t[0] += 1
        t[1] += bounced
    assert reported == expected


def test_an_entity_burst_is_seen_whatever_the_arrival_order():
    """52 clicks a second apart from one IP, the second half arriving first (two partitions):
    the hour holds 52 > 50, so the rule fires, as it does in time order."""
    clicks = burst(0, 52, 1000, "ad_click", ip="203.0.113.7")
    for order in (clicks, clicks[26:] + clicks[:26], clicks[::-1]):
        rules = EntityRules([load_rules().rule("ip_cluster_click_fraud")])
        fired = [a for s in order for a in rules.observe(s) if a.status == "firing"]
        assert len(fired) == 1 and fired[0].value == 51.0


def test_entity_resolve_after_and_a_deterministic_resolve_time(tmp_path):
    doc = yaml.safe_load(RULES_FILE.read_text())
    flood = next(r for r in doc["rules"] if r["name"] == "ip_request_flood")
    flood["resolve_after"] = "10s"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    results = []
    for ticks in ([5_000, 20_000, 40_000], [39_000, 40_000], [40_000]):
        rules = EntityRules([load_rules(path).rule("ip_request_flood")])
        for s in burst(1_000, 150, 6, "page", ip="198.51.100.9"):
            rules.observe(s)
        results.append([(a.status, a.at_ms) for t in ticks for a in rules.tick(t)])
    # The window emptied at 2 s (the last breaching second ends), plus 10 s: however "now" moved.
    assert results == [[("resolved", 12_000)]] * 3


def test_entity_shards_drop_duplicates_and_late_signals():
    from flows.entity_alerts import EntityChunk, EntityShard

    shard = EntityShard(0, [load_rules().rule("user_orders_per_day")], lateness_ms=60_000)
    orders = [Signal(3_600_000 + i * 1000, "order_completed", "hoarder", "", "", 2, f"o{i}")
              for i in range(99)]
    out = shard.ingest(EntityChunk(0, orders + orders[:10], {0: 3_700_000}, 1))  # 10 retries
    assert out == []  # 99 orders, not 109
    late = Signal(1_000, "order_completed", "hoarder", "", "", 2, "o-late")  # behind the watermark
    assert shard.ingest(EntityChunk(0, [late], {0: 3_700_000}, 1)) == []
    fired = shard.ingest(EntityChunk(0, [orders[0]._replace(event_id="o99", ts_ms=3_700_000)],
                                     {0: 3_700_000}, 1))
    assert [(a.rule, a.value) for a in fired] == [("user_orders_per_day", 100.0)]


def test_an_entity_shard_erased_person_stays_out_whatever_the_ingest_shards_did():
    """The erasure reaches the entity shard before any ingest shard has added the person to the
    process's ledger; a signal of theirs still in flight must not bring them back."""
    import pickle

    from flows.entity_alerts import EntityChunk, EntityShard
    from privacy.erasure import ErasureRequest, reset_process_ledger

    reset_process_ledger(b"k" * 32, {})
    try:
        shard = EntityShard(0, [load_rules().rule("user_orders_per_day")], lateness_ms=60_000)
        order = Signal(3_600_000, "order_completed", "victim-7", "", "", 2, "o1")
        shard.ingest(EntityChunk(0, [order], {0: 3_600_000}, 1))
        assert b"victim-7" in pickle.dumps(shard)
        request = ErasureRequest("r1", "victim-7", False, "t", 3_700_000)
        shard.ingest(EntityChunk(0, [], {}, 1, 0, [request]))
        shard.ingest(EntityChunk(0, [order._replace(event_id="o2", ts_ms=3_600_500)], {0: 3_600_500}, 1))
        assert b"victim-7" not in pickle.dumps(shard)
    finally:
        reset_process_ledger(None, {})


def test_resumed_rules_take_the_current_catalogue_and_keep_unchanged_state(tmp_path):
    import pickle

    rules = MinuteRules(load_rules())
    for m in range(40):
        rules.judge(CompleteMinute(m, [("web", "c1", "", "page_view", 100 + m % 3, 0.0, 0.0, 0, [])]))
    resumed = pickle.loads(pickle.dumps(rules))
    doc = yaml.safe_load(RULES_FILE.read_text())
    next(r for r in doc["rules"] if r["name"] == "traffic_anomaly")["detector"]["params"]["k"] = 9
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    retuned = resumed.retuned(load_rules(path))
    assert ("traffic_anomaly", "all") not in retuned.detectors  # changed: starts afresh
    kept = retuned.detectors[("channel_traffic_anomaly", "channel=web")]
    before = rules.detectors[("channel_traffic_anomaly", "channel=web")]
    assert kept.members["gaussian"].count == before.members["gaussian"].count == 40
    assert retuned.series.minute == 39 and retuned.rules[0].name == "cvr_fluctuation"
    assert next(r for r in retuned.rules if r.name == "traffic_anomaly").detector.params["k"] == 9


def test_an_ingest_shard_snapshot_from_before_the_alert_state_resumes():
    import pickle

    from flows.shard import IngestShard, ShardConfig
    from tests.engine_harness import Harness

    shard = IngestShard(0, ShardConfig(), Harness().plan)
    shard.store.plan = None  # as the snapshot does
    old = pickle.loads(pickle.dumps(shard))
    for name in IngestShard._ADDED_STATE:
        del old.__dict__[name]
    resumed = pickle.loads(pickle.dumps(old))
    assert all(getattr(resumed, name) == {} for name in IngestShard._ADDED_STATE)
