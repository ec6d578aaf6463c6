"""Access to the HTTP surfaces (privacy/access.py): the feature API over a real Redis and the
dashboard over chDB, each served by a real uvicorn on loopback. Refused with the right status:
no token, a wrong one, one without the scope, an oversized body, a flood; no internal error text
in any answer."""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import time
from base64 import b64encode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import features.http as feature_http
from config.settings import AccessSettings
from dashboards.server import create_app as dashboard_app
from dashboards.server import start_in_thread
from features.http import create_app, serve
from features.layout import user_key
from privacy.access import AccessError, Tokens, check_bind, load_tokens
from tests.services import serve_app, start_redis

P = "acc"
READER, REGISTRY, ERASER, ADMIN, VIEWER = (f"{name}-{'x' * 24}" for name in
                                           ("reader", "registry", "eraser", "admin", "viewer"))
TOKENS = Tokens.of({READER: "features:read", REGISTRY: "registry:read", ERASER: "erasure:write",
                    ADMIN: "*", VIEWER: "dashboard:read"})
ROOMY = AccessSettings(max_body_bytes=1024, rate_per_s=10_000, burst=100_000)  # no 429 by accident
UNAUTHORIZED = {"detail": "authentication required"}
NO_TOKENS = {"SURGEFLOW_API_TOKENS": ""}


def call(port: int, method: str, path: str, body=None, token: str | None = None,
         headers: dict | None = None):
    """(status, headers, JSON body or None) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return resp.status, resp.headers, parsed
    finally:
        conn.close()


def raw_call(port: int, head: str, chunks: list[bytes] = ()) -> tuple[int, bytes]:
    """Status and whole answer of a request written by hand (a lying Content-Length, chunks)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        try:
            for chunk in chunks:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if chunks:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the whole body: what is tested
        answer = b""
        while data := s.recv(65536):
            answer += data
    return int(answer.split(b" ", 2)[1]), answer


def head(method: str, path: str, token: str | None, extra: str = "") -> str:
    auth = f"Authorization: Bearer {token}\n" if token else ""
    return f"{method} {path} HTTP/1.1\nHost: x\nConnection: close\n{auth}{extra}"


class Erasures(list):
    def __call__(self, user_id: str, anonymous: bool, requested_by: str) -> str:
        self.append((user_id, anonymous, requested_by))
        return f"req-{len(self)}"


@pytest.fixture(scope="module")
def erasures():
    return Erasures()


@pytest.fixture(scope="module")
def api(redis_url, erasures):
    with serve_app(create_app(redis_url, P, access=ROOMY, max_batch=3, tokens=TOKENS,
                              on_erasure=erasures)) as port:
        yield port


@pytest.fixture
def stored(redis_client):
    redis_client.hset(user_key(P, "u1"), mapping={"views_1h": "3", "as_of": 1, "updated_at": 1})


# ---- the feature API ---------------------------------------------------------------------------

PROTECTED = [("GET", "/features/u1", None), ("GET", "/features/u1?anonymous=maybe", None),
             ("POST", "/features", {"user_ids": ["u1"]}), ("GET", "/registry", None),
             ("GET", "/openapi.json", None), ("GET", "/docs", None),
             ("POST", "/erasure", {"user_id": "u1"}), ("GET", "/no-such-path", None)]


@pytest.mark.parametrize("method,path,body", PROTECTED)
def test_no_token_and_a_wrong_token_are_the_same_401(api, method, path, body):
    answers = [call(api, method, path, body, token) for token in
               (None, "", "wrong-" + "y" * 30, READER[:-1], READER + "x", READER.upper())]
    answers.append(call(api, method, path, body, headers={"Authorization": READER}))  # no scheme
    answers.append(call(api, method, path, body, headers={  # Basic is for the dashboard only
        "Authorization": "Basic " + b64encode(f"u:{READER}".encode()).decode()}))
    for status, headers, got in answers:
        assert (status, got) == (401, UNAUTHORIZED)
        assert headers.get_all("WWW-Authenticate") == ['Bearer realm="surgeflow"']


@given(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=0, max_size=80))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_wrong_tokens_are_always_401(api, token):
    for known in (READER, REGISTRY, ERASER, ADMIN, VIEWER):
        if token == known:
            return
    assert call(api, "GET", "/features/u1", token=token)[::2] == (401, UNAUTHORIZED)


def test_scopes(api, stored):
    assert call(api, "GET", "/features/u1", token=READER)[2]["views_1h"] == 3
    assert call(api, "GET", "/features/u1?anonymous=0", token=READER)[0] == 200  # the route
    assert call(api, "POST", "/features", {"user_ids": ["u1"]}, READER)[2]["features"]["u1"]["views_1h"] == 3
    assert call(api, "GET", "/openapi.json", token=READER)[0] == 200
    assert call(api, "GET", "/no-such-path", token=READER)[0] == 404
    assert call(api, "GET", "/registry", token=REGISTRY)[0] == 200
    for token, path in ((READER, "/registry"), (REGISTRY, "/features/u1"), (VIEWER, "/features/u1"),
                        (ERASER, "/openapi.json"), (REGISTRY, "/docs")):
        assert call(api, "GET", path, token=token)[::2] == (403, {"detail": "forbidden"}), (token, path)
    for path in ("/features/u1", "/registry", "/openapi.json"):
        assert call(api, "GET", path, token=ADMIN)[0] == 200
    assert call(api, "GET", "/healthz")[::2] == (200, {"status": "ok", "redis": "ok", "registry": "absent"})


def test_batch_above_max_batch_is_422(api, stored):
    status, _, got = call(api, "POST", "/features", {"user_ids": ["u1", "u2", "u3"]}, READER)
    assert status == 200 and set(got["features"]) == {"u1", "u2", "u3"}
    assert call(api, "POST", "/features", {"user_ids": ["u1", "u2", "u3", "u4"]}, READER)[0] == 422
    doc = call(api, "GET", "/openapi.json", token=READER)[2]
    assert doc["components"]["schemas"]["FeaturesRequest"]["properties"]["user_ids"]["maxItems"] == 3


def test_oversized_bodies_are_413(api):
    # declared: answered from the headers, nothing of a huge body is read
    status, answer = raw_call(api, head("POST", "/features", READER, "Content-Length: 100000000\n"
                                                                     "Content-Type: application/json\n"))
    assert status == 413 and answer.endswith(b'{"detail":"request body too large"}')
    # a client sending its (moderate) body whole still reads the answer, not a connection reset
    big = {"user_ids": ["u" * 100] * 60}
    assert call(api, "POST", "/features", big, READER)[::2] == (413, {"detail": "request body too large"})
    assert call(api, "POST", "/features", big, "wrong-" + "y" * 30)[::2] == (401, UNAUTHORIZED)
    # streamed without a Content-Length: counted while received
    chunked = "Transfer-Encoding: chunked\nContent-Type: application/json\n"
    status, answer = raw_call(api, head("POST", "/features", READER, chunked), [b" " * 300] * 20)
    assert status == 413 and answer.endswith(b'{"detail":"request body too large"}')
    status, answer = raw_call(api, head("GET", "/features/u1", READER, chunked), [b" " * 300] * 20)
    assert status == 413
    # below the limit, chunked, the body reaches the route intact
    body = json.dumps({"user_ids": ["nobody-1", "nobody-2"]}).encode()
    status, answer = raw_call(api, head("POST", "/features", READER, chunked), [body[:7], body[7:]])
    got = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert status == 200 and got == {"features": {"nobody-1": None, "nobody-2": None}}
    # authentication comes first: a stranger's big body is a 401
    assert raw_call(api, head("POST", "/features", None, "Content-Length: 100000000\n"))[0] == 401


def test_a_flood_is_429_then_allowed_again(redis_url, stored):
    flood = AccessSettings(rate_per_s=5, burst=5)
    with serve_app(create_app(redis_url, P, access=flood, tokens=TOKENS)) as port:
        statuses = [call(port, "GET", "/features/u1", token=READER)[0] for _ in range(5)]
        status, headers, got = call(port, "GET", "/features/u1", token=READER)
        assert statuses == [200] * 5 and (status, got) == (429, {"detail": "rate limit exceeded"})
        wait = int(headers["Retry-After"])
        assert wait == 1  # the window of 5 per second
        assert call(port, "GET", "/features/u1", token=ADMIN)[0] == 200  # per token
        # wrong tokens are charged to the address: guessing is throttled as well
        assert [call(port, "GET", "/features/u1", token="nope" * 8)[0] for _ in range(6)] == [401] * 5 + [429]
        time.sleep(wait + 0.1)
        assert call(port, "GET", "/features/u1", token=READER)[0] == 200
        # a batch costs one unit per id: 5 ids leave nothing of the 5 for the next call
        time.sleep(1.1)
        assert call(port, "POST", "/features", {"user_ids": list("abcde")}, READER)[0] == 200
        assert call(port, "GET", "/features/u1", token=READER)[0] == 429
        time.sleep(1.1)
        status, headers, got = call(port, "POST", "/features", {"user_ids": list("abcdef")}, READER)
        assert (status, got) == (429, {"detail": "rate limit exceeded"}) and int(headers["Retry-After"]) >= 1


def test_no_tokens_on_loopback_still_limited_per_address(redis_url, stored):
    with serve_app(create_app(redis_url, P, access=AccessSettings(rate_per_s=3, burst=3),
                              tokens=Tokens())) as port:
        assert [call(port, "GET", "/features/u1")[0] for _ in range(4)] == [200, 200, 200, 429]


def test_redis_error_text_never_reaches_the_client(tmp_path, monkeypatch, caplog):
    own = start_redis(tmp_path)  # a Redis of this test's own, to stop
    monkeypatch.setattr(feature_http, "_last_logged", [0.0, 0])
    try:
        url = own.url
        port_text = url.rsplit(":", 1)[1].split("/")[0]
        with serve_app(create_app(url, P, access=ROOMY, tokens=TOKENS)) as port:
            assert call(port, "GET", "/features/u1", token=READER)[0] == 404
            own.stop()
            down = {"detail": "redis unavailable"}
            with caplog.at_level(logging.WARNING, logger="surgeflow.api"):
                for method, path, body in (("GET", "/features/u1", None), ("GET", "/features/u1?anonymous=1", None),
                                           ("POST", "/features", {"user_ids": ["u1"]}), ("GET", "/registry", None)):
                    status, _, got = call(port, method, path, body, ADMIN)
                    assert (status, got) == (503, down), path
                status, _, got = call(port, "GET", "/healthz")
            assert (status, got) == (503, {"status": "unavailable", "redis": "unavailable", "registry": "unknown"})
            assert any(r.name == "surgeflow.api" and "redis unavailable" in r.getMessage() for r in caplog.records)
            assert port_text in caplog.text  # the detail is in the server's log, not in the answers
    finally:
        own.stop()


def test_erasure(api, erasures, redis_url):
    erasures.clear()
    body = {"user_id": "u 42", "anonymous": True}
    for token in (None, "wrong-" + "z" * 30):
        assert call(api, "POST", "/erasure", body, token)[0] == 401
    for token in (READER, VIEWER, REGISTRY):
        assert call(api, "POST", "/erasure", body, token)[::2] == (403, {"detail": "forbidden"})
    assert erasures == []
    status, _, got = call(api, "POST", "/erasure", body, ERASER)
    assert (status, got) == (202, {"request_id": "req-1"})
    assert call(api, "POST", "/erasure", {"user_id": "u7"}, ADMIN)[::2] == (202, {"request_id": "req-2"})
    digest = hashlib.sha256(ERASER.encode()).hexdigest()
    assert erasures == [("u 42", True, "token:" + digest[:8]),
                        ("u7", False, "token:" + hashlib.sha256(ADMIN.encode()).hexdigest()[:8])]
    for bad in ({"user_id": ""}, {"user_id": "u1", "anonymous": "true"}, {"user": "u1"}, {"user_id": "x" * 129}):
        assert call(api, "POST", "/erasure", bad, ERASER)[0] == 422, bad
    assert len(erasures) == 2

    def broken(user_id, anonymous, requested_by):
        raise RuntimeError("kafka at 10.1.2.3:9092 is down")

    with serve_app(create_app(redis_url, P, tokens=TOKENS)) as port:  # not configured
        assert call(port, "POST", "/erasure", body, ERASER)[::2] == (503, {"detail": "erasure not configured"})
    with serve_app(create_app(redis_url, P, tokens=TOKENS, on_erasure=broken)) as port:
        assert call(port, "POST", "/erasure", body, ERASER)[::2] == (503, {"detail": "erasure unavailable"})


# ---- binding and token configuration ------------------------------------------------------------

def test_check_bind_refuses_a_public_address_without_tokens(caplog, redis_url):
    for host in ("0.0.0.0", "::", "", "192.0.2.7", "example.org"):
        with pytest.raises(AccessError, match="refusing to serve"):
            check_bind(host, Tokens())
        check_bind(host, TOKENS)  # with a token: fine
    with caplog.at_level(logging.WARNING, logger="surgeflow.access"):
        check_bind("127.0.0.1", Tokens(), "the feature API")
    assert "no access token" in caplog.text
    nobody = AccessSettings(tokens_env="SURGEFLOW_TEST_NO_TOKENS")
    with pytest.raises(AccessError):  # before anything listens
        serve(redis_url, P, host="0.0.0.0", port=0, access=nobody)
    with pytest.raises(AccessError):
        start_in_thread("chdb:///nonexistent", "db", "0.0.0.0", 0, access=nobody)


SECRET = "Sup3rSecretToken0123456789"


@pytest.mark.parametrize("line,problem", [
    (f"{SECRET}", "expected 'token scope,scope'"),
    (f"{SECRET} features:reed", "unknown scope"),
    (f"{SECRET} ,", "no scope"),
    (f"{SECRET[:10]} features:read", "at least 24 characters"),
    (f"{SECRET}\u00e9 features:read", "may only hold"),
    (f"{SECRET}:features:read", "expected 'token scope,scope'"),  # the env format in the file
    (f"features:read {SECRET}", "at least 24 characters"),  # swapped: still not echoed
])
def test_tokens_file_errors_name_the_line_never_the_token(tmp_path, line, problem):
    path = tmp_path / "tokens"
    path.write_text(f"# readers\n{'r' * 30} features:read  # a comment\n\n{line}\n")
    path.chmod(0o600)
    with pytest.raises(AccessError) as err:
        load_tokens(AccessSettings(tokens_file=path), env=NO_TOKENS)
    message = str(err.value)
    assert f"{path}:4" in message and problem in message
    assert SECRET not in message and SECRET[:10] not in message and "r" * 30 not in message


def test_tokens_from_env_and_file(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text(f"{'f' * 30}   features:read, registry:read\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="surgeflow.access"):
        tokens = load_tokens(AccessSettings(tokens_file=path),
                             env={"SURGEFLOW_API_TOKENS": f" {'e' * 30}:erasure:write ; ;"})
    assert "readable by other users" in caplog.text
    assert len(tokens) == 2 and tokens.lookup(b"f" * 30).scopes == {"features:read", "registry:read"}
    assert tokens.lookup(b"e" * 30).allows("erasure:write") and not tokens.lookup(b"e" * 30).allows("features:read")
    assert not load_tokens(AccessSettings(), env=NO_TOKENS)
    for value, problem in ((f"{SECRET}", "entry 1: expected token:scope,scope"),
                           (f"{'e' * 30}:*;{SECRET}:nope", "entry 2: unknown scope"),
                           (f"{SECRET}:*;{SECRET}:features:read", "entry 2: the same token as")):
        with pytest.raises(AccessError) as err:
            load_tokens(AccessSettings(), env={"SURGEFLOW_API_TOKENS": value})
        assert problem in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(AccessError, match="cannot read"):
        load_tokens(AccessSettings(tokens_file=tmp_path / "missing"), env=NO_TOKENS)


# ---- the dashboard -----------------------------------------------------------------------------

@pytest.fixture
def dashboard(chdb_dsn, ch_database):
    """The dashboard with tokens, on a database without tables (ClickHouse errors)."""
    with serve_app(dashboard_app(chdb_dsn, ch_database, access=ROOMY, tokens=TOKENS)) as port:
        yield port


def test_dashboard_tokens_and_scopes(dashboard):
    for path in ("/", "/static/app.js", "/api/overview", "/openapi.json", "/nothing"):
        for token in (None, "wrong-" + "q" * 30):
            status, headers, got = call(dashboard, "GET", path, token=token)
            assert (status, got) == (401, UNAUTHORIZED), path
            assert headers.get_all("WWW-Authenticate") == [
                'Bearer realm="surgeflow"', 'Basic realm="surgeflow dashboard"']
        for token in (READER, ERASER, REGISTRY):
            assert call(dashboard, "GET", path, token=token)[::2] == (403, {"detail": "forbidden"})
    status, headers, page = call(dashboard, "GET", "/", token=VIEWER)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert call(dashboard, "GET", "/static/app.js", token=ADMIN)[0] == 200
    # a browser sends the token as the password of Basic credentials
    basic = {"Authorization": "Basic " + b64encode(f"me:{VIEWER}".encode()).decode()}
    assert call(dashboard, "GET", "/", headers=basic)[0] == 200
    wrong = {"Authorization": "Basic " + b64encode(b"me:guess").decode()}
    assert call(dashboard, "GET", "/", headers=wrong)[0] == 401


def test_dashboard_hides_clickhouse_errors(dashboard):
    status, _, got = call(dashboard, "GET", "/api/overview", token=VIEWER)
    assert (status, got) == (503, {"detail": "clickhouse unavailable"})
    status, _, got = call(dashboard, "GET", "/healthz")  # open, without the error text
    assert (status, got) == (503, {"status": "unavailable", "clickhouse": "unavailable"})


def test_dashboard_limits(chdb_dsn, ch_database):
    flood = AccessSettings(max_body_bytes=256, rate_per_s=4, burst=4)
    with serve_app(dashboard_app(chdb_dsn, ch_database, access=flood, tokens=TOKENS)) as port:
        # each request is charged before its body is looked at: 2 of the 4 units
        assert raw_call(port, head("POST", "/api/overview", VIEWER, "Content-Length: 100000000\n"))[0] == 413
        assert raw_call(port, head("POST", "/", VIEWER, "Transfer-Encoding: chunked\n"), [b"x" * 200] * 3)[0] == 413
        assert [call(port, "GET", "/", token=VIEWER)[0] for _ in range(3)] == [200, 200, 429]
        time.sleep(1.1)
        assert call(port, "GET", "/", token=VIEWER)[0] == 200
