"""Every endpoint of SPEC §7 and the backend forms of §8 (issue 10), end to end: a real gateway
subprocess in front of real `ntonix mock` backends serving different models.

What reached a backend is read from the mock's own recording (`/mock/requests`) and counters
(`/mock/stats`); a raw socket server stands for a backend that resets the connection after reading a
request, to show which routes are retried once a request was sent.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import (
    HTTP,
    Proc,
    Processes,
    backend_entry,
    free_port,
    mock_requests,
    mock_reset,
    wait_for,
    wait_models,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
JSON_HEADERS = {"content-type": "application/json"}
MAX_BODY = 10_000  # bytes (proxy.max_body_size_mb of the shared gateway)

_unique = itertools.count()


def fresh_text(stem: str = "text") -> str:
    """Words no earlier request of this module used (so the cache never answers them by accident)."""
    return f"{stem} {next(_unique)} {os.getpid()}"


def post(gateway: Proc, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HTTP.post(gateway.url + path, content=content, headers={**JSON_HEADERS, **(headers or {})})


def chat(model: str, content: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content or fresh_text()}], **extra}


def served(mock: Proc, path: str) -> int:
    stats = HTTP.get(mock.url + "/mock/stats").json()
    return int(stats["requests_by_endpoint"].get(path, 0))


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


class Cluster:
    """`llama` on mock a, `coder` and `embed` on mock b (configured), alias `mini` -> llama."""

    def __init__(self, procs: Processes) -> None:
        self.a = procs.mock_serving("llama", name="a", wait=False)
        self.b = procs.mock_serving("coder", "embed", name="b", wait=False)
        self.mocks = (self.a, self.b)
        for mock in self.mocks:
            procs.wait_healthy(mock)
        self.gateway = procs.gateway_for(
            # configured, not discovered: a probe timing out on a loaded machine cannot re-route anything
            [backend_entry(self.a, models=["llama"]), backend_entry(self.b, models=["coder", "embed"])],
            {"models": {"aliases": {"mini": "llama"}}, "proxy": {"max_body_size_mb": MAX_BODY / 2**20}},
        )
        wait_models(self.gateway, {"llama", "coder", "embed", "mini"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    processes = Processes(tmp_path_factory.mktemp("endpoints"))
    try:
        yield Cluster(processes)
    finally:
        processes.close()


@pytest.fixture
def fresh(cluster: Cluster) -> Cluster:
    for mock in cluster.mocks:
        mock_reset(mock)
    return cluster


# -- the routes ------------------------------------------------------------------------------------


def test_index_lists_every_endpoint(cluster: Cluster) -> None:
    endpoints = HTTP.get(cluster.gateway.url + "/").json()["endpoints"]
    assert endpoints["chat_completions"] == CHAT
    assert endpoints["completions"] == COMPLETIONS
    assert endpoints["embeddings"] == EMBEDDINGS
    assert endpoints["responses"] == RESPONSES
    assert endpoints["models"] == "/v1/models"
    assert endpoints["dashboard"] == "/dashboard"


def test_chat_whole_and_streamed(fresh: Cluster) -> None:
    gw = fresh.gateway
    body = chat("llama", "chat whole")
    whole = post(gw, CHAT, body)
    assert whole.status_code == 200 and whole.headers["x-cache"] == "MISS"
    assert whole.json()["object"] == "chat.completion"
    assert whole.json()["choices"][0]["message"]["content"].startswith("Echo: chat whole")
    assert post(gw, CHAT, body).headers["x-cache"] == "HIT"
    streamed = post(gw, CHAT, chat("llama", stream=True))
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_data(streamed.text)
    assert events[-1] == "[DONE]"
    assert {json.loads(e)["object"] for e in events[:-1]} == {"chat.completion.chunk"}
    assert served(fresh.a, CHAT) == 2 and served(fresh.b, CHAT) == 0


def test_query_string_goes_upstream_and_keys_the_cache(fresh: Cluster) -> None:
    """A query (Azure-style `api-version`) reaches the backend on the model routes too, and an answer
    cached for one query is not served for another, nor for none."""
    gw = fresh.gateway
    body = chat("llama", "with a query")
    first = post(gw, CHAT + "?api-version=2024-06-01", body)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    assert post(gw, CHAT + "?api-version=2024-06-01", body).headers["x-cache"] == "HIT"
    assert post(gw, CHAT + "?api-version=2025-01-01", body).headers["x-cache"] == "MISS"
    assert post(gw, CHAT, body).headers["x-cache"] == "MISS"
    embedded = post(gw, EMBEDDINGS + "?api-version=2024-06-01", {"model": "embed", "input": "q"})
    assert embedded.status_code == 200 and embedded.headers["x-cache"] == "MISS"
    assert post(gw, EMBEDDINGS, {"model": "embed", "input": "q"}).headers["x-cache"] == "MISS"
    queries = [r["query"] for r in mock_requests(fresh.a, CHAT)]
    assert queries == ["api-version=2024-06-01", "api-version=2025-01-01", ""]
    assert [r["query"] for r in mock_requests(fresh.b, EMBEDDINGS)] == ["api-version=2024-06-01", ""]


def test_completions_whole_and_streamed(fresh: Cluster) -> None:
    gw = fresh.gateway
    body = {"model": "coder", "prompt": fresh_text("def add"), "max_tokens": 6}
    whole = post(gw, COMPLETIONS, body)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["object"] == "text_completion" and answer["model"] == "coder"
    assert answer["usage"]["completion_tokens"] == 6
    assert whole.headers["x-cache"] == "MISS"
    again = post(gw, COMPLETIONS, body)
    assert again.headers["x-cache"] == "HIT" and again.content == whole.content
    streamed = post(gw, COMPLETIONS, {**body, "stream": True})
    assert streamed.status_code == 200
    events = sse_data(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["choices"][0]["text"]
    assert served(fresh.b, COMPLETIONS) == 2 and served(fresh.a, COMPLETIONS) == 0


def test_embeddings_float_and_base64_cached_per_request(fresh: Cluster) -> None:
    gw = fresh.gateway
    body = {"model": "embed", "input": [fresh_text("first"), fresh_text("second")]}
    floats = post(gw, EMBEDDINGS, body)
    assert floats.status_code == 200, floats.text
    data = floats.json()["data"]
    assert [item["index"] for item in data] == [0, 1]
    assert all(len(item["embedding"]) == 16 for item in data)
    assert floats.headers["x-cache"] == "MISS"
    assert post(gw, EMBEDDINGS, body).headers["x-cache"] == "HIT"
    encoded = post(gw, EMBEDDINGS, {**body, "encoding_format": "base64"})
    assert encoded.headers["x-cache"] == "MISS"  # another request, another entry
    vector = struct.unpack("<16f", base64.b64decode(encoded.json()["data"][0]["embedding"]))
    assert vector == pytest.approx(data[0]["embedding"], abs=1e-6)
    assert served(fresh.b, EMBEDDINGS) == 2


def test_responses_whole_and_streamed_are_never_cached(fresh: Cluster) -> None:
    gw = fresh.gateway
    body = {"model": "llama", "input": "responses are not cached"}
    for _ in range(2):
        whole = post(gw, RESPONSES, body)
        assert whole.status_code == 200, whole.text
        assert "x-cache" not in whole.headers
        answer = whole.json()
        assert answer["object"] == "response" and answer["status"] == "completed"
    streamed = post(gw, RESPONSES, {**body, "stream": True})
    assert streamed.status_code == 200 and "x-cache" not in streamed.headers
    kinds = [json.loads(e)["type"] for e in sse_data(streamed.text)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert served(fresh.a, RESPONSES) == 3


def test_models_list_and_model_lookup(cluster: Cluster) -> None:
    gw = cluster.gateway
    listing = HTTP.get(gw.url + "/v1/models")
    assert listing.status_code == 200 and listing.headers["content-type"] == "application/json"
    document = listing.json()
    assert document["object"] == "list"
    ids = [entry["id"] for entry in document["data"]]
    assert sorted(ids) == ["coder", "embed", "llama", "mini"] and len(ids) == len(set(ids))
    for entry in document["data"]:
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert entry["object"] == "model" and isinstance(entry["created"], int)
        assert isinstance(entry["owned_by"], str)
    for model in ("llama", "mini"):
        one = HTTP.get(f"{gw.url}/v1/models/{model}")
        assert one.status_code == 200 and one.json() == next(e for e in document["data"] if e["id"] == model)
    missing = HTTP.get(gw.url + "/v1/models/gpt-nothing")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and "gpt-nothing" in error["message"]


def test_other_post_is_forwarded_byte_for_byte_and_never_cached(fresh: Cluster) -> None:
    gw = fresh.gateway
    sent = b'{ "model" : "coder",  "query": "q",\n "documents": ["x", "y"] }'
    for _ in range(2):
        response = post(gw, "/v1/rerank?top_n=1", sent, {"x-mock-echo": "1"})
        assert response.status_code == 200, response.text
        assert response.content == sent  # the backend echoed what it got: the client's very bytes
        assert response.headers["x-mock-name"] == "b"
        assert "x-cache" not in response.headers
    recorded = mock_requests(fresh.b, "/v1/rerank")
    assert [(r["query"], r["body"].encode()) for r in recorded] == [("top_n=1", sent)] * 2
    assert mock_requests(fresh.a, "/v1/rerank") == []
    # a body that is not JSON goes through too, to any backend, content type and all
    raw = bytes(range(256))
    headers = {"content-type": "application/octet-stream", "x-mock-echo": "1"}
    echoed = post(gw, "/v1/audio/transcriptions", raw, headers)
    assert echoed.status_code == 200 and echoed.content == raw
    assert echoed.headers["content-type"] == "application/octet-stream"
    # the backend's own answer passes through as it is
    missing = post(gw, "/v1/nothing/here", {"model": "llama"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert missing.headers["x-mock-name"] == "a"
    # a model nobody serves is the gateway's 404, as on every route
    unknown = post(gw, "/v1/rerank", {"model": "ghost"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


# -- status codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (CHAT, {"model": "llama"}, "messages"),
        (CHAT, {"model": "llama", "messages": []}, "messages"),
        (COMPLETIONS, {"model": "coder"}, "prompt"),
        (COMPLETIONS, {"model": "coder", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        (EMBEDDINGS, {"model": "embed"}, "input"),
        (EMBEDDINGS, {"model": "embed", "input": ""}, "input"),
        (RESPONSES, {"model": "llama"}, "input"),
    ],
)
def test_400_names_the_routes_own_required_field(
    cluster: Cluster, path: str, body: dict[str, Any], field: str
) -> None:
    response = post(cluster.gateway, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert f"'{field}'" in error["message"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES])
def test_malformed_json_is_400_on_every_json_route(cluster: Cluster, path: str) -> None:
    response = post(cluster.gateway, path, b'{"model": "llama", ')
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_wrong_method_is_405_with_allow(cluster: Cluster) -> None:
    gw = cluster.gateway
    for path in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES):
        for method in ("GET", "PUT", "DELETE"):
            response = HTTP.request(method, gw.url + path)
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == "POST"
            assert response.json()["error"]["code"] == "method_not_allowed"
    for path in ("/v1/models", "/v1/models/llama"):
        response = HTTP.post(gw.url + path, json={})
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES])
def test_wrong_content_type_is_415(fresh: Cluster, path: str) -> None:
    body = json.dumps(chat("llama")).encode()
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        response = HTTP.post(fresh.gateway.url + path, content=body, headers=headers)
        assert response.status_code == 415, response.text
        assert response.json()["error"]["code"] == "unsupported_media_type"
    assert all(served(mock, path) == 0 for mock in fresh.mocks)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, "/v1/rerank"])
def test_body_over_the_limit_is_413_on_every_post_route(fresh: Cluster, path: str) -> None:
    big = json.dumps({"model": "llama", "input": "x" * MAX_BODY, "prompt": "p"}).encode()
    with_length = HTTP.post(fresh.gateway.url + path, content=big, headers=JSON_HEADERS)
    assert with_length.status_code == 413, with_length.text
    assert with_length.json()["error"]["code"] == "request_too_large"
    chunked = HTTP.post(
        fresh.gateway.url + path, content=iter([big[:5000], big[5000:]]), headers=JSON_HEADERS
    )
    assert chunked.status_code == 413
    assert [r for mock in fresh.mocks for r in mock_requests(mock) if r["method"] == "POST"] == []


# -- retry rules -----------------------------------------------------------------------------------


class Resetter:
    """A backend that answers GETs (health, an empty-ish model list) and resets every POST once read."""

    def __init__(self, models: list[str]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.models = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
        self.posts: list[str] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            while len(body) < length:
                piece = conn.recv(65536)
                if not piece:
                    return
                body += piece
            if method == "POST":
                self.posts.append(path)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closing with linger 0 sends a reset
            answer = (self.models if path == "/v1/models" else '{"status":"ok"}').encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(answer)}\r\n\r\n".encode()
                + answer
            )

    def close(self) -> None:
        self.listener.close()


def test_responses_and_unknown_routes_are_not_retried_once_sent(procs: Processes) -> None:
    resetter = Resetter(["llama"])
    try:
        mock = procs.mock_serving("llama", name="steady")
        # models configured: no discovery, so no pool rebuilt (and round robin restarted) mid-test
        gw = procs.gateway_for(
            [
                {"url": f"http://127.0.0.1:{resetter.port}", "models": ["llama"]},
                backend_entry(mock, models=["llama"]),
            ],
            {"circuit_breaker": {"failure_threshold": 1000}, "cache": {"enabled": False}},
        )
        for path, body in (
            (RESPONSES, {"model": "llama", "input": "once"}),
            ("/v1/rerank", {"model": "llama"}),
        ):
            before = len(resetter.posts)
            statuses = [post(gw, path, body, {"x-mock-echo": "1"}).status_code for _ in range(4)]
            # round robin over the two: every request that met the resetter failed there, and only there
            assert sorted(statuses) == [200, 200, 502, 502], (path, statuses)
            assert resetter.posts[before:] == [path] * 2
        assert served(mock, RESPONSES) == 2
        assert len(mock_requests(mock, "/v1/rerank")) == 2
        # the idempotent routes are retried on the other backend once sent
        before = len(resetter.posts)
        for _ in range(4):
            response = post(gw, CHAT, chat("llama"))
            assert response.status_code == 200, response.text
        assert len(resetter.posts) - before >= 1
        assert served(mock, CHAT) == 4
        assert HTTP.get(gw.url + "/metrics").json()["retries"] >= 1
    finally:
        resetter.close()


# -- backends --------------------------------------------------------------------------------------


def test_url_backend_keeps_its_path_prefix(procs: Processes) -> None:
    model = "org/pfx-model"  # ids with a slash are the norm (vLLM serves Hugging Face names)
    mock = procs.mock_serving(model, extra=("--prefix", "/openai"), name="prefixed")
    assert HTTP.get(mock.url + "/v1/models").status_code == 404  # only served under the prefix
    gw = procs.gateway_for([{"url": mock.url + "/openai/"}])
    wait_models(gw, {model})  # discovered at /openai/v1/models
    assert post(gw, CHAT, chat(model)).status_code == 200
    streamed = post(gw, COMPLETIONS, {"model": model, "prompt": "p", "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    paths = [r["path"] for r in mock_requests(mock) if r["method"] == "POST"]
    assert paths == ["/openai/v1/chat/completions", "/openai/v1/completions"]
    [backend] = HTTP.get(gw.url + "/metrics").json()["backends"]
    assert backend["url"] == mock.url + "/openai" and backend["healthy"] is True
    health = mock_requests(mock, "/openai/health")
    assert health and all(r["method"] == "GET" for r in health)
    for path in ("/v1/models/org/pfx-model", "/v1/models/org%2Fpfx-model"):
        found = HTTP.get(gw.url + path)
        assert found.status_code == 200 and found.json()["id"] == model, path


def test_api_key_replaces_the_clients_authorization(procs: Processes) -> None:
    keyed = procs.mock_serving("keyed", extra=("--api-key", "sekret"), name="keyed", wait=False)
    open_ = procs.mock_serving("open", name="open", wait=False)
    for mock in (keyed, open_):
        procs.wait_healthy(mock)
    gw = procs.gateway_for([backend_entry(keyed, api_key="sekret"), backend_entry(open_)])
    wait_models(gw, {"keyed", "open"})  # the model list is read with the key too
    client = {"authorization": "Bearer client-token"}
    for mock, name, expected in ((keyed, "keyed", "Bearer sekret"), (open_, "open", "Bearer client-token")):
        for headers in (client, {}):
            response = post(gw, CHAT, chat(name), headers)
            assert response.status_code == 200, response.text
        first, second = mock_requests(mock, CHAT)
        sent = [value for key, value in first["header_list"] if key == "authorization"]
        assert sent == [expected]  # exactly one: the client's is never forwarded beside the key
        if mock is keyed:
            assert second["headers"]["authorization"] == "Bearer sekret"  # also when the client sends none
        else:
            assert "authorization" not in second["headers"]
    # the client's Authorization is part of the cache scope only where it reaches the backend
    for name, shared in (("keyed", True), ("open", False)):
        body = chat(name, "scoped " + name)
        assert post(gw, CHAT, body, {"authorization": "Bearer one"}).headers["x-cache"] == "MISS"
        other = post(gw, CHAT, body, {"authorization": "Bearer two"}).headers["x-cache"]
        assert other == ("HIT" if shared else "MISS"), name
        assert post(gw, CHAT, body, {"authorization": "Bearer one"}).headers["x-cache"] == "HIT"


def _backends(gateway: Proc) -> list[tuple[str, int]]:
    return [(b["url"], b["weight"]) for b in HTTP.get(gateway.url + "/metrics").json()["backends"]]


def test_cli_and_environment_take_host_port_weight_and_urls(procs: Processes) -> None:
    a = procs.mock_serving("ca", name="ca", wait=False)
    b = procs.mock_serving("cb", extra=("--prefix", "/v"), name="cb", wait=False)
    for mock in (a, b):
        procs.wait_healthy(mock)
    specs = [f"127.0.0.1:{a.port}:3", f"{b.url}/v"]
    steady = {"health_check": {"timeout_seconds": 3}}
    from_cli = procs.gateway(backends=specs, config=steady, wait=False)
    from_env = procs.gateway(env={"NTONIX_BACKENDS": ",".join(specs)}, config=steady, wait=False)
    for gw in (from_cli, from_env):
        procs.wait_healthy(gw)
        assert _backends(gw) == [(a.url, 3), (b.url + "/v", 1)]
        wait_models(gw, {"ca", "cb"})
        assert post(gw, CHAT, chat("ca")).status_code == 200
        assert post(gw, CHAT, chat("cb")).status_code == 200
    assert len(mock_requests(a, CHAT)) == 2 and len(mock_requests(b, "/v/v1/chat/completions")) == 2


BAD_BACKENDS: list[tuple[list[str], dict[str, str], str]] = [
    (["--backend", "ftp://127.0.0.1:1"], {}, "ftp://127.0.0.1:1"),
    (["--backend", "http://"], {}, "http://"),
    (["--backend", "http://127.0.0.1:99999"], {}, "99999"),
    (["--backend", "http://127.0.0.1:0"], {}, "http://127.0.0.1:0"),
    (["--backend", "https://h/p?x=1"], {}, "https://h/p?x=1"),
    ([], {"NTONIX_BACKENDS": "127.0.0.1:1,http//nope"}, "http//nope"),
    (["--config", "{config}"], {}, "backends[0].url"),
]


def test_bad_backend_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"backends": [{"url": "http//127.0.0.1:8000"}]}))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NTONIX_")}
    runs = []
    for args, env, named in BAD_BACKENDS:  # all at once: each is a Python start-up
        argv = [arg.replace("{config}", str(config)) for arg in args]
        command = [sys.executable, "-m", "ntonix", "run", "--port", str(free_port()), *argv]
        popen = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**clean, **env},
            cwd=tmp_path,
        )
        runs.append((popen, named))
    try:
        for popen, named in runs:
            _, stderr = popen.communicate(timeout=60)
            assert popen.returncode == 2, (named, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1, stderr
            assert lines[0].startswith("ntonix: ") and named in lines[0], stderr
            assert "Traceback" not in stderr
    finally:
        for popen, _ in runs:
            if popen.poll() is None:
                popen.kill()
                popen.wait()


def test_a_backend_down_at_start_is_probed_and_discovered_when_it_comes_back(procs: Processes) -> None:
    """/ready is 503 with Retry-After while no backend is up; a backend without /health (llama.cpp's
    Python server) is probed at /v1/models instead, and its models are learnt once it answers."""
    port = free_port()
    gw = procs.gateway_for([{"url": f"http://127.0.0.1:{port}"}])
    wait_for(lambda: not HTTP.get(gw.url + "/metrics").json()["backends"][0]["healthy"], what="unhealthy")
    ready = HTTP.get(gw.url + "/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"].isdigit()
    assert ready.json()["error"]["code"] == "no_healthy_backend"
    late = procs.mock("--model", "later", "--no-health", port=port, name="later", wait=False)
    wait_for(lambda: HTTP.get(gw.url + "/ready").status_code == 200, timeout=20.0, what="ready")
    assert HTTP.get(gw.url + "/ready").json()["healthy_backends"] == 1
    wait_models(gw, {"later"})
    assert post(gw, CHAT, chat("later")).status_code == 200
    probes = {r["path"] for r in mock_requests(late) if r["method"] == "GET"}
    assert "/v1/models" in probes
    assert "has no /health (404): probing /v1/models instead" in gw.log()


# -- https:// backends -----------------------------------------------------------------------------


def make_ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signed for 127.0.0.1: (ca.pem, leaf.pem, leaf.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ntonix test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


class TlsFront:
    """Terminates TLS on a free port and relays the bytes to a plain-HTTP backend (the mock)."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(raw,), daemon=True).start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.handshakes += 1
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(upstream, secure), daemon=True)
        back.start()
        pump(secure, upstream)
        back.join(timeout=30)
        secure.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()


def test_https_backend_with_a_ca_from_ssl_cert_file(procs: Processes, tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_leaf(tmp_path)
    mock = procs.mock_serving("secure", name="secure")
    front = TlsFront(mock.port, cert, key)
    try:
        url = f"https://127.0.0.1:{front.port}"
        trusted = procs.gateway_for([{"url": url + "/"}], env={"SSL_CERT_FILE": str(ca)}, wait=False)
        untrusted = procs.gateway_for([{"url": url}], wait=False)
        for gw in (trusted, untrusted):
            procs.wait_healthy(gw)
        wait_models(trusted, {"secure"})  # discovered over TLS
        assert post(trusted, CHAT, chat("secure")).status_code == 200
        streamed = post(trusted, COMPLETIONS, {"model": "secure", "prompt": "tls", "stream": True})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        posts = [(r["path"], r["headers"]["host"]) for r in mock_requests(mock) if r["method"] == "POST"]
        assert [path for path, _ in posts] == [CHAT, COMPLETIONS]
        assert front.handshakes >= 1
        # a gateway that does not trust the CA never sends a request there
        wait_for(
            lambda: not HTTP.get(untrusted.url + "/metrics").json()["backends"][0]["healthy"], what="down"
        )
        refused = post(untrusted, CHAT, chat("secure"))
        assert refused.status_code in (502, 503), refused.text
        assert len([r for r in mock_requests(mock) if r["method"] == "POST"]) == 2
        assert "certificate" in untrusted.log().lower()
    finally:
        front.close()
