"""`surgeflow run`, with ClickHouse failing on demand: the first SIGUSR1 detaches every table the
flow inserts into, the next attaches them again, and so on. chDB lives in the flow's process,
so the outage is staged from inside it; inserts then fail with UNKNOWN_TABLE, as against a
server whose tables are detached or being migrated.

    python -m tests.outage_child --config run.yaml
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

TABLES = ("events_minute_in", "events_raw", "actions", "alerts")


def stage(config: str) -> None:
    from config.settings import load_settings
    from connectors import clickhouse

    ch = load_settings(config).clickhouse
    asked = threading.Semaphore(0)

    def toggle() -> None:
        verbs = ("DETACH", "ATTACH")
        n = 0
        while True:
            asked.acquire()
            verb = verbs[n % 2]
            n += 1
            client, lock = clickhouse.connect(ch.dsn)
            with lock:
                for t in TABLES:
                    client.command(f"{verb} TABLE {ch.database}.{t}")
            print(f"[outage] ClickHouse tables: {verb}", file=sys.stderr, flush=True)

    threading.Thread(target=toggle, daemon=True).start()
    # the handler only wakes the thread: the main thread may be inside the flow, holding locks
    signal.signal(signal.SIGUSR1, lambda *_: asked.release())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    stage(args.config)
    from surgeflow.cli import app

    app(["run", "--config", args.config])


if __name__ == "__main__":
    main()
