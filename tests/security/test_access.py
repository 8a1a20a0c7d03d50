"""Who may call what: every route without a key, with a wrong key, with the right one; what goes upstream."""

from __future__ import annotations

import httpx
import pytest

from tests.security.conftest import ADMIN, MODEL, ORIGIN, OTHER, Cluster, chat

OPEN = "sk-open-Xa7Wq"
LLAMA = "sk-llama-Pm3Ru"

# (method, path, body) of every route the gateway has, and a few it has not.
PROXIED = [
    ("POST", "/v1/chat/completions", chat("hello")),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hello"}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hello"}),
    ("POST", "/v1/responses", {"model": MODEL, "input": "hello"}),
    ("POST", "/v1/unknown/thing", {"model": MODEL}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("GET", "/v1/chat/completions", None),  # 405 once authenticated
    ("GET", "/v1/nothing", None),  # 404 once authenticated
]
ADMIN_ROUTES = ["/metrics", "/metrics/prometheus", "/cache/stats"]
PUBLIC = {"/health": 200, "/ready": 200, "/": 200, "/dashboard": 200}


def call(cluster: Cluster, method: str, path: str, body: object, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, cluster.gateway.url + path, json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(("method", "path", "body"), PROXIED)
@pytest.mark.parametrize("key", [None, "sk-wrong", "sk-open-xa7wq", ADMIN])
def test_v1_routes_refuse_without_a_valid_key(
    cluster: Cluster, method: str, path: str, body: object, key: str | None
) -> None:
    answer = call(cluster, method, path, body, key)
    assert answer.status_code == 401, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert answer.headers["www-authenticate"] == 'Bearer realm="ntonix"'


@pytest.mark.parametrize(("method", "path", "body"), PROXIED)
def test_v1_routes_answer_with_a_key(cluster: Cluster, method: str, path: str, body: object) -> None:
    answer = call(cluster, method, path, body, OPEN)
    expected = {"/v1/chat/completions": 405 if method == "GET" else 200, "/v1/nothing": 404}
    assert answer.status_code == expected.get(path, 200 if path != "/v1/unknown/thing" else 404), answer.text


@pytest.mark.parametrize("path", ADMIN_ROUTES)
def test_admin_routes_need_the_admin_key(cluster: Cluster, path: str) -> None:
    for key in (None, "sk-wrong", OPEN):
        answer = call(cluster, "GET", path, None, key)
        assert answer.status_code == 401, (key, answer.text)
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert call(cluster, "GET", path, None, ADMIN).status_code == 200
    assert httpx.head(cluster.gateway.url + path, timeout=5).status_code == 401


@pytest.mark.parametrize(("path", "status"), PUBLIC.items())
def test_health_ready_index_and_dashboard_page_need_no_key(cluster: Cluster, path: str, status: int) -> None:
    assert call(cluster, "GET", path, None, None).status_code == status


def test_model_allow_list(cluster: Cluster) -> None:
    assert cluster.post(LLAMA, chat("hi")).status_code == 200
    refused = cluster.post(LLAMA, chat("hi", model=OTHER))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    nameless = cluster.post(LLAMA, {"messages": [{"role": "user", "content": "hi"}]})
    assert nameless.status_code == 403
    listed = call(cluster, "GET", "/v1/models", None, LLAMA).json()
    assert [m["id"] for m in listed["data"]] == [MODEL]
    everything = {m["id"] for m in call(cluster, "GET", "/v1/models", None, OPEN).json()["data"]}
    assert {MODEL, OTHER} <= everything
    assert call(cluster, "GET", f"/v1/models/{OTHER}", None, LLAMA).status_code == 404
    assert call(cluster, "GET", f"/v1/models/{MODEL}", None, LLAMA).status_code == 200


def test_what_reaches_the_backend(cluster: Cluster) -> None:
    """No gateway key, no Proxy-*, no header the client named in Connection; Host is the backend's."""
    headers = {
        "proxy-authorization": "Basic c2VjcmV0",
        "proxy-connection": "keep-alive",
        "x-hop": "drop me",
        "connection": "keep-alive, x-hop",
        "host": "evil.example",
        "x-kept": "yes",
    }
    answer = cluster.post(OPEN, chat("what reaches the backend"), headers=headers)
    assert answer.status_code == 200, answer.text
    seen = [r for r in cluster.backend_requests() if "what reaches the backend" in r["body"]]
    assert len(seen) == 1
    upstream = seen[0]["headers"]
    assert "authorization" not in upstream
    assert not [name for name in upstream if name.startswith("proxy-")]
    assert "x-hop" not in upstream and "connection" not in upstream
    assert upstream["host"] == f"127.0.0.1:{cluster.mock.port}"
    assert upstream["x-kept"] == "yes"


def test_cors_preflight_and_answers(cluster: Cluster) -> None:
    url = cluster.gateway.url + "/v1/chat/completions"
    preflight = {"origin": ORIGIN, "access-control-request-method": "POST"}
    answer = httpx.options(
        url, headers={**preflight, "access-control-request-headers": "authorization, content-type"}, timeout=5
    )
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert answer.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "origin" in answer.headers["vary"]
    other = httpx.options(url, headers={**preflight, "origin": "https://evil.example"}, timeout=5)
    assert other.status_code == 403
    assert "access-control-allow-origin" not in other.headers
    # the real requests: an allowed origin may read the answer (errors included), another may not
    ok = cluster.post(OPEN, chat("cors"), headers={"origin": ORIGIN})
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in ok.headers["access-control-expose-headers"]
    refused = cluster.post(None, chat("cors"), headers={"origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    foreign = cluster.post(OPEN, chat("cors"), headers={"origin": "https://evil.example"})
    assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers
    # without an Origin, no CORS headers; an OPTIONS that is no preflight is an ordinary request
    assert "access-control-allow-origin" not in cluster.post(OPEN, chat("cors")).headers
    assert httpx.options(url, timeout=5).status_code == 401
    assert httpx.options(url, headers={"authorization": f"Bearer {OPEN}"}, timeout=5).status_code == 405
