"""The official `openai` Python client works through the gateway unchanged (issue 2).

The client only gets `base_url` pointed at the gateway; the mock's answer is
deterministic ("Echo: <prompt words>" padded with filler words), so whole and
streamed answers are compared with what the mock must have generated.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Processes

FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")
MESSAGES: Any = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "what is a gateway"},
]


def expected(prompt: str, tokens: int) -> str:
    words = ["Echo:", *prompt.split()][:tokens]
    words.extend(FILLER[i % len(FILLER)] for i in range(tokens - len(words)))
    return " ".join(words)


@pytest.fixture
def mock(procs: Processes) -> Any:
    return procs.mock("--tokens", "12", name="openai-mock")


@pytest.fixture
def gateway(procs: Processes, mock: Any) -> Any:
    return procs.gateway(backends=[f"127.0.0.1:{mock.port}"], config={"cache": {"enabled": False}})


@pytest.fixture
def client(gateway: Any) -> Any:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=10.0) as client:
        yield client


def mock_stats(mock: Any) -> dict[str, Any]:
    return dict(httpx.get(mock.url + "/mock/stats", timeout=5.0).json())


def test_non_streaming_completion(client: Any, mock: Any) -> None:
    completion = client.chat.completions.create(model="mock-model", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.model == "mock-model"
    assert completion.system_fingerprint == "openai-mock"
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected("what is a gateway", 12)
    assert choice.finish_reason == "stop"
    assert completion.usage.completion_tokens == 12
    stats = mock_stats(mock)
    assert stats["chat_requests"] == 1
    assert stats["last_headers"]["authorization"] == "Bearer x"  # the client's headers reach the backend


def test_streaming_completion(client: Any, mock: Any) -> None:
    stream = client.chat.completions.create(
        model="mock-model", messages=MESSAGES, stream=True, extra_headers={"X-Mock-Token-Rate": "200"}
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.system_fingerprint == "openai-mock" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected("what is a gateway", 12)
    assert chunks[-1].choices[0].finish_reason == "stop"
    stats = mock_stats(mock)
    assert (stats["streams_started"], stats["streams_completed"]) == (1, 1)


def test_streaming_with_usage_and_max_tokens(client: Any) -> None:
    stream = client.chat.completions.create(
        model="mock-model",
        messages=MESSAGES,
        stream=True,
        max_tokens=5,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected("what is a gateway", 5)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5


def test_raw_response_carries_gateway_headers(client: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mock-model", messages=MESSAGES, extra_headers={"X-Request-ID": "sdk-req-1"}
    )
    assert raw.headers["x-request-id"] == "sdk-req-1"
    assert raw.parse().choices[0].message.content == expected("what is a gateway", 12)


def test_backend_error_surfaces_as_sdk_exception(client: Any) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="mock-model", messages=MESSAGES, extra_headers={"X-Mock-Status": "429"}
        )
    assert caught.value.status_code == 429
    assert caught.value.code == "mock_forced_status"


def test_gateway_error_surfaces_as_sdk_exception(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="mock-model", messages=[])
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict)
    assert caught.value.body.get("type") == "invalid_request_error"


def test_stream_broken_mid_way_raises_in_the_sdk(client: Any) -> None:
    stream = client.chat.completions.create(
        model="mock-model", messages=MESSAGES, stream=True, extra_headers={"X-Mock-Abort-After": "4"}
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)
    assert "mid-stream" in caught.value.message
    assert len(received) == 4
