"""Routing by model (issue 10, SPEC §8), end to end: a real gateway in front of real mocks serving
different models.

Each mock is started with `--model` names, so it answers 404 `model_not_found` to any other model: a
request sent to the wrong backend cannot pass unnoticed. Where requests went is read from the mocks'
own counters (`/mock/stats`) and recordings (`/mock/requests`), never from the gateway's view of itself.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    HTTP,
    Proc,
    Processes,
    backend_entry,
    free_port,
    listed_models,
    mock_requests,
    mock_reset,
    wait_for,
    wait_models,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
JSON_HEADERS = {"content-type": "application/json"}


def post(gateway: Proc, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return HTTP.post(
        gateway.url + path,
        content=json.dumps(body),
        headers={**JSON_HEADERS, **(headers or {})},
        timeout=10.0,
    )


_unique = itertools.count()


def chat(model: str, content: str | None = None, **extra: Any) -> dict[str, Any]:
    """A chat body; without `content`, one no earlier request had (so the cache never answers it)."""
    text = content if content is not None else f"hello {next(_unique)}"
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def served(mock: Proc, path: str = CHAT) -> int:
    stats = HTTP.get(mock.url + "/mock/stats", timeout=5.0).json()
    return int(stats["requests_by_endpoint"].get(path, 0))


def metrics(gateway: Proc) -> dict[str, Any]:
    return dict(HTTP.get(gateway.url + "/metrics", timeout=5.0).json())


def set_models_status(mock: Proc, status: int) -> None:
    response = HTTP.post(mock.url + "/mock/health", json={"models_status": status}, timeout=5.0)
    assert response.status_code == 200


class Cluster:
    """Mocks shared by the module, and one gateway over the first three.

    a1 and a2 serve `llama`, b serves `coder` and `embed` (all configured; discovery has tests of its
    own), alias `gpt-4o-mini` -> llama. z (`zed`), w (`wid`) and `anything` (lists mock-model, answers
    any name) are for gateways of single tests. Tests that need their own gateway start only that.
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.a1 = procs.mock_serving("llama", name="a1", wait=False)
        self.a2 = procs.mock_serving("llama", name="a2", wait=False)
        self.b = procs.mock_serving("coder", "embed", name="b", wait=False)
        self.z = procs.mock_serving("zed", name="z", wait=False)
        self.w = procs.mock_serving("wid", name="w", wait=False)
        self.anything = procs.mock(name="anything", wait=False)
        self.anything2 = procs.mock(name="anything2", wait=False)
        self.mocks = (self.a1, self.a2, self.b, self.z, self.w, self.anything, self.anything2)
        for mock in self.mocks:
            procs.wait_healthy(mock)
        self.gateway = procs.gateway_for(
            [
                # all configured: no discovery, so no pool rebuilt mid-test (exact round robin counts)
                backend_entry(self.a1, models=["llama"]),
                backend_entry(self.a2, models=["llama"]),
                backend_entry(self.b, models=["coder", "embed"]),
            ],
            {"models": {"aliases": {"gpt-4o-mini": "llama"}}},
        )
        wait_models(self.gateway, {"llama", "coder", "embed", "gpt-4o-mini"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    processes = Processes(tmp_path_factory.mktemp("models"))
    try:
        yield Cluster(processes)
    finally:
        processes.close()


@pytest.fixture
def fresh(cluster: Cluster, procs: Processes) -> Iterator[Cluster]:
    """The shared mocks with zeroed counters and default health; gateways of the test die with it."""
    for mock in cluster.mocks:
        mock_reset(mock)
        set_models_status(mock, 200)
    own = cluster.procs
    cluster.procs = procs
    try:
        yield cluster
    finally:
        cluster.procs = own


# -- routing ---------------------------------------------------------------------------------------


def test_requests_for_each_model_reach_only_its_backends(fresh: Cluster) -> None:
    gw = fresh.gateway
    for i in range(6):
        assert post(gw, CHAT, chat("llama", f"route llama {i}")).status_code == 200
    for i in range(3):
        response = post(gw, CHAT, chat("coder", f"route coder {i}"))
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "coder"
    for i in range(2):
        response = post(gw, EMBEDDINGS, {"model": "embed", "input": f"route embed {i}"})
        assert response.status_code == 200, response.text
    # llama is spread over its two backends (round robin: 3 and 3), never sent to b
    assert (served(fresh.a1), served(fresh.a2)) == (3, 3)
    assert served(fresh.b) == 3
    assert served(fresh.b, EMBEDDINGS) == 2
    assert served(fresh.a1, EMBEDDINGS) + served(fresh.a2, EMBEDDINGS) == 0
    for mock, model in ((fresh.a1, "llama"), (fresh.a2, "llama")):
        assert {json.loads(r["body"])["model"] for r in mock_requests(mock, CHAT)} == {model}


def test_a_model_nobody_serves_is_404_model_not_found_naming_it(fresh: Cluster) -> None:
    for path, body in (
        (CHAT, chat("gpt-5-turbo")),
        (COMPLETIONS, {"model": "gpt-5-turbo", "prompt": "x"}),
        (EMBEDDINGS, {"model": "gpt-5-turbo", "input": "x"}),
    ):
        response = post(fresh.gateway, path, body)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "model_not_found"
        assert "'gpt-5-turbo'" in error["message"] and "/v1/models" in error["message"]
        assert response.headers["x-request-id"]
    assert sum(served(m, p) for m in fresh.mocks for p in (CHAT, COMPLETIONS, EMBEDDINGS)) == 0


def test_alias_is_routed_as_its_target_and_the_body_rewritten(fresh: Cluster) -> None:
    gw = fresh.gateway
    response = post(gw, CHAT, chat("gpt-4o-mini", "alias please"))
    assert response.status_code == 200, response.text
    assert response.headers["x-cache"] == "MISS"
    # the answer keeps the backend's bytes: it names the model that answered, not the alias
    assert response.json()["model"] == "llama"
    assert response.headers["content-length"] == str(len(response.content))
    [forwarded] = mock_requests(fresh.a1, CHAT) + mock_requests(fresh.a2, CHAT)
    assert json.loads(forwarded["body"]) == chat("llama", "alias please")
    assert served(fresh.b) == 0


def test_cache_key_has_the_route_and_the_resolved_model(fresh: Cluster) -> None:
    gw = fresh.gateway
    first = post(gw, CHAT, chat("gpt-4o-mini", "shared entry"))
    assert first.headers["x-cache"] == "MISS"
    # the alias and its target share one entry: same answer bytes, no second backend request
    target = post(gw, CHAT, chat("llama", "shared entry"))
    assert target.headers["x-cache"] == "HIT"
    assert target.content == first.content
    # the same body for another model is another entry, answered by that model's backend
    other = post(gw, CHAT, chat("coder", "shared entry"))
    assert other.headers["x-cache"] == "MISS"
    assert other.json()["model"] == "coder"
    # a body valid on two routes: one entry per route
    both = {"model": "llama", "messages": [{"role": "user", "content": "two routes"}], "prompt": "two routes"}
    assert post(gw, CHAT, both).headers["x-cache"] == "MISS"
    on_completions = post(gw, COMPLETIONS, both)
    assert on_completions.headers["x-cache"] == "MISS"
    assert on_completions.json()["object"] == "text_completion"
    assert served(fresh.a1) + served(fresh.a2) == 2
    assert served(fresh.b) == 1


def test_model_whose_backends_are_all_down_is_503_with_retry_after(fresh: Cluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = fresh.procs.gateway_for(
        [backend_entry(fresh.b, models=["coder"]), {"url": dead, "models": ["ghost"]}]
    )
    # the first attempt fails to connect (503 already); once health checks mark it down, the same
    for _ in range(2):
        response = post(gw, CHAT, chat("ghost"))
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
        error = response.json()["error"]
        assert error["code"] == "no_healthy_backend" and "'ghost'" in error["message"]
        wait_for(
            lambda: not next(b for b in metrics(gw)["backends"] if b["url"] == dead)["healthy"],
            what="the dead backend marked unhealthy",
        )
    assert post(gw, CHAT, chat("coder")).status_code == 200
    assert served(fresh.b) == 1


def test_each_model_has_its_own_balancing_state(fresh: Cluster) -> None:
    one, two = fresh.anything, fresh.anything2  # both answer any model name
    gw = fresh.procs.gateway_for(
        [backend_entry(one, models=["x", "y"]), backend_entry(two, models=["x", "y"])]
    )
    names: dict[str, list[str]] = {"x": [], "y": []}
    for model in ("x", "y", "x", "y"):
        response = post(gw, CHAT, chat(model))
        assert response.status_code == 200, response.text
        names[model].append(response.json()["system_fingerprint"])
    # one round robin per model: each model alternates over both backends on its own
    assert names == {"x": ["anything", "anything2"], "y": ["anything", "anything2"]}


def test_a_backend_serving_several_models_is_one_breaker_and_one_health_state(fresh: Cluster) -> None:
    b = fresh.b
    gw = fresh.procs.gateway_for(
        [backend_entry(b, models=["coder", "embed"])],
        {"circuit_breaker": {"failure_threshold": 2, "open_seconds": 60}, "cache": {"enabled": False}},
    )
    [entry] = metrics(gw)["backends"]
    assert entry["models"] == ["coder", "embed"]
    for _ in range(2):
        assert post(gw, CHAT, chat("coder"), {"x-mock-status": "500"}).status_code == 500
    # failures on one model opened the circuit of the backend, so the other model has none left
    response = post(gw, EMBEDDINGS, {"model": "embed", "input": "after the breaker opened"})
    assert response.status_code == 503, response.text
    assert "'embed'" in response.json()["error"]["message"]
    assert served(b, EMBEDDINGS) == 0
    assert metrics(gw)["backends"][0]["circuit_state"] == "open"


# -- configured models and discovery ---------------------------------------------------------------


def test_configured_models_override_discovery(fresh: Cluster) -> None:
    a1, b = fresh.a1, fresh.b
    gw = fresh.procs.gateway_for([backend_entry(a1), backend_entry(b, models=["coder"])])
    wait_models(
        gw, {"llama", "coder"}
    )  # llama discovered from a1; b lists embed too, but its config says coder
    assert post(gw, CHAT, chat("llama")).status_code == 200
    assert post(gw, CHAT, chat("coder")).status_code == 200
    response = post(gw, EMBEDDINGS, {"model": "embed", "input": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert (served(a1), served(b), served(b, EMBEDDINGS)) == (1, 1, 0)
    backends = {entry["url"]: entry["models"] for entry in metrics(gw)["backends"]}
    assert backends == {a1.url: ["llama"], b.url: ["coder"]}


def test_unreadable_model_list_serves_any_model_and_discovery_refreshes(fresh: Cluster) -> None:
    z, w = fresh.z, fresh.w
    set_models_status(z, 500)  # before the gateway's first look
    gw = fresh.procs.gateway_for([backend_entry(z), backend_entry(w)])
    wait_models(gw, {"wid"})
    assert next(b for b in metrics(gw)["backends"] if b["url"] == z.url)["models"] is None
    # z may serve anything while its list cannot be read: zed goes there (only there: w is known)
    for _ in range(2):
        assert post(gw, CHAT, chat("zed")).status_code == 200
    assert (served(z), served(w)) == (2, 0)

    set_models_status(z, 200)  # learnt on the next health interval
    wait_models(gw, {"wid", "zed"})
    for mock in (z, w):
        mock_reset(mock)
    for _ in range(4):
        assert post(gw, CHAT, chat("wid")).status_code == 200
    assert (served(z), served(w)) == (0, 4)  # z is known not to serve wid any more

    set_models_status(z, 503)  # unreadable again: eligible for any model again, no longer listed
    wait_models(gw, {"wid"})
    assert post(gw, CHAT, chat("zed")).status_code == 200


# -- SIGHUP ----------------------------------------------------------------------------------------


def test_sighup_reapplies_backends_models_and_aliases(fresh: Cluster) -> None:
    b, a1 = fresh.b, fresh.a1
    gw = fresh.procs.gateway_for(
        [backend_entry(b, models=["coder"])], {"models": {"aliases": {"old": "coder"}}}
    )
    wait_models(gw, {"coder", "old"})
    assert post(gw, CHAT, chat("old")).status_code == 200
    assert post(gw, EMBEDDINGS, {"model": "embed", "input": "before"}).status_code == 404
    assert post(gw, CHAT, chat("llama")).status_code == 404

    path: Path = gw.config_path  # type: ignore[attr-defined]
    document = json.loads(path.read_text())
    document["backends"] = [backend_entry(b, models=["coder", "embed"]), backend_entry(a1)]
    document["models"] = {"aliases": {"new": "embed"}}
    path.write_text(json.dumps(document))
    gw.signal(signal.SIGHUP)
    wait_models(gw, {"coder", "embed", "llama", "new"})

    mock_reset(b)
    response = post(gw, CHAT, chat("old"))
    assert response.status_code == 404 and "'old'" in response.json()["error"]["message"]
    embedded = post(gw, EMBEDDINGS, {"model": "new", "input": "after reload"})
    assert embedded.status_code == 200 and embedded.json()["model"] == "embed"
    assert [json.loads(r["body"])["model"] for r in mock_requests(b, EMBEDDINGS)] == ["embed"]
    assert post(gw, CHAT, chat("llama")).status_code == 200
    assert served(a1) == 1 and served(b) == 0


def test_an_alias_of_an_alias_is_refused_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "chain.json"
    document = {
        "backends": [{"host": "127.0.0.1", "port": 9}],
        "models": {"aliases": {"a": "b", "b": "llama"}},
    }
    config.write_text(json.dumps(document))
    result = subprocess.run(
        [sys.executable, "-m", "ntonix", "config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout
    [line] = result.stderr.strip().splitlines()
    assert "models.aliases" in line and "'b' is itself an alias" in line


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_per_model_with_tokens_from_usage(fresh: Cluster) -> None:
    gw = fresh.procs.gateway_for(
        [backend_entry(fresh.a1), backend_entry(fresh.b, models=["coder", "embed"])],
        {"models": {"aliases": {"mini": "llama"}}},
    )
    wait_models(gw, {"llama", "coder", "embed", "mini"})
    # "count these four words" -> 4 prompt tokens; the mock answers 16 words
    assert post(gw, CHAT, chat("llama", "count these four words")).status_code == 200
    assert post(gw, CHAT, chat("mini", "count these four words")).headers["x-cache"] == "HIT"
    stream = post(
        gw,
        CHAT,
        chat("llama", "one two", stream=True, stream_options={"include_usage": True}, max_tokens=5),
    )
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    failed = post(gw, CHAT, chat("llama", "fail"), {"x-mock-status": "500"})
    assert failed.status_code == 500
    assert post(gw, EMBEDDINGS, {"model": "embed", "input": "three words here"}).status_code == 200
    # Responses API usage (input/output tokens), whole and in the stream's response.completed event
    assert (
        post(gw, "/v1/responses", {"model": "llama", "input": "five words in this input"}).status_code == 200
    )
    streamed = post(gw, "/v1/responses", {"model": "mini", "input": "a b", "stream": True})
    assert streamed.status_code == 200 and "response.completed" in streamed.text

    models = metrics(gw)["models"]
    llama = models["llama"]
    assert llama["requests"] == 6 and llama["errors"] == 1 and llama["cache_hits"] == 1
    assert llama["prompt_tokens"] == 4 + 2 + 5 + 2  # the failed answer carries no usage
    assert llama["completion_tokens"] == 16 + 5 + 16 + 16
    assert llama["routes"]["chat"]["requests"] == 4
    assert llama["routes"]["responses"]["requests"] == 2
    embed = models["embed"]
    assert (embed["requests"], embed["prompt_tokens"], embed["completion_tokens"]) == (1, 3, 0)
    assert embed["routes"]["embeddings"]["requests"] == 1
    assert "coder" not in models  # no traffic, no entry
    backends = {b["url"]: b["models"] for b in metrics(gw)["backends"]}
    assert backends == {fresh.a1.url: ["llama"], fresh.b.url: ["coder", "embed"]}


def test_tokens_are_counted_from_gzip_compressed_answers(fresh: Cluster) -> None:
    # not cacheable (cache off; /v1/responses never): the client's Accept-Encoding reaches the backend
    gw = fresh.procs.gateway_for([backend_entry(fresh.a1, models=["llama"])], {"cache": {"enabled": False}})
    gzip_headers = {"accept-encoding": "gzip", "x-mock-gzip": "1"}
    whole = post(gw, CHAT, chat("llama", "two words"), gzip_headers)
    assert whole.headers["content-encoding"] == "gzip" and whole.json()["usage"]["prompt_tokens"] == 2
    answer = post(gw, "/v1/responses", {"model": "llama", "input": "three more words"}, gzip_headers)
    assert answer.headers["content-encoding"] == "gzip" and answer.json()["usage"]["input_tokens"] == 3
    llama = metrics(gw)["models"]["llama"]
    assert (llama["prompt_tokens"], llama["completion_tokens"]) == (2 + 3, 16 + 16)


def _samples(text: str, family: str) -> dict[tuple[str, str], float]:
    out = {}
    for route, model, value in re.findall(
        rf'^{family}{{route="([^"]*)",model="([^"]*)"}} (\S+)$', text, re.M
    ):
        out[(route, model)] = float(value)
    return out


def test_prometheus_model_series_are_bounded_to_known_models(fresh: Cluster) -> None:
    known, anything = fresh.a1, fresh.anything
    set_models_status(anything, 500)  # its list unreadable: it may serve any model
    gw = fresh.procs.gateway_for([backend_entry(known, models=["llama"]), backend_entry(anything)])
    wait_for(
        lambda: metrics(gw)["backends"][1]["models"] is None,
        what="the any-model backend",
    )
    for i in range(3):
        assert post(gw, CHAT, chat("llama", f"prom {i}")).status_code == 200
    # client strings the gateway does not list: routed to the any-model backend, never a label value
    for name in ("client-made-up-1", "client-made-up-2"):
        assert post(gw, CHAT, chat(name)).status_code == 200
        assert post(gw, "/v1/rerank", {"model": name, "query": "q"}).status_code == 404  # the mock's 404
    text = HTTP.get(gw.url + "/metrics", headers={"accept": "text/plain"}, timeout=5.0).text
    requests = _samples(text, "ntonix_model_requests_total")
    assert requests[("chat", "llama")] == 3
    assert requests[("chat", "other")] == 2
    assert requests[("other", "other")] == 2
    assert "client-made-up" not in text
    assert set(metrics(gw)["models"]) == {"llama", "other"}  # the JSON view is bounded the same way
    assert {model for _, model in requests} <= {"llama", "other", "-"}
    tokens = _samples(text, "ntonix_model_completion_tokens_total")
    assert tokens[("chat", "llama")] == 3 * 16
    for family in ("errors", "cache_hits", "prompt_tokens"):
        assert _samples(text, f"ntonix_model_{family}_total").keys() == requests.keys()


def test_models_list_is_the_union_of_served_models_and_aliases(fresh: Cluster) -> None:
    ids = listed_models(fresh.gateway)
    assert sorted(ids) == ["coder", "embed", "gpt-4o-mini", "llama"]
    assert len(ids) == len(set(ids))  # llama is served by two backends, listed once
