"""Benchmark of the trigger rule engine (config/trigger_rules.yaml, triggers/engine.py).

    .venv/bin/python -m bench.bench_triggers            # full: about 13-15 min on 2 vCPUs
    .venv/bin/python -m bench.bench_triggers --quick    # about 2.5 min

Issue: "p99 event -> action and p99 timer lateness (action time minus the moment the watermark
passed the due time) at half of the flow's maximum rate, with the whole catalogue on; targets
200 ms and 1 s. Flow throughput with and without the catalogue, in one run. Memory per user with
pending timers, and for 1,000,000 users who never come back."

Starts its own services like bench/run_bench.py (a Kafka broker from tests/services.py, an
embedded Redis, chDB in a temp dir) and measures, in one process:

1. throughput   the full flow (flows.runner.run: Kafka -> shards -> Redis / ClickHouse / Kafka)
                over one replay topic, with ``trigger.rules`` = the catalogue and = None,
                alternated (off, on, on, off, ...); events/s, CPU per event (this process, and
                the broker + Redis processes apart), the ratio on/off. Also the Bytewax
                read-and-discard baseline of run_bench on the same topic, for reference.
2. live         the full flow with the catalogue following a fresh topic while another process
                produces synthetic events stamped "now" at ``--live-fraction`` (0.5) x the
                catalogue-on throughput of part 1. The rule file is the catalogue with its
                timers shortened (so they fire within the run) and consent opt_out, no quiet
                hours (so actions are sent); the output says exactly what was changed.
                Event -> action latency (STATS ``action_latency_ms``) and timer lateness (STATS
                ``timer_lateness_ms``) against the targets; plus a check of the lateness from
                the actions topic (see below).
3. memory       in a fresh child process, no services: (a) trigger state per user with pending
                timers through the real ProfileStore + TriggerEngine (tracemalloc, with and
                without the catalogue); (b) users who send one event each and never come back,
                through TriggerEngine with a light context (triggers.rules.SimpleContext):
                memory while their timers are pending, then the clock is run past every horizon
                (100 days): users still holding trigger state and the memory left.

Prints ONE JSON object on stdout (also saved as bench/results/triggers-<time>.json); progress
goes to stderr. See bench/README.md ("Trigger rules").
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import multiprocessing
import os
import statistics
import sys
import threading
import time
import tracemalloc
import uuid
from datetime import datetime
from pathlib import Path

import orjson
import yaml

from bench import run_bench
from bench.run_bench import (REPLAY_START_MS, RESULTS_DIR, Bench, GcTimer, StopAt,
                             StoppableKafkaSource, code_info, flush_redis, live_producer,
                             machine_info)
from config.settings import Settings, load_settings
from connectors import kafka
from connectors.synthetic import SyntheticSpec, rhythm
from flows.gc_pacing import THRESHOLD as GC_THRESHOLD
from flows import runner
from surgeflow.stats import STATS
from triggers.spec import RULES_FILE, duration_ms, load_trigger_rules

_T0 = time.monotonic()
TARGET_ACTION_P99_MS = 200.0
TARGET_TIMER_P99_MS = 1000.0
TIMER_KINDS = ("absence", "schedule", "drip")  # rules that only ever fire on a timer
DAY_MS = 86_400_000
CLOCK_STEP_MS = 3_600_000  # memory parts: the clock runs on an hour at a time, as a watermark does


def log(msg: str) -> None:
    print(f"[triggers {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def dist(values: list[float]) -> dict:
    """p50 / p90 / p99 / max of a list of milliseconds (same rank rule as STATS.percentile)."""
    if not values:
        return {"samples": 0, "p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(values)

    def q(x: float) -> float:
        return round(s[min(len(s) - 1, int(x * len(s)))], 1)

    return {"samples": len(s), "p50": q(0.50), "p90": q(0.90), "p99": q(0.99),
            "max": round(s[-1], 1)}


def proc_cpu_s(pid: int | None) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss() -> int:
    """RSS after a full collection and glibc's malloc_trim (freed memory back to the OS)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


class LatencyTimeline(threading.Thread):
    """Every ``interval_s``, the new STATS samples of each name (the lists only grow while
    ``max_samples`` is not reached): their count and max, by time since the start. Shows
    whether the latency tail is a few periodic stalls (epochs, minute closes, inserts, GC)
    or spread out."""

    def __init__(self, names: tuple[str, ...], interval_s: float = 0.5):
        super().__init__(name="latency-timeline", daemon=True)
        self.names, self.interval_s = names, interval_s
        self.pos = dict.fromkeys(names, 0)
        self.rows: dict[str, list[tuple[float, int, float]]] = {n: [] for n in names}
        self.done = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        t = round(time.monotonic() - self.started, 2)
        with STATS.lock:
            for name in self.names:
                samples = STATS.samples.get(name, [])
                new = samples[self.pos[name]:]
                self.pos[name] = len(samples)
                if new:
                    self.rows[name].append((t, len(new), max(new)))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        self.sample()

    def summary(self, name: str, over_ms: float) -> dict:
        rows = self.rows[name]
        spikes = [r for r in rows if r[2] > over_ms]
        times = [r[0] for r in spikes]
        return {
            "interval_s": self.interval_s,
            "intervals": len(rows),
            f"intervals_with_max_over_{over_ms:g}ms": len(spikes),
            "worst": [{"t_s": t, "samples": n, "max_ms": round(m, 1)}
                      for t, n, m in sorted(rows, key=lambda r: -r[2])[:8]],
            "seconds_between_spikes": [round(b - a, 1) for a, b in zip(times, times[1:])][:30],
        }


# ------------------------------------------------------------------------------------------------
# the live rule file: the catalogue, timers shortened, consent opt_out, no quiet hours


def short_duration(ms: int, a: argparse.Namespace) -> str:
    """A catalogue duration squeezed into the run: 30 min -> 20 s, 2 h -> 30 s (x1.5 per x4),
    kept within [--live-min-timer-s, --live-max-timer-s]."""
    s = 20.0 * (ms / 1_800_000) ** 0.2925
    return f"{int(round(min(a.live_max_timer_s, max(a.live_min_timer_s, s))))}s"


def live_rules(a: argparse.Namespace) -> tuple[dict, dict]:
    """(rule file document, what was changed). Same rules, priorities, re-entry, caps and
    channels as the catalogue; only the timers' lengths and two guards differ."""
    doc = yaml.safe_load(Path(RULES_FILE).read_text(encoding="utf-8"))
    changes: dict = {"guards": {}}
    guards = doc.setdefault("guards", {})
    changes["guards"]["consent"] = f"{guards.get('consent', 'opt_in')} -> opt_out"
    changes["guards"]["quiet_hours"] = f"{guards.get('quiet_hours')} -> null"
    guards["consent"], guards["quiet_hours"] = "opt_out", None
    for rule in doc.get("rules", []):
        done: dict = {}
        if "timeout" in rule:
            new = short_duration(duration_ms(rule["timeout"]), a)
            done["timeout"] = f"{rule['timeout']} -> {new}"
            rule["timeout"] = new
        for i, o in enumerate(rule.get("timeouts") or []):
            new = short_duration(duration_ms(o["timeout"]), a)
            done[f"timeouts[{i}]"] = f"{o['timeout']} -> {new}"
            o["timeout"] = new
        if rule.get("kind") in ("schedule", "drip"):
            for i, step in enumerate(rule.get("steps") or []):
                if step.get("after") is not None:
                    was, ms = step["after"], duration_ms(step["after"])
                else:
                    was = f"after_days {step['after_days']}" + (
                        f" at_local {step['at_local']}" if step.get("at_local") else "")
                    ms = max(1, step.pop("after_days")) * DAY_MS
                    step.pop("at_local", None)
                step["after"] = short_duration(ms, a)
                done[f"steps[{i}]"] = f"{was} -> {step['after']}"
        fb = (rule.get("action") or {}).get("fallback")
        if fb and fb.get("after"):
            new = short_duration(duration_ms(fb["after"]), a)
            done["action.fallback.after"] = f"{fb['after']} -> {new}"
            fb["after"] = new
        if done:
            changes[rule["name"]] = done
    return doc, changes


# ------------------------------------------------------------------------------------------------
# the benchmark on services


class TriggerBench(Bench):
    """run_bench's services (broker, Redis, chDB), topic filling and baseline, with its own
    full runs (rules on / off, CPU) and live phase (timers, actions topic check)."""

    def settings(self, topic: str, *, tail: bool, database: str, rules=None,  # noqa: D102
                 **extra) -> Settings:
        a = self.args
        return load_settings(
            None, env={},
            source__kind="kafka",
            kafka__brokers=[self.broker.bootstrap], kafka__events_topic=topic, kafka__tail=tail,
            kafka__starting_offset="beginning", kafka__batch_size=a.batch_size,
            output__kind="kafka",
            redis__url=self.redis_url,
            clickhouse__dsn=self.dsn, clickhouse__database=database,
            clickhouse__spool_dir=str(self.tmp / "spool"),
            flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None,
            flow__workers=a.workers, flow__shards=a.shards, flow__epoch_interval_s=a.epoch_s,
            trigger__rules=None if rules is None else str(rules),
            **extra,
        )

    def service_pids(self) -> list[int]:
        pids = []
        for svc in (self.broker, self.redis_server):
            proc = getattr(svc, "_proc", None)
            if proc is not None:
                pids.append(proc.pid)
        return pids

    # -- part 1 --------------------------------------------------------------------------
    def full_run(self, topic: str, rules, database: str, label: str) -> dict:
        """One replay of the whole topic; CPU measured over run_main only (runner._run), as
        the wall time (RunResult.seconds)."""
        a = self.args
        settings = self.settings(topic, tail=False, database=database, rules=rules)
        flush_redis(self.redis_url)
        STATS.reset()
        STATS.max_samples = max(STATS.max_samples, 2 * a.events + 10_000)
        pids = self.service_pids()
        marks: dict = {}
        inner = runner._run

        def timed_run(*args, **kwargs):  # the same interval as RunResult.seconds
            marks["cpu0"], marks["svc0"] = time.process_time(), sum(map(proc_cpu_s, pids))
            try:
                return inner(*args, **kwargs)
            finally:
                marks["cpu1"], marks["svc1"] = time.process_time(), sum(map(proc_cpu_s, pids))

        log(f"{label}: flows.runner.run, trigger.rules={'catalogue' if rules else 'None'}")
        runner._run = timed_run
        try:
            started = time.monotonic()
            with GcTimer() as gc_time:
                result = runner.run(settings, self.redis_url, a.workers)
            total = time.monotonic() - started
        finally:
            runner._run = inner
        n = STATS.get("events_in")
        if n != a.events:
            raise RuntimeError(f"{label} flow read {n} records, expected {a.events}")
        cpu = marks["cpu1"] - marks["cpu0"]
        svc = marks["svc1"] - marks["svc0"]
        res = {
            "label": label,
            "rules": "catalogue" if rules else None,
            "events": n,
            "seconds": round(result.seconds, 3),
            "setup_seconds": round(total - result.seconds, 3),
            "events_per_s": round(n / result.seconds, 1),
            "cpu_seconds": round(cpu, 2),
            "cpu_us_per_event": round(cpu / n * 1e6, 1),
            "cpu_cores_busy": round(cpu / result.seconds, 2),
            "services_cpu_us_per_event": round(svc / n * 1e6, 1),
            "python_gc_seconds": gc_time.summary()["seconds"],
            "actions_emitted": STATS.get("actions_emitted"),
            "trigger_decisions": dict(sorted(STATS.labeled("trigger_decisions").items())),
            "trigger_actions_by_rule": dict(sorted(STATS.labeled("trigger_actions").items())),
            "late_events": STATS.get("late_events"),
            "events_unique": STATS.get("events_unique"),
        }
        log(f"{label}: {n:,} events in {result.seconds:.2f}s = {res['events_per_s']:,.0f}/s; "
            f"CPU {res['cpu_us_per_event']:.0f} us/event ({res['cpu_cores_busy']:.2f} cores), "
            f"services {res['services_cpu_us_per_event']:.0f} us/event; "
            f"actions {res['actions_emitted']:,}")
        return res

    def throughput(self) -> dict:
        a = self.args
        topic, produced = self.fill_topic()
        base = self.baseline(topic, "source baseline")
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        order = []
        for i in range(a.repeat):  # off, on, on, off, off, on ...: drift hits both alike
            order += ["off", "on"] if i % 2 == 0 else ["on", "off"]
        for k, which in enumerate(order):
            n = len(runs[which]) + 1
            runs[which].append(self.full_run(
                topic, RULES_FILE if which == "on" else None, f"bench_{which}_{n}",
                f"full {k + 1}/{len(order)} (catalogue {which})"))

        def summary(rs: list[dict]) -> dict:
            med = statistics.median
            return {"events_per_s": round(med(r["events_per_s"] for r in rs), 1),
                    "cpu_us_per_event": round(med(r["cpu_us_per_event"] for r in rs), 1),
                    "services_cpu_us_per_event": round(med(r["services_cpu_us_per_event"] for r in rs), 1),
                    "cpu_cores_busy": round(med(r["cpu_cores_busy"] for r in rs), 2),
                    "runs_events_per_s": [r["events_per_s"] for r in rs]}

        on, off = summary(runs["on"]), summary(runs["off"])
        out = {
            "events": a.events, "users": a.users, "event_time_span_h": a.span_hours,
            "order": order,
            "source_baseline_events_per_s": base["events_per_s"],
            "catalogue_off": off,
            "catalogue_on": on,
            "ratio_on_to_off_events_per_s": round(on["events_per_s"] / off["events_per_s"], 3),
            "ratio_on_to_off_cpu_per_event": round(on["cpu_us_per_event"] / off["cpu_us_per_event"], 3),
            "ratio_on_to_source_baseline": round(on["events_per_s"] / base["events_per_s"], 4),
            "ratio_off_to_source_baseline": round(off["events_per_s"] / base["events_per_s"], 4),
            "runs": runs["off"] + runs["on"],
            "produce": produced,
        }
        log(f"throughput: catalogue on {on['events_per_s']:,.0f}/s, off {off['events_per_s']:,.0f}/s "
            f"(ratio {out['ratio_on_to_off_events_per_s']}); CPU/event ratio "
            f"{out['ratio_on_to_off_cpu_per_event']}")
        return out

    # -- part 2 --------------------------------------------------------------------------
    def live(self, rate: float, rate_from: str) -> dict:
        a = self.args
        doc, changes = live_rules(a)
        rules_path = self.tmp / "live_trigger_rules.yaml"
        rules_path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        book = load_trigger_rules(rules_path)  # fails loudly if the derived file is invalid
        timer_rules = {r.name for r in book.rules if r.kind in TIMER_KINDS}
        lateness_ms = int(a.live_lateness_s * 1000)

        origin = int(time.time() * 1000)
        spec = SyntheticSpec(
            seed=a.seed + 1, users=a.users, start_ms=origin - int(a.live_prime_s * 1000),
            events_per_s=rate / rhythm(origin),
            duration_s=a.live_prime_s + a.live_warmup_s + a.live_seconds, malformed_share=0.001,
            duplicate_share=0.001, max_disorder_ms=2000)
        topic = self.broker.create_topic(f"bench-trig-live-{uuid.uuid4().hex[:8]}",
                                         partitions=a.partitions)
        settings = self.settings(topic, tail=True, database="bench_trig_live", rules=rules_path,
                                 flow__allowed_lateness_s=a.live_lateness_s,
                                 flow__idle_timeout_s=a.live_idle_timeout_s)
        actions_topic = settings.kafka.actions_topic
        actions_from = kafka.end_offsets([self.broker.bootstrap], actions_topic)

        ctx = multiprocessing.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        producer = ctx.Process(target=live_producer, name="live-producer", daemon=True,
                               args=(child_conn, self.broker.bootstrap, topic, spec, origin))
        producer.start()
        if not conn.poll(600):
            raise RuntimeError("live producer did not generate its records within 600 s")
        log(f"live: producer generated {conn.recv():,} records "
            f"({a.live_warmup_s:g}+{a.live_seconds:g} s at ~{rate:,.0f}/s)")
        stop = StopAt()
        source = StoppableKafkaSource(
            kafka.events_source([self.broker.bootstrap], topic, tail=True, from_beginning=True,
                                batch_size=a.batch_size), stop)
        flush_redis(self.redis_url)
        STATS.reset()
        STATS.max_samples = 10_000_000  # keep every sample: no reservoir
        outcome: dict = {}

        def target():
            try:
                outcome["result"] = runner.run(settings, self.redis_url, a.workers, source=source,
                                               partitions=a.partitions)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc

        log(f"live: flow (tail) on {topic}, rules {rules_path.name}, allowed lateness "
            f"{a.live_lateness_s:g}s, idle timeout {a.live_idle_timeout_s:g}s")
        thread = threading.Thread(target=target, name="live-flow", daemon=True)
        thread.start()
        if not stop.ready.wait(120):
            raise RuntimeError(f"live flow did not start: {outcome.get('error')!r}")
        time.sleep(1.0)  # consumer assigned and polling
        t0 = int(time.time() * 1000) + 300
        warm_end_ms = t0 + int(a.live_warmup_s * 1000)
        conn.send((t0, warm_end_ms))
        time.sleep(max(0.0, warm_end_ms / 1000 - time.time()))
        STATS.reset()  # samples of the warm-up dropped
        measure_from_ms = time.time() * 1000
        timeline = LatencyTimeline(("action_latency_ms", "timer_lateness_ms", "feature_latency_ms"))
        timeline.start()
        cpu0, svc0 = time.process_time(), sum(map(proc_cpu_s, self.service_pids()))
        log(f"live: warm-up over, measuring {a.live_seconds:g} s")
        if not conn.poll(a.live_seconds + 600):
            raise RuntimeError("live producer did not finish")
        counts = conn.recv()
        producer.join(timeout=30)
        produced_s = counts.pop("measured_s")
        # The watermark only moves with input: once the producer is done nothing more comes
        # due. Let the last actions reach the topic, then read the figures before the end of
        # input (which fires every timer still pending at once, from the last batch's time).
        time.sleep(a.live_drain_s)
        timeline.stop()
        until_ms = time.time() * 1000
        cpu = time.process_time() - cpu0
        svc = sum(map(proc_cpu_s, self.service_pids())) - svc0
        with STATS.lock:
            action_ms = list(STATS.samples.get("action_latency_ms", ()))
            timer_ms = list(STATS.samples.get("timer_lateness_ms", ()))
            feature_ms = list(STATS.samples.get("feature_latency_ms", ()))
        snap = {k: STATS.get(k) for k in ("events_in", "actions_emitted", "late_events",
                                          "events_dead_lettered")}
        decisions = dict(sorted(STATS.labeled("trigger_decisions").items()))
        by_rule = dict(sorted(STATS.labeled("trigger_actions").items()))
        watermark = STATS.value("watermark_ms")
        clock = STATS.value("stream_clock_ms")
        ends = kafka.end_offsets([self.broker.bootstrap], topic)
        read = {int(k.split("{", 1)[1][:-1]): int(v) for k, v in STATS.values.items()
                if k.startswith("source_offset{")}
        lag = sum(max(0, ends[p] - 1 - read.get(p, -1)) for p in ends)
        stop.set(ends)
        log(f"live: produced {counts['measured']:,} in {produced_s:.1f}s "
            f"({counts['measured'] / produced_s:,.0f}/s); consumer lag at the end {lag}; "
            f"stopping the flow")
        thread.join(timeout=300)
        if thread.is_alive():
            raise RuntimeError("live flow did not stop within 300 s of the last event")
        if "error" in outcome:
            raise RuntimeError(f"live flow failed: {outcome['error']!r}") from outcome["error"]

        check = self.timer_check(actions_topic, actions_from, timer_rules, lateness_ms,
                                 measure_from_ms, until_ms)
        action = dist(action_ms)
        timer = dist(timer_ms)
        res = {
            "rate_events_per_s_target": round(rate, 1),
            "rate_from": rate_from,
            "measured_events": counts["measured"],
            "measured_events_per_s": round(counts["measured"] / produced_s, 1),
            "measured_seconds": round(produced_s, 1),
            "warmup_s": a.live_warmup_s,
            "rules_file": "config/trigger_rules.yaml with timers shortened (so they fire within "
                          "the run), consent opt_out and quiet_hours null (so actions are sent); "
                          "same rules, priorities, re-entry, caps, fallbacks",
            "rules_changes": changes,
            "settings": {"flow.allowed_lateness_s": a.live_lateness_s,
                         "flow.idle_timeout_s": a.live_idle_timeout_s,
                         "kafka.batch_size": a.batch_size, "partitions": a.partitions,
                         "workers": a.workers, "synthetic_users": a.users},
            "action_latency_ms": action,
            "timer_lateness_ms": timer,
            "notes": {
                "action_latency_ms": "STATS action_latency_ms of actions fired by an event: "
                                     "Kafka timestamp of the event -> action delivered to the "
                                     "actions topic (sink flushed)",
                "timer_lateness_ms": "STATS timer_lateness_ms of timer-fired actions (absence, "
                                     "schedule, drip, channel fallbacks): action delivered - wall "
                                     "time of the profile shard batch whose watermark passed the "
                                     "due time; the allowed lateness (watermark = stream clock - "
                                     f"{a.live_lateness_s:g} s) is not included",
                "window": "samples from the end of the warm-up to the last record + "
                          f"{a.live_drain_s:g} s, read before the end of input (which fires "
                          "every timer still pending at once)"},
            "feature_latency_ms": dist(feature_ms),
            "samples_over_target": {
                "action_latency_ms": sum(x > TARGET_ACTION_P99_MS for x in action_ms),
                "timer_lateness_ms": sum(x > TARGET_TIMER_P99_MS for x in timer_ms),
                f"feature_latency_ms_over_{TARGET_ACTION_P99_MS:g}":
                    sum(x > TARGET_ACTION_P99_MS for x in feature_ms)},
            "latency_timeline": {
                "action_latency_ms": timeline.summary("action_latency_ms", TARGET_ACTION_P99_MS),
                "feature_latency_ms": timeline.summary("feature_latency_ms", TARGET_ACTION_P99_MS),
                "timer_lateness_ms": timeline.summary("timer_lateness_ms", TARGET_ACTION_P99_MS)},
            "timer_lateness_from_actions_topic_ms": check,
            "counts_in_window": {**snap, "trigger_decisions": decisions,
                                 "trigger_actions_by_rule": by_rule},
            "watermark_behind_wall_clock_ms": round(until_ms - watermark) if watermark else None,
            "stream_clock_behind_wall_clock_ms": round(until_ms - clock) if clock else None,
            "consumer_lag_records_at_end": lag,
            "flow_process_cpu_cores_busy": round(cpu / ((until_ms - measure_from_ms) / 1000), 2),
            "services_cpu_cores_busy": round(svc / ((until_ms - measure_from_ms) / 1000), 2),
        }
        log(f"live: event -> action {action}; timer lateness {timer}; "
            f"from the actions topic {check['lateness_ms']}")
        return res

    def timer_check(self, topic: str, start: dict[int, int], timer_rules: set[str],
                    lateness_ms: int, from_ms: float, until_ms: float) -> dict:
        """Timer lateness seen from outside the flow. The live events are stamped with the wall
        time they are produced at (paced on event time), so the watermark (the stream clock
        minus the allowed lateness) passes a due time D once a record of time D + lateness is
        produced, at wall time ~D + lateness. For every timer action in the measured window:
        its Kafka timestamp (set when the action sink produced it) - (D + lateness), where D
        is the action's event_ts_ms. Unlike STATS ``timer_lateness_ms`` (from the wall time
        of the profile shard's batch that advanced the watermark) this also covers the
        source read, decode and the ingest -> profile shard hand-over. A timer can also fire
        with its user's own later event, before the watermark (TriggerEngine.elapse): those
        actions come out negative, which a watermark-fired one cannot, and are counted apart."""
        from confluent_kafka import Consumer, TopicPartition

        ends = kafka.end_offsets([self.broker.bootstrap], topic)
        consumer = Consumer({"bootstrap.servers": self.broker.bootstrap,
                             "group.id": f"bench-triggers-{uuid.uuid4().hex[:6]}",
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, p, start.get(p, 0)) for p in ends])
        remaining = {p: ends[p] - start.get(p, 0) for p in ends}
        lateness, early, event_actions, outside = [], 0, 0, 0
        by_rule: dict[str, int] = {}
        deadline = time.monotonic() + 120
        try:
            while sum(remaining.values()) > 0 and time.monotonic() < deadline:
                for msg in consumer.consume(10_000, timeout=1.0):
                    if msg.error():
                        continue
                    remaining[msg.partition()] -= 1
                    doc = orjson.loads(msg.value())
                    ts = msg.timestamp()[1]
                    if not from_ms <= ts <= until_ms:
                        outside += 1
                        continue
                    if doc.get("rule") in timer_rules or doc.get("step", 0) >= 1000:
                        late = ts - (doc["event_ts_ms"] + lateness_ms)
                        if late < 0:  # before the watermark: the user's own later event fired it
                            early += 1
                        else:
                            lateness.append(late)
                        by_rule[doc["rule"]] = by_rule.get(doc["rule"], 0) + 1
                    else:
                        event_actions += 1
        finally:
            consumer.close()
        return {"lateness_ms": dist(lateness),
                "timer_actions_fired_by_the_users_own_event": early,
                "timer_actions_by_rule": dict(sorted(by_rule.items())),
                "event_actions": event_actions, "actions_outside_window": outside,
                "note": "timer actions fired by the watermark: Kafka timestamp of the action - "
                        "(event_ts_ms + allowed lateness); includes the source read, decode and "
                        "the ingest -> profile hand-over. A timer whose user sends an event after "
                        "its due time fires with that event, before the watermark passes it "
                        "(TriggerEngine.elapse): those come out negative and are only counted"}


# ------------------------------------------------------------------------------------------------
# part 3: memory (run in a fresh child process, no services)


def _pending_records(n: int, start_ms: int) -> list[bytes]:
    """n users, each: login, add_to_cart, push_opened, 1 s apart, users spread over 10 min;
    marketing consent granted, a time zone. Pending after them: abandoned_cart (30 min),
    push_open_no_order (2 h), no_login (3 d), winback_drip (30 d)."""
    recs = []
    context = {"consent": {"profiling": True, "marketing": True}, "timezone": "Europe/Paris",
               "channel": "app"}
    steps = (("login", {"method": "password"}),
             ("add_to_cart", {"product_id": "p0042", "price": 19.9, "quantity": 1,
                              "cart_value": 19.9}),
             ("push_opened", {"campaign_id": "cmp-01", "message_id": "m-1"}))
    for i in range(n):
        ts = start_ms + i * 600_000 // max(n, 1)
        user = f"u{i:07d}"
        for k, (name, props) in enumerate(steps):
            recs.append((ts + k * 1000, orjson.dumps({
                "event_id": f"{user}-{k}", "type": "track", "event": name, "user_id": user,
                "timestamp": ts + k * 1000, "properties": props, "context": context})))
    recs.sort(key=lambda r: r[0])
    return [r for _, r in recs]


def _feed(store, out, recs: list[bytes], batch: int = 1000) -> None:
    """As a profile shard does: apply each event, advance "now" (no lateness here: the events
    are in order), flush the touched profiles once per batch."""
    from flows.events import DeadLetter, decode

    for i, raw in enumerate(recs):
        e = decode(raw)
        if isinstance(e, DeadLetter):
            raise RuntimeError(f"bench record rejected: {e.reason} {e.detail}")
        store.apply(e, out)
        store.advance(e.ts_ms, out)
        if i % batch == batch - 1:
            store.flush(out)
            out.features.clear(), out.actions.clear(), out.audit.clear(), out.dead.clear()
    store.flush(out)
    out.features.clear(), out.actions.clear(), out.audit.clear(), out.dead.clear()


def memory_pending(n: int) -> dict:
    """(a) Trigger state per user with pending timers, through the real ProfileStore: the same
    events fed to a store without trigger rules and to one with the catalogue, each under
    tracemalloc from an empty store; the difference is what the catalogue adds. Also the
    allocations still alive that were made in triggers/*.py (the engine's own objects)."""
    from config.registry import load_registry
    from features.profile import FeaturePlan
    from flows.shard import ProfileStore, ShardConfig, ShardOut
    from triggers.engine import CompiledBook

    plan = FeaturePlan(load_registry())
    book = CompiledBook(load_trigger_rules(RULES_FILE))
    start = REPLAY_START_MS + 12 * 3_600_000  # 12:00 UTC, 13:00 in Paris: no quiet hours
    recs = _pending_records(n, start)
    triggers_dir = str(Path(RULES_FILE).resolve().parent.parent / "triggers")
    res: dict = {"users": n, "events_per_user": 3,
                 "events": "login, add_to_cart, push_opened (consent granted, Europe/Paris)"}
    kept = {}
    for label, rules in (("without_triggers", None), ("with_catalogue", RULES_FILE)):
        gc.collect()
        tracemalloc.start()
        store = ProfileStore(plan, ShardConfig(trigger_rules=str(rules) if rules else None,
                                               raw_events=False))
        if store.triggers is not None:
            store.triggers.use(book)
        out = ShardOut(0)
        t = time.perf_counter()
        _feed(store, out, recs)
        seconds = time.perf_counter() - t
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        entry = {"traced_bytes_per_user": round(traced / n, 1), "seconds_traced": round(seconds, 1)}
        if store.triggers is not None:
            snap = tracemalloc.take_snapshot()
            in_triggers = sum(s.size for s in snap.statistics("filename")
                              if s.traceback[0].filename.startswith(triggers_dir))
            entry["allocated_in_triggers_py_bytes_per_user"] = round(in_triggers / n, 1)
            del snap
        tracemalloc.stop()
        res[label] = entry
        kept[label] = store
        log(f"memory (a) {label}: {entry}")
    eng = kept["with_catalogue"].triggers
    states = list(eng.users.values())
    res["trigger_bytes_per_user"] = round(res["with_catalogue"]["traced_bytes_per_user"]
                                          - res["without_triggers"]["traced_bytes_per_user"], 1)
    res["profile_bytes_per_user"] = res["without_triggers"]["traced_bytes_per_user"]
    res["users_with_trigger_state"] = len(eng.users)
    res["users_with_pending_timer"] = eng.pending_timers()
    res["per_user_state"] = {
        "matches": round(sum(len(s.matches) for s in states) / max(len(states), 1), 2),
        "pending_sends": round(sum(len(s.sends) for s in states) / max(len(states), 1), 2),
        "history": round(sum(len(s.history) for s in states) / max(len(states), 1), 2),
        "marks": round(sum(len(s.marks) for s in states) / max(len(states), 1), 2),
        "open_matches_by_rule": _by_rule(states)}
    res["timer_heap_entries"] = len(eng.timers)
    # The same users never come back, through the real store (no tracing): the clock runs on.
    store, out = kept["with_catalogue"], ShardOut(0)
    del kept["without_triggers"]
    end = start + 600_000 + 3000
    curve = []
    now = end
    for days in (1, 7, 31, 45, 91, 100):
        t = time.perf_counter()
        actions = 0
        while now < end + days * DAY_MS:  # an hour at a time, outputs taken away each step
            now = min(end + days * DAY_MS, now + CLOCK_STEP_MS)
            store.advance(now, out)
            store.flush(out)
            actions += len(out.actions)
            out.features.clear(), out.actions.clear(), out.audit.clear(), out.dead.clear()
        curve.append({"after_days": days, "users_with_trigger_state": len(store.triggers.users),
                      "profiles": len(store.users), "actions_sent": actions,
                      "seconds": round(time.perf_counter() - t, 2)})
    res["never_return_through_profile_store"] = curve
    return res


def _by_rule(states) -> dict:
    counts: dict[str, int] = {}
    for s in states:
        for m in s.matches.values():
            counts[m.rule.name] = counts.get(m.rule.name, 0) + 1
    return dict(sorted(counts.items()))


class _LightEvent:
    """What TriggerEngine reads of an event (flows.events.Event has more)."""

    __slots__ = ("name", "ts_ms", "event_id", "properties", "latlon", "campaign")

    def __init__(self, name, ts_ms, event_id, properties):
        self.name, self.ts_ms, self.event_id, self.properties = name, ts_ms, event_id, properties
        self.latlon, self.campaign = None, ""


# One event per user, in turn (the catalogue rules each starts: see the README section).
NEVER_RETURN_EVENTS = ("page_view", "product_viewed", "add_to_cart", "login", "signup",
                       "push_opened", "order_completed", "sms_clicked")


def _one_event(i: int, ts: int) -> _LightEvent:
    name = NEVER_RETURN_EVENTS[i % len(NEVER_RETURN_EVENTS)]
    if name == "product_viewed":
        props = {"product_id": f"p{i % 500:04d}", "dwell_ms": 4000}
    elif name == "add_to_cart":
        props = {"product_id": f"p{i % 500:04d}", "quantity": 1}
    else:
        props = {}
    return _LightEvent(name, ts, f"e{i}", props)


def memory_never_return(n: int, traced: bool, span_ms: int = 3_600_000,
                        lateness_ms: int = 60_000) -> dict:
    """(b) n users send one event each (over ``span_ms`` of event time, the watermark
    following ``lateness_ms`` behind) and never come back; TriggerEngine with the catalogue
    and a light context (SimpleContext: consent given, UTC, no features, no session). Then the
    clock runs past every horizon (100 days after the last event)."""
    from triggers.engine import Collected, CompiledBook, TriggerEngine
    from triggers.rules import SimpleContext

    gc.set_threshold(*GC_THRESHOLD)  # the flow's GC counts (automatic here: no batches)
    book = CompiledBook(load_trigger_rules(RULES_FILE))
    ctx = SimpleContext()
    ctx_of = lambda user: ctx  # noqa: E731
    out = Collected()
    start = REPLAY_START_MS + 10 * 3_600_000
    rss0 = settled_rss()
    if traced:
        tracemalloc.start()
    engine = TriggerEngine()
    engine.use(book)
    t = time.perf_counter()
    actions = 0
    for i in range(n):
        ts = start + i * span_ms // n
        engine.on_event(f"u{i:07d}", _one_event(i, ts), ctx, out)
        if i % 1000 == 999:
            engine.advance(ts - lateness_ms, ctx_of, out)
            actions += len(out.actions)
            out.actions.clear(), out.audit.clear()
        if not traced and i % 200_000 == 199_999:
            log(f"memory (b): {i + 1:,} users")
    end = start + span_ms
    engine.advance(end - lateness_ms, ctx_of, out)
    actions += len(out.actions)
    out.actions.clear(), out.audit.clear()
    feed_s = time.perf_counter() - t
    states = list(engine.users.values())
    res: dict = {
        "users": n, "event_time_span_h": span_ms / 3_600_000, "events_in_turn": list(NEVER_RETURN_EVENTS),
        "feed_seconds": round(feed_s, 1),
        "feed_us_per_event": round(feed_s / n * 1e6, 1),
        "pending": {
            "users_with_trigger_state": len(engine.users),
            "users_with_pending_timer": engine.pending_timers(),
            "matches_per_user": round(sum(len(s.matches) for s in states) / max(n, 1), 2),
            "pending_sends_per_user": round(sum(len(s.sends) for s in states) / max(n, 1), 2),
            "history_per_user": round(sum(len(s.history) for s in states) / max(n, 1), 2),
            "marks_per_user": round(sum(len(s.marks) for s in states) / max(n, 1), 2),
            "open_matches_by_rule": _by_rule(states),
            "actions_sent_so_far": actions,
            "timer_heap_entries": len(engine.timers),
        },
    }
    del states
    if traced:
        gc.collect()
        res["pending"]["traced_bytes_per_user"] = round(tracemalloc.get_traced_memory()[0] / n, 1)
    else:
        rss1 = settled_rss()
        res["pending"]["rss_bytes_per_user"] = round((rss1 - rss0) / n, 1)
        res["rss_mb_before"] = round(rss0 / 2**20, 1)
        res["pending"]["rss_mb"] = round(rss1 / 2**20, 1)
    log(f"memory (b) {'traced ' if traced else ''}{n:,} users pending: {res['pending']}")
    curve = []
    checkpoints = (100,) if traced else (1, 7, 31, 45, 91, 100)
    now = end
    for days in checkpoints:
        t = time.perf_counter()
        sent = 0
        while now < end + days * DAY_MS:  # an hour at a time, outputs taken away each step
            now = min(end + days * DAY_MS, now + CLOCK_STEP_MS)
            engine.advance(now, ctx_of, out)
            sent += len(out.actions)
            out.actions.clear(), out.audit.clear()
        point = {"after_days": days, "users_with_trigger_state": len(engine.users),
                 "users_with_pending_timer": engine.pending_timers(),
                 "timer_heap_entries": len(engine.timers), "actions_sent": sent,
                 "seconds": round(time.perf_counter() - t, 1)}
        if not traced:
            point["rss_mb"] = round(settled_rss() / 2**20, 1)
            log(f"memory (b) +{days} d: {point}")
        curve.append(point)
    res["after_last_event"] = curve
    final = curve[-1]
    left = {"users_with_trigger_state": final["users_with_trigger_state"],
            "timer_heap_entries": final["timer_heap_entries"],
            "users_dict_bytes": sys.getsizeof(engine.users),
            "timer_heap_list_bytes": sys.getsizeof(engine.timers)}
    if traced:
        gc.collect()
        left["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    else:
        left["rss_delta_mb"] = round((settled_rss() - rss0) / 2**20, 1)
    res["left_after_100_days"] = left
    return res


def memory_child(conn, part: str, kwargs: dict, t0_wall: float) -> None:
    global _T0
    _T0 = time.monotonic() - (time.time() - t0_wall)  # the parent's clock in the log lines
    try:
        fn = {"pending": memory_pending, "never_return": memory_never_return}[part]
        conn.send(("ok", fn(**kwargs)))
    except BaseException as exc:  # noqa: BLE001 - sent to the parent
        import traceback

        conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))


def in_child(part: str, **kwargs) -> dict:
    """One memory part in a fresh process: no services, no chDB, a clean heap for RSS."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=memory_child, args=(child, part, kwargs, time.time() - (time.monotonic() - _T0)),
                       name=f"memory-{part}")
    proc.start()
    try:
        while not parent.poll(1.0):
            if not proc.is_alive():
                raise RuntimeError(f"memory part {part} died (exit {proc.exitcode})")
        status, value = parent.recv()
    finally:
        proc.join(timeout=60)
    if status != "ok":
        raise RuntimeError(f"memory part {part} failed: {value}")
    return value


def memory(a: argparse.Namespace) -> dict:
    log(f"memory (a): {a.state_users:,} users with pending timers, ProfileStore + engine, "
        "tracemalloc")
    pending = in_child("pending", n=a.state_users)
    log(f"memory (b): {a.forget_sample_users:,} users traced, then {a.forget_users:,} by RSS")
    sample = in_child("never_return", n=a.forget_sample_users, traced=True)
    full = in_child("never_return", n=a.forget_users, traced=False)
    return {
        "pending_timers": pending,
        "never_return": {
            "how": "TriggerEngine directly with the catalogue and a light context "
                   "(triggers.rules.SimpleContext: consent given, UTC, no features, no session) "
                   "instead of the full ProfileStore (1M profiles through the store take too "
                   "long and measure the profiles, not the triggers); one engine for all users "
                   "(the flow has one per profile shard); watermark 60 s behind the events",
            "traced_sample": sample,
            "rss_at_scale": full,
        },
    }


# ------------------------------------------------------------------------------------------------


def targets(live: dict | None) -> dict:
    if live is None:
        return {}
    a, t = live["action_latency_ms"]["p99"], live["timer_lateness_ms"]["p99"]
    return {
        "action_latency_p99_ms": {"target": TARGET_ACTION_P99_MS, "value": a,
                                  "met": a is not None and a <= TARGET_ACTION_P99_MS},
        "timer_lateness_p99_ms": {"target": TARGET_TIMER_P99_MS, "value": t,
                                  "met": t is not None and t <= TARGET_TIMER_P99_MS},
    }


def headline(out: dict) -> dict:
    h: dict = {}
    tp = out.get("throughput")
    if tp:
        h["events_per_s_catalogue_on"] = tp["catalogue_on"]["events_per_s"]
        h["events_per_s_catalogue_off"] = tp["catalogue_off"]["events_per_s"]
        h["ratio_on_to_off"] = tp["ratio_on_to_off_events_per_s"]
        h["cpu_us_per_event_on"] = tp["catalogue_on"]["cpu_us_per_event"]
        h["cpu_us_per_event_off"] = tp["catalogue_off"]["cpu_us_per_event"]
    lv = out.get("live")
    if lv:
        h["live_events_per_s"] = lv["measured_events_per_s"]
        h["action_latency_ms"] = {k: lv["action_latency_ms"][k] for k in ("p50", "p99", "max", "samples")}
        h["timer_lateness_ms"] = {k: lv["timer_lateness_ms"][k] for k in ("p50", "p99", "max", "samples")}
        h["timer_lateness_from_actions_topic_ms"] = {
            k: lv["timer_lateness_from_actions_topic_ms"]["lateness_ms"][k] for k in ("p50", "p99", "max")}
        h["timer_actions_fired_by_the_users_own_event"] = \
            lv["timer_lateness_from_actions_topic_ms"]["timer_actions_fired_by_the_users_own_event"]
    mem = out.get("memory")
    if mem:
        h["trigger_bytes_per_user_pending"] = mem["pending_timers"]["trigger_bytes_per_user"]
        nr = mem["never_return"]
        h["never_return_traced_bytes_per_user"] = nr["traced_sample"]["pending"]["traced_bytes_per_user"]
        h["never_return_rss_bytes_per_user"] = nr["rss_at_scale"]["pending"]["rss_bytes_per_user"]
        h["never_return_users"] = nr["rss_at_scale"]["users"]
        h["never_return_users_left_after_100_days"] = \
            nr["rss_at_scale"]["left_after_100_days"]["users_with_trigger_state"]
    return h


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_triggers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller figures everywhere (about 3 min); explicit flags still win")
    p.add_argument("--events", type=int, help="records in the replay topic (200000; quick 30000)")
    p.add_argument("--repeat", type=int,
                   help="on/off run pairs, alternated; medians reported (2; quick 1)")
    p.add_argument("--users", type=int, help="synthetic population (100000; quick 50000)")
    p.add_argument("--span-hours", type=float, default=4.0, help="event time of the replay")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--shards", type=int, default=16, help="flow.shards (ingest shards)")
    p.add_argument("--epoch-s", type=float, default=10.0)
    p.add_argument("--live-fraction", type=float, default=0.5,
                   help="live rate = this x the catalogue-on throughput of part 1")
    p.add_argument("--live-rate", type=float, help="live rate in events/s (instead)")
    p.add_argument("--live-seconds", type=float, help="measured live seconds (150; quick 45)")
    p.add_argument("--live-warmup-s", type=float, help="live warm-up, dropped (20; quick 5)")
    p.add_argument("--live-prime-s", type=float,
                   help="event time generated and dropped before the live records (60; quick 30)")
    p.add_argument("--live-lateness-s", type=float,
                   help="flow.allowed_lateness_s of the live run (60 = default; quick 10)")
    p.add_argument("--live-idle-timeout-s", type=float, default=10.0,
                   help="flow.idle_timeout_s of the live run (10)")
    p.add_argument("--live-min-timer-s", type=float, help="shortest live timer (10; quick 5)")
    p.add_argument("--live-max-timer-s", type=float, help="longest live timer (90; quick 20)")
    p.add_argument("--live-drain-s", type=float, default=3.0,
                   help="wait after the last live record before reading the figures")
    p.add_argument("--state-users", type=int,
                   help="memory (a): users with pending timers (10000; quick 5000)")
    p.add_argument("--forget-users", type=int,
                   help="memory (b): users who never come back (1000000; quick 50000)")
    p.add_argument("--forget-sample-users", type=int,
                   help="memory (b): of them, traced with tracemalloc (20000; quick 5000)")
    p.add_argument("--no-throughput", action="store_true", help="skip part 1 (needs --live-rate)")
    p.add_argument("--no-live", action="store_true", help="skip part 2")
    p.add_argument("--no-memory", action="store_true", help="skip part 3")
    a = p.parse_args(argv)
    defaults = {  # (full, quick)
        "events": (200_000, 30_000), "repeat": (2, 1), "users": (100_000, 50_000),
        "live_seconds": (150.0, 45.0), "live_warmup_s": (20.0, 5.0), "live_prime_s": (60.0, 30.0),
        "live_lateness_s": (60.0, 10.0), "live_min_timer_s": (10.0, 5.0),
        "live_max_timer_s": (90.0, 20.0), "state_users": (10_000, 5_000),
        "forget_users": (1_000_000, 50_000), "forget_sample_users": (20_000, 5_000),
    }
    for name, (full, quick) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    if a.no_throughput and not a.no_live and a.live_rate is None:
        p.error("--no-throughput needs --live-rate for the live part")
    if min(a.events, a.repeat, a.workers, a.partitions) < 1:
        p.error("--events, --repeat, --workers and --partitions must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("surgeflow.alerts").setLevel(logging.ERROR)
    started = time.monotonic()
    out: dict = {"quick": a.quick, "machine": machine_info(), "code": code_info(),
                 "targets": {}, "headline": {}}
    need_services = not a.no_throughput or not a.no_live
    bench = TriggerBench(a)
    try:
        if need_services:
            bench.start_services()
        if not a.no_throughput:
            out["throughput"] = bench.throughput()
        if not a.no_live:
            if a.live_rate is not None:
                rate, rate_from = a.live_rate, "--live-rate"
            else:
                rate = a.live_fraction * out["throughput"]["catalogue_on"]["events_per_s"]
                rate_from = f"{a.live_fraction} x catalogue_on.events_per_s"
            out["live"] = bench.live(rate, rate_from)
    finally:
        if need_services:
            log("stopping services")
            bench.stop_services()
    if not a.no_memory:
        out["memory"] = memory(a)
    out["targets"] = targets(out.get("live"))
    out["headline"] = headline(out)
    with contextlib.suppress(OSError):
        out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["seconds"] = round(time.monotonic() - started, 1)
    out["settings"] = {k: v for k, v in vars(a).items()}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS_DIR / f"triggers-{stamp}{'-quick' if a.quick else ''}.json").write_text(
        json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


run_bench.log = log  # the shared phases (services, topic, baseline) log with this prefix too

if __name__ == "__main__":
    sys.exit(main())
