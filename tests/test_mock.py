"""`ntonix mock`, the mock OpenAI backend, tested as a real subprocess (`python -m ntonix.mock`).

Each mock runs on a free port, is polled on /health with a deadline, killed by PID in a finaliser, and its
output is printed when a test fails. Timing assertions use generous margins: they check that a knob has an
effect in the right direction and size, not the scheduler's precision.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parent.parent
# One client for every call: a new httpx client per request builds an SSL context, ~0.2 s on a busy machine.
HTTP = httpx.Client(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, OSError) as err:
            last = err
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: last {last!r}")


class Mock:
    """One `python -m ntonix.mock` subprocess with its output in a file."""

    def __init__(self, tmp: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"mock-{self.port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "python"), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "ntonix.mock", "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_healthy(self, timeout: float = 20.0) -> Mock:
        def up() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"mock exited early ({self.popen.returncode}):\n{self.log()}")
            return HTTP.get(self.url + "/health", timeout=1.0).status_code == 200

        wait_for(up, timeout, f"{self.url}/health")
        return self

    def stats(self) -> dict[str, Any]:
        return HTTP.get(self.url + "/mock/stats", timeout=5).json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        HTTP.post(self.url + "/mock/reset", timeout=5).raise_for_status()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Mocks:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Mock] = []

    def start(self, *args: str, wait: bool = True) -> Mock:
        mock = Mock(self.tmp, *args)
        self.all.append(mock)
        return mock.wait_healthy() if wait else mock


def _show_logs_if_failed(request: pytest.FixtureRequest, mocks: list[Mock]) -> None:
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        for mock in mocks:
            sys.stderr.write(f"\n----- output of mock on :{mock.port} -----\n{mock.log()[-6000:]}\n")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    """One mock for the tests that only read answers; counters are reset by `mock`."""
    mock = Mock(tmp_path_factory.mktemp("mock"), "--name", "mock-shared")
    try:
        yield mock.wait_healthy()
    finally:
        mock.kill()


@pytest.fixture
def mock(shared: Mock, request: pytest.FixtureRequest) -> Iterator[Mock]:
    shared.reset()
    yield shared
    _show_logs_if_failed(request, [shared])


@pytest.fixture
def mocks(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mocks]:
    started = Mocks(tmp_path)
    try:
        yield started
    finally:
        for one in started.all:
            one.kill()
        _show_logs_if_failed(request, started.all)


def chat(content: str = "hello world", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        **extra,
    }


def read_events(response: httpx.Response) -> list[tuple[float, str]]:
    """SSE `data:` payloads with their arrival time, read as the bytes come in."""
    events: list[tuple[float, str]] = []
    buffer = b""
    for raw in response.iter_raw():
        now = time.monotonic()
        buffer += raw
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            events.append((now, event[len(b"data: ") :].decode()))
    assert buffer == b"", buffer
    return events


def stream_events(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[str]:
    with HTTP.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [data for _, data in read_events(r)]


# --- answers


def test_non_streaming_shape_and_determinism(mock: Mock) -> None:
    first = HTTP.post(mock.url + "/v1/chat/completions", json=chat("say something nice"), timeout=5)
    second = HTTP.post(mock.url + "/v1/chat/completions", json=chat("say something nice"), timeout=5)
    other = HTTP.post(mock.url + "/v1/chat/completions", json=chat("something else"), timeout=5)
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    assert first.headers["x-mock-name"] == "mock-shared"
    body = first.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and body["id"] != second.json()["id"]
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-test"
    assert body["system_fingerprint"] == "mock-shared"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert content.startswith("Echo: say something nice")
    assert len(content.split()) == 16
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    assert second.json()["choices"][0]["message"]["content"] == content
    assert other.json()["choices"][0]["message"]["content"] != content


def test_tokens_header_cuts_or_pads_and_max_tokens_caps(mock: Mock) -> None:
    def content(headers: dict[str, str], **extra: Any) -> tuple[str, str]:
        body = chat("one two three four five", **extra)
        answer = HTTP.post(mock.url + "/v1/chat/completions", json=body, headers=headers, timeout=5).json()
        return answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"]

    assert content({"X-Mock-Tokens": "3"}) == ("Echo: one two", "stop")
    padded, _ = content({"X-Mock-Tokens": "40"})
    assert padded.startswith("Echo: one two three four five ") and len(padded.split()) == 40
    assert content({"X-Mock-Tokens": "0"}) == ("", "stop")
    assert content({}, max_tokens=2) == ("Echo: one", "length")


def test_streaming_chunks_parse_and_end_with_done(mock: Mock) -> None:
    expected = HTTP.post(mock.url + "/v1/chat/completions", json=chat("stream me"), timeout=5).json()
    events = stream_events(mock.url, chat("stream me", stream=True))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert len(chunks) == 1 + 16 + 1
    assert len({chunk["id"] for chunk in chunks}) == 1
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "gpt-test" and chunk["system_fingerprint"] == "mock-shared"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected["choices"][0]["message"]["content"]
    stats = mock.stats()
    assert (stats["streams_started"], stats["streams_completed"], stats["streams_cancelled"]) == (1, 1, 0)


def test_streaming_include_usage(mock: Mock) -> None:
    body = chat("a b c", stream=True, stream_options={"include_usage": True})
    events = stream_events(mock.url, body, {"X-Mock-Tokens": "4"})
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_token_rate_spaces_chunks(mock: Mock) -> None:
    rate, tokens = 20.0, 8  # one token every 50 ms
    headers = {"X-Mock-Token-Rate": str(rate), "X-Mock-Tokens": str(tokens)}
    body = chat("pace", stream=True)
    with HTTP.stream("POST", mock.url + "/v1/chat/completions", json=body, headers=headers, timeout=10) as r:
        events = read_events(r)
    token_times = [
        t for t, data in events if data != "[DONE]" and "content" in json.loads(data)["choices"][0]["delta"]
    ][1:]
    assert len(token_times) == tokens
    gaps = [b - a for a, b in itertools.pairwise(token_times)]
    span = token_times[-1] - token_times[0]
    assert span >= 0.9 * (tokens - 1) / rate, gaps
    assert span < 3 * (tokens - 1) / rate, gaps
    assert 0.025 <= statistics.median(gaps) <= 0.1, gaps

    # A non-streamed answer arrives when the stream would have ended.
    started = time.monotonic()
    HTTP.post(mock.url + "/v1/chat/completions", json=chat("pace"), headers=headers, timeout=10)
    assert time.monotonic() - started >= 0.9 * (tokens - 1) / rate

    # Rate 0 means as fast as possible: the same stream takes a fraction of that time.
    started = time.monotonic()
    stream_events(mock.url, body, {"X-Mock-Tokens": str(tokens)})
    assert time.monotonic() - started < (tokens - 1) / rate


def test_latency_header_delays_first_byte(mock: Mock) -> None:
    started = time.monotonic()
    fast = HTTP.post(mock.url + "/v1/chat/completions", json=chat(), timeout=5)
    fast_elapsed = time.monotonic() - started
    started = time.monotonic()
    slow = HTTP.post(
        mock.url + "/v1/chat/completions", json=chat(), headers={"X-Mock-Latency-Ms": "400"}, timeout=5
    )
    slow_elapsed = time.monotonic() - started
    assert fast.status_code == slow.status_code == 200
    assert slow_elapsed >= 0.4
    assert fast_elapsed < 0.4

    body = chat(stream=True)
    started = time.monotonic()
    with HTTP.stream(
        "POST", mock.url + "/v1/chat/completions", json=body, headers={"X-Mock-Latency-Ms": "300"}, timeout=5
    ) as r:
        headers_at = time.monotonic() - started
        events = read_events(r)
    assert headers_at >= 0.3
    assert events[-1][1] == "[DONE]"


def test_cli_options_set_defaults(mocks: Mocks) -> None:
    mock = mocks.start("--name", "custom", "--model", "my-model", "--tokens", "5", "--latency-ms", "300")
    models = HTTP.get(mock.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["my-model"]
    assert models["data"][0]["object"] == "model"
    started = time.monotonic()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    answer = HTTP.post(mock.url + "/v1/chat/completions", json=body, timeout=5).json()
    assert time.monotonic() - started >= 0.3
    assert answer["model"] == "my-model"  # no model in the request: the mock's own
    assert answer["system_fingerprint"] == "custom"
    assert answer["choices"][0]["message"]["content"] == "Echo: hi lorem ipsum dolor"


def test_default_name_is_mock_port(mocks: Mocks) -> None:
    mock = mocks.start()
    answer = HTTP.post(mock.url + "/v1/chat/completions", json=chat(), timeout=5).json()
    assert answer["system_fingerprint"] == f"mock-{mock.port}"


# --- errors and faults


@pytest.mark.parametrize(("status", "kind"), [(500, "server_error"), (503, "server_error"), (429, None)])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_status(mock: Mock, status: int, kind: str | None, stream: bool) -> None:
    response = HTTP.post(
        mock.url + "/v1/chat/completions",
        json=chat(stream=stream),
        headers={"X-Mock-Status": str(status)},
        timeout=5,
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == (kind or "invalid_request_error")


def test_bad_json_and_bad_headers_are_400(mock: Mock) -> None:
    for body in (b"{not json", b"[1, 2]", b'{"messages": "hello"}', b""):
        response = HTTP.post(mock.url + "/v1/chat/completions", content=body, timeout=5)
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["message"].startswith("invalid chat request: ")
    for name, value in [("X-Mock-Tokens", "many"), ("X-Mock-Latency-Ms", "-5"), ("X-Mock-Status", "302")]:
        response = HTTP.post(mock.url + "/v1/chat/completions", json=chat(), headers={name: value}, timeout=5)
        assert response.status_code == 400, name
        assert name.lower() in response.json()["error"]["message"]


def test_unknown_path_and_wrong_method(mock: Mock) -> None:
    missing = HTTP.get(mock.url + "/nope", timeout=5)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = HTTP.get(mock.url + "/v1/chat/completions", timeout=5)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_abort_after_drops_the_connection_mid_stream(mock: Mock) -> None:
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        HTTP.stream(
            "POST",
            mock.url + "/v1/chat/completions",
            json=chat(stream=True),
            headers={"X-Mock-Abort-After": "3"},
            timeout=5,
        ) as r,
    ):
        assert r.status_code == 200
        for raw in r.iter_raw():
            received += [e for e in raw.decode().split("\n\n") if e]
    assert len(received) == 3
    assert all("[DONE]" not in event for event in received)

    # Clean mode: the body ends properly, just without [DONE].
    events = stream_events(
        mock.url, chat(stream=True), {"X-Mock-Abort-After": "2", "X-Mock-Abort-Mode": "clean"}
    )
    assert len(events) == 2 and "[DONE]" not in events

    # Non-streaming: headers and the first bytes of the JSON, then the connection drops.
    with pytest.raises(httpx.RemoteProtocolError):
        HTTP.post(mock.url + "/v1/chat/completions", json=chat(), headers={"X-Mock-Abort-After": "10"})
    assert mock.stats()["aborted"] == 3


def test_client_disconnect_mid_stream_counts_as_cancelled(mock: Mock) -> None:
    # Tokens every 5 s: the mock can only notice the departure through client_disconnect, not a failed send.
    headers = {"X-Mock-Token-Rate": "0.2", "X-Mock-Tokens": "50"}
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", mock.url + "/v1/chat/completions", json=chat(stream=True), headers=headers
        ) as r,
    ):
        chunks = r.iter_raw()
        seen = b""
        while seen.count(b"\n\n") < 2:  # role and first token
            seen += next(chunks)
        stats = mock.stats()
        assert (stats["in_flight"], stats["streams_cancelled"]) == (1, 0)
    left = time.monotonic()
    stats = wait_for(lambda: (s := mock.stats())["streams_cancelled"] == 1 and s, 4, "streams_cancelled == 1")
    assert time.monotonic() - left < 4
    assert (stats["streams_started"], stats["streams_completed"], stats["in_flight"]) == (1, 0, 0)


def test_hang_never_answers_until_the_client_leaves(mock: Mock) -> None:
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(mock.url + "/v1/chat/completions", json=chat(), headers={"X-Mock-Hang": "1"}, timeout=0.5)
    stats = wait_for(lambda: (s := mock.stats())["requests_cancelled"] == 1 and s, 5, "hang noticed")
    assert stats["in_flight"] == 0


# --- admin endpoints


def test_health_can_be_set_and_stats_reset(mock: Mock) -> None:
    assert HTTP.get(mock.url + "/health", timeout=5).json() == {"status": "ok"}
    try:
        assert HTTP.post(mock.url + "/mock/health", json={"status": 503}, timeout=5).status_code == 200
        unhealthy = HTTP.get(mock.url + "/health", timeout=5)
        assert unhealthy.status_code == 503
        assert HTTP.post(mock.url + "/mock/health", json={"status": "bad"}, timeout=5).status_code == 400
    finally:
        HTTP.post(mock.url + "/mock/health", json={"status": 200}, timeout=5)
    assert HTTP.get(mock.url + "/health", timeout=5).status_code == 200

    raw = b'{"messages": [{"role": "user", "content": "inspect me"}]}'
    HTTP.post(mock.url + "/v1/chat/completions", content=raw, headers={"X-Trace": "abc"}, timeout=5)
    stats = mock.stats()
    assert stats["requests"] == 4  # three /health and one chat; admin calls are not counted
    assert stats["health_requests"] == 3 and stats["chat_requests"] == 1
    assert stats["last_headers"]["x-trace"] == "abc"
    assert stats["last_body"] == raw.decode()
    mock.reset()
    stats = mock.stats()
    assert stats["requests"] == stats["chat_requests"] == stats["streams_started"] == 0
    assert stats["last_headers"] is None and stats["last_body"] is None


# --- the openai client


def test_openai_client_non_streaming_and_streaming(mock: Mock) -> None:
    client = openai.OpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0, timeout=10)
    messages: Any = [{"role": "user", "content": "hello from openai"}]
    completion = client.chat.completions.create(model="gpt-test", messages=messages)
    content = completion.choices[0].message.content
    assert content is not None and content.startswith("Echo: hello from openai")
    assert completion.usage is not None and completion.usage.completion_tokens == 16
    assert completion.system_fingerprint == "mock-shared"

    stream = client.chat.completions.create(
        model="gpt-test", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    parts: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == content
    assert usage is not None and usage.total_tokens == completion.usage.total_tokens
    assert [m.id for m in client.models.list()] == ["mock-model"]


# --- process behaviour


def test_sigterm_exits_zero_promptly_with_requests_in_flight(mocks: Mocks) -> None:
    mock = mocks.start("--token-rate", "1", "--tokens", "100")
    outcomes: list[str] = []

    def call(headers: dict[str, str], stream: bool) -> None:
        try:
            with HTTP.stream(
                "POST",
                mock.url + "/v1/chat/completions",
                json=chat(stream=stream),
                headers=headers,
                timeout=30,
            ) as r:
                for _ in r.iter_raw():
                    pass
            outcomes.append("ended")
        except httpx.HTTPError as err:
            outcomes.append(type(err).__name__)

    threads = [
        threading.Thread(target=call, args=({"X-Mock-Hang": "1"}, False), daemon=True),
        threading.Thread(target=call, args=({}, True), daemon=True),
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: mock.stats()["in_flight"] == 2, 5, "two requests in flight")
    started = time.monotonic()
    mock.popen.send_signal(signal.SIGTERM)
    assert mock.popen.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    for thread in threads:
        thread.join(timeout=10)
    assert len(outcomes) == 2
    assert "Traceback" not in mock.log() and "panicked" not in mock.log()


def test_sigint_exits_zero(mocks: Mocks) -> None:
    mock = mocks.start()
    mock.popen.send_signal(signal.SIGINT)
    assert mock.popen.wait(timeout=10) == 0


def test_bad_options_give_a_usage_error(mocks: Mocks) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    for args in (["--tokens", "-1"], ["--port", "70000"], ["--token-rate", "fast"], ["--bogus"]):
        done = subprocess.run(
            [sys.executable, "-m", "ntonix.mock", *args], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert "Error:" in done.stderr, done.stderr


def test_busy_port_is_a_one_line_error(mocks: Mocks) -> None:
    first = mocks.start()
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    done = subprocess.run(
        [sys.executable, "-m", "ntonix.mock", "--host", "127.0.0.1", "--port", str(first.port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{first.port}" in done.stderr
