"""`/v1/embeddings` cached per input (SPEC §10, issue 12) through a real gateway in front of `ntonix mock`.

The reference for every vector is the mock asked directly for that one input:
whatever mix of cached, duplicated and fresh inputs a request has, each item the
gateway answers must be byte-identical to it, at the client's index.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntonix.pipeline.embeddings import input_digest, share_tokens, split_inputs
from tests.conftest import Proc, Processes

EMB = "/v1/embeddings"
SHUFFLE = {"x-mock-shuffle": "1"}


class _Item(msgspec.Struct):
    index: int
    embedding: msgspec.Raw


class _Doc(msgspec.Struct):
    data: list[_Item]
    model: str | None = None
    usage: dict[str, int] | None = None


_decode = msgspec.json.Decoder(_Doc).decode


def vectors(body: bytes) -> dict[int, bytes]:
    """index -> the raw JSON bytes of its embedding, exactly as sent."""
    return {item.index: bytes(item.embedding) for item in _decode(body).data}


def embed(url: str, inputs: Any, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": "mock-model", "input": inputs, **extra}
    return httpx.post(url + EMB, json=body, headers=headers or {}, timeout=30.0)


def direct(mock: Proc, one: Any, **extra: Any) -> bytes:
    """The vector the backend computes for `one` input alone (bypassing the gateway)."""
    response = embed(mock.url, one, **extra)
    assert response.status_code == 200, response.text
    return vectors(response.content)[0]


def recorded(mock: Proc) -> list[dict[str, Any]]:
    items = httpx.get(mock.url + "/mock/requests", timeout=5.0).json()["requests"]
    return [json.loads(r["body"]) for r in items if r["path"] == EMB]


def reset(mock: Proc) -> None:
    httpx.post(mock.url + "/mock/reset", timeout=5.0)


def metrics(gateway: Proc) -> dict[str, Any]:
    return dict(httpx.get(gateway.url + "/metrics", timeout=5.0).json())


@pytest.fixture
def pair(procs: Processes) -> tuple[Proc, Proc]:
    mock = procs.mock("--record", "1024")
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    return mock, gateway


def check_answer(response: httpx.Response, mock: Proc, inputs: list[Any], **extra: Any) -> None:
    assert response.status_code == 200, response.text
    got = vectors(response.content)
    assert sorted(got) == list(range(len(inputs)))
    want = {i: direct(mock, one, **extra) for i, one in enumerate(inputs)}
    assert got == want


def test_mixed_batch_with_duplicates_sends_only_the_missing_inputs_once(pair: tuple[Proc, Proc]) -> None:
    mock, gateway = pair
    first = embed(gateway.url, ["alpha", "beta"], SHUFFLE)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    reset(mock)
    batch = ["gamma", "alpha", "delta", "gamma", "beta", "epsilon", "delta"]
    response = embed(gateway.url, batch, SHUFFLE)
    assert response.headers["x-cache"] == "PARTIAL"
    sent = recorded(mock)
    assert len(sent) == 1
    assert sent[0]["input"] == ["gamma", "delta", "epsilon"]  # missing ones, the client's order, once each
    doc = json.loads(response.content)
    assert [item["index"] for item in doc["data"]] == list(range(len(batch)))
    assert doc["model"] == "mock-model"
    # the mock counts a word a token: each input here is one token, duplicates counted as the client sent them
    assert doc["usage"] == {"prompt_tokens": len(batch), "total_tokens": len(batch)}
    reset(mock)
    check_answer(response, mock, batch)
    again = embed(gateway.url, list(reversed(batch)), SHUFFLE)
    assert again.headers["x-cache"] == "HIT"
    check_answer(again, mock, list(reversed(batch)))
    figures = metrics(gateway)
    assert figures["embedding_inputs_missed"] == 2 + 3
    assert figures["embedding_inputs_hit"] == (len(batch) - 3) + len(batch)
    prometheus = httpx.get(gateway.url + "/metrics/prometheus", timeout=5.0).text
    assert "ntonix_embedding_inputs_hit_total 11" in prometheus
    assert "ntonix_embedding_inputs_missed_total 5" in prometheus


def test_reordered_backend_answers_are_mapped_by_index(pair: tuple[Proc, Proc]) -> None:
    mock, gateway = pair
    batch = [f"item number {i}" for i in range(12)]
    shuffled = embed(mock.url, batch, SHUFFLE)
    assert [item.index for item in _decode(shuffled.content).data] != list(range(12))  # the mock did shuffle
    response = embed(gateway.url, batch, SHUFFLE)
    assert response.headers["x-cache"] == "MISS"
    assert recorded(mock)[-1]["input"] == batch  # nothing cached, no duplicate: sent as the client wrote it
    assert [item.index for item in _decode(response.content).data] == list(range(12))
    check_answer(response, mock, batch)
    usage = json.loads(response.content)["usage"]
    assert usage["prompt_tokens"] == sum(len(s.split()) for s in batch)  # the backend's own count


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_encoding_format_and_dimensions_are_part_of_the_key(pair: tuple[Proc, Proc], encoding: str) -> None:
    mock, gateway = pair
    batch = ["one", "two", "three"]
    plain = embed(gateway.url, batch, SHUFFLE, encoding_format=encoding)
    assert plain.headers["x-cache"] == "MISS"
    check_answer(plain, mock, batch, encoding_format=encoding)
    short = embed(gateway.url, ["two", "four"], SHUFFLE, encoding_format=encoding, dimensions=4)
    assert short.headers["x-cache"] == "MISS"  # other dimensions: other entries
    check_answer(short, mock, ["two", "four"], encoding_format=encoding, dimensions=4)
    other = "base64" if encoding == "float" else "float"
    assert embed(gateway.url, ["one"], encoding_format=other).headers["x-cache"] == "MISS"
    partial = embed(gateway.url, ["four", "five"], SHUFFLE, encoding_format=encoding, dimensions=4)
    assert partial.headers["x-cache"] == "PARTIAL"
    check_answer(partial, mock, ["four", "five"], encoding_format=encoding, dimensions=4)
    first = vectors(plain.content)[0]
    assert first.startswith(b'"') if encoding == "base64" else first.startswith(b"[")
    # `user` changes no vector: it is not part of the key
    assert embed(gateway.url, batch, encoding_format=encoding, user="someone").headers["x-cache"] == "HIT"


def test_single_string_and_list_share_entries(pair: tuple[Proc, Proc]) -> None:
    mock, gateway = pair
    single = embed(gateway.url, "lonely input")
    assert single.headers["x-cache"] == "MISS"
    assert recorded(mock)[-1]["input"] == "lonely input"  # forwarded as the client sent it
    check_answer(single, mock, ["lonely input"])
    listed = embed(gateway.url, ["lonely input", "friend"])
    assert listed.headers["x-cache"] == "PARTIAL"
    assert recorded(mock)[-1]["input"] == ["friend"]
    assert embed(gateway.url, "friend").headers["x-cache"] == "HIT"


def test_token_arrays(pair: tuple[Proc, Proc]) -> None:
    mock, gateway = pair
    single = embed(gateway.url, [11, 22, 33])
    assert single.headers["x-cache"] == "MISS"
    check_answer(single, mock, [[11, 22, 33]])
    batch = [[1, 2], [11, 22, 33], [1, 2], [7]]
    response = embed(gateway.url, batch, SHUFFLE)
    assert response.headers["x-cache"] == "PARTIAL"
    assert recorded(mock)[-1]["input"] == [[1, 2], [7]]
    check_answer(response, mock, batch)
    # a token array's tokens are its entries: the usage is exact
    assert json.loads(response.content)["usage"]["prompt_tokens"] == 2 + 3 + 2 + 1
    # the text "1 2" is not the tokens [1, 2]
    assert embed(gateway.url, ["1 2"]).headers["x-cache"] == "MISS"


def test_hit_makes_no_upstream_request_and_errors_pass_through(pair: tuple[Proc, Proc]) -> None:
    mock, gateway = pair
    assert embed(gateway.url, ["x", "y"]).headers["x-cache"] == "MISS"
    reset(mock)
    hit = embed(gateway.url, ["y", "x", "y"])
    assert hit.headers["x-cache"] == "HIT"
    assert recorded(mock) == []
    assert json.loads(hit.content)["usage"]["prompt_tokens"] == 3
    failed = embed(gateway.url, ["x", "z"], {"x-mock-status": "429"})
    assert failed.status_code == 429
    assert json.loads(failed.content)["error"]  # the backend's own error body
    assert recorded(mock)[-1]["input"] == ["z"]
    assert embed(gateway.url, ["z"]).headers["x-cache"] == "MISS"  # nothing was stored
    mixed = embed(gateway.url, ["x", [1, 2]])  # not one kind: the backend judges it as a whole
    assert mixed.status_code == 400


def test_concurrent_identical_inputs_are_computed_once(pair: tuple[Proc, Proc]) -> None:
    mock, gateway = pair
    batches = [["shared one", "shared two", f"own {i}"] for i in range(8)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.post(
                            gateway.url + EMB,
                            json={"model": "mock-model", "input": batch},
                            headers={"x-mock-latency-ms": "300"},
                        )
                        for batch in batches
                    )
                )
            )

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    sent = [item for body in recorded(mock) for item in body["input"]]
    assert sent.count("shared one") == 1 and sent.count("shared two") == 1
    assert sorted(sent) == sorted(["shared one", "shared two", *(f"own {i}" for i in range(8))])
    reset(mock)
    for response, batch in zip(responses, batches, strict=True):
        check_answer(response, mock, batch)


# -- property: any sequence of batches answers each input with the backend's own vector ---------------

_WORDS = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]
_text = st.lists(st.sampled_from(_WORDS), min_size=1, max_size=3).map(" ".join)
_tokens = st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=3)
_batch = st.one_of(
    st.lists(_text, min_size=1, max_size=6),
    st.lists(_tokens, min_size=1, max_size=6),
    _text,
)
_options = st.fixed_dictionaries(
    {},
    optional={"encoding_format": st.sampled_from(["float", "base64"]), "dimensions": st.sampled_from([3, 8])},
)


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    processes = Processes(tmp_path_factory.mktemp("embeddings-property"))
    try:
        mock = processes.mock()
        gateway = processes.gateway(backends=[f"127.0.0.1:{mock.port}"])
        yield mock, gateway, {}
    finally:
        processes.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_batch, _options), min_size=1, max_size=4))
def test_any_sequence_of_batches_gets_the_backends_vectors(
    shared_pair: tuple[Proc, Proc, dict[Any, bytes]], sequence: list[tuple[Any, dict[str, Any]]]
) -> None:
    mock, gateway, reference = shared_pair
    for inputs, options in sequence:
        response = embed(gateway.url, inputs, SHUFFLE, **options)
        assert response.status_code == 200, response.text
        got = vectors(response.content)
        items = [inputs] if isinstance(inputs, str) else inputs
        assert sorted(got) == list(range(len(items)))
        for index, one in enumerate(items):
            key = (json.dumps(one), json.dumps(options, sort_keys=True))
            if key not in reference:
                reference[key] = direct(mock, [one], **options)
            assert got[index] == reference[key], (one, options)


# -- the pieces, without a gateway ---------------------------------------------------------------------


@given(
    st.integers(min_value=0, max_value=100_000),
    st.lists(st.integers(min_value=0, max_value=5000), min_size=1),
)
def test_token_shares_add_up_to_the_backends_count(total: int, weights: list[int]) -> None:
    parts = share_tokens(total, weights)
    assert sum(parts) == total and len(parts) == len(weights)
    whole = sum(max(1, w) for w in weights)
    for part, weight in zip(parts, weights, strict=True):
        assert abs(part - total * max(1, weight) / whole) < 1.0


def test_split_inputs_kinds() -> None:
    assert split_inputs("a") == ([("s", "a")], False)
    assert split_inputs([1, 2]) == ([("t", [1, 2])], False)
    assert split_inputs(["a", "b"]) == ([("s", "a"), ("s", "b")], True)
    assert split_inputs([[1], [2, 3]]) == ([("t", [1]), ("t", [2, 3])], True)
    assert split_inputs(["a", [1]]) is None  # mixed: the whole-request path
    assert input_digest(0, ("s", "1 2")) != input_digest(0, ("t", [1, 2]))
    assert input_digest(0, ("s", "x")) != input_digest(1, ("s", "x"))
