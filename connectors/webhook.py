"""Webhook: POSTs every alert message as JSON to a URL, without ever holding up the flow.

``write_batch`` only queues; a thread per worker delivers the messages one at a time, in the
order they came (an alert's "resolved" never overtakes its "firing"). Each request carries
``Idempotency-Key: <alert_id>:<status>:<seq>``, the receiver's dedupe key: a retry after a
timeout may deliver a message twice, always with the same key and the same bytes. Connection
errors, timeouts, HTTP 408, 429 and 5xx are retried with exponential backoff and jitter, forever;
any other 4xx is permanent: the message goes to ``<spool_dir>/webhook_rejected.jsonl`` with the
response, and delivery goes on. An outage is logged once, and its end with its duration.

Every batch is written ahead to a JSON-lines file in ``spool_dir`` (one body per line, byte for
byte what is sent) before ``write_batch`` returns, and the thread sends from those files, oldest
first; a file is removed once its last message is delivered. So nothing waits in memory, and a
run killed at any moment leaves what it had not sent to the next run, which sends it first
(at-least-once: a message sent just before the kill is sent again, with the same key). ``close``
waits ``close_wait_s`` for the files to drain; what is left stays for the next run.

Trigger actions (``trigger.webhook``) go through the same sink; their key is the ``action_id``.

The key is made safe for a header: characters outside printable ASCII, and ``%``, are
percent-encoded (UTF-8), so ordinary ids pass unchanged and distinct ids stay distinct.

>>> idempotency_key({"alert_id": "cvr_drop|campaign=c1|60000", "status": "firing", "seq": 0})
'cvr_drop|campaign=c1|60000:firing:0'
>>> idempotency_key({"alert_id": "r|campaign=été 5%|0", "status": "resolved", "seq": 3})
'r|campaign=%C3%A9t%C3%A9%205%25|0:resolved:3'
>>> sign(b'{"alert_id":"a"}', "secret")
'sha256=c1d11d0d449d14bcd9713dcbb05ca1a5c7854d168831d1cc446dae83209f6bc2'
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson
import urllib3
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from privacy.secrets import redact
from surgeflow.stats import STATS

log = logging.getLogger("surgeflow.webhook")

REJECTED_FILE = "webhook_rejected.jsonl"
EXCERPT_CHARS = 500  # of a rejecting response's body, kept with the dead letter
_SPOOL_NAME = re.compile(r"spool-w(\d+)-(\d{12})\.jsonl")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
_FILE_LOCKS: dict[Path, threading.Lock] = {}  # the rejected file is shared by the workers
_FILE_LOCKS_LOCK = threading.Lock()


def idempotency_key(alert: dict) -> str:
    """``<alert_id>:<status>:<seq>``, percent-encoded where a header could not carry it; a
    trigger action's key is its ``action_id``."""
    if "action_id" in alert and "alert_id" not in alert:
        key = str(alert["action_id"])
    else:
        key = f"{alert['alert_id']}:{alert['status']}:{int(alert['seq'])}"
    if all("!" <= c <= "~" and c != "%" for c in key):
        return key
    return "".join(c if "!" <= c <= "~" and c != "%" else
                   "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in key)


def sign(body: bytes, secret: str) -> str:
    """The ``X-Surgeflow-Signature`` value: HMAC-SHA256 of the body, hex."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def encode(alert: dict) -> bytes:
    """The request body: the alert without its internal ("_"-prefixed) fields, one JSON line."""
    return orjson.dumps({k: v for k, v in alert.items() if not k.startswith("_")})


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: str  # "sent", "retry" or "rejected"
    status: int | None = None
    detail: str = ""  # why it failed, or the rejecting response's body excerpt
    retry_after_s: float | None = None


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact(  # an error may quote the URL, query tokens included
        f"{type(exc).__name__}: {text}")[:200]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the backoff decides


class _WebhookPartition(StatelessSinkPartition):
    def __init__(self, sink: WebhookSink, worker_index: int, worker_count: int):
        self.url, self.secret = sink.url, sink.secret
        # logs and dead letters name the host only: webhook paths and queries often hold tokens
        u = urllib3.util.parse_url(sink.url)
        self.where = f"{u.scheme}://{u.host}" + (f":{u.port}" if u.port else "")
        self.timeout_s, self.close_wait_s = sink.timeout_s, sink.close_wait_s
        self.backoff_initial_s, self.backoff_max_s = sink.backoff_initial_s, sink.backoff_max_s
        # the configured headers may not override those this sink sets (in any spelling)
        ours = {"content-type", "idempotency-key", "x-surgeflow-signature"}
        self.headers = {"User-Agent": "surgeflow-webhook",
                        **{k: v for k, v in sink.headers.items() if k.lower() not in ours},
                        "Content-Type": "application/json"}
        self.spool_dir, self.worker = sink.spool_dir, worker_index
        self.rejected_path = sink.spool_dir / REJECTED_FILE
        with _FILE_LOCKS_LOCK:
            self.rejected_lock = _FILE_LOCKS.setdefault(self.rejected_path, threading.Lock())
        # retries=False: this class owns retrying (in order, forever); no redirects either
        self.http = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False,
                                        timeout=urllib3.Timeout(total=sink.timeout_s))
        self.rng = random.Random()
        # Pending messages, oldest first: current, the rest of head, spooled.
        self.current: tuple[str, bytes] | None = None  # in flight, retried until done
        self.head: tuple[Path, BinaryIO] | None = None  # the spool file being sent
        self.spooled: deque[Path] = deque(self._adopt(worker_index, worker_count))
        self.cond = threading.Condition()
        self.stop = self.closed = False
        self.down_since: float | None = None
        self.failed_attempts = 0
        self.thread = threading.Thread(target=self._run, name=f"webhook-{worker_index}",
                                       daemon=True)
        self.thread.start()

    def _adopt(self, worker_index: int, worker_count: int) -> list[Path]:
        """This worker's spool files from earlier runs, and those of workers that are gone
        (fewer workers now): theirs first, they are older than anything of this run."""
        self.spool_seq = 0  # of this worker's next spool file
        if not self.spool_dir.is_dir():
            return []
        found = []
        for p in self.spool_dir.iterdir():
            m = _SPOOL_NAME.fullmatch(p.name)
            if m and int(m[1]) % worker_count == worker_index:
                found.append((int(m[1]) == worker_index, int(m[1]), int(m[2]), p))
        found.sort(key=lambda t: t[:3])
        own = [seq for is_own, _, seq, _ in found if is_own]
        self.spool_seq = max(own) + 1 if own else 0
        return [p for *_, p in found]

    # -- the flow's side: write ahead, never wait for the endpoint ---------------------------
    def write_batch(self, items: list) -> None:
        bodies = []
        for item in items:
            # an item is one alert or, as the pipeline emits them, a list of alerts
            for alert in item if isinstance(item, (list, tuple)) else (item,):
                if hasattr(alert, "to_dict"):
                    alert = alert.to_dict()
                try:
                    key, body = idempotency_key(alert), encode(alert)
                except (KeyError, TypeError, ValueError) as exc:
                    self._reject("", None, f"not an alert: {_describe(exc)}",
                                 orjson.dumps(repr(alert)[:EXCERPT_CHARS]))
                    continue
                bodies.append(body)
        if not bodies:
            return
        # Written ahead: the batch is in a spool file before the flow moves on. Once Bytewax
        # snapshots this epoch it will not replay these alerts, so a kill -9 before they were
        # sent must not lose them: the next run sends them from the file.
        with self.cond:
            self.spooled.append(self._write_spool(self._next_spool_path(), bodies))
            self.cond.notify_all()

    def _next_spool_path(self) -> Path:
        path = self.spool_dir / f"spool-w{self.worker}-{self.spool_seq:012d}.jsonl"
        self.spool_seq += 1
        return path

    def _write_spool(self, path: Path, bodies: list[bytes], tail: bytes = b"") -> Path:
        # write then rename: a spool file on disk is always whole
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(b + b"\n" for b in bodies) + tail)
        os.replace(tmp, path)
        return path

    # -- the delivery thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._deliver()
        except Exception:  # a bug or a broken disk: say so; close() still spools what is left
            log.exception("webhook %s: the delivery thread stopped; alerts wait for close()",
                          self.where)

    def _deliver(self) -> None:
        backoff = self.backoff_initial_s
        while True:
            with self.cond:
                while self.current is None and not self.stop:
                    self.current = self._take()
                    if self.current is None:
                        self.cond.notify_all()  # drained: close() may be waiting for this
                        self.cond.wait()
                if self.stop:
                    return
                key, body = self.current
            try:
                outcome = self._post(key, body)
            except Exception as exc:  # noqa: BLE001 - the thread must live; kept and retried
                outcome = _Outcome("retry", detail=_describe(exc))
            with self.cond:
                if self.stop:
                    return  # close() has spooled current (a success now is a keyed duplicate)
                if outcome.kind == "retry":
                    STATS.add("webhook_errors")
                    self.failed_attempts += 1
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        log.warning("webhook %s failed (%s); retrying with backoff, alerts kept",
                                    self.where, outcome.detail)
                    else:
                        log.debug("webhook %s failed again (%s)", self.where, outcome.detail)
                    # jitter: workers (and other senders) hitting one endpoint spread out
                    delay = self.rng.uniform(backoff / 2, backoff)
                    if outcome.retry_after_s is not None:
                        delay = max(delay, min(outcome.retry_after_s, self.backoff_max_s))
                    backoff = min(backoff * 2, self.backoff_max_s)
                    # new alerts notify too: only close() may cut the wait short
                    until = time.monotonic() + delay
                    while not self.stop and (left := until - time.monotonic()) > 0:
                        self.cond.wait(left)
                    continue
                if self.down_since is not None:
                    log.info("webhook %s is back after %.1f s (%d attempts failed)", self.where,
                             time.monotonic() - self.down_since, self.failed_attempts)
                    self.down_since, self.failed_attempts = None, 0
                backoff = self.backoff_initial_s
                if outcome.kind == "sent":
                    STATS.add("webhook_sent")
                else:
                    self._reject(key, outcome.status, "rejected by the endpoint", body,
                                 outcome.detail)
                self.current = None
                self.cond.notify_all()

    def _take(self) -> tuple[str, bytes] | None:
        """The oldest pending message of the spool files."""
        while self.head is not None or self.spooled:
            if self.head is None:
                path = self.spooled.popleft()
                try:
                    self.head = (path, path.open("rb"))
                except FileNotFoundError:
                    continue
            path, f = self.head
            line = f.readline()
            if not line:
                # removed only now: its last message has been delivered, not just taken
                f.close()
                path.unlink(missing_ok=True)
                self.head = None
                continue
            body = line.rstrip(b"\r\n")
            if not body:
                continue
            try:
                return idempotency_key(orjson.loads(body)), body
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                self._reject("", None, f"unreadable spool line in {path.name}: "
                             f"{_describe(exc)}",
                             orjson.dumps(body.decode("utf-8", "replace")[:EXCERPT_CHARS]))
        return None

    def _post(self, key: str, body: bytes) -> _Outcome:
        headers = {**self.headers, "Idempotency-Key": key}
        if self.secret:
            headers["X-Surgeflow-Signature"] = sign(body, self.secret)
        try:
            resp = self.http.request("POST", self.url, body=body, headers=headers,
                                     redirect=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return _Outcome("retry", detail=_describe(exc))
        status = resp.status
        if 200 <= status < 300:
            return _Outcome("sent", status)
        excerpt = resp.data[:EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]
        if 400 <= status < 500 and status not in (408, 429):
            return _Outcome("rejected", status, excerpt)
        # 5xx, 408, 429, and anything else (a redirect: a wrong URL) wait for the endpoint
        # to be fixed rather than dropping alerts
        return _Outcome("retry", status, f"HTTP {status}",
                        _retry_after(resp.headers.get("Retry-After")))

    def _reject(self, key: str, status: int | None, reason: str, alert_json: bytes,
                response: str = "") -> None:
        record = orjson.dumps({"at_ms": int(time.time() * 1000), "endpoint": self.where, "key": key,
                               "status": status, "reason": reason, "response": response})
        line = record[:-1] + b',"alert":' + alert_json + b"}\n"  # the alert as sent, verbatim
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        with self.rejected_lock, self.rejected_path.open("ab") as f:
            f.write(line)
        STATS.add("webhook_rejected")
        log.error("webhook %s rejected alert %s (%s%s): %s; kept in %s", self.where, key or "?",
                  reason, f", HTTP {status}" if status else "", response[:200],
                  self.rejected_path)

    # -- shutdown ----------------------------------------------------------------------------
    def _pending(self) -> bool:
        return bool(self.current or self.head or self.spooled)

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            deadline = time.monotonic() + self.close_wait_s
            while self._pending() and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            self.stop = True
            self.cond.notify_all()
        # a request in flight ends within its timeout; if not, spool it anyway (at worst a
        # duplicate with the same key in the next run)
        self.thread.join(self.timeout_s + 1.0)
        with self.cond:
            self._spool_rest()
            self.closed = True
        self.http.clear()

    def _spool_rest(self) -> None:
        """Everything not delivered goes to disk, keeping the order for the next run."""
        current, self.current = self.current, None
        front = [current[1]] if current else []
        left = len(front)
        if self.head is not None:
            path, f = self.head
            rest = f.read()
            f.close()
            self.head = None
            left += rest.count(b"\n")
            self._write_spool(path, front, rest)  # stays first in line
        elif front and self.spooled:  # its file is gone (all taken): it goes before the others
            self._write_spool(self.spooled[0], front, self.spooled[0].read_bytes())
        elif front:
            self._write_spool(self._next_spool_path(), front)
        if left or self.spooled:
            log.warning("webhook %s not drained at shutdown; %d alerts (besides %d spool files "
                        "not yet started) kept in %s for the next run", self.where, left,
                        len(self.spooled), self.spool_dir)


class WebhookSink(DynamicSink):
    """POSTs each alert (items are alerts, or lists of alerts) to ``url``; see the module doc."""

    def __init__(self, url: str, timeout_s: float = 5.0, headers: dict[str, str] | None = None,
                 secret: str | None = None,
                 spool_dir: Path = Path(".surgeflow/spool"), backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, close_wait_s: float = 5.0):
        parsed = urllib3.util.parse_url(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("webhook url must be http:// or https:// with a host")
        for name, value in (headers or {}).items():
            # checked now: a bad header would otherwise fail every request, forever
            if not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
                raise ValueError(f"webhook header {name!r} has an invalid name or value")
        if timeout_s <= 0 or backoff_initial_s <= 0 or close_wait_s < 0:
            raise ValueError("webhook timeout and backoff must be > 0")
        self.url, self.timeout_s = url, timeout_s
        self.headers = dict(headers or {})
        self.secret = secret
        self.spool_dir = Path(spool_dir).resolve()  # the program may change directory
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = max(backoff_max_s, backoff_initial_s)
        self.close_wait_s = close_wait_s

    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _WebhookPartition(self, worker_index, worker_count)
