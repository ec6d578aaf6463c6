"""`surgeflow run --processes N` on one machine: N copies of `surgeflow run --addresses ...
--process-id I`, one Bytewax cluster on loopback ports. Signals go to every process (each
drains and snapshots); the first process to fail stops the others; the run's summary adds up
the processes' counts.

Across machines there is no launcher: run `surgeflow run --addresses h0:p,h1:p,... --process-id
I` on each machine (README, "Several processes, several machines").
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# counts that add up over processes; the rest of a summary is taken from process 0
ADDED = ("events_in", "events_dead_lettered", "duplicates_dropped", "late_events", "alerts_fired",
         "actions_emitted", "shards_restored")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def command(config: Path, addresses: list[str], process_id: int, workers: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "surgeflow", "run", "--config", str(config),
           "--addresses", ",".join(addresses), "--process-id", str(process_id)]
    return cmd + (["--workers", str(workers)] if workers else [])


def launch(config: Path, processes: int, workers: int | None, say=print,
           kill_after_s: float = 30.0) -> tuple[int, dict | None]:
    """Runs the cluster to its end; returns (exit code, combined summary or None)."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(processes)]
    summary = os.environ.get("SURGEFLOW_SUMMARY")
    procs = []
    for i in range(processes):
        env = dict(os.environ)
        if summary:
            env["SURGEFLOW_SUMMARY"] = f"{summary}.process-{i}"
        # a session of its own: a terminal's Ctrl-C reaches it once, through us
        procs.append(subprocess.Popen(command(config, addresses, i, workers), env=env,
                                      start_new_session=True))
    say(f"cluster of {processes} processes on {', '.join(addresses)} "
        f"(pids {', '.join(str(p.pid) for p in procs)})")

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code, stopping_since = 0, None
        # every process is polled each turn (any() on a generator would stop at the first one
        # still running, and a failed process behind it would never be seen)
        while [p.poll() for p in procs].count(None):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed and not code:
                code = failed[0].returncode
                say(f"process {procs.index(failed[0])} ended with exit code {code}: "
                    "stopping the others (restart them all: they resume from the snapshot)")
                forward(signal.SIGTERM, None)
                stopping_since = time.monotonic()
            if stopping_since is not None and time.monotonic() - stopping_since > kill_after_s:
                forward(signal.SIGKILL, None)  # a cluster that lost a process may not drain
            time.sleep(0.2)
        if not code:
            failed = [p for p in procs if p.returncode != 0]
            if failed:
                code = failed[0].returncode
                say(f"process {procs.index(failed[0])} ended with exit code {code} "
                    "(restart them all: they resume from the snapshot)")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return code, (combine([Path(f"{summary}.process-{i}") for i in range(processes)])
                  if summary else None)


def combine(paths: list[Path]) -> dict | None:
    """One summary from the processes' own: counts added up, the rest from process 0."""
    parts = [json.loads(p.read_text()) for p in paths if p.exists()]
    if len(parts) != len(paths):
        return None
    out = dict(parts[0])
    for key in ADDED:
        out[key] = sum(p.get(key) or 0 for p in parts)
    out["seconds"] = max(p["seconds"] for p in parts)
    out["events_per_s"] = round(out["events_in"] / out["seconds"], 1) if out["seconds"] else None
    out["processes"] = len(parts)
    return out
