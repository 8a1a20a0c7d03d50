"""The client libraries people point at a cluster work unchanged through the gateway (issue 10).

The official `openai` SDK (models, chat, completions, embeddings, responses), LangChain's
`ChatOpenAI` and `OpenAIEmbeddings`, and litellm's `completion`, `text_completion` and `embedding`
(`openai/<model>` with `api_base` = the gateway's `/v1`), against one gateway in front of two mocks
serving different models. Each client only gets the gateway's URL; the mocks' recordings show each
request reached the backend of its model and no other.

Set-up facts: litellm reads its model price map from the network unless `LITELLM_LOCAL_MODEL_COST_MAP`
is set (there is no network here); LangChain's `OpenAIEmbeddings` counts tokens with tiktoken, which
downloads its encodings, unless `check_embedding_ctx_length=False` (its documented setting for
OpenAI-compatible servers that are not OpenAI).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import HTTP, Proc, Processes, backend_entry, mock_requests, mock_reset, wait_models

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")
TOKENS = 8
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"

_unique = itertools.count()


def prompt(stem: str) -> str:
    """A prompt no earlier request used (the cache must not answer for the backend)."""
    return f"{stem} {next(_unique)}"


def echo(text: str, tokens: int = TOKENS) -> str:
    """What the mock answers to `text`: "Echo:" and its words, padded with filler, cut to `tokens` words."""
    words = ["Echo:", *text.split()][:tokens]
    words.extend(FILLER[i % len(FILLER)] for i in range(tokens - len(words)))
    return " ".join(words)


class Cluster:
    """`llama` on mock a (alias `gpt-4o-mini`), `coder` and `text-embed` on mock b (configured)."""

    def __init__(self, procs: Processes) -> None:
        tokens = ("--tokens", str(TOKENS))
        self.a = procs.mock_serving("llama", extra=tokens, name="a", wait=False)
        self.b = procs.mock_serving("coder", "text-embed", extra=tokens, name="b", wait=False)
        for mock in (self.a, self.b):
            procs.wait_healthy(mock)
        self.gateway = procs.gateway_for(
            # configured, not discovered: a probe timing out on a loaded machine cannot re-route anything
            [backend_entry(self.a, models=["llama"]), backend_entry(self.b, models=["coder", "text-embed"])],
            {"models": {"aliases": {"gpt-4o-mini": "llama"}}},
        )
        wait_models(self.gateway, {"llama", "coder", "text-embed", "gpt-4o-mini"})
        self.base = self.gateway.url + "/v1"

    def posts(self, mock: Proc) -> list[tuple[str, str]]:
        """(path, model) of every POST `mock` received since the last reset."""
        return [
            (r["path"], json.loads(r["body"])["model"]) for r in mock_requests(mock) if r["method"] == "POST"
        ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    processes = Processes(tmp_path_factory.mktemp("sdks"))
    try:
        yield Cluster(processes)
    finally:
        processes.close()


@pytest.fixture
def fresh(cluster: Cluster) -> Cluster:
    for mock in (cluster.a, cluster.b):
        mock_reset(mock)
    return cluster


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster.base, api_key="sk-client", max_retries=0, timeout=20.0) as sdk:
        yield sdk


# -- openai ----------------------------------------------------------------------------------------


def test_openai_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert sorted(m.id for m in models) == ["coder", "gpt-4o-mini", "llama", "text-embed"]
    assert all(m.object == "model" and m.owned_by for m in models)
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-nothing")
    assert caught.value.code == "model_not_found"


def test_openai_chat_whole_and_streamed(fresh: Cluster, client: openai.OpenAI) -> None:
    text = prompt("openai chat")
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )
    assert completion.model == "llama"  # the backend's answer, as it sent it
    assert completion.choices[0].message.content == echo(text)
    assert completion.usage is not None and completion.usage.completion_tokens == TOKENS
    streamed = prompt("openai stream")
    stream = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": streamed}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echo(streamed)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == TOKENS
    assert fresh.posts(fresh.a) == [(CHAT, "llama"), (CHAT, "llama")]
    assert fresh.posts(fresh.b) == []


def test_openai_completions_whole_and_streamed(fresh: Cluster, client: openai.OpenAI) -> None:
    text = prompt("def add")
    completion = client.completions.create(model="coder", prompt=text, max_tokens=5)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == echo(text, 5)
    stream = client.completions.create(model="coder", prompt=text, max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == echo(text, 5)
    assert fresh.posts(fresh.b) == [(COMPLETIONS, "coder")] * 2
    assert fresh.posts(fresh.a) == []


def test_openai_embeddings(fresh: Cluster, client: openai.OpenAI) -> None:
    # the SDK asks for base64 and decodes it itself
    first = client.embeddings.create(model="text-embed", input=["alpha beta", "gamma"])
    assert [d.index for d in first.data] == [0, 1]
    assert all(len(d.embedding) == 16 for d in first.data)
    again = client.embeddings.create(model="text-embed", input="alpha beta", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(first.data[0].embedding, abs=1e-6)
    assert first.usage.prompt_tokens == 3
    assert fresh.posts(fresh.b) == [(EMBEDDINGS, "text-embed")] * 2


def test_openai_responses_whole_and_streamed(fresh: Cluster, client: openai.OpenAI) -> None:
    text = prompt("responses sdk")
    response = client.responses.create(model="llama", input=text)
    assert response.status == "completed"
    assert response.output_text == echo(text)
    assert response.usage is not None and response.usage.output_tokens == TOKENS
    with client.responses.stream(model="gpt-4o-mini", input=text) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == echo(text)
    assert fresh.posts(fresh.a) == [(RESPONSES, "llama")] * 2  # never cached: both reached the backend


# -- LangChain -------------------------------------------------------------------------------------


def test_langchain_chat_openai(fresh: Cluster) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fresh.base, api_key="sk-client", max_retries=0, timeout=20)
    text = prompt("langchain")
    message = llm.invoke(text)
    assert message.content == echo(text)
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] == TOKENS
    streamed = prompt("langchain stream")
    assert "".join(str(chunk.content) for chunk in llm.stream(streamed)) == echo(streamed)
    assert fresh.posts(fresh.a) == [(CHAT, "llama")] * 2


def test_langchain_openai_embeddings(fresh: Cluster) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="text-embed",
        base_url=fresh.base,
        api_key="sk-client",  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    documents = embeddings.embed_documents(["first doc", "second doc"])
    query = embeddings.embed_query("first doc")
    assert len(documents) == 2 and all(len(v) == 16 for v in documents)
    assert query == pytest.approx(documents[0], abs=1e-6)  # vectors depend on the input alone
    assert documents[0] != pytest.approx(documents[1], abs=1e-3)
    # the query's input was computed with the documents: answered from the per-input cache (SPEC §10)
    assert fresh.posts(fresh.b) == [(EMBEDDINGS, "text-embed")]


# -- litellm ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm() -> Any:
    import litellm

    litellm.telemetry = False
    return litellm


def test_litellm_completion_whole_and_streamed(fresh: Cluster, litellm: Any) -> None:
    text = prompt("litellm")
    messages = [{"role": "user", "content": text}]
    answer = litellm.completion(
        model="openai/gpt-4o-mini", api_base=fresh.base, api_key="x", messages=messages
    )
    assert answer.choices[0].message.content == echo(text)
    assert answer.usage.completion_tokens == TOKENS
    streamed = prompt("litellm stream")
    stream = litellm.completion(
        model="openai/llama",
        api_base=fresh.base,
        api_key="x",
        messages=[{"role": "user", "content": streamed}],
        stream=True,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == echo(streamed)
    assert fresh.posts(fresh.a) == [(CHAT, "llama")] * 2


def test_litellm_text_completion(fresh: Cluster, litellm: Any) -> None:
    text = prompt("def mul")
    answer = litellm.text_completion(model="openai/coder", api_base=fresh.base, api_key="x", prompt=text)
    assert answer.choices[0].text == echo(text)
    assert fresh.posts(fresh.b) == [(COMPLETIONS, "coder")]


def test_litellm_embedding(fresh: Cluster, litellm: Any) -> None:
    answer = litellm.embedding(
        model="openai/text-embed", api_base=fresh.base, api_key="x", input=["litellm one", "litellm two"]
    )
    vectors = [item["embedding"] for item in answer.data]
    assert len(vectors) == 2 and all(len(v) == 16 for v in vectors)
    assert fresh.posts(fresh.b) == [(EMBEDDINGS, "text-embed")]
    assert HTTP.get(fresh.gateway.url + "/metrics").json()["models"]["text-embed"]["requests"] >= 1
