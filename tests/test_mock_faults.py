"""`ntonix mock`'s KV prefix cache emulation (issue 11 item 4) and the faults real servers show (issue 9
items 21-25): no /health, UUID-only request ids, gzip, an abrupt close after [DONE], one request at a time,
request-id echo, and `/mock/requests` for checking what a gateway forwarded. Real mock subprocesses.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.test_mock import (
    HTTP,
    REPO,
    Mock,
    Mocks,
    _show_logs_if_failed,
    chat,
    mocks,  # noqa: F401 (the fixture)
    wait_for,
)

BLOCK = 16
PREFILL_US = 250.0  # 1,500 uncached characters: 0.375 s before the first token


@pytest.fixture(scope="module")
def kv_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    args = ["--kv-capacity", "200", "--kv-block-chars", str(BLOCK), "--prefill-us-per-char", str(PREFILL_US)]
    mock = Mock(tmp_path_factory.mktemp("kv"), "--name", "kv", *args)
    try:
        yield mock.wait_healthy()
    finally:
        mock.kill()


@pytest.fixture(scope="module")
def plain_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    mock = Mock(tmp_path_factory.mktemp("plain"), "--name", "plain")
    try:
        yield mock.wait_healthy()
    finally:
        mock.kill()


@pytest.fixture(scope="module")
def llama_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    """Like llama-cpp-python behind one slot: no /health, UUID request ids only, serial; and gzip on."""
    mock = Mock(tmp_path_factory.mktemp("llama"), "--no-health", "--uuid-request-ids", "--serial", "--gzip")
    try:
        wait_for(lambda: HTTP.get(mock.url + "/v1/models", timeout=1).status_code == 200, 20, "/v1/models")
        yield mock
    finally:
        mock.kill()


def _fresh(mock: Mock, request: pytest.FixtureRequest) -> Iterator[Mock]:
    mock.reset()
    yield mock
    _show_logs_if_failed(request, [mock])


@pytest.fixture
def kv(kv_mock: Mock, request: pytest.FixtureRequest) -> Iterator[Mock]:
    yield from _fresh(kv_mock, request)


@pytest.fixture
def plain(plain_mock: Mock, request: pytest.FixtureRequest) -> Iterator[Mock]:
    yield from _fresh(plain_mock, request)


@pytest.fixture
def llama(llama_mock: Mock, request: pytest.FixtureRequest) -> Iterator[Mock]:
    yield from _fresh(llama_mock, request)


def timed_chat(mock: Mock, content: str, **extra: Any) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    response = HTTP.post(mock.url + "/v1/chat/completions", json=chat(content, **extra), timeout=10)
    assert response.status_code == 200, response.text
    return time.monotonic() - started, response.json()


def cached_tokens(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


def whole_blocks(text: str) -> int:
    return len(text) // BLOCK * BLOCK


# --- item 4: KV prefix cache


def test_kv_cache_hits_chained_prefixes_and_evicts_lru(kv: Mock) -> None:
    a = ("alpha beta gamma delta " * 80)[:1500]
    text_a = f"user: {a}\n"  # the prompt text of a one-message chat
    first_time, first = timed_chat(kv, a)
    assert cached_tokens(first) == 0
    assert first["usage"]["prompt_tokens"] == -(-len(text_a) // 4)  # characters / 4 with the cache on
    assert first_time >= len(text_a) * PREFILL_US / 1e6

    again_time, again = timed_chat(kv, a)
    assert cached_tokens(again) == whole_blocks(text_a) // 4
    assert again_time < first_time

    # Half the prompt shared: the shared whole blocks count.
    _, half = timed_chat(kv, a[:800] + "X" * 700)
    assert cached_tokens(half) == whole_blocks(f"user: {a[:800]}") // 4
    # The first block differs: nothing counts, though every later block is the same text.
    _, shifted = timed_chat(kv, "Z" + a[1:])
    assert cached_tokens(shifted) == 0

    # 94 + 44 + 94 blocks in a cache of 200: the 32 least recent went, which are a's last ones.
    stats = kv.stats()
    assert stats["kv_evictions"] == 32 and stats["kv_blocks"] == 200
    assert stats["prompt_chars_total"] == 4 * len(text_a)
    assert stats["prompt_chars_cached"] == whole_blocks(text_a) + whole_blocks(f"user: {a[:800]}")
    _, evicted = timed_chat(kv, a)
    assert cached_tokens(evicted) == (len(text_a) // BLOCK - 32) * BLOCK // 4

    kv.reset()
    assert kv.stats()["kv_blocks"] == 0
    _, cold = timed_chat(kv, a)
    assert cached_tokens(cold) == 0


def test_kv_cached_tokens_in_streams_completions_and_responses(kv: Mock) -> None:
    system = "You are a helpful assistant. " * 30
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "question one"}]
    prompt_text = f"system: {system}\nuser: question one\n"
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    HTTP.post(kv.url + "/v1/chat/completions", json={"messages": messages}, timeout=10)
    started = time.monotonic()
    with HTTP.stream("POST", kv.url + "/v1/chat/completions", json=body, timeout=10) as r:
        text = r.read().decode()
    warm = time.monotonic() - started
    events = [e[len("data: ") :] for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == whole_blocks(prompt_text) // 4
    assert warm < len(prompt_text) * PREFILL_US / 1e6  # a cold prefill would take this long

    # A different user turn after the same system prompt: its first blocks are cached.
    messages[1]["content"] = "another question entirely"
    with HTTP.stream("POST", kv.url + "/v1/chat/completions", json=body, timeout=10) as r:
        events = [e[len("data: ") :] for e in r.read().decode().split("\n\n") if e]
    assert json.loads(events[-2])["usage"]["prompt_tokens_details"]["cached_tokens"] == (
        whole_blocks(f"system: {system}\nuser: ") // 4
    )

    # A completion prompt is its own text, with no role prefix.
    prompt = "def fibonacci(n):\n    " * 10
    completions = [
        HTTP.post(kv.url + "/v1/completions", json={"prompt": [prompt, prompt]}, timeout=10).json()
        for _ in range(2)
    ]
    assert cached_tokens(completions[0]) == whole_blocks(prompt) // 4  # the second copy hit the first
    assert cached_tokens(completions[1]) == 2 * whole_blocks(prompt) // 4

    responses = [
        HTTP.post(kv.url + "/v1/responses", json={"input": prompt}, timeout=10).json() for _ in range(2)
    ]
    assert responses[0]["usage"]["input_tokens_details"]["cached_tokens"] == 0
    assert (
        responses[1]["usage"]["input_tokens_details"]["cached_tokens"]
        == whole_blocks(f"user: {prompt}\n") // 4
    )


def test_kv_off_counts_prompt_chars_and_reports_no_details(plain: Mock) -> None:
    _, first = timed_chat(plain, "same prompt " * 20)
    _, again = timed_chat(plain, "same prompt " * 20)
    assert (
        first["usage"] == again["usage"] == {"prompt_tokens": 40, "completion_tokens": 16, "total_tokens": 56}
    )
    stats = plain.stats()
    assert stats["prompt_chars_total"] == 2 * len("user: " + "same prompt " * 20 + "\n")
    assert stats["prompt_chars_cached"] == 0 and stats["kv_blocks"] == 0


def test_prefill_cost_applies_without_a_cache(mocks: Mocks) -> None:  # noqa: F811
    mock = mocks.start("--prefill-us-per-char", "500")
    started = time.monotonic()
    HTTP.post(mock.url + "/v1/chat/completions", json=chat("x" * 600), timeout=10).raise_for_status()
    assert time.monotonic() - started >= 607 * 500 / 1e6
    started = time.monotonic()
    HTTP.post(mock.url + "/v1/chat/completions", json=chat("x"), timeout=10).raise_for_status()
    assert time.monotonic() - started < 0.3


def test_peak_and_current_in_flight(plain: Mock) -> None:
    def slow() -> None:
        HTTP.post(plain.url + "/v1/completions", json={"prompt": "p"}, headers={"X-Mock-Latency-Ms": "500"})

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: plain.stats()["in_flight"] == 3, 5, "three in flight")
    assert plain.stats()["requests_by_endpoint"] == {"/v1/completions": 3}
    plain.reset()  # a reset keeps the gauge of what is in flight, and those requests still count down
    assert (plain.stats()["in_flight"], plain.stats()["peak_in_flight"]) == (3, 3)
    for thread in threads:
        thread.join(timeout=10)
    stats = plain.stats()
    assert (stats["in_flight"], stats["peak_in_flight"]) == (0, 3)
    assert stats["requests_by_endpoint"] == {}
    plain.reset()
    assert plain.stats()["peak_in_flight"] == 0


# --- item 5: faults


def test_no_health_answers_404(llama: Mock) -> None:
    response = HTTP.get(llama.url + "/health")
    assert response.status_code == 404
    assert HTTP.get(llama.url + "/v1/models").status_code == 200
    assert llama.stats()["health_requests"] == 1


def test_uuid_request_ids_reject_others_with_an_empty_400(llama: Mock) -> None:
    for path, method in [("/v1/chat/completions", "POST"), ("/v1/models", "GET")]:
        bad = HTTP.request(method, llama.url + path, json=chat(), headers={"X-Request-ID": "4e4d329b2655-1"})
        assert bad.status_code == 400 and bad.content == b"" and bad.headers["content-length"] == "0"
        good = HTTP.request(
            method, llama.url + path, json=chat(), headers={"X-Request-ID": str(uuid.uuid4())}
        )
        assert good.status_code == 200
        assert HTTP.request(method, llama.url + path, json=chat()).status_code == 200
    assert llama.stats()["rejected"] == 2


def raw_body(url: str, path: str, body: Any, headers: dict[str, str]) -> tuple[httpx.Headers, bytes]:
    with HTTP.stream("POST", url + path, json=body, headers=headers) as r:
        return r.headers, b"".join(r.iter_raw())


def test_gzip_when_asked_and_accepted(plain: Mock, llama: Mock) -> None:
    on = {"X-Mock-Gzip": "1"}
    for path, body in [("/v1/chat/completions", chat()), ("/v1/embeddings", {"input": "x"})]:
        headers, raw = raw_body(plain.url, path, body, on)
        assert headers["content-encoding"] == "gzip"
        assert "usage" in json.loads(gzip.decompress(raw))
        assert HTTP.post(plain.url + path, json=body, headers=on).json()["usage"]  # httpx decodes it
        headers, raw = raw_body(plain.url, path, body, {**on, "Accept-Encoding": "identity"})
        assert "content-encoding" not in headers and json.loads(raw)["usage"]
        headers, raw = raw_body(plain.url, path, body, {**on, "Accept-Encoding": "br, gzip;q=0"})
        assert "content-encoding" not in headers
        headers, raw = raw_body(plain.url, path, body, {})
        assert "content-encoding" not in headers
    # --gzip: every non-streamed answer, GET /v1/models included; streams never.
    headers, raw = raw_body(llama.url, "/v1/chat/completions", chat(), {})
    assert headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(raw))["choices"]
    models = HTTP.get(llama.url + "/v1/models")
    assert models.headers["content-encoding"] == "gzip" and models.json()["data"]
    headers, raw = raw_body(llama.url, "/v1/chat/completions", chat(stream=True), {})
    assert "content-encoding" not in headers and raw.endswith(b"data: [DONE]\n\n")


def test_close_after_done_drops_the_connection_after_the_last_event(plain: Mock) -> None:
    # At the socket: every byte of the stream, [DONE] last, and then the connection closes owing a byte.
    body = json.dumps(chat(stream=True)).encode()
    with socket.create_connection(("127.0.0.1", plain.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Mock-Close-After-Done: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    declared = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
    )
    assert payload.endswith(b"data: [DONE]\n\n") and declared == len(payload) + 1

    # Through a client: the events parse, then the body is reported incomplete.
    for path, request, last in [
        ("/v1/chat/completions", chat(stream=True), b"data: [DONE]"),
        ("/v1/responses", {"input": "x", "stream": True}, b"event: response.completed\n"),
    ]:
        received = b""
        with (
            pytest.raises(httpx.RemoteProtocolError),
            HTTP.stream(
                "POST", plain.url + path, json=request, headers={"X-Mock-Close-After-Done": "1"}
            ) as r,
        ):
            for raw in r.iter_raw():
                received += raw
        assert received.endswith(b"\n\n") and received.rsplit(b"\n\n", 2)[-2].startswith(last), received[
            -300:
        ]
    stats = plain.stats()
    assert (stats["streams_completed"], stats["closed_after_done"], stats["aborted"]) == (3, 3, 0)


def test_serial_runs_one_request_at_a_time(llama: Mock) -> None:
    stream_done: list[float] = []

    def stream() -> None:
        headers = {"X-Mock-Token-Rate": "10", "X-Mock-Tokens": "6"}  # about 0.5 s
        with HTTP.stream(
            "POST", llama.url + "/v1/chat/completions", json=chat(stream=True), headers=headers
        ) as r:
            r.read()
        stream_done.append(time.monotonic())

    runner = threading.Thread(target=stream, daemon=True)
    runner.start()
    wait_for(lambda: llama.stats()["in_flight"] == 1, 5, "the stream to hold the slot")
    assert HTTP.get(llama.url + "/health").status_code == 404  # /health is not behind the slot
    models_done: list[float] = []

    def models() -> None:
        HTTP.get(llama.url + "/v1/models")
        models_done.append(time.monotonic())

    waiter = threading.Thread(target=models, daemon=True)
    waiter.start()
    wait_for(lambda: llama.stats()["waiting"] == 1, 5, "GET /v1/models to wait")
    seen_waiting = time.monotonic()
    runner.join(timeout=10)
    waiter.join(timeout=10)
    assert stream_done and models_done
    # The stream had most of its 0.5 s to go when the listing queued; it came when the stream ended.
    assert models_done[0] - seen_waiting >= 0.2
    assert models_done[0] >= stream_done[0] - 0.2
    stats = llama.stats()
    assert (stats["waiting"], stats["in_flight"], stats["streams_completed"]) == (0, 0, 1)


def test_serial_waiter_that_leaves_frees_its_place(llama: Mock) -> None:
    def hang() -> None:
        with pytest.raises(httpx.ReadTimeout):
            HTTP.post(
                llama.url + "/v1/completions", json={"prompt": "p"}, headers={"X-Mock-Hang": "1"}, timeout=1.5
            )

    hold = threading.Thread(target=hang, daemon=True)
    hold.start()
    wait_for(lambda: llama.stats()["in_flight"] == 1, 5, "the hang to hold the slot")
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(llama.url + "/v1/completions", json={"prompt": "q"}, timeout=0.3)
    wait_for(lambda: llama.stats()["waiting"] == 0, 5, "the waiter to be gone")
    hold.join(timeout=10)
    wait_for(lambda: llama.stats()["in_flight"] == 0, 5, "the slot to be free")
    started = time.monotonic()
    assert HTTP.post(llama.url + "/v1/completions", json={"prompt": "r"}).status_code == 200
    assert time.monotonic() - started < 1.0
    assert llama.stats()["requests_cancelled"] == 2  # the hang and the waiter


def test_echo_request_id(plain: Mock) -> None:
    rid = "trace-42"
    echo = {"X-Request-ID": rid, "X-Mock-Echo-Request-Id": "1"}
    assert (
        HTTP.post(plain.url + "/v1/chat/completions", json=chat(), headers=echo).headers["x-request-id"]
        == rid
    )
    with HTTP.stream("POST", plain.url + "/v1/chat/completions", json=chat(stream=True), headers=echo) as r:
        assert r.headers["x-request-id"] == rid
        r.read()
    assert HTTP.get(plain.url + "/v1/models", headers=echo).headers["x-request-id"] == rid
    assert (
        HTTP.post(plain.url + "/v1/embeddings", json={"model": 1}, headers=echo).headers["x-request-id"]
        == rid
    )
    plain_answer = HTTP.post(plain.url + "/v1/chat/completions", json=chat(), headers={"X-Request-ID": rid})
    assert "x-request-id" not in plain_answer.headers


def test_mock_requests_records_what_arrived(plain: Mock) -> None:
    HTTP.get(plain.url + "/health")
    body = chat("recorded")
    headers = [("Authorization", "Bearer client-key"), ("X-Dup", "one"), ("X-Dup", "two")]
    HTTP.post(plain.url + "/v1/chat/completions", json=body, headers=headers)
    HTTP.get(plain.url + "/mock/stats")  # admin calls are not recorded
    recorded = HTTP.get(plain.url + "/mock/requests").json()["requests"]
    assert [(r["method"], r["path"]) for r in recorded] == [
        ("GET", "/health"),
        ("POST", "/v1/chat/completions"),
    ]
    last = recorded[-1]
    assert last["headers"]["authorization"] == "Bearer client-key"
    assert last["headers"]["host"] == f"127.0.0.1:{plain.port}"
    assert last["headers"]["x-dup"] == "one, two"
    assert [v for k, v in last["header_list"] if k == "x-dup"] == ["one", "two"]
    assert json.loads(last["body"]) == body and recorded[0]["body"] == ""
    HTTP.get(plain.url + "/v1/models?x=1")
    (only,) = HTTP.get(plain.url + "/mock/requests?limit=1").json()["requests"]
    assert (only["path"], only["query"]) == ("/v1/models", "x=1")
    assert HTTP.get(plain.url + "/mock/requests?limit=0").json()["requests"] == []
    assert HTTP.get(plain.url + "/mock/requests?limit=x").status_code == 400
    plain.reset()
    assert HTTP.get(plain.url + "/mock/requests").json()["requests"] == []


def test_help_documents_the_options_and_headers() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    done = subprocess.run(
        [sys.executable, "-m", "ntonix.mock", "--help"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    for word in (
        "--model",
        "--api-key",
        "--kv-capacity",
        "--kv-block-chars",
        "--prefill-us-per-char",
        "--no-health",
        "--uuid-request-ids",
        "--gzip",
        "--serial",
        "X-Mock-Close-After-Done",
        "X-Mock-Gzip",
        "X-Mock-Shuffle",
        "X-Mock-Echo-Request-Id",
        "/mock/requests",
    ):
        assert word in done.stdout, word
