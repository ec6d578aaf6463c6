"""The feature HTTP API served by a real uvicorn on a loopback port, over a real Redis."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.registry import load_registry
from features.http import MAX_BATCH, FastFeatureGet, create_app
from features.layout import alias_key, profile_key, registry_key, user_key
from surgeflow.cli import app as cli
from tests.services import http_call, serve_app

P = "ht"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["fast-path", "route"])
def port(request, redis_url):
    """The app as served, and without its GET fast path (FastFeatureGet): the FastAPI route
    that documents GET /features/{id} must answer the same."""
    app = create_app(redis_url, P, max_age_s=60)
    if request.param == "route":  # the access guard stays
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastFeatureGet]
    with serve_app(app) as port:
        yield port


def store(client, user_id, fields, updated_at=None, anonymous=False):
    client.hset(profile_key(P, user_id, anonymous), mapping={
        **fields, "as_of": 1795392000000,
        "updated_at": int(time.time() * 1000) if updated_at is None else updated_at})


def test_get_typed_features_and_defaults(redis_client, port):
    store(redis_client, "u1", {"views_1h": "3", "revenue_30d": "129.90", "aov_30d": "64.9500",
                               "rfm_tier": "important-value", "checkout_pending": "1",
                               "p_purchase_24h": "0.123456", "legacy": "x"})
    status, headers, got = http_call(port, "GET", "/features/u1")
    assert status == 200 and headers["content-type"] == "application/json"
    assert got["views_1h"] == 3 and got["revenue_30d"] == 129.9 and got["aov_30d"] == 64.95
    assert got["rfm_tier"] == "important-value" and got["checkout_pending"] == 1
    assert got["p_purchase_24h"] == 0.123456 and got["legacy"] == "x"
    assert got["views_7d"] == 0 and got["revenue_lifetime"] == 0.0 and got["last_seen"] is None
    assert got["as_of"] == 1795392000000 and got["stale"] is False and got["user_id"] == "u1"
    assert set(load_registry().names) <= set(got)


def test_unknown_user_is_404_json(redis_client, port):
    status, headers, got = http_call(port, "GET", "/features/nobody")
    assert status == 404 and headers["content-type"] == "application/json"
    assert got == {"detail": "unknown user"}
    assert http_call(port, "GET", "/features/")[0] == 404


def test_anonymous_id_follows_its_alias_and_stale(redis_client, port):
    store(redis_client, "user-9", {"orders_lifetime": "2"}, updated_at=int(time.time() * 1000) - 120_000)
    redis_client.set(alias_key(P, "anon 1"), "user-9")
    status, _, got = http_call(port, "GET", "/features/anon%201?anonymous=true")
    assert status == 200 and got["user_id"] == "user-9" and got["alias_of"] == "anon 1"
    assert got["orders_lifetime"] == 2 and got["stale"] is True
    assert http_call(port, "GET", "/features/anon%201")[0] == 404  # by user id: no alias


def test_user_id_never_follows_an_alias(redis_client, port):
    """The attack (see tests/test_reader.py): alias:victim:2 -> attacker, written by an
    unauthenticated event, and no hash for victim:2. By user id: 404 / null, never the attacker."""
    store(redis_client, "attacker", {"views_1h": "666"})
    redis_client.set(alias_key(P, "victim:2"), "attacker")
    unknown = (404, {"detail": "unknown user"})
    for query in ("", "?anonymous=false", "?anonymous=0", "?anonymous=False", "?x=1"):
        status, _, got = http_call(port, "GET", "/features/victim:2" + query)
        assert (status, got) == unknown, query
    for query in ("?anonymous=true", "?anonymous=1", "?anonymous=True", "?x=1&anonymous=true"):
        status, _, got = http_call(port, "GET", "/features/victim:2" + query)
        assert status == 200 and got["user_id"] == "attacker" and got["alias_of"] == "victim:2", query
    for query in ("?anonymous=maybe", "?anonymous=", "?anonymous"):
        status, _, got = http_call(port, "GET", "/features/victim:2" + query)
        assert status == 422 and got["detail"][0]["loc"] == ["query", "anonymous"], query
    for body in ({}, {"anonymous": False}):
        status, _, got = http_call(port, "POST", "/features", {"user_ids": ["victim:2", "attacker"], **body})
        assert status == 200 and got["features"]["victim:2"] is None, body
        assert got["features"]["attacker"]["user_id"] == "attacker"
    status, _, got = http_call(port, "POST", "/features", {"user_ids": ["victim:2"], "anonymous": True})
    assert status == 200 and got["features"]["victim:2"]["user_id"] == "attacker"
    for flag in ("true", 1, None):  # JSON has booleans: nothing else switches the mode
        assert http_call(port, "POST", "/features", {"user_ids": ["victim:2"], "anonymous": flag})[0] == 422
    # once the user victim:2 has a hash, a lookup by user id reads it; the anonymous visitor
    # "victim:2" (another namespace) reads its own hash once it has one
    store(redis_client, "victim:2", {"views_1h": "1"})
    status, _, got = http_call(port, "GET", "/features/victim:2")
    assert status == 200 and got["user_id"] == "victim:2" and got["alias_of"] is None
    store(redis_client, "victim:2", {"views_1h": "2"}, anonymous=True)
    status, _, got = http_call(port, "GET", "/features/victim:2?anonymous=true")
    assert status == 200 and got["views_1h"] == 2 and got["alias_of"] is None


@pytest.mark.parametrize("user_id,path", [
    ("a:b*", "/features/a:b*"), ("a:b*", "/features/a%3Ab%2A"), ("x y", "/features/x%20y"),
    ("a/b", "/features/a%2Fb"), ("a/b", "/features/a/b"), ("p%2Fq", "/features/p%252Fq"),
    ("ü:☃", "/features/%C3%BC:%E2%98%83"), ("q?x=1#f", "/features/q%3Fx=1%23f"),
])
def test_weird_ids_read_their_own_key(redis_client, port, user_id, path):
    store(redis_client, user_id, {"views_1h": "5"})
    store(redis_client, "u1", {"views_1h": "1"})
    status, _, got = http_call(port, "GET", path)
    assert status == 200 and got["user_id"] == user_id and got["views_1h"] == 5


@pytest.mark.parametrize("path", ["/features/*", "/features/u%2A", "/features/u%3F", "/features/u%5B1%5D",
                                  "/features/u1%20", "/features/u1%0A", "/features/..%2Fu1",
                                  f"/features/{P}:v2:user:u1", "/features/" + "u" * 129,
                                  "/features/" + "x" * 4000])
def test_hostile_ids_cannot_read_another_user(redis_client, port, path):
    store(redis_client, "u1", {"views_1h": "1"})
    redis_client.set(registry_key(P), "{}")
    assert http_call(port, "GET", path)[0] == 404


def test_post_batch(redis_client, port):
    store(redis_client, "u1", {"views_1h": "3"})
    store(redis_client, "a:b*", {"views_1h": "4"})
    redis_client.set(alias_key(P, "anon"), "u1")
    ids = ["u1", "nobody", "a:b*", "anon", "*"]
    status, _, got = http_call(port, "POST", "/features", {"user_ids": ids})
    assert status == 200 and list(got) == ["features"]
    f = got["features"]
    assert f["u1"]["views_1h"] == 3 and f["a:b*"]["views_1h"] == 4 and f["nobody"] is None
    assert f["anon"] is None and f["*"] is None
    status, _, got = http_call(port, "POST", "/features", {"user_ids": ids, "anonymous": True})
    assert status == 200 and got["features"]["anon"] == {**f["u1"], "alias_of": "anon"}
    assert got["features"]["u1"] is None and got["features"]["nobody"] is None  # not a visitor
    many = [f"m{i}" for i in range(MAX_BATCH)]
    status, _, got = http_call(port, "POST", "/features", {"user_ids": many})
    assert status == 200 and len(got["features"]) == MAX_BATCH
    assert http_call(port, "POST", "/features", {"user_ids": many + ["one-more"]})[0] == 422
    assert http_call(port, "POST", "/features", {"user_ids": "u1"})[0] == 422
    assert http_call(port, "POST", "/features", {"ids": ["u1"]})[0] == 422


def test_registry_and_healthz(redis_client, port):
    local = load_registry().to_dict()
    status, headers, got = http_call(port, "GET", "/registry")
    assert status == 200 and headers["x-registry-source"] == "local" and got == json.loads(json.dumps(local))
    assert http_call(port, "GET", "/healthz")[2] == {"status": "ok", "redis": "ok", "registry": "absent"}
    redis_client.set(registry_key(P), json.dumps(local))
    assert http_call(port, "GET", "/healthz")[2]["registry"] == "match"
    redis_client.set(registry_key(P), json.dumps({**local, "registry_version": 2}))
    status, headers, got = http_call(port, "GET", "/registry")
    assert headers["x-registry-source"] == "redis" and got["registry_version"] == 2
    assert http_call(port, "GET", "/healthz")[2]["registry"] == "differs"


def test_openapi_documents_the_endpoints(port):
    status, _, doc = http_call(port, "GET", "/openapi.json")
    assert status == 200
    paths = doc["paths"]
    assert "get" in paths["/features/{user_id}"] and "post" in paths["/features"]
    assert {"/registry", "/healthz"} <= set(paths)
    ok = paths["/features/{user_id}"]["get"]["responses"]
    assert ok["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/UserFeatures"}
    assert "404" in ok
    props = doc["components"]["schemas"]["UserFeatures"]["properties"]
    assert props["views_1h"]["type"] == "integer" and props["stale"]["type"] == "boolean"
    assert {"type": "number"} in props["aov_30d"]["anyOf"]
    body = doc["components"]["schemas"]["FeaturesRequest"]["properties"]
    assert body["user_ids"]["maxItems"] == MAX_BATCH
    assert body["anonymous"]["type"] == "boolean" and body["anonymous"]["default"] is False
    params = {p["name"]: p for p in paths["/features/{user_id}"]["get"]["parameters"]}
    anonymous = params["anonymous"]
    assert anonymous["in"] == "query" and not anonymous.get("required")
    assert anonymous["schema"]["type"] == "boolean" and anonymous["schema"]["default"] is False
    assert "alias" in anonymous["description"]


def test_redis_down_is_503(redis_url):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    url = f"redis://127.0.0.1:{dead.getsockname()[1]}/0"
    try:
        with serve_app(create_app(url, P)) as port:
            status, _, got = http_call(port, "GET", "/healthz")
            assert status == 503 and got["status"] == "unavailable"
            assert http_call(port, "GET", "/features/u1")[0] == 503
    finally:
        dead.close()


def test_cli_needs_a_redis_url_for_the_embedded_profile(monkeypatch):
    monkeypatch.delenv("SURGEFLOW__REDIS__URL", raising=False)
    monkeypatch.delenv("SURGEFLOW_CONFIG", raising=False)
    result = CliRunner().invoke(cli, ["serve-features"])
    assert result.exit_code == 2 and "--redis-url" in result.output


def test_cli_serves_the_api(redis_client, redis_url):
    store(redis_client, "u1", {"views_1h": "3"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SURGEFLOW__REDIS__KEY_PREFIX": P}
    proc = subprocess.Popen([sys.executable, "-m", "surgeflow", "serve-features", "--redis-url", redis_url,
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                status, _, got = http_call(port, "GET", "/features/u1")
                break
            except OSError:
                assert time.monotonic() < deadline, "serve-features did not answer"
                time.sleep(0.1)
        assert status == 200 and got["views_1h"] == 3
    finally:
        proc.terminate()
        proc.wait(10)
