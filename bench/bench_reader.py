"""Latency of the feature reader and of the feature HTTP API on loopback.

Starts its own redis-server (connectors.embedded_redis, in a temporary directory), writes
``--users`` hashes shaped like the flow's (about 40 fields of realistic values), then measures:

- ``FeatureReader.get`` and ``get_many(100)`` one call after another (p50 / p99 / p99.9);
- ``GET /features/{id}`` on ``surgeflow serve-features`` (its own process, uvicorn) under an
  open-loop load: requests are scheduled at ``--rate`` per second for ``--seconds`` whatever the
  answers do, and latency runs from the *scheduled* send time (no coordinated omission); the
  client is raw asyncio sockets on keep-alive connections, so it adds little of its own;
- ``POST /features`` with 100 ids, open loop at ``--post-rate`` per second.

    .venv/bin/python bench/bench_reader.py                    # defaults: 100,000 users, 1000 req/s, 20 s
    .venv/bin/python bench/bench_reader.py --users 20000 --seconds 5

Targets: get p99 < 1 ms, get_many(100) p99 < 5 ms, HTTP GET p99 < 5 ms at 1,000 req/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from hiredis import pack_command  # noqa: E402

from config.registry import load_registry  # noqa: E402
from connectors.embedded_redis import EmbeddedRedis  # noqa: E402
from features.layout import alias_key, registry_key, user_key  # noqa: E402
from features.reader import FeatureReader  # noqa: E402

PREFIX = "bench"
LABELS = {"rfm_r": ["high", "low"], "rfm_f": ["high", "low"], "rfm_m": ["high", "low"],
          "rfm_tier": ["important-value", "general-develop", "general-winback", "important-retain"],
          "lifecycle": ["new", "growth", "mature", "decline", "churned"],
          "activity": ["silent", "active", "highly_active"]}


def fake_hash(rng: random.Random, registry, now_ms: int, density: float = 1.0) -> dict[str, str]:
    """About 40 fields at density 1: 80 % of the non-sparse features, 40 % of the counts and sums
    (others are 0). Density 0.55 gives the ~24 fields per hash that the flow wrote for the
    synthetic users of bench/bench_memory.py."""
    out = {}
    for f in registry.features:
        if rng.random() > (0.4 if f.sparse else 0.8) * density:
            continue
        t = f.type
        if t == "int":
            v = str(rng.randint(1, 60) if f.sparse else rng.randint(0, 400))
        elif t == "money":
            v = f"{rng.uniform(5, 2500):.2f}"
        elif t == "ratio":
            v = f"{rng.random():.4f}"
        elif t == "time_ms":
            v = str(now_ms - rng.randint(0, 30 * 86_400_000))
        elif t == "label":
            v = rng.choice(list(f.labels) or LABELS.get(f.name, ["x"]))
        elif t == "text":
            v = f"s-{rng.getrandbits(48):012x}" if f.name == "session_id" else f"spring-sale-{rng.randint(1, 6)}"
        elif t == "flag":
            v = rng.choice("01")
        else:
            v = f"{rng.random():.6f}"
        out[f.name] = v
    out["as_of"] = str(now_ms - 30_000)
    out["updated_at"] = str(now_ms)
    return out


def populate(client: redis.Redis, users: int, seed: int, density: float = 1.0) -> float:
    """HSET every user in pipelined batches of 1000 (raw packed commands); mean fields per hash."""
    rng = random.Random(seed)
    registry = load_registry()
    now_ms = int(time.time() * 1000) + 3_600_000  # "fresh" for the whole run
    fields = 0
    conn = client.connection_pool.get_connection()
    try:
        for start in range(0, users, 1000):
            batch = []
            for i in range(start, min(start + 1000, users)):
                h = fake_hash(rng, registry, now_ms, density)
                fields += len(h)
                batch.append(pack_command(("HSET", user_key(PREFIX, f"u{i:06d}"),
                                           *[x for kv in h.items() for x in kv])))
            conn.send_packed_command([b"".join(batch)])
            for _ in batch:
                conn.read_response()
    finally:
        client.connection_pool.release(conn)
    for i in range(100):  # a few merged anonymous profiles
        client.set(alias_key(PREFIX, f"anon-{i}"), f"u{i:06d}")
    client.set(registry_key(PREFIX), json.dumps(registry.to_dict()))
    return fields / users


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        return int(stat[11]) + int(stat[12])
    except (OSError, IndexError):
        return 0


class OtherLoad:
    """CPU used by processes other than this benchmark's (this one, redis-server, the API) while
    a phase runs, in cores: the machine is shared (2 vCPUs), so figures need this context."""

    def __init__(self, *pids: int):
        self.pids = (os.getpid(), *pids)

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _ours(self) -> int:
        return sum(map(cpu_ticks, self.pids))

    def __enter__(self):
        self.t, self.busy, self.ours = time.monotonic(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc):
        ticks = os.sysconf("SC_CLK_TCK") * (time.monotonic() - self.t)
        self.cores = round(max(0, (self._busy() - self.busy) - (self._ours() - self.ours)) / ticks, 2)


def pct(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    at = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"n": len(s), "p50_ms": round(at(0.5), 3), "p99_ms": round(at(0.99), 3),
            "p999_ms": round(at(0.999), 3), "max_ms": round(s[-1], 3)}


def bench_reader(url: str, users: int, calls: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    reader = FeatureReader(redis.Redis.from_url(url, protocol=2), PREFIX)  # see features.reader
    ids = lambda n: [f"u{rng.randrange(users):06d}" for _ in range(n)]  # noqa: E731
    for _ in range(1000):  # warm up (connection, allocator)
        reader.get(ids(1)[0])
    one = []
    for user in ids(calls):
        t = time.perf_counter_ns()
        assert reader.get(user) is not None
        one.append((time.perf_counter_ns() - t) / 1e6)
    many, mixed = [], []
    for _ in range(max(calls // 10, 100)):
        batch = ids(100)
        t = time.perf_counter_ns()
        reader.get_many(batch)
        many.append((time.perf_counter_ns() - t) / 1e6)
        # by anonymous id: 10 unknown ids + 5 merged anonymous ids, so the alias round trips too
        batch = ids(85) + [f"nobody-{i}" for i in range(10)] + [f"anon-{rng.randrange(100)}" for _ in range(5)]
        t = time.perf_counter_ns()
        reader.get_many(batch, anonymous=True)
        mixed.append((time.perf_counter_ns() - t) / 1e6)
    return {"get": pct(one), "get_many_100": pct(many), "get_many_100_with_missing_and_aliases": pct(mixed)}


# -- HTTP: open-loop load with a raw asyncio client --------------------------------------------

async def _open_loop(port: int, rate: float, seconds: float, make_request, conns: int,
                     warmup_s: float = 2.0) -> dict:
    """Send ``make_request()`` at ``rate`` per second on ``conns`` keep-alive connections
    (a request waits for a free one); latency = response end - scheduled send time. The event
    loop's timers have 1 ms granularity, so sends can start up to ~1 ms late: reported apart as
    ``send_late_*`` (part of the latency, caused by the client)."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pool.put_nowait((reader, writer))
    latencies: list[float] = []
    late: list[float] = []
    errors = 0
    clock = time.perf_counter

    async def one(scheduled: float, request: bytes, record: bool) -> None:
        nonlocal errors
        reader, writer = await pool.get()
        sent = clock()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
        finally:
            pool.put_nowait((reader, writer))
        if record:
            latencies.append((clock() - scheduled) * 1000)
            late.append((sent - scheduled) * 1000)

    total = int((seconds + warmup_s) * rate)
    start = clock() + 0.05
    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled, make_request(), i >= warmup_s * rate)))
    await asyncio.gather(*tasks)
    behind = clock() - (start + total / rate)
    while not pool.empty():
        pool.get_nowait()[1].close()
    lateness = pct(late)
    return {**pct(latencies), "send_late_p50_ms": lateness["p50_ms"], "send_late_p99_ms": lateness["p99_ms"],
            "rate_per_s": rate, "seconds": seconds, "connections": conns, "errors": errors,
            "finished_behind_s": round(behind, 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_http(url: str, users: int, rate: float, seconds: float, post_rate: float, conns: int,
               seed: int, redis_pid: tuple = ()) -> dict:
    port = _free_port()
    # the load generator is one client: lift the per-client rate limit, or it measures 429s
    env = {**os.environ, "SURGEFLOW__REDIS__KEY_PREFIX": PREFIX,
           "SURGEFLOW__ACCESS__RATE_PER_S": "1000000", "SURGEFLOW__ACCESS__BURST": "1000000"}
    server = subprocess.Popen([sys.executable, "-m", "surgeflow", "serve-features", "--redis-url", url,
                               "--port", str(port)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    rng = random.Random(seed + 2)
    get = lambda: (f"GET /features/u{rng.randrange(users):06d} HTTP/1.1\r\n"  # noqa: E731
                   "Host: bench\r\n\r\n").encode()

    def post() -> bytes:
        body = json.dumps({"user_ids": [f"u{rng.randrange(users):06d}" for _ in range(100)]}).encode()
        return (b"POST /features HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("serve-features did not start")
                time.sleep(0.1)
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        ticks = cpu_ticks(server.pid)
        with OtherLoad(server.pid, *redis_pid) as load:
            out = {"http_get": run(_open_loop(port, rate, seconds, get, conns))}
        served = (seconds + 2) * rate  # with the warm-up
        out["http_get"]["server_cpu_us_per_request"] = round(
            (cpu_ticks(server.pid) - ticks) / os.sysconf("SC_CLK_TCK") / served * 1e6)
        out["http_get"]["other_processes_cpu_cores"] = load.cores
        if post_rate:
            with OtherLoad(server.pid, *redis_pid) as load:
                out["http_post_100"] = run(_open_loop(port, post_rate, min(seconds, 10), post, conns))
            out["http_post_100"]["other_processes_cpu_cores"] = load.cores
        return out
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=20_000, help="get calls (get_many: a tenth)")
    ap.add_argument("--rate", type=float, default=1000, help="HTTP GET requests per second")
    ap.add_argument("--seconds", type=float, default=20, help="HTTP GET load duration")
    ap.add_argument("--post-rate", type=float, default=100, help="POST (100 ids) per second; 0: skip")
    ap.add_argument("--connections", type=int, default=32, help="keep-alive client connections")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--density", type=float, default=1.0,
                    help="share of fields kept (1: ~43 fields per hash; 0.55: ~24, as the flow writes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp, EmbeddedRedis(Path(tmp)) as server:
        client = redis.Redis.from_url(server.url)
        t = time.monotonic()
        mean_fields = populate(client, args.users, args.seed, args.density)
        result = {"users": args.users, "mean_fields_per_hash": round(mean_fields, 1),
                  "populate_s": round(time.monotonic() - t, 1),
                  "redis_used_memory_mb": round(client.info("memory")["used_memory"] / 2**20, 1)}
        print(f"populated {args.users:,} hashes ({mean_fields:.1f} fields each)", file=sys.stderr)
        redis_pid = (client.info("server")["process_id"],)
        with OtherLoad(*redis_pid) as load:
            result.update(bench_reader(server.url, args.users, args.calls, args.seed))
        result["reader_other_processes_cpu_cores"] = load.cores
        print("reader done; HTTP load ...", file=sys.stderr)
        result.update(bench_http(server.url, args.users, args.rate, args.seconds, args.post_rate,
                                 args.connections, args.seed, redis_pid))
        client.flushall()  # nothing worth saving at shutdown
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
