"""End-to-end tests of SSE streaming through a real gateway in front of `ntonix mock` (issue 2).

The mock's answer is deterministic ("Echo: <prompt words>" cut or padded with
filler words to `X-Mock-Tokens` words), one SSE event per word, so the client
can check order and completeness; its `/mock/stats` counters show whether the
backend saw a stream cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from typing import Any

import httpx
import pytest

from tests.conftest import LOAD_SLACK, Processes, chat_body, wait_for

CHAT = "/v1/chat/completions"
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")


def expected_words(prompt: str, tokens: int) -> list[str]:
    """The mock's answer for `prompt` with `tokens` words (see ntonix/mock.py `_answer_words`)."""
    words = ["Echo:", *prompt.split()][:tokens]
    words.extend(FILLER[i % len(FILLER)] for i in range(tokens - len(words)))
    return words


def parse_events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE byte stream, in order; asserts nothing is left after the last event."""
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"", f"stream does not end with a complete event: {blocks[-1][:200]!r}"
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith(b"data: "), block[:200]
        payloads.append(block[len(b"data: ") :])
    return payloads


def deltas(payloads: list[bytes]) -> list[str]:
    """The content deltas of chat.completion.chunk payloads (ending with [DONE], which is left out)."""
    assert payloads[-1] == b"[DONE]"
    assert b"[DONE]" not in payloads[:-1]
    out = []
    for payload in payloads[:-1]:
        chunk = json.loads(payload)
        assert chunk["object"] == "chat.completion.chunk"
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            out.append(delta["content"])
    return out


def stream_headers(tokens: int, rate: float = 0, **extra: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "x-mock-tokens": str(tokens),
        "x-mock-token-rate": str(rate),
        **extra,
    }


def mock_stats(mock: Any) -> dict[str, Any]:
    return dict(httpx.get(mock.url + "/mock/stats", timeout=5.0).json())


def gateway_metrics(gateway: Any) -> dict[str, Any]:
    return dict(httpx.get(gateway.url + "/metrics", timeout=5.0).json())


@pytest.fixture
def mock(procs: Processes) -> Any:
    return procs.mock(name="stream-mock")


@pytest.fixture
def gateway(procs: Processes, mock: Any) -> Any:
    return procs.gateway(backends=[f"127.0.0.1:{mock.port}"], config={"cache": {"enabled": False}})


def test_stream_arrives_whole_in_order_and_ends_with_done(gateway: Any, mock: Any) -> None:
    prompt = "tell me a long story about gateways"
    with (
        httpx.Client(timeout=10.0) as client,
        client.stream(
            "POST",
            gateway.url + CHAT,
            content=json.dumps(chat_body(prompt, stream=True)),
            headers=stream_headers(40, 0, **{"x-request-id": "stream-1"}),
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == "stream-1"
        raw = b"".join(response.iter_raw())

    payloads = parse_events(raw)
    words = expected_words(prompt, 40)
    assert len(payloads) == 1 + len(words) + 1 + 1  # role, one per word, finish, [DONE]
    assert raw.endswith(b"data: [DONE]\n\n")
    got = deltas(payloads)
    assert got == [words[0], *(" " + word for word in words[1:])]
    assert "".join(got) == " ".join(words)
    first = json.loads(payloads[0])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["system_fingerprint"] == "stream-mock"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "stop"

    stats = mock_stats(mock)
    assert (stats["streams_started"], stats["streams_completed"], stats["streams_cancelled"]) == (1, 1, 0)
    assert stats["last_headers"]["x-request-id"] == "stream-1"
    metrics = gateway_metrics(gateway)
    assert (metrics["requests_total"], metrics["requests_success"], metrics["requests_error"]) == (1, 1, 0)
    assert metrics["streams_active"] == 0
    assert metrics["client_disconnects"] == 0


def test_stream_is_forwarded_as_produced_not_buffered(gateway: Any) -> None:
    """At 4 tokens/s each event must reach the client ~250 ms after the previous, not all at the end.

    4 tokens/s (not faster) so a loaded machine's scheduling jitter (~100 ms) fits inside one gap.
    """
    tokens, rate = 12, 4.0
    arrivals: list[float] = []
    buffer = b""
    with httpx.Client(timeout=10.0) as client:
        # warm the client's and the gateway's keep-alive connections, so `started` is close to token 0
        warm = client.post(
            gateway.url + CHAT, content=json.dumps(chat_body("warm")), headers=stream_headers(1)
        )
        assert warm.status_code == 200
        started = time.monotonic()
        with client.stream(
            "POST",
            gateway.url + CHAT,
            content=json.dumps(chat_body("pace", stream=True)),
            headers=stream_headers(tokens, rate),
        ) as response:
            assert response.status_code == 200
            for piece in response.iter_raw():
                buffer += piece
                now = time.monotonic() - started
                arrivals.extend(now for _ in range(buffer.count(b"\n\n") - len(arrivals)))
    payloads = parse_events(buffer)
    assert len(payloads) == len(arrivals) == tokens + 3
    # token k (payload k+1) is produced k/rate seconds after the first one
    token_arrivals = arrivals[1 : tokens + 1]
    gaps = [b - a for a, b in itertools.pairwise(token_arrivals)]
    stream_span = (tokens - 1) / rate
    assert token_arrivals[-1] - token_arrivals[0] >= 0.8 * stream_span, arrivals
    assert statistics.median(gaps) == pytest.approx(1 / rate, abs=0.1), gaps
    assert min(gaps) > 0.05, gaps  # no two tokens glued together by a buffer
    assert max(gaps) < 1.0, gaps
    # token i reaches the client before token i+1 is even produced (at >= (i+1)/rate after the request)
    for index, arrived in enumerate(token_arrivals[:-1]):
        assert arrived < (index + 1) / rate, (index, arrivals)
    assert arrivals[0] < arrivals[-1] - 0.8 * stream_span


def test_client_disconnect_cancels_the_backend_stream(gateway: Any, mock: Any) -> None:
    """A client leaving mid-stream makes the gateway drop the upstream request within 1 s (plus slack)."""
    with (
        httpx.Client(timeout=10.0) as client,
        client.stream(
            "POST",
            gateway.url + CHAT,
            content=json.dumps(chat_body("leave", stream=True)),
            headers=stream_headers(1000, 20),
        ) as response,
    ):
        assert response.status_code == 200
        received = b""
        pieces = response.iter_raw()  # kept referenced: the connection stays open after `break`
        for piece in pieces:
            received += piece
            if received.count(b"\n\n") >= 5:
                break
        before = mock_stats(mock)
        assert (before["streams_started"], before["streams_cancelled"], before["in_flight"]) == (1, 0, 1)
        left_at = time.monotonic()
        response.close()  # body unread: the connection is closed, not pooled

    stats = wait_for(
        lambda: (s := mock_stats(mock))["streams_cancelled"] == 1 and s,
        timeout=1.0 + LOAD_SLACK,
        interval=0.01,
        what="the mock to see the stream cancelled",
    )
    assert time.monotonic() - left_at < 1.0 + LOAD_SLACK  # else the 50 s stream runs on
    assert stats["streams_completed"] == 0
    wait_for(
        lambda: mock_stats(mock)["in_flight"] == 0, timeout=1.0 + LOAD_SLACK, what="mock in_flight back to 0"
    )
    metrics = wait_for(
        lambda: (m := gateway_metrics(gateway))["client_disconnects"] == 1 and m,
        what="the gateway to count the disconnect",
    )
    assert metrics["streams_active"] == 0
    assert metrics["requests_active"] == 0
    assert metrics["requests_total"] == 1


def test_client_leaving_before_first_byte_cancels_the_backend_request(gateway: Any, mock: Any) -> None:
    """The upstream request is dropped even while the backend has not answered at all (X-Mock-Hang)."""
    headers = stream_headers(10, 0, **{"x-mock-hang": "1"})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.url + CHAT,
            content=json.dumps(chat_body("hang", stream=True)),
            headers=headers,
            timeout=httpx.Timeout(10.0, read=0.3),
        )
    left_at = time.monotonic()
    wait_for(
        lambda: mock_stats(mock)["requests_cancelled"] == 1,
        timeout=1.0 + LOAD_SLACK,
        interval=0.01,
        what="the mock to see the hanging request cancelled",
    )
    assert time.monotonic() - left_at < 1.0 + LOAD_SLACK  # else it hangs until the 10 s timeout
    assert mock_stats(mock)["in_flight"] == 0
    wait_for(
        lambda: gateway_metrics(gateway)["client_disconnects"] == 1, what="gateway counts the disconnect"
    )


def test_backend_aborting_mid_stream_ends_with_an_error_event(gateway: Any) -> None:
    """Headers are gone by then, so no 502: the gateway ends the stream with an OpenAI error event."""
    with (
        httpx.Client(timeout=10.0) as client,
        client.stream(
            "POST",
            gateway.url + CHAT,
            content=json.dumps(chat_body("cut", stream=True)),
            headers=stream_headers(20, 0, **{"x-mock-abort-after": "5"}),
        ) as response,
    ):
        assert response.status_code == 200
        received = b""
        try:
            for piece in response.iter_raw():
                received += piece
        except httpx.HTTPError:
            pass  # an aborted connection would be an acceptable signal too
    events = [block for block in received.split(b"\n\n") if block]
    assert b"[DONE]" not in received
    assert len(events) == 6, events  # the 5 events the backend sent, then the error
    for event in events[:5]:
        assert json.loads(event.removeprefix(b"data: "))["object"] == "chat.completion.chunk"
    assert events[-1].startswith(b"data: ")
    error = json.loads(events[-1].removeprefix(b"data: "))["error"]
    assert {"message", "type", "code"} <= set(error)
    assert error["type"] == "upstream_error"
    metrics = wait_for(
        lambda: (m := gateway_metrics(gateway))["stream_errors"] == 1 and m,
        what="the gateway to count the broken stream",
    )
    assert metrics["backends"][0]["errors"] == 1
    assert metrics["streams_active"] == 0


def test_backend_error_before_stream_passes_through(gateway: Any) -> None:
    response = httpx.post(
        gateway.url + CHAT,
        content=json.dumps(chat_body("err", stream=True)),
        headers=stream_headers(5, 0, **{"x-mock-status": "429"}),
        timeout=10.0,
    )
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "mock_forced_status"


def test_500_concurrent_streams_complete_in_order(procs: Processes) -> None:
    mock = procs.mock("--threads", "2", name="many")
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"], config={"cache": {"enabled": False}})
    count, tokens, rate = 500, 12, 20.0

    async def one(client: httpx.AsyncClient, index: int) -> tuple[int, list[str]]:
        prompt = f"stream number {index}"
        async with client.stream(
            "POST",
            CHAT,
            content=json.dumps(chat_body(prompt, stream=True)),
            headers=stream_headers(tokens, rate),
        ) as response:
            raw = b"".join([piece async for piece in response.aiter_raw()])
            return response.status_code, deltas(parse_events(raw))

    async def run_all() -> list[tuple[int, list[str]]]:
        limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
        async with httpx.AsyncClient(base_url=gateway.url, limits=limits, timeout=60.0) as client:
            return await asyncio.gather(*(one(client, index) for index in range(count)))

    started = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - started

    for index, (status, got) in enumerate(results):
        assert status == 200, index
        words = expected_words(f"stream number {index}", tokens)
        assert got == [words[0], *(" " + word for word in words[1:])], index
    assert elapsed < 60, elapsed
    stats = mock_stats(mock)
    assert (stats["streams_started"], stats["streams_completed"], stats["streams_cancelled"]) == (
        count,
        count,
        0,
    )
    metrics = gateway_metrics(gateway)
    assert (metrics["requests_total"], metrics["requests_success"], metrics["requests_error"]) == (
        count,
        count,
        0,
    )
    assert metrics["streams_active"] == 0
    assert metrics["client_disconnects"] == 0
