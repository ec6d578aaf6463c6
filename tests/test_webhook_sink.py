"""The webhook sink against a real HTTP endpoint on a local socket, scripted to fail: HTTP 500
and 429, requests that hang past the timeout, connections refused (server stopped, then started
again on the same port), a 400. Every alert message arrives (the receiver dedupes on the
Idempotency-Key), in order per alert, the flow never waits, memory stays bounded with the rest
spooled to disk and sent by the next run, and the signature verifies."""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main

from connectors.webhook import REJECTED_FILE, WebhookSink, idempotency_key
from surgeflow.stats import STATS

STATUSES = ["firing", "update", "update", "resolved"]  # seq 0..3
FAST = {"timeout_s": 0.3, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}


def alert(n: int, seq: int, series: str | None = None) -> dict:
    return {"alert_id": f"cvr_drop|campaign=c{n}|60000", "rule": "cvr_drop",
            "series": series or f"campaign=c{n}", "status": STATUSES[seq], "seq": seq,
            "value": 0.01 * n, "mu": 0.05, "z": None, "_arrival_ms": 1}


def wait_for(predicate, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Receiver:
    """A webhook endpoint whose behaviour the test sets: mode "ok", "error" (500, 429 and 503 in
    turn) or "hang" (sleeps past the client's timeout); keys in ``reject`` get a 400."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[tuple[str, bytes, dict, str]] = []  # key, body, headers, outcome
        self.mode = "ok"
        self.reject: set[str] = set()
        self.hang_s = 0.8
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/alerts"

    def start(self) -> None:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                key = self.headers["Idempotency-Key"]
                with rx.lock:
                    mode = rx.mode
                    outcome = ("reject" if key in rx.reject else
                               "hang" if mode == "hang" else
                               ["500", "429", "503"][len(rx.requests) % 3] if mode == "error"
                               else "ok")
                    rx.requests.append((key, body, dict(self.headers), outcome))
                try:
                    if outcome == "hang":
                        time.sleep(rx.hang_s)  # took it, but answers too late
                        outcome = "ok"
                    status = {"ok": 200, "reject": 400, "500": 500, "429": 429, "503": 503}[outcome]
                    reply = b"bad alert: field 'value' out of range" if status == 400 else b"{}"
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except OSError:
                    pass  # the client gave up on a hung request

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # the port now refuses connections

    def count(self, outcome: str) -> int:
        with self.lock:
            return sum(o == outcome for *_, o in self.requests)

    def accepted(self) -> list[str]:
        """Keys the receiver took (answered 200, or hung after taking), first receipt order."""
        with self.lock:
            keys = [k for k, _, _, o in self.requests if o in ("ok", "hang")]
        return list(dict.fromkeys(keys))

    def check_no_loss_no_stray_duplicate(self, sent: list[str]) -> None:
        assert sorted(self.accepted()) == sorted(sent)
        bodies = defaultdict(set)
        with self.lock:
            for key, body, _, _ in self.requests:
                bodies[key].add(body)
        assert all(len(b) == 1 for b in bodies.values()), "a key was sent with another body"


@pytest.fixture
def rx():
    receiver = Receiver()
    yield receiver
    receiver.stop()


def timed_write(part, batch: list[dict], sent: list[str]) -> None:
    started = time.perf_counter()
    part.write_batch([batch])  # as the pipeline emits alerts: one list per item
    took = time.perf_counter() - started
    assert took < 0.05, f"write_batch took {took:.3f} s: the flow waited for the endpoint"
    sent.extend(idempotency_key(a) for a in batch)


def assert_ordered_per_alert(keys: list[str]) -> None:
    seqs = defaultdict(list)
    for key in keys:
        alert_id, _, seq = key.rsplit(":", 2)
        seqs[alert_id].append(int(seq))
    assert all(s == sorted(s) for s in seqs.values()), seqs


def test_an_outage_loses_nothing_keeps_order_and_never_stalls_the_flow(rx, tmp_path, caplog):
    errors = STATS.get("webhook_errors")
    sent_before = STATS.get("webhook_sent")
    sink = WebhookSink(rx.url, spool_dir=tmp_path, close_wait_s=5.0, **FAST)
    part = sink.build("alerts_to_webhook", 0, 1)
    sent: list[str] = []
    with caplog.at_level(logging.INFO, logger="surgeflow.webhook"):
        timed_write(part, [alert(n, 0) for n in range(5)], sent)
        assert wait_for(lambda: len(rx.accepted()) == 5)

        rx.mode = "error"  # 500, 429 (Retry-After: 0), 503
        timed_write(part, [alert(n, 1) for n in range(5)], sent)
        assert wait_for(lambda: rx.count("503") >= 2)

        rx.mode = "hang"
        for n in range(5):
            timed_write(part, [alert(n, 2)], sent)
        assert wait_for(lambda: rx.count("hang") >= 2)

        rx.stop()  # refused
        stopped_errors = STATS.get("webhook_errors")
        timed_write(part, [alert(n, 3) for n in range(5)], sent)
        assert wait_for(lambda: STATS.get("webhook_errors") >= stopped_errors + 3)

        rx.mode = "ok"
        rx.start()  # the same port again
        timed_write(part, [alert(n, 3) for n in range(5, 8)] + [alert(9, 0)], sent)
        assert wait_for(lambda: len(rx.accepted()) == len(sent))
        part.close()

    rx.check_no_loss_no_stray_duplicate(sent)
    assert rx.count("hang") >= 2  # a hung request was retried: the allowed, keyed duplicate
    assert_ordered_per_alert(rx.accepted())
    assert rx.accepted()[:5] == sent[:5]  # and FIFO overall
    assert STATS.get("webhook_errors") - errors >= 9
    assert STATS.get("webhook_sent") - sent_before == len(sent)
    assert not (tmp_path / REJECTED_FILE).exists()  # 429 and 5xx are not permanent
    assert not list(tmp_path.glob("spool-*"))  # never behind enough to spill
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    backs = [r.getMessage() for r in caplog.records if "is back after" in r.getMessage()]
    assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()  # logged once
    assert len(backs) == 1 and backs[0].split("after ")[1].split(" s")[0] != "0.0"


def _on_disk(tmp_path) -> list[str]:
    return [idempotency_key(orjson.loads(line)) for p in sorted(tmp_path.glob("spool-w0-*.jsonl"))
            for line in p.read_bytes().splitlines()]


def test_every_batch_is_on_disk_when_written_and_the_next_run_sends_the_spool(rx, tmp_path):
    rx.stop()  # down from the start: connections refused
    sink = WebhookSink(rx.url, spool_dir=tmp_path, close_wait_s=0.3, **FAST)
    part = sink.build("alerts_to_webhook", 0, 1)
    sent: list[str] = []
    before = STATS.get("webhook_errors")
    for b in range(20):
        timed_write(part, [alert(b * 15 + i, i % 4) for i in range(15)], sent)
        # written ahead: a kill -9 now loses nothing (nothing waits in memory only)
        assert _on_disk(tmp_path) == sent
        if b == 0:  # the first message is in flight when the next batches come
            assert wait_for(lambda: STATS.get("webhook_errors") > before)
            started, errors = time.monotonic(), STATS.get("webhook_errors")
        time.sleep(0.015)  # alerts keep coming while the endpoint is down
    # and they do not cut the backoff short (waits 10, 20, 40, 80 ms, then 100..200 ms)
    assert STATS.get("webhook_errors") - errors <= 5 + (time.monotonic() - started) / 0.1
    assert list(tmp_path.glob("spool-w0-*.jsonl"))  # the overflow is on disk
    part.close()  # still down: the rest goes to disk too

    on_disk = [line for p in sorted(tmp_path.glob("spool-w0-*.jsonl"))
               for line in p.read_bytes().splitlines()]
    assert [idempotency_key(orjson.loads(line)) for line in on_disk] == sent  # all, in order
    assert not list(tmp_path.glob("*.tmp"))

    # A second run while the endpoint hangs: it starts on the spool, and at close the message
    # in flight and the rest of that file go back to disk, still first in line.
    rx.mode = "hang"
    rx.start()
    part2 = WebhookSink(rx.url, spool_dir=tmp_path, close_wait_s=0.3, **FAST).build("w", 0, 1)
    timed_write(part2, [alert(1000, 0)], sent)
    assert wait_for(lambda: rx.count("hang") >= 1)
    part2.close()
    assert rx.accepted() == sent[:1]
    on_disk = [line for p in sorted(tmp_path.glob("spool-w0-*.jsonl"))
               for line in p.read_bytes().splitlines()]
    assert [idempotency_key(orjson.loads(line)) for line in on_disk] == sent

    rx.mode = "ok"  # a third run, the endpoint back
    part3 = WebhookSink(rx.url, spool_dir=tmp_path, **FAST).build("w", 0, 1)
    timed_write(part3, [alert(1001, 0), alert(1002, 0)], sent)
    assert wait_for(lambda: len(rx.accepted()) == len(sent))
    part3.close()
    rx.check_no_loss_no_stray_duplicate(sent)
    assert rx.accepted() == sent  # the spooled ones first, each run's new ones after
    assert not list(tmp_path.glob("spool-*"))
    body = orjson.loads(rx.requests[0][1])
    assert body == {k: v for k, v in alert(0, 0).items() if not k.startswith("_")}


def test_a_run_with_fewer_workers_sends_the_spool_of_the_gone_ones(rx, tmp_path):
    rx.stop()
    sink = WebhookSink(rx.url, spool_dir=tmp_path, close_wait_s=0.1, **FAST)
    parts = [sink.build("w", i, 2) for i in range(2)]
    sent: list[str] = []
    for seq in range(4):
        for i, part in enumerate(parts):  # each alert stays on its worker, as in the flow
            timed_write(part, [alert(2 * n + i, seq) for n in range(3)], sent)
    for part in parts:
        part.close()
    assert {p.name[:8] for p in tmp_path.glob("spool-*.jsonl")} == {"spool-w0", "spool-w1"}

    rx.start()
    part = WebhookSink(rx.url, spool_dir=tmp_path, **FAST).build("w", 0, 1)
    assert wait_for(lambda: len(rx.accepted()) == len(sent))
    part.close()
    rx.check_no_loss_no_stray_duplicate(sent)
    assert_ordered_per_alert(rx.accepted())
    assert not list(tmp_path.glob("spool-*"))


def test_a_400_goes_to_the_rejected_file_and_delivery_goes_on(rx, tmp_path, caplog):
    rejected = STATS.get("webhook_rejected")
    bad = alert(2, 0)
    rx.reject.add(idempotency_key(bad))
    part = WebhookSink(rx.url, spool_dir=tmp_path, **FAST).build("alerts_to_webhook", 0, 1)
    sent: list[str] = []
    with caplog.at_level(logging.INFO, logger="surgeflow.webhook"):
        timed_write(part, [alert(1, 0), bad, alert(3, 0)], sent)
        timed_write(part, [alert(1, 1), alert(2, 1)], sent)  # the bad one's update is fine
        assert wait_for(lambda: len(rx.accepted()) == 4)
        part.close()
    assert rx.accepted() == [k for k in sent if k != idempotency_key(bad)]
    assert rx.count("reject") == 1  # permanent: not retried
    lines = (tmp_path / REJECTED_FILE).read_bytes().splitlines()
    assert len(lines) == 1
    record = orjson.loads(lines[0])
    assert record["status"] == 400 and record["key"] == idempotency_key(bad)
    assert "bad alert" in record["response"]
    assert record["alert"]["alert_id"] == bad["alert_id"] and record["alert"]["seq"] == 0
    assert STATS.get("webhook_rejected") - rejected == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "HTTP 400" in errors[0]


def test_headers_and_signature_verify_with_the_secret(rx, tmp_path):
    secret = "s3cr3t-for-tests"
    part = WebhookSink(rx.url, spool_dir=tmp_path, secret=secret,
                       headers={"Authorization": "Bearer t0ken"}, **FAST).build("w", 0, 1)
    hostile = alert(7, 0, series="campaign=été\n100%")  # not header-safe as it is
    sent: list[str] = []
    timed_write(part, [alert(1, 0), hostile], sent)
    assert wait_for(lambda: len(rx.accepted()) == 2)
    part.close()
    assert sent[0] == "cvr_drop|campaign=c1|60000:firing:0"
    for key, body, headers, _ in rx.requests:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Surgeflow-Signature"], f"sha256={expected}")
        assert headers["Authorization"] == "Bearer t0ken"
        assert headers["Content-Type"] == "application/json"
        assert key == idempotency_key(orjson.loads(body))
    assert orjson.loads(rx.requests[1][1])["series"] == "campaign=été\n100%"
    with pytest.raises(ValueError):
        WebhookSink(rx.url, headers={"X-Bad": "a\r\nInjected: 1"})


def test_runs_as_a_bytewax_dynamic_sink(rx, tmp_path):
    batches = [[alert(n, 0) for n in range(3)], [alert(n, 1) for n in range(3)],
               [alert(0, 3)], alert(1, 3)]  # lists of alerts, as the pipeline emits, or one
    flow = Dataflow("webhook_sink_test")
    alerts = op.input("alerts", flow, TestingSource(batches))
    op.output("alerts_to_webhook", alerts, WebhookSink(rx.url, spool_dir=tmp_path, **FAST))
    run_main(flow)  # close() drains before the run ends
    sent = [idempotency_key(a) for b in batches for a in (b if isinstance(b, list) else [b])]
    assert rx.accepted() == sent
