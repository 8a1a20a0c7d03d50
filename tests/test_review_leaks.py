"""Review: every kind of request leaves the backend's in-flight count, and the gateway's active
counters, back at 0 (the pool's pick/release pairing on every path)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx

from tests.conftest import HTTP, Processes, wait_for

CHAT = "/v1/chat/completions"


def _chat(content: str, stream: bool = False) -> bytes:
    return json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": content}], "stream": stream}
    ).encode()


def _metrics(url: str) -> dict:
    return HTTP.get(url + "/metrics", timeout=5).json()


def _settled(url: str) -> bool:
    doc = _metrics(url)
    return all(b["in_flight"] == 0 for b in doc["backends"])


def test_in_flight_back_to_zero_after_every_kind_of_request(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(
        backends=[f"127.0.0.1:{mock.port}"],
        config={"proxy": {"ttfb_timeout_seconds": 0.5}, "cache": {"streaming": True}},
    )
    url = gateway.url
    h = {"content-type": "application/json"}
    # plain, cached hit, 4xx / 5xx passthrough, timeout, passthrough route, responses, embeddings
    assert HTTP.post(url + CHAT, content=_chat("a"), headers=h).status_code == 200
    assert HTTP.post(url + CHAT, content=_chat("a"), headers=h).headers["x-cache"] == "HIT"
    assert HTTP.post(url + CHAT, content=_chat("b"), headers={**h, "x-mock-status": "400"}).status_code == 400
    assert HTTP.post(url + CHAT, content=_chat("c"), headers={**h, "x-mock-status": "503"}).status_code == 503
    assert HTTP.post(url + CHAT, content=_chat("d"), headers={**h, "x-mock-hang": "1"}).status_code == 504
    HTTP.post(url + "/v1/unknown/thing", content=b"{}", headers=h)
    HTTP.post(url + "/v1/responses", content=json.dumps({"model": "mock-model", "input": "hi"}), headers=h)
    emb = {"model": "mock-model", "input": ["x", "y"]}
    assert HTTP.post(url + "/v1/embeddings", content=json.dumps(emb), headers=h).status_code == 200
    emb = {"model": "mock-model", "input": ["x", "z"]}
    r = HTTP.post(url + "/v1/embeddings", content=json.dumps(emb), headers=h)
    assert r.headers["x-cache"] == "PARTIAL"
    # streams: whole, a stream the backend aborts, a 4xx stream, a stream the client leaves
    with HTTP.stream("POST", url + CHAT, content=_chat("s1", True), headers=h) as resp:
        resp.read()
    with HTTP.stream(
        "POST", url + CHAT, content=_chat("s2", True), headers={**h, "x-mock-abort-after": "2"}
    ) as resp:
        resp.read()
    with HTTP.stream(
        "POST", url + CHAT, content=_chat("s3", True), headers={**h, "x-mock-status": "429"}
    ) as resp:
        resp.read()

    async def leave() -> None:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream(
                "POST", url + CHAT, content=_chat("s4", True), headers={**h, "x-mock-token-rate": "20"}
            ) as resp,
        ):
            async for _ in resp.aiter_raw():
                break

    asyncio.run(leave())
    wait_for(lambda: _settled(url), timeout=5, what="in_flight back to 0")
    doc = _metrics(url)
    assert doc["requests_active"] == 0 and doc["streams_active"] == 0
    # failures counted once each: the 503, the timeout, the aborted stream (not the 4xx, not the leaver)
    assert doc["backends"][0]["errors"] == 3, doc["backends"][0]
    assert gateway.alive()
    assert "Traceback" not in gateway.log(), gateway.log()


def _idle(url: str) -> bool:
    doc = _metrics(url)
    return (
        all(b["in_flight"] == 0 for b in doc["backends"])
        and doc["requests_active"] == 0
        and doc["streams_active"] == 0
    )


def test_counters_back_to_zero_after_concurrent_and_abandoned_requests(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    url = gateway.url
    h = {"content-type": "application/json"}
    slow = {**h, "x-mock-latency-ms": "600"}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=10) as client:

            async def whole(body: bytes, headers: dict[str, str]) -> int:
                return (await client.post(url + CHAT, content=body, headers=headers)).status_code

            async def leaver(body: bytes, headers: dict[str, str], after: float) -> None:
                with contextlib.suppress(httpx.TimeoutException):
                    async with httpx.AsyncClient(timeout=after) as own:
                        await own.post(url + CHAT, content=body, headers=headers)

            async def stream_leaver(body: bytes, headers: dict[str, str]) -> None:
                async with client.stream("POST", url + CHAT, content=body, headers=headers) as resp:
                    async for _ in resp.aiter_raw():
                        break

            async def stream_all(body: bytes, headers: dict[str, str]) -> bytes:
                async with client.stream("POST", url + CHAT, content=body, headers=headers) as resp:
                    return await resp.aread()

            # coalesced whole answers: a leader whose client leaves, followers that stay
            await asyncio.gather(
                leaver(_chat("co"), slow, 0.2), *(whole(_chat("co"), slow) for _ in range(3))
            )
            # coalesced streams: followers leave, one stays; an error stream shared by three
            rate = {**h, "x-mock-token-rate": "30"}
            await asyncio.gather(
                stream_all(_chat("cs", True), rate),
                *(stream_leaver(_chat("cs", True), rate) for _ in range(3)),
            )
            err = {**h, "x-mock-status": "500"}
            await asyncio.gather(*(stream_all(_chat("ce", True), err) for _ in range(3)))
            # every client of a shared stream leaves before the first byte
            await asyncio.gather(*(leaver(_chat("cl", True), slow, 0.2) for _ in range(3)))

    asyncio.run(run())
    wait_for(lambda: _idle(url), timeout=5, what="in_flight, requests_active, streams_active back to 0")
    assert gateway.alive()
    assert "Traceback" not in gateway.log(), gateway.log()
