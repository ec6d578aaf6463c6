"""The models' end-to-end AUC over a long replay: the full version of
tests/test_model_auc_end_to_end.py.

    .venv/bin/python -m bench.bench_model_auc [--days 40] [--users 2000] [--rate 0.4]
                                              [--churn-horizon 2d] [--seed 7]

Synthetic history written to a file and replayed through the flow (a Redis server this script
starts, chDB in a temporary directory); then, per model, its rolling AUC in ClickHouse at the
end of each day, beside the oracle AUC read off the generated events (tests/model_oracle.py:
the generator's true activity for propensity and churn, the channel's rate for CTR) and the
margin the test asks for (half the oracle's lift over 0.5, at least three null standard
deviations). Churn's horizon is shortened (``--churn-horizon``): its 30 days need a replay of
months. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from config.settings import load_settings  # noqa: E402
from connectors import clickhouse  # noqa: E402
from connectors.synthetic import SyntheticSpec, generate  # noqa: E402
from flows.runner import run  # noqa: E402
from models.spec import MODELS_FILE, duration_ms  # noqa: E402
from tests.model_oracle import null_sd, oracles  # noqa: E402
from tests.services import start_redis  # noqa: E402

START_MS = 1_795_132_800_000  # a midnight, UTC
WINDOW = 5000  # labels in a rolling AUC (models/quality.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=float, default=40.0)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--rate", type=float, default=0.4, help="events per second of event time")
    p.add_argument("--churn-horizon", default="2d")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    churn_ms = duration_ms(args.churn_horizon)
    if churn_ms is None:
        p.error(f"--churn-horizon {args.churn_horizon!r} is not like 2d or 36h")
    with tempfile.TemporaryDirectory(prefix="bench-auc-") as tmp:
        tmp = Path(tmp)
        doc = yaml.safe_load(MODELS_FILE.read_text())
        next(m for m in doc["models"] if m["name"] == "churn_risk")["horizon"] = args.churn_horizon
        (tmp / "models.yaml").write_text(yaml.safe_dump(doc))
        events = tmp / "events.jsonl"
        t = time.monotonic()
        n = 0
        with events.open("wb") as f:
            for r in generate(SyntheticSpec(seed=args.seed, users=args.users, start_ms=START_MS,
                                            events_per_s=args.rate, duration_s=args.days * 86_400)):
                f.write(r.value + b"\n")
                n += 1
        print(f"{n} events generated in {time.monotonic() - t:.0f} s", file=sys.stderr)
        server = start_redis(tmp / "redis")
        dsn = f"chdb://{tmp}/chdb"
        settings = load_settings(
            None, env={}, source__kind="file", source__file__paths=[str(events)],
            output__kind="files", output__dir=str(tmp / "out"), redis__url=server.url,
            redis__key_prefix="auc", clickhouse__dsn=dsn, clickhouse__spool_dir=str(tmp / "spool"),
            flow__recovery_dir=None, flow__max_clock_skew_s=None, flow__max_lookback_s=None,
            model__file=str(tmp / "models.yaml"), privacy__erasure__inbox=str(tmp / "inbox"))
        t = time.monotonic()
        try:
            run(settings, server.url)
        finally:
            server.stop()
        replay_s = time.monotonic() - t
        client, lock = clickhouse.connect(dsn)
        db = settings.clickhouse.database
        with lock:
            daily = client.query(
                f"SELECT model, toDate(ts) AS day, argMax(value, ts) FROM {db}.model_metrics FINAL "
                f"WHERE metric = 'auc' GROUP BY model, day ORDER BY model, day").result_rows
            totals = client.query(
                f"SELECT model, argMaxIf(value, ts, metric = 'auc'), sumIf(value, metric = 'labels'), "
                f"avgIf(value, metric = 'positive_rate') FROM {db}.model_metrics FINAL GROUP BY model"
            ).result_rows
        truth = oracles(events, churn_horizon_ms=churn_ms)
    result = {"events": n, "replay_s": round(replay_s, 1), "churn_horizon": args.churn_horizon,
              "models": {}}
    for model, auc, labels, rate in totals:
        window = min(WINDOW, int(labels))
        positives = round(window * rate)
        oracle = truth.get(model, (float("nan"),))[0]
        sd = null_sd(positives, window - positives) if 0 < positives < window else float("nan")
        margin = max(3 * sd, (oracle - 0.5) / 2)
        result["models"][model] = {
            "final_auc": round(auc, 4), "oracle_auc": round(oracle, 4),
            "required": round(0.5 + margin, 4), "met": bool(auc >= 0.5 + margin),
            "labels": int(labels), "positive_rate": round(rate, 4),
            "by_day": {str(day): round(v, 4) for m, day, v in daily if m == model}}
    result["ctr_oracle_by_campaign"] = round(truth["ctr_by_campaign"][0], 4)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
