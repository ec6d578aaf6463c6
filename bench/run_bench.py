"""End-to-end throughput and latency benchmark of the surgeflow dataflow on real services.

    .venv/bin/python -m bench.run_bench [--events 1000000] [--workers 1] [--partitions 1] [--profile]

Starts its own services (a single-node Kafka broker from tests/services.py, an embedded Redis
server and chDB, all in temporary directories), fills a topic with deterministic synthetic
events, then measures in one process:

1. produce      generate + produce N events into the topic (connectors.kafka.produce);
2. baseline     a Bytewax flow reading the topic with the same KafkaSource settings and doing
                nothing with the records: the ceiling the engine + consumer allow;
3. full         flows.runner.run on the same topic (decode, shards, Redis, ClickHouse, Kafka
                outputs), tail=False so it ends at the end of the topic;
4. baseline     again, to see drift (page cache, JIT of the broker, thermal...);
5. profile      (--profile) the full flow once more under pyinstrument or py-spy;
6. live         the full flow following a fresh topic (tail=True) while this process produces
                events stamped "now" at a fixed rate: arrival -> feature-in-Redis latency.

Prints ONE JSON object on stdout; progress goes to stderr. See bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
# Event time of the replayed stream: fixed, in the past (2026-11-20T00:00:00Z).
REPLAY_START_MS = 1_795_132_800_000

import bytewax.operators as op  # noqa: E402
import orjson  # noqa: E402
import redis  # noqa: E402
from bytewax.dataflow import Dataflow  # noqa: E402
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition  # noqa: E402
from bytewax.outputs import DynamicSink, StatelessSinkPartition  # noqa: E402
from bytewax.testing import cluster_main, run_main  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from config.settings import Settings, load_settings  # noqa: E402
from connectors import kafka  # noqa: E402
from connectors.embedded_redis import EmbeddedRedis  # noqa: E402
from connectors.synthetic import SyntheticSpec, expected_records, generate, rhythm  # noqa: E402
from flows import runner  # noqa: E402
from surgeflow.stats import STATS  # noqa: E402

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _load_test_services():
    """tests/services.py (not a package): KafkaBroker with its Maven jar cache."""
    path = PROJECT_ROOT / "tests" / "services.py"
    spec = importlib.util.spec_from_file_location("surgeflow_test_services", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    import bytewax

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average_at_start": load,
        "mem_total_gb": mem_gb,
        "python": platform.python_version(),
        "bytewax": getattr(bytewax, "__version__", None) or _dist_version("bytewax"),
    }


def code_info() -> dict:
    """The commit measured, and which tracked files differ from it (others edit concurrently)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "modified_files": [line[3:] for line in status if len(line) > 3]}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# helpers


def percentiles(name: str) -> dict:
    p50, p99 = STATS.percentile(name, 0.50), STATS.percentile(name, 0.99)
    return {
        "p50": round(p50, 1) if p50 is not None else None,
        "p99": round(p99, 1) if p99 is not None else None,
        "samples": len(STATS.samples.get(name, ())),
    }


def run_dataflow(flow: Dataflow, workers: int, epoch_s: float) -> float:
    """Runs a flow the way flows.runner.run does; returns wall seconds."""
    epoch = timedelta(seconds=epoch_s)
    started = time.monotonic()
    if workers == 1:
        run_main(flow, epoch_interval=epoch)
    else:
        cluster_main(flow, [], 0, epoch_interval=epoch, worker_count_per_proc=workers)
    return time.monotonic() - started


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    return kafka.end_offsets([bootstrap], topic)


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class GcTimer:
    """Time spent in Python's cyclic garbage collector, per generation (gc.callbacks)."""

    def __init__(self):
        self.started = 0.0
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            gen = info.get("generation", 0)
            self.seconds[gen] += time.perf_counter() - self.started
            self.collections[gen] += 1

    def __enter__(self) -> "GcTimer":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {"seconds": round(sum(self.seconds), 2),
                "seconds_by_generation": [round(x, 3) for x in self.seconds],
                "collections_by_generation": self.collections}


class ThreadCpu:
    """CPU seconds of this process's threads while a phase runs, grouped by what they do.

    Samples /proc/self/task every ``interval`` s (threads come and go: the insert threads end at
    close, chDB's pools grow); a Python thread is named by ``threading``, others by their kernel
    name (librdkafka's ``rdk:*``, chDB's pools, Bytewax's workers)."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.start_cpu: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> dict[int, float]:
        out = {}
        py = {t.native_id: t.name for t in threading.enumerate()}
        for task in Path("/proc/self/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            tid = int(task.name)
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[tid] = (int(fields[11]) + int(fields[12])) / self.tick
            self.names[tid] = py.get(tid, comm)
        return out

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.cpu.update(self._sample())

    def __enter__(self) -> "ThreadCpu":
        self.start_cpu = self._sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.cpu.update(self._sample())

    def summary(self) -> dict[str, float]:
        """CPU seconds per thread group, largest first (digits in names folded: pools)."""
        groups: dict[str, float] = defaultdict(float)
        for tid, cpu in self.cpu.items():
            name = "".join("#" if ch.isdigit() else ch for ch in self.names.get(tid, "?"))
            groups[name] += cpu - self.start_cpu.get(tid, 0.0)
        return {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v >= 0.01}


class _Timed:
    """Wraps an iterator and accumulates the time spent producing its items."""

    def __init__(self, it):
        self.it = it
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# baseline flow: read the topic and throw the records away


class _NullPartition(StatelessSinkPartition):
    def write_batch(self, items: list) -> None:
        pass


class NullSink(DynamicSink):
    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _NullPartition()


class _Count:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, batch: list) -> list:
        with self.lock:
            self.n += len(batch)
        return []


def run_baseline(bootstrap: str, topic: str, batch_size: int, workers: int, epoch_s: float) -> dict:
    counter = _Count()
    flow = Dataflow("bench_baseline")
    source = kafka.events_source([bootstrap], topic, tail=False, from_beginning=True,
                                 batch_size=batch_size)
    raw = op.input("events_in", flow, source)
    nothing = op.flat_map_batch("discard", raw, counter)
    op.output("null", nothing, NullSink())
    seconds = run_dataflow(flow, workers, epoch_s)
    return {"events": counter.n, "seconds": round(seconds, 3),
            "events_per_s": round(counter.n / seconds, 1) if seconds else None}


# ------------------------------------------------------------------------------------------------
# a Kafka source that follows the topic (tail=True) and ends once told up to which offsets


class StopAt:
    """Shared by the live source's partitions: set once the producer is done."""

    def __init__(self):
        self.targets: dict[int, int] | None = None
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def set(self, targets: dict[int, int]) -> None:
        with self.lock:
            self.targets = dict(targets)

    def reached(self, partition: int, next_offset: int) -> bool:
        with self.lock:
            return self.targets is not None and next_offset >= self.targets.get(partition, 0)


class _StoppablePartition(StatefulSourcePartition):
    def __init__(self, inner, partition: int, stop: StopAt):
        self.inner, self.partition, self.stop = inner, partition, stop
        self.next_offset = 0  # fresh topic read from the beginning

    def next_batch(self) -> list:
        self.stop.ready.set()
        if self.stop.reached(self.partition, self.next_offset):
            raise StopIteration()
        batch = self.inner.next_batch()
        if batch:
            last = batch[-1]
            msg = getattr(last, "msg", last)  # KafkaError wraps the message
            offset = getattr(msg, "offset", None)
            if isinstance(offset, int) and offset >= 0:  # errors may carry no real offset
                self.next_offset = max(self.next_offset, offset + 1)
        return batch

    def next_awake(self):
        return self.inner.next_awake()

    def snapshot(self):
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


class StoppableKafkaSource(FixedPartitionedSource):
    """The project's KafkaSource (tail=True), unchanged, plus a clean end: each partition raises
    StopIteration once it has read up to the offset given to ``stop.set``. The flow then drains
    and ends normally (shards' on_eof, sinks closed), and this process keeps STATS."""

    def __init__(self, inner, stop: StopAt):
        self.inner, self.stop = inner, stop

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state):
        partition = int(for_part.split("-", 1)[0])
        return _StoppablePartition(self.inner.build_part(step_id, for_part, resume_state),
                                   partition, self.stop)


# ------------------------------------------------------------------------------------------------
# profile analysis: stacks of (function, file, line) with a weight in seconds


CATEGORIES = [  # (category, file suffix, function names or None for any); outermost match wins
    ("setup/teardown (schema, topics, clients, sink build/close)", "flows/runner.py",
     {"make_outputs", "make_source", "build_flow"}),
    ("setup/teardown (schema, topics, clients, sink build/close)", "flows/pipeline.py", {"build_flow"}),
    ("setup/teardown (schema, topics, clients, sink build/close)", "connectors/clickhouse.py",
     {"ensure_schema", "connect", "build", "__init__"}),
    ("setup/teardown (schema, topics, clients, sink build/close)", "connectors/kafka.py",
     {"check_brokers", "ensure_topics", "partition_count", "build", "__init__", "close",
      "events_source"}),
    ("setup/teardown (schema, topics, clients, sink build/close)", "connectors/redis_features.py",
     {"build", "__init__", "close"}),
    ("kafka source (consume + message objects)", "connectors/kafka/__init__.py", None),
    ("decode_and_route (orjson decode, validation, routing)", "flows/pipeline.py", {"__call__"}),
    ("user_shards: ShardLogic.on_batch (dedupe, features, sessions, model, minutes)",
     "flows/shard.py", {"on_batch"}),
    ("user_shards: on_eof (final flush of every user)", "flows/shard.py", {"on_eof"}),
    ("state snapshots (pickle at each epoch)", "flows/shard.py", {"snapshot"}),
    ("state snapshots (pickle at each epoch)", "flows/pipeline.py", {"snapshot"}),
    ("detect_anomalies (AlertLogic.on_batch)", "flows/pipeline.py", {"on_batch"}),
    ("redis feature sink", "connectors/redis_features.py", {"write_batch"}),
    ("clickhouse sinks (chDB insert)", "connectors/clickhouse.py",
     {"write_batch", "_flush", "_flush_when_old", "close"}),  # buffered: may flush in a timer thread
    ("kafka sinks (produce + flush per batch)", "connectors/kafka.py", {"write_batch"}),
    ("json-lines sinks", "connectors/files.py", {"write_batch"}),
    ("pipeline maps/filters/branch lambdas", "flows/pipeline.py", None),
    ("stats counters", "surgeflow/stats.py", None),
]
ENGINE = "bytewax engine (Rust: scheduling, exchange, clock; GIL hand-offs)"
ENGINE_FUNCS = {"run_main", "cluster_main", "run_dataflow"}


def _category(stack: tuple) -> str:
    for func, path, _line in stack:
        base = func.rsplit(".", 1)[-1]  # py-spy qualifies names: "ShardLogic.on_batch"
        for name, suffix, want in CATEGORIES:
            if path.endswith(suffix) and (want is None or base in want):
                return name
    if stack:
        func, path, _ = stack[-1]  # time spent in run_main itself (native code) shows here
        func = func.rsplit(".", 1)[-1]
        if func in ENGINE_FUNCS or (func == "run" and path.endswith("flows/runner.py")):
            return ENGINE
    return "other"


def _short(path: str) -> str:
    for marker in ("site-packages/", str(PROJECT_ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _in_run(stack: tuple) -> bool:
    return any(f.rsplit(".", 1)[-1] == "run" and p.endswith("flows/runner.py") for f, p, _ in stack)


def _flow_time(stack: tuple, workers: int) -> bool:
    """Samples that are the flow's work: under flows.runner.run in the main thread (one worker:
    run_main runs the worker there), or in any other thread (cluster_main's worker threads, whose
    Python stacks start at the step callback). With several workers the main thread only waits
    in cluster_main: those samples are dropped."""
    if stack and stack[-1][0].rsplit(".", 1)[-1] == "wait" and stack[-1][1].endswith("threading.py"):
        return False  # a helper thread sleeping (e.g. a sink's flush timer): idle, not work
    if _in_run(stack):
        leaf, path, _ = stack[-1]
        return workers == 1 or not (leaf.rsplit(".", 1)[-1] == "run" and path.endswith("flows/runner.py"))
    return not any(p.endswith("bench/run_bench.py") or p.startswith("<frozen runpy") for _, p, _ in stack)


def analyse_stacks(stacks: list[tuple[tuple, float]], workers: int = 1, top: int = 25) -> dict:
    """Time of the flow only (see _flow_time), by step (outermost matching frame), by function.
    With several workers the sum is thread time (up to workers x wall time)."""
    stacks = [(s, w) for s, w in stacks if _flow_time(s, workers)]
    total = sum(w for _, w in stacks) or 1e-9
    by_cat: dict[str, float] = defaultdict(float)
    self_time: dict[tuple, float] = defaultdict(float)
    incl: dict[tuple, float] = defaultdict(float)
    for stack, w in stacks:
        by_cat[_category(stack)] += w
        if stack:
            func, path, _ = stack[-1]
            self_time[(func, _short(path))] += w
        for key in {(func, _short(path)) for func, path, _ in stack}:
            incl[key] += w

    def rows(d):
        return [{"function": f, "file": p, "seconds": round(s, 3), "share": round(s / total, 4)}
                for (f, p), s in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    project = {k: v for k, v in incl.items()
               if not k[1].startswith(("bytewax/", "confluent_kafka/", "redis/", "clickhouse_connect/",
                                       "chdb/", "pyinstrument/", "orjson", "<"))
               and k[0] not in ENGINE_FUNCS and "bench/" not in k[1]}
    return {
        "profiled_seconds": round(total, 2),
        "by_category": {k: {"seconds": round(v, 3), "share": round(v / total, 4)}
                        for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_self": rows(self_time),
        "top_inclusive_project": rows(project),
    }


def pyinstrument_stacks(session) -> list[tuple[tuple, float]]:
    root = session.root_frame(trim_stem=False)
    out: list[tuple[tuple, float]] = []

    def walk(frame, path):
        key = (frame.function or "?", frame.file_path or "?", frame.line_no or 0)
        here = path if frame.is_synthetic else path + (key,)
        child_time = 0.0
        for child in frame.children:
            child_time += child.time
            walk(child, here)
        own = frame.time - child_time
        if own > 0:
            out.append((here, own))

    if root is not None:
        walk(root, ())
    return out


def pyspy_stacks(raw_file: Path, rate: int) -> list[tuple[tuple, float]]:
    out = []
    for line in raw_file.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        frames = []
        for part in stack_text.split(";"):
            if part.startswith("process ") or part.startswith("thread "):
                continue
            func, _, where = part.partition(" (")
            where = where.rstrip(")")
            path, _, lineno = where.rpartition(":")
            frames.append((func, path or where, int(lineno) if lineno.isdigit() else 0))
        out.append((tuple(frames), int(count) / rate))
    return out


def print_profile(summary: dict) -> None:
    log(f"profile: {summary['profiled_seconds']} s sampled; time by step:")
    for name, v in summary["by_category"].items():
        print(f"    {v['share'] * 100:5.1f}%  {v['seconds']:8.2f}s  {name}", file=sys.stderr)
    print("  top functions by self time:", file=sys.stderr)
    for r in summary["top_self"][:20]:
        print(f"    {r['share'] * 100:5.1f}%  {r['seconds']:8.2f}s  {r['function']}  ({r['file']})",
              file=sys.stderr)
    print("  top project functions by inclusive time:", file=sys.stderr)
    for r in summary["top_inclusive_project"][:20]:
        print(f"    {r['share'] * 100:5.1f}%  {r['seconds']:8.2f}s  {r['function']}  ({r['file']})",
              file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the benchmark


def live_producer(conn, bootstrap: str, topic: str, spec: SyntheticSpec, origin: int) -> None:
    """The live phase's producer, in its own process: generates the records, reports their
    count, waits for (t0, end of warm-up) and produces them paced to the wall clock, stamped
    "now"; sends back how many were sent in the warm-up and in the measured part."""
    records: list = []
    for r in generate(spec):
        if records or r.ts_ms >= origin:
            records.append(r)
    conn.send(len(records))
    t0, warm_end_ms = conn.recv()
    shift = t0 - origin
    counts = {"warmup": 0, "measured": 0}
    marks = {"start": time.time(), "measure_start": None}

    def paced():
        latest = t0
        for r in records:
            ts = r.ts_ms + shift
            if ts > latest:
                latest = ts
            ahead = latest - time.time() * 1000
            if ahead > 1:
                time.sleep(ahead / 1000)
            if latest >= warm_end_ms:
                if marks["measure_start"] is None:
                    marks["measure_start"] = time.time()
                counts["measured"] += 1
            else:
                counts["warmup"] += 1
            yield r.key, restamp(r, shift)

    kafka.produce([bootstrap], topic, paced())
    conn.send({**counts, "measured_s": time.time() - (marks["measure_start"] or marks["start"])})


def restamp(record, shift_ms: int) -> bytes:
    """The record's bytes with its event time moved by ``shift_ms`` (same format: epoch ms or
    ISO-8601 UTC). Malformed records are sent unchanged; equal inputs give equal outputs, so a
    duplicate stays byte-identical to its original."""
    if not shift_ms or record.kind not in ("ok", "duplicate"):
        return record.value
    doc = orjson.loads(record.value)
    ts = doc.get("timestamp")
    if isinstance(ts, int) and not isinstance(ts, bool):
        doc["timestamp"] = ts + shift_ms
    elif isinstance(ts, str):
        when = datetime.fromisoformat(ts.replace("Z", "+00:00")) + timedelta(milliseconds=shift_ms)
        doc["timestamp"] = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + \
            f"{when.microsecond // 1000:03d}Z"
    else:
        return record.value
    return orjson.dumps(doc)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="surgeflow-bench-"))
        self.broker = None
        self.redis_server: EmbeddedRedis | None = None
        self.redis_url = ""
        self.dsn = f"chdb://{self.tmp}/chdb"

    # -- services --------------------------------------------------------------------------
    def start_services(self) -> None:
        services = _load_test_services()
        log("starting Kafka broker (tests/services.py KafkaBroker)")
        self.broker = services.KafkaBroker().start()
        log(f"Kafka on {self.broker.bootstrap}; starting embedded Redis")
        self.redis_server = EmbeddedRedis(self.tmp / "redis")
        self.redis_url = self.redis_server.start()
        log(f"Redis on {self.redis_url}; chDB at {self.dsn}")
        # Output topics made here: connectors.kafka.ensure_topics drops its AdminClient before
        # the create futures resolve (KafkaError _DESTROY), so it must find them existing.
        k = load_settings(None, env={}).kafka
        for name in (k.actions_topic, k.alerts_topic, k.dead_letter_topic):
            self.broker.create_topic(name)
        # The sinks' idempotent producers need the broker's transaction coordinator: load it
        # now, not during the first measured run.
        warm = self.broker.create_topic(f"bench-warmup-{uuid.uuid4().hex[:8]}")
        producer = Producer({"bootstrap.servers": self.broker.bootstrap, "enable.idempotence": "true"})
        producer.produce(warm, b"warm-up")
        if producer.flush(60):
            raise RuntimeError("warm-up message not delivered")

    def stop_services(self) -> None:
        if self.redis_server is not None:
            with contextlib.suppress(Exception):
                self.redis_server.stop()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- settings --------------------------------------------------------------------------
    def settings(self, topic: str, *, tail: bool, database: str, **overrides) -> Settings:
        a = self.args
        return load_settings(
            None, env={},
            source__kind="kafka",
            kafka__brokers=[self.broker.bootstrap], kafka__events_topic=topic, kafka__tail=tail,
            kafka__starting_offset="beginning", kafka__batch_size=a.batch_size,
            output__kind="kafka",
            redis__url=self.redis_url,
            clickhouse__dsn=self.dsn, clickhouse__database=database,
            flow__max_clock_skew_s=None, flow__max_lookback_s=None, flow__recovery_dir=None, flow__workers=a.workers, flow__shards=a.shards,
            flow__epoch_interval_s=a.epoch_s, **overrides,
        )

    def feature_only(self, topic: str) -> dict:
        """The flow with features and Redis only, against the hand-written loop: no trigger
        rules, no alert rules, no raw events. The engine has no switch for the rest: sessions,
        the propensity model and the minute aggregates (one chDB insert per minute) stay on."""
        empty = self.tmp / "no_alert_rules.yaml"
        empty.write_text("rules: []\n")
        return self.full(topic, "bench_features", label="feature-only", trigger__rules=None,
                         clickhouse__raw_events=False, alerts__rules=str(empty))

    # -- phases ----------------------------------------------------------------------------
    def fill_topic(self) -> tuple[str, dict]:
        a = self.args
        topic = self.broker.create_topic(f"bench-events-{uuid.uuid4().hex[:8]}", partitions=a.partitions)
        span_s = a.span_hours * 3600.0
        unit = expected_records(SyntheticSpec(start_ms=REPLAY_START_MS, events_per_s=1.0, duration_s=span_s))
        spec = SyntheticSpec(
            seed=a.seed, users=a.users, start_ms=REPLAY_START_MS, events_per_s=a.events / unit,
            duration_s=None, malformed_share=0.001, duplicate_share=0.001, max_disorder_ms=2000)
        log(f"producing {a.events:,} events into {topic} ({a.partitions} partition(s)); "
            f"events_per_s={spec.events_per_s:.1f} event-time, ~{a.span_hours:g} h, {a.users:,} users")
        records = _Timed((r.key, r.value) for r in itertools.islice(generate(spec), a.events))
        step = max(10_000, a.events // 10 // 10_000 * 10_000)

        def progress(n: int) -> None:
            if n % step == 0:
                log(f"  produced {n:,}")

        started = time.monotonic()
        sent = kafka.produce([self.broker.bootstrap], topic, records, progress=progress)
        seconds = time.monotonic() - started
        ends = end_offsets(self.broker.bootstrap, topic)
        in_topic = sum(ends.values())
        log(f"produced {sent:,} in {seconds:.1f}s ({sent / seconds:,.0f}/s; generator "
            f"{records.seconds:.1f}s of it); topic holds {in_topic:,}")
        if in_topic != a.events:
            raise RuntimeError(f"topic holds {in_topic} records, expected {a.events}")
        return topic, {
            "events_per_s": round(sent / seconds, 1),
            "seconds": round(seconds, 2),
            "generator_seconds": round(records.seconds, 2),
            "produce_only_events_per_s": round(sent / max(seconds - records.seconds, 1e-9), 1),
            "event_time_span_h": a.span_hours,
            "spec_events_per_s": round(spec.events_per_s, 2),
        }

    def baseline(self, topic: str, label: str) -> dict:
        a = self.args
        log(f"{label}: Bytewax KafkaSource -> discard, {a.workers} worker(s)")
        res = run_baseline(self.broker.bootstrap, topic, a.batch_size, a.workers, a.epoch_s)
        log(f"{label}: {res['events']:,} events in {res['seconds']:.2f}s = {res['events_per_s']:,.0f}/s")
        if res["events"] != a.events:
            raise RuntimeError(f"{label} read {res['events']} records, expected {a.events}")
        return res

    def full(self, topic: str, database: str, label: str = "full", **overrides) -> dict:
        a = self.args
        settings = self.settings(topic, tail=False, database=database, **overrides)
        flush_redis(self.redis_url)
        STATS.reset()
        STATS.max_samples = max(STATS.max_samples, 2 * a.events + 10_000)  # keep every sample
        log(f"{label}: flows.runner.run (Kafka -> shards -> Redis/ClickHouse/Kafka), "
            f"{a.workers} worker(s), {a.shards} shards")
        started, cpu = time.monotonic(), time.process_time()
        with GcTimer() as gc_time, ThreadCpu() as threads:
            result = runner.run(settings, self.redis_url, a.workers)
        cpu = time.process_time() - cpu  # this process runs the flow (Redis, Kafka are apart)
        total = time.monotonic() - started
        n = STATS.get("events_in")
        log(f"{label}: {n:,} events in {result.seconds:.2f}s = {n / result.seconds:,.0f}/s "
            f"(setup {total - result.seconds:.2f}s; Python GC {sum(gc_time.seconds):.1f}s)")
        if n != a.events:
            raise RuntimeError(f"{label} flow read {n} records, expected {a.events}")
        return {
            "events": n,
            "seconds": round(result.seconds, 3),
            "setup_seconds": round(total - result.seconds, 3),
            "events_per_s": round(n / result.seconds, 1),
            "cpu_s": round(cpu, 3),  # set-up included (schema, registry): a little over the run's
            "cpu_us_per_event": round(cpu / n * 1e6, 1),
            "feature_latency_ms": percentiles("feature_latency_ms"),
            "action_latency_ms": percentiles("action_latency_ms"),
            "python_gc": gc_time.summary(),
            "cpu_s_by_thread": threads.summary(),
            "counts": self.counts(settings),
        }

    def hand_written(self, topic: str) -> dict:
        """bench/baseline_loop.py on the same topic: what a user would write instead (a subset of
        the features, none of the outputs beyond Redis)."""
        from bench.baseline_loop import run_baseline as run_loop

        log("hand-written loop: confluent-kafka + orjson + redis-py pipeline")
        res = run_loop(self.broker.bootstrap, topic, self.redis_url,
                       batch_size=self.args.batch_size, prefix=f"baseline-{uuid.uuid4().hex[:6]}")
        log(f"hand-written loop: {res['events']:,} events in {res['seconds']:.2f}s = "
            f"{res['events_per_s']:,.0f}/s, {res['cpu_us_per_event']} us CPU/event")
        return res

    def counts(self, settings: Settings) -> dict:
        names = ["events_in", "events_dead_lettered", "duplicates", "late_events", "events_unique",
                 "feature_writes", "actions_emitted", "alerts_fired", "rows_events_minute_in",
                 "rows_actions", "rows_alerts"]
        out = {k: STATS.get(k) for k in names}
        out["users_seen"] = len(STATS.users)
        with contextlib.suppress(Exception):
            out["redis_user_hashes"] = runner.count_feature_users(self.redis_url, settings.redis.key_prefix)
        with contextlib.suppress(Exception):
            out["clickhouse_minute_rows"] = runner.count_aggregate_rows(settings)
        return out

    def profile(self, topic: str) -> dict:
        a = self.args
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = RESULTS_DIR / f"profile-{stamp}-{a.events}ev-{a.workers}w"
        profiler_name = a.profiler
        files: list[str] = []
        stacks = None
        if profiler_name == "py-spy":
            raw = base.with_suffix(".pyspy.txt")
            rate = 100  # py-spy falls behind (lost samples, more overhead) at higher rates here
            # --idle: with one worker, time blocked in socket reads / flushes is wall time too
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()),
                 "--rate", str(rate), "--format", "raw", "--output", str(raw), "--nonblocking",
                 "--idle"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.5)  # let py-spy attach
            if spy.poll() is not None:
                err = spy.stderr.read().decode(errors="replace")[-1000:]
                log(f"py-spy could not attach (exit {spy.returncode}): {err.strip()}; "
                    "falling back to pyinstrument")
                profiler_name = "pyinstrument"
            else:
                try:
                    res = self.full(topic, "bench_profile", label="profile (py-spy)")
                finally:
                    spy.send_signal(signal.SIGINT)
                    try:
                        _, err = spy.communicate(timeout=120)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                        _, err = spy.communicate()
                if not raw.exists():
                    raise RuntimeError("py-spy wrote no profile: "
                                       + err.decode(errors="replace")[-2000:])
                files.append(str(raw))
                stacks = pyspy_stacks(raw, rate)
        if profiler_name == "pyinstrument":
            from pyinstrument import Profiler

            if a.workers > 1:
                log("note: pyinstrument sees only the calling thread, not Bytewax's worker threads")
            profiler = Profiler(interval=0.001)
            profiler.start()
            try:
                res = self.full(topic, "bench_profile", label="profile (pyinstrument)")
            finally:
                profiler.stop()
            session = profiler.last_session
            (base.with_suffix(".txt")).write_text(profiler.output_text(unicode=True, show_all=False))
            (base.with_suffix(".html")).write_text(profiler.output_html())
            files += [str(base.with_suffix(".txt")), str(base.with_suffix(".html"))]
            stacks = pyinstrument_stacks(session)
        summary = analyse_stacks(stacks, a.workers)
        summary_file = base.with_suffix(".summary.json")
        summary_file.write_text(json.dumps({"run": res, **summary}, indent=2))
        files.append(str(summary_file))
        print_profile(summary)
        log(f"profile files: {', '.join(files)}")
        return {"profiler": profiler_name, "events_per_s_under_profiler": res["events_per_s"],
                "files": files, "by_category": summary["by_category"],
                "top_self": summary["top_self"][:12]}

    def live_spec(self) -> tuple[SyntheticSpec, int]:
        """The live phase's synthetic stream and the event-time origin of its measured part. A
        synthetic stream needs a few minutes of event time to reach its steady rate (sessions
        last minutes), so it starts ``live_prime_s`` earlier and only the records after that
        are kept; timestamps are moved to the wall clock when produced (see ``restamp``)."""
        a = self.args
        origin = int(time.time() * 1000)
        spec = SyntheticSpec(
            seed=a.seed + 1, users=a.users, start_ms=origin - int(a.live_prime_s * 1000),
            events_per_s=a.live_rate / rhythm(origin),  # ~live_rate records/s at this hour
            duration_s=a.live_prime_s + a.live_warmup_s + a.live_seconds, malformed_share=0.001,
            duplicate_share=0.001, max_disorder_ms=2000)
        return spec, origin

    def live(self) -> dict:
        """Full flow following a fresh topic while events stamped "now" are produced at a rate.

        The producer is another process, as in production: in this one it would share the GIL
        with the flow and lower the rate the flow can follow."""
        a = self.args
        spec, origin = self.live_spec()
        topic = self.broker.create_topic(f"bench-live-{uuid.uuid4().hex[:8]}", partitions=a.partitions)
        settings = self.settings(topic, tail=True, database="bench_live")
        ctx = multiprocessing.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        producer = ctx.Process(target=live_producer, name="live-producer", daemon=True,
                               args=(child_conn, self.broker.bootstrap, topic, spec, origin))
        producer.start()
        started = time.monotonic()
        if not conn.poll(600):
            raise RuntimeError("live producer did not generate its records within 600 s")
        log(f"live: producer generated {conn.recv():,} records for "
            f"{a.live_warmup_s + a.live_seconds:g} s (+{a.live_prime_s:g} s priming) in "
            f"{time.monotonic() - started:.1f}s")
        stop = StopAt()
        source = StoppableKafkaSource(
            kafka.events_source([self.broker.bootstrap], topic, tail=True, from_beginning=True,
                                batch_size=a.batch_size), stop)
        STATS.reset()
        outcome: dict = {}

        def target():
            try:
                outcome["result"] = runner.run(settings, self.redis_url, a.workers, source=source,
                                               partitions=a.partitions)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc

        log(f"live: flow (tail=True) on {topic}; producing ~{a.live_rate:g}/s for "
            f"{a.live_warmup_s:g}+{a.live_seconds:g} s of events stamped now")
        thread = threading.Thread(target=target, name="live-flow", daemon=True)
        thread.start()
        if not stop.ready.wait(60):
            raise RuntimeError(f"live flow did not start: {outcome.get('error')!r}")
        time.sleep(1.0)  # consumer assigned and polling

        t0 = int(time.time() * 1000) + 300
        warm_end_ms = t0 + int(a.live_warmup_s * 1000)
        conn.send((t0, warm_end_ms))
        time.sleep(max(0.0, warm_end_ms / 1000 - time.time()))
        STATS.reset()  # latency samples of the warm-up are dropped
        if not conn.poll(a.live_seconds + 600):
            raise RuntimeError("live producer did not finish")
        counts = conn.recv()
        producer.join(timeout=30)
        produced_s = counts.pop("measured_s")
        ends = end_offsets(self.broker.bootstrap, topic)
        stop.set(ends)
        log(f"live: produced {sum(counts.values()):,} ({counts['measured']:,} measured in "
            f"{produced_s:.1f}s = {counts['measured'] / produced_s:,.0f}/s); waiting for the flow "
            f"to reach offsets {ends}")
        thread.join(timeout=300)
        if thread.is_alive():
            raise RuntimeError("live flow did not stop within 300 s of the last event")
        if "error" in outcome:
            raise RuntimeError(f"live flow failed: {outcome['error']!r}") from outcome["error"]
        res = {
            "topic_events": sum(ends.values()),
            "measured_events": counts["measured"],
            "measured_events_per_s": round(counts["measured"] / produced_s, 1),
            "feature_latency_ms": percentiles("feature_latency_ms"),
            "action_latency_ms": percentiles("action_latency_ms"),
            "events_in_after_warmup": STATS.get("events_in"),
            "late_events": STATS.get("late_events"),
            "actions_emitted": STATS.get("actions_emitted"),
        }
        log(f"live: feature latency {res['feature_latency_ms']}, action latency "
            f"{res['action_latency_ms']}")
        return res

    # -- all -------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        out: dict = {"events": a.events, "workers": a.workers, "partitions": a.partitions,
                     "machine": machine_info(), "code": code_info()}
        self.start_services()
        topic, produced = self.fill_topic()
        out["produce_events_per_s"] = produced["events_per_s"]
        base1 = self.baseline(topic, "baseline")
        runs = [self.full(topic, "bench", label=f"full {i + 1}/{a.repeat}" if a.repeat > 1 else "full")
                for i in range(a.repeat)]
        full = sorted(runs, key=lambda r: r["events_per_s"])[len(runs) // 2]  # the median run
        out["baseline_events_per_s"] = base1["events_per_s"]
        out["full_events_per_s"] = full["events_per_s"]
        out["ratio_full_to_baseline"] = round(full["events_per_s"] / base1["events_per_s"], 4)
        out["full_cpu_us_per_event"] = full["cpu_us_per_event"]
        loop = self.hand_written(topic)
        out["hand_written_loop"] = loop
        out["ratio_full_to_hand_written_loop"] = round(
            full["events_per_s"] / loop["events_per_s"], 4)
        out["replay_feature_latency_ms"] = {k: full["feature_latency_ms"][k] for k in ("p50", "p99")}
        if not a.no_feature_only:
            features = self.feature_only(topic)
            out["feature_only_events_per_s"] = features["events_per_s"]
            out["feature_only_cpu_us_per_event"] = features["cpu_us_per_event"]
            out["ratio_feature_only_to_hand_written_loop"] = round(
                features["events_per_s"] / loop["events_per_s"], 4)
            out["details"] = {"feature_only": features}
        if not a.no_baseline_after:
            base2 = self.baseline(topic, "baseline (after)")
            out["baseline_after_events_per_s"] = base2["events_per_s"]
        if a.profile:
            out["profile"] = self.profile(topic)
        if not a.no_live:
            live = self.live()
            out["live_feature_latency_ms"] = {k: live["feature_latency_ms"][k] for k in ("p50", "p99")}
            out["live_action_latency_ms"] = {k: live["action_latency_ms"][k] for k in ("p50", "p99")}
            out["live"] = live
        with contextlib.suppress(OSError):
            out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out["details"] = out.get("details", {}) | {"produce": produced, "baseline": base1, "full": full,
                          "full_runs_events_per_s": [r["events_per_s"] for r in runs],
                          "settings": {"batch_size": a.batch_size, "shards": a.shards,
                                       "epoch_interval_s": a.epoch_s, "users": a.users,
                                       "seed": a.seed, "gc_threshold": list(gc.get_threshold())}}
        if not a.no_baseline_after:
            out["details"]["baseline_after"] = base2
        return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000, help="records in the replay topic")
    p.add_argument("--workers", type=int, default=1, help="Bytewax worker threads")
    p.add_argument("--partitions", type=int, default=1, help="partitions of the events topics")
    p.add_argument("--users", type=int, default=100_000, help="synthetic user population")
    p.add_argument("--span-hours", type=float, default=4.0, help="event-time span of the N events")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=1000, help="KafkaSource batch size (both flows)")
    p.add_argument("--shards", type=int, default=16, help="flow.shards")
    p.add_argument("--epoch-s", type=float, default=10.0, help="flow.epoch_interval_s")
    p.add_argument("--repeat", type=int, default=1,
                   help="full runs on the replay topic; the median one is reported")
    p.add_argument("--profile", action="store_true", help="profile one more full run")
    p.add_argument("--profiler", choices=("py-spy", "pyinstrument"), default="py-spy",
                   help="py-spy: sampling from outside, ~5-10%% overhead, sees all worker threads "
                        "(default); pyinstrument: in-process, 2-3x slower run, calling thread only")
    p.add_argument("--no-live", action="store_true", help="skip the live latency phase")
    p.add_argument("--no-feature-only", action="store_true",
                   help="skip the feature-only flow (features and Redis only)")
    p.add_argument("--no-baseline-after", action="store_true", help="skip the second baseline")
    p.add_argument("--live-rate", type=float, default=2000.0, help="live phase records/s")
    p.add_argument("--live-seconds", type=float, default=20.0, help="live phase measured seconds")
    p.add_argument("--live-warmup-s", type=float, default=2.0, help="live phase warm-up seconds")
    p.add_argument("--live-prime-s", type=float, default=180.0,
                   help="event time generated (and dropped) before the live records, so the "
                        "synthetic stream is at its steady rate")
    p.add_argument("--show-alerts", action="store_true", help="let the flow log its alerts")
    p.add_argument("--gc-threshold", type=int, default=None, metavar="N",
                   help="experiment: gc.set_threshold(N, 10, 10) for the whole benchmark "
                        "(Python's default is 700); reported in details.settings")
    args = p.parse_args(argv)
    if min(args.events, args.workers, args.partitions, args.repeat) < 1:
        p.error("--events, --workers, --partitions and --repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.show_alerts:
        logging.getLogger("surgeflow.alerts").setLevel(logging.ERROR)
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, 10, 10)
    bench = Bench(args)
    try:
        result = bench.run()
    finally:
        log("stopping services")
        bench.stop_services()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS_DIR / f"bench-{stamp}-{args.events}ev-{args.workers}w.json").write_text(
        json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
