"""`ntonix mock`'s OpenAI surface beyond chat: models, completions, embeddings, responses, /tokenize, usage,
`--api-key` (issue 10 item 6), each through a real mock subprocess and, where it exists, the openai SDK.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.test_mock import HTTP, Mock, _show_logs_if_failed, chat, stream_events

KEY = "sk-mock-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVED = ("qwen2.5-coder", "bge-small", "org/tiny-1")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    """A mock without --model: lists mock-model and answers any model name."""
    mock = Mock(tmp_path_factory.mktemp("plain"), "--name", "plain")
    try:
        yield mock.wait_healthy()
    finally:
        mock.kill()


@pytest.fixture(scope="module")
def served_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    """A mock serving three models behind an API key."""
    args = [arg for model in SERVED for arg in ("--model", model)]
    mock = Mock(tmp_path_factory.mktemp("served"), "--name", "served", *args, "--api-key", KEY)
    try:
        yield mock.wait_healthy()
    finally:
        mock.kill()


@pytest.fixture
def mock(plain: Mock, request: pytest.FixtureRequest) -> Iterator[Mock]:
    plain.reset()
    yield plain
    _show_logs_if_failed(request, [plain])


@pytest.fixture
def served(served_mock: Mock, request: pytest.FixtureRequest) -> Iterator[Mock]:
    served_mock.reset()
    yield served_mock
    _show_logs_if_failed(request, [served_mock])


def post(mock: Mock, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return HTTP.post(mock.url + path, json=body, headers=headers, timeout=10)


def sse(mock: Mock, path: str, body: Any, headers: dict[str, str] | None = None) -> list[str]:
    """`data:` payloads of a stream from any endpoint (`event:` lines dropped)."""
    with HTTP.stream("POST", mock.url + path, json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    assert text.endswith("\n\n")
    payloads = []
    for event in text.split("\n\n")[:-1]:
        (data,) = [line[len("data: ") :] for line in event.split("\n") if line.startswith("data: ")]
        payloads.append(data)
    return payloads


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["type"]
    return error


# --- item 1: models


def test_models_list_from_repeated_model_option_and_lookup(served: Mock) -> None:
    listing = HTTP.get(served.url + "/v1/models", headers=AUTH, timeout=5).json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == list(SERVED)
    assert all(m["object"] == "model" and m["owned_by"] == "served" for m in listing["data"])
    assert all(isinstance(m["created"], int) for m in listing["data"])
    for model in SERVED:  # a slash in an id is part of the path
        one = HTTP.get(f"{served.url}/v1/models/{model}", headers=AUTH, timeout=5)
        assert one.status_code == 200 and one.json() == listing["data"][SERVED.index(model)]
    error = assert_error(
        HTTP.get(served.url + "/v1/models/gpt-4", headers=AUTH, timeout=5), 404, "model_not_found"
    )
    assert "gpt-4" in error["message"]


def test_model_not_served_is_404_and_the_first_is_the_default(served: Mock) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert post(served, "/v1/chat/completions", body, AUTH).json()["model"] == "qwen2.5-coder"
    assert (
        post(served, "/v1/chat/completions", {**body, "model": "bge-small"}, AUTH).json()["model"]
        == "bge-small"
    )
    for path, request in [
        ("/v1/chat/completions", {**body, "model": "llama-3.1-8b"}),
        ("/v1/chat/completions", {**body, "model": "llama-3.1-8b", "stream": True}),
        ("/v1/completions", {"model": "llama-3.1-8b", "prompt": "x"}),
        ("/v1/embeddings", {"model": "llama-3.1-8b", "input": "x"}),
        ("/v1/responses", {"model": "llama-3.1-8b", "input": "x"}),
        ("/tokenize", {"model": "llama-3.1-8b", "prompt": "x"}),
    ]:
        error = assert_error(post(served, path, request, AUTH), 404, "model_not_found")
        assert "llama-3.1-8b" in error["message"] and error["param"] == "model", path
    assert served.stats()["streams_started"] == 0


def test_without_model_option_any_name_is_answered(mock: Mock) -> None:
    assert [m["id"] for m in HTTP.get(mock.url + "/v1/models", timeout=5).json()["data"]] == ["mock-model"]
    assert HTTP.get(mock.url + "/v1/models/mock-model", timeout=5).status_code == 200
    assert_error(HTTP.get(mock.url + "/v1/models/anything", timeout=5), 404, "model_not_found")
    assert post(mock, "/v1/chat/completions", chat()).json()["model"] == "gpt-test"


# --- item 2: completions


def test_completions_non_streaming_every_prompt_shape(mock: Mock) -> None:
    one = post(mock, "/v1/completions", {"model": "m", "prompt": "write a haiku"}).json()
    assert one["object"] == "text_completion" and one["id"].startswith("cmpl-")
    assert one["model"] == "m" and isinstance(one["created"], int)
    (choice,) = one["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert choice["text"].startswith("Echo: write a haiku") and len(choice["text"].split()) == 16
    assert one["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    # The same words as a chat answer to the same prompt.
    chat_answer = post(mock, "/v1/chat/completions", chat("write a haiku")).json()
    assert chat_answer["choices"][0]["message"]["content"] == choice["text"]

    many = post(mock, "/v1/completions", {"prompt": ["a b", "c"], "max_tokens": 3}).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in many["choices"]] == [
        (0, "Echo: a b", "length"),
        (1, "Echo: c lorem", "length"),
    ]
    assert many["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}

    tokens = post(mock, "/v1/completions", {"prompt": [101, 7, 7, 9]}).json()
    assert tokens["usage"]["prompt_tokens"] == 4 and len(tokens["choices"]) == 1
    arrays = post(mock, "/v1/completions", {"prompt": [[1, 2], [3, 4, 5]]}).json()
    assert arrays["usage"]["prompt_tokens"] == 5 and len(arrays["choices"]) == 2

    for bad in ({"prompt": []}, {"prompt": [1, "a"]}, {"prompt": [[]]}, {"prompt": 5}, {"model": "m"}):
        response = post(mock, "/v1/completions", bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert "prompt" in post(mock, "/v1/completions", {"model": "m"}).json()["error"]["message"]


def test_completions_streaming_with_usage(mock: Mock) -> None:
    body = {"prompt": ["one two", "three"], "stream": True, "stream_options": {"include_usage": True}}
    events = sse(mock, "/v1/completions", body, {"X-Mock-Tokens": "4"})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 8,
        "total_tokens": 11,
    }
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "Echo: one two lorem", 1: "Echo: three lorem ipsum"}
    assert finishes == {0: "stop", 1: "stop"}
    # Without include_usage there is no usage chunk.
    plain = [json.loads(e) for e in sse(mock, "/v1/completions", {"prompt": "x", "stream": True})[:-1]]
    assert all(c["choices"] and "usage" not in c for c in plain)
    stats = mock.stats()
    assert (stats["streams_started"], stats["streams_completed"]) == (2, 2)


# --- item 2: embeddings


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def test_embeddings_are_deterministic_unit_vectors_per_input(mock: Mock) -> None:
    answer = post(mock, "/v1/embeddings", {"model": "e", "input": ["alpha", "beta", "alpha"]}).json()
    assert answer["object"] == "list" and answer["model"] == "e"
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    data = answer["data"]
    assert [(d["object"], d["index"]) for d in data] == [("embedding", 0), ("embedding", 1), ("embedding", 2)]
    alpha, beta, alpha_again = (d["embedding"] for d in data)
    assert len(alpha) == 16 and alpha == alpha_again and alpha != beta
    assert abs(norm(alpha) - 1.0) < 1e-5 and abs(norm(beta) - 1.0) < 1e-5
    single = post(mock, "/v1/embeddings", {"input": "alpha"}).json()["data"]
    assert [d["embedding"] for d in single] == [alpha]

    short = post(mock, "/v1/embeddings", {"input": "alpha", "dimensions": 4}).json()["data"][0]["embedding"]
    assert len(short) == 4 and abs(norm(short) - 1.0) < 1e-5
    long = post(mock, "/v1/embeddings", {"input": "alpha", "dimensions": 1024}).json()["data"][0]["embedding"]
    assert len(long) == 1024

    tokens = post(mock, "/v1/embeddings", {"input": [5, 6, 7]}).json()
    assert len(tokens["data"]) == 1 and tokens["usage"]["prompt_tokens"] == 3
    arrays = post(mock, "/v1/embeddings", {"input": [[5, 6, 7], [8]]}).json()
    assert [d["index"] for d in arrays["data"]] == [0, 1]
    assert arrays["data"][0]["embedding"] == tokens["data"][0]["embedding"]
    assert arrays["data"][1]["embedding"] != arrays["data"][0]["embedding"]


def test_embeddings_base64_is_little_endian_float32(mock: Mock) -> None:
    floats = post(mock, "/v1/embeddings", {"input": ["x y", "z"]}).json()["data"]
    b64 = post(mock, "/v1/embeddings", {"input": ["x y", "z"], "encoding_format": "base64"}).json()["data"]
    for as_float, as_b64 in zip(floats, b64, strict=True):
        raw = base64.b64decode(as_b64["embedding"])
        assert len(raw) == 16 * 4
        assert list(struct.unpack("<16f", raw)) == as_float["embedding"]
    for bad in (
        {"input": "x", "encoding_format": "int8"},
        {"input": []},
        {"input": "x", "dimensions": 0},
        {"input": [["a"]]},
        {"model": "e"},
    ):
        response = post(mock, "/v1/embeddings", bad)
        assert response.status_code == 400, bad
    assert "input" in post(mock, "/v1/embeddings", {"model": "e"}).json()["error"]["message"]


def test_embeddings_shuffle_header_reorders_data_keeping_indexes(mock: Mock) -> None:
    inputs = [f"text number {i}" for i in range(8)]
    ordered = post(mock, "/v1/embeddings", {"input": inputs}).json()["data"]
    shuffled = post(mock, "/v1/embeddings", {"input": inputs}, {"X-Mock-Shuffle": "1"}).json()["data"]
    assert [d["index"] for d in ordered] == list(range(8))
    assert [d["index"] for d in shuffled] != list(range(8))
    assert sorted(d["index"] for d in shuffled) == list(range(8))
    by_index = {d["index"]: d["embedding"] for d in shuffled}
    assert all(by_index[d["index"]] == d["embedding"] for d in ordered)
    two = post(mock, "/v1/embeddings", {"input": ["a", "b"]}, {"X-Mock-Shuffle": "1"}).json()["data"]
    assert [d["index"] for d in two] == [1, 0]


# --- item 2: responses


def test_responses_non_streaming(mock: Mock) -> None:
    answer = post(mock, "/v1/responses", {"model": "r", "input": "tell me more", "instructions": "be brief"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["status"] == "completed"
    assert body["model"] == "r" and isinstance(body["created_at"], int)
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    (part,) = item["content"]
    assert part["type"] == "output_text"
    assert part["text"].startswith("Echo: tell me more") and len(part["text"].split()) == 16
    usage = body["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (5, 16, 21)

    messages = {
        "input": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "input_text", "text": "second turn"}]},
        ],
        "max_output_tokens": 3,
    }
    capped = post(mock, "/v1/responses", messages).json()
    assert capped["output"][0]["content"][0]["text"] == "Echo: second turn"
    assert capped["status"] == "incomplete" and capped["incomplete_details"] == {
        "reason": "max_output_tokens"
    }
    assert capped["usage"]["input_tokens"] == 4
    response = post(mock, "/v1/responses", {"model": "r"})
    assert response.status_code == 400 and "input" in response.json()["error"]["message"]


def test_responses_streaming_events(mock: Mock) -> None:
    with HTTP.stream(
        "POST", mock.url + "/v1/responses", json={"input": "go on", "stream": True}, timeout=10
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = []
    for block in text.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]
        events.append(data)
    types = [e["type"] for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 16
    completed = events[-1]["response"]
    assert completed["status"] == "completed" and completed["id"] == events[0]["response"]["id"]
    assert "".join(deltas) == completed["output"][0]["content"][0]["text"] == events[-4]["text"]
    assert completed["usage"]["output_tokens"] == 16 and completed["usage"]["input_tokens"] == 2
    assert "[DONE]" not in text
    assert mock.stats()["streams_completed"] == 1


# --- item 2: tokenize and usage everywhere


def test_tokenize_counts_words_like_usage(mock: Mock) -> None:
    answer = post(mock, "/tokenize", {"prompt": "the cat the dog"}).json()
    assert answer["count"] == 4 and len(answer["tokens"]) == 4
    assert answer["tokens"][0] == answer["tokens"][2] != answer["tokens"][1]
    assert all(isinstance(t, int) and t >= 0 for t in answer["tokens"])
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "the cat"}]
    assert post(mock, "/tokenize", {"messages": messages}).json()["count"] == 4
    usage = post(mock, "/v1/chat/completions", {"messages": messages}).json()["usage"]
    assert usage["prompt_tokens"] == 4
    response = post(mock, "/tokenize", {"model": "m"})
    assert response.status_code == 400 and "prompt" in response.json()["error"]["message"]


def test_usage_in_every_answer(mock: Mock) -> None:
    requests = [
        ("/v1/chat/completions", chat("a b")),
        ("/v1/completions", {"prompt": "a b"}),
        ("/v1/embeddings", {"input": "a b"}),
        ("/v1/responses", {"input": "a b"}),
    ]
    for path, body in requests:
        usage = post(mock, path, body).json()["usage"]
        assert usage.get("prompt_tokens", usage.get("input_tokens")) == 2, path
        assert usage["total_tokens"] >= 2, path
    events = stream_events(mock.url, chat("a b", stream=True, stream_options={"include_usage": True}))
    assert json.loads(events[-2])["usage"]["prompt_tokens"] == 2
    assert mock.stats()["requests_by_endpoint"] == {
        "/v1/chat/completions": 2,
        "/v1/completions": 1,
        "/v1/embeddings": 1,
        "/v1/responses": 1,
    }


# --- item 2: the openai SDK


def test_openai_sdk_completions_embeddings_responses(served: Mock) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=10)
    assert [m.id for m in client.models.list()] == list(SERVED)
    assert client.models.retrieve("bge-small").id == "bge-small"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")

    completion = client.completions.create(model="qwen2.5-coder", prompt="def add(a, b):", max_tokens=4)
    assert completion.choices[0].text == "Echo: def add(a, b):"
    assert completion.usage is not None and completion.usage.total_tokens == 3 + 4
    streamed = client.completions.create(
        model="qwen2.5-coder", prompt="def add(a, b):", max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text

    # The SDK asks for base64 unless told otherwise and decodes it.
    embedded = client.embeddings.create(model="bge-small", input=["one", "two"])
    as_floats = client.embeddings.create(model="bge-small", input=["one", "two"], encoding_format="float")
    assert [d.embedding for d in embedded.data] == [d.embedding for d in as_floats.data]
    assert len(embedded.data[0].embedding) == 16
    assert client.embeddings.create(model="bge-small", input="one", dimensions=8).data[0].embedding[0] != 0

    response = client.responses.create(model="org/tiny-1", input="hello responses")
    assert response.output_text.startswith("Echo: hello responses")
    assert response.usage is not None and response.usage.input_tokens == 2
    stream = client.responses.create(model="org/tiny-1", input="hello responses", stream=True)
    deltas = []
    final = None
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            final = event.response
    assert final is not None and "".join(deltas) == final.output_text == response.output_text

    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"


# --- item 3: --api-key


def test_api_key_guards_v1_but_not_health(served: Mock) -> None:
    assert HTTP.get(served.url + "/health", timeout=5).status_code == 200
    assert HTTP.post(served.url + "/tokenize", json={"prompt": "a"}, timeout=5).status_code == 200
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing")]:
            response = HTTP.request(method, served.url + path, json=body, headers=headers, timeout=5)
            error = assert_error(response, 401, "invalid_api_key")
            assert error["type"] == "invalid_request_error"
    assert HTTP.get(served.url + "/v1/models", headers=AUTH, timeout=5).status_code == 200
    assert post(served, "/v1/chat/completions", body, AUTH).status_code == 200
    assert HTTP.get(served.url + "/v1/nothing", headers=AUTH, timeout=5).status_code == 404
    stats = served.stats()
    assert stats["rejected"] == 6 and stats["chat_requests"] == 4  # unknown routes are not counted
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_streams_still_pace_on_other_endpoints(mock: Mock) -> None:
    """The token rate paces completions and responses streams like chat ones."""
    headers = {"X-Mock-Token-Rate": "25", "X-Mock-Tokens": "6"}  # 5 gaps of 40 ms
    for path, body in [
        ("/v1/completions", {"prompt": "p", "stream": True}),
        ("/v1/responses", {"input": "p", "stream": True}),
    ]:
        with HTTP.stream("POST", mock.url + path, json=body, headers=headers, timeout=10) as r:
            arrivals = []
            buffer = b""
            for raw in r.iter_raw():
                buffer += raw
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if b'"delta"' in event or (b'"text":"' in event and b'finish_reason":null' in event):
                        arrivals.append(time.monotonic())
        assert len(arrivals) == 6, path
        assert arrivals[-1] - arrivals[0] >= 0.9 * 5 / 25, path
