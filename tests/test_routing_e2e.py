"""Routing policies end to end (issue 11; SPEC §9): the real gateway in front of 3 or 4 KV-emulating mocks.

- `prefix`: a conversation's later turns go to the backend that served its earlier turns, which the
  mocks confirm with cached prompt characters; an overloaded backend (many slow requests in flight)
  loses new work despite affinity; a killed backend's conversations move to another one and stick
  there, with no errors once the health checks have seen it down;
- `session`: the `x-session-id` header, else the body's `user`, pins requests to one backend;
- a SIGHUP that removes a backend moves its sessions (`session`) or conversations (`prefix`) and
  leaves the others where they were, without errors;
- `least_requests` with one backend stuck on long streams sends new work to the others.

Which backend answered is the mock's name in `system_fingerprint`. The mocks' KV emulation (64-char
blocks, ample capacity, no prefill cost) reports `usage.prompt_tokens_details.cached_tokens` (prompt
characters / 4). Nothing here depends on timing except waits polled with deadlines.
"""

from __future__ import annotations

import json
import random
import re
import signal
import string
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HTTP, LOAD_SLACK, Proc, Processes, wait_for

CHAT = "/v1/chat/completions"
KV = ("--kv-capacity", "4096", "--kv-block-chars", "64")
BASE: dict[str, Any] = {
    "cache": {"enabled": False},
    # A killed backend refuses at once, so the probe timeout only matters for a live one that a loaded
    # machine stalls: 0.5 s let a live backend fall out of rotation under `make test-under-load`.
    "health_check": {"interval_seconds": 0.2, "timeout_seconds": 0.5 + LOAD_SLACK, "unhealthy_threshold": 2},
}


def mocks(procs: Processes, count: int, *extra: str) -> list[Proc]:
    started = [procs.mock(*KV, *extra, name=f"m{i}", wait=False) for i in range(count)]
    return [procs.wait_healthy(m) for m in started]


def gateway(procs: Processes, backends: list[Proc], policy: str) -> Proc:
    config = {**BASE, "routing": {"policy": policy}}
    return procs.gateway_for([{"url": m.url} for m in backends], config)


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase + "     ", k=n))


class Chat:
    """One conversation: each turn sends everything so far plus a new user message."""

    def __init__(self, rng: random.Random, system: str, session: str | None = None) -> None:
        self.rng = rng
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        self.session = session
        self.served: list[str] = []
        self.cached: list[int] = []
        self.prompt_chars: list[int] = []

    def turn(self, gateway: Proc, extra_headers: dict[str, str] | None = None) -> str:
        self.messages.append({"role": "user", "content": text(self.rng, 300)})
        headers = {"content-type": "application/json", **(extra_headers or {})}
        if self.session:
            headers["x-session-id"] = self.session
        body = {"model": "mock-model", "messages": self.messages}
        response = HTTP.post(gateway.url + CHAT, content=json.dumps(body), headers=headers, timeout=15.0)
        assert response.status_code == 200, response.text
        answer = response.json()
        self.served.append(answer["system_fingerprint"])
        self.cached.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"] * 4)
        # what the mock hashes: "role: content\n" per message
        self.prompt_chars.append(sum(len(m["role"]) + len(m["content"]) + 3 for m in self.messages))
        self.messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        return str(answer["system_fingerprint"])


def mock_stats(mock: Proc) -> dict[str, Any]:
    return dict(HTTP.get(mock.url + "/mock/stats", timeout=5.0).json())


def metrics(gateway: Proc) -> dict[str, Any]:
    return dict(HTTP.get(gateway.url + "/metrics", timeout=5.0).json())


def in_flight(gateway: Proc) -> dict[int, int]:
    return {b["port"]: b["in_flight"] for b in metrics(gateway)["backends"]}


def assert_followed(chat: Chat, first: int = 0, block: int = 64) -> None:
    """From turn `first` on, every turn went where the previous one did and found that prompt cached."""
    served, cached, chars = chat.served[first:], chat.cached[first:], chat.prompt_chars[first:]
    assert len(set(served)) == 1, chat.served
    for turn in range(1, len(served)):
        # the previous prompt, cut to whole blocks, is the least the backend can still hold
        assert cached[turn] >= chars[turn - 1] - block, (turn, chat.cached, chat.prompt_chars)


# -- prefix -----------------------------------------------------------------------------------------


def test_prefix_sends_later_turns_where_the_conversation_is(procs: Processes) -> None:
    backends = mocks(procs, 3)
    gw = gateway(procs, backends, "prefix")
    rng = random.Random(11)
    # a system prompt per tenant, so the first turns (sequential, all backends idle) spread in turn
    chats = [Chat(rng, f"You serve tenant {i}. " + text(rng, 1500)) for i in range(6)]
    for _ in range(4):
        for chat in chats:
            chat.turn(gw)
    for chat in chats:
        assert_followed(chat)
    homes = Counter(chat.served[0] for chat in chats)
    assert len(homes) == 3, homes
    # the mocks saw it too: the later turns' prompts were mostly cached
    stats = [mock_stats(m) for m in backends]
    total = sum(s["prompt_chars_total"] for s in stats)
    cached = sum(s["prompt_chars_cached"] for s in stats)
    assert cached / total > 0.6, (cached, total)
    index = metrics(gw)["routing"]["prefix_index"]
    assert index["affinity_picks"] >= 18
    assert index["feedback_confirmed"] >= 15


def test_prefix_overloaded_backend_loses_new_work_despite_affinity(procs: Processes) -> None:
    backends = mocks(procs, 3)
    gw = gateway(procs, backends, "prefix")
    rng = random.Random(12)
    prefix = text(rng, 3000)
    home = Chat(rng, prefix).turn(gw)
    home_port = {f"m{i}": m.port for i, m in enumerate(backends)}[home]
    # Slow requests sharing that prefix, each placed (counted in flight) before the next is sent.
    count = 12
    outcomes: list[int] = []

    def slow(i: int) -> None:
        body = {"model": "mock-model", "messages": [{"role": "system", "content": prefix + f" load {i}"}]}
        try:
            response = httpx.post(
                gw.url + CHAT, json=body, headers={"x-mock-latency-ms": "20000"}, timeout=30.0
            )
            outcomes.append(response.status_code)
        except httpx.HTTPError:
            outcomes.append(0)

    order: list[int] = []
    before = in_flight(gw)
    for i in range(count):
        threading.Thread(target=slow, args=(i,), daemon=True).start()
        wait_for(lambda n=i + 1: sum(in_flight(gw).values()) == n, timeout=10.0, what=f"request {i} placed")
        now = in_flight(gw)
        order.append(next(port for port in now if now[port] > before[port]))
        before = now
    placed = in_flight(gw)
    # affinity first: the first ones went to the backend holding the prefix, although it was busier ...
    assert order[:3] == [home_port] * 3, order
    # ... but load won before everything did: the others took new work although they held nothing
    assert placed[home_port] < count, placed
    assert all(n > 0 for n in placed.values()), placed
    assert not outcomes  # all still in flight (nothing failed on the way)


def test_prefix_dead_backend_conversations_move_and_stick(procs: Processes) -> None:
    backends = mocks(procs, 3)
    gw = gateway(procs, backends, "prefix")
    rng = random.Random(13)
    system = text(rng, 1000)
    chats = [Chat(rng, system) for _ in range(6)]
    for chat in chats:
        chat.turn(gw)
    victim_name = chats[0].served[0]
    victim = {f"m{i}": m for i, m in enumerate(backends)}[victim_name]
    victim.kill()
    wait_for(
        lambda: not next(b for b in metrics(gw)["backends"] if b["port"] == victim.port)["healthy"],
        timeout=10.0,
        what="the killed backend marked unhealthy",
    )
    for _ in range(3):
        for chat in chats:
            chat.turn(gw)  # asserts 200
    moved = [chat for chat in chats if chat.served[0] == victim_name]
    assert moved
    for chat in chats:
        assert victim_name not in chat.served[1:], chat.served
        assert_followed(chat, first=1)  # after the move, the conversation stays on its new backend
    for chat in chats:
        if chat not in moved:
            assert len(set(chat.served)) == 1, chat.served  # the others never moved
    assert metrics(gw)["routing"]["prefix_index"]["removed"] >= 1  # the index forgot the dead backend


# -- session --------------------------------------------------------------------------------------


def test_session_header_and_body_user_stick_to_one_backend(procs: Processes) -> None:
    backends = mocks(procs, 4)
    gw = gateway(procs, backends, "session")

    def ask(headers: dict[str, str], user: str | None) -> str:
        body: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
        if user is not None:
            body["user"] = user
        response = HTTP.post(gw.url + CHAT, json=body, headers=headers, timeout=10.0)
        assert response.status_code == 200, response.text
        return str(response.json()["system_fingerprint"])

    by_header = {s: {ask({"x-session-id": s}, None) for _ in range(4)} for s in (f"h{i}" for i in range(12))}
    by_user = {u: {ask({}, u) for _ in range(4)} for u in (f"user-{i}" for i in range(12))}
    for placements in (by_header, by_user):
        assert all(len(served) == 1 for served in placements.values()), placements
        assert len({next(iter(s)) for s in placements.values()}) >= 3, placements  # sessions spread
    # the header wins over the body's user
    header_home = next(iter(by_header["h0"]))
    assert {ask({"x-session-id": "h0"}, f"user-{i}") for i in range(6)} == {header_home}


@pytest.mark.parametrize("policy", ["session", "prefix"])
def test_reload_removing_a_backend_moves_only_its_sessions(procs: Processes, policy: str) -> None:
    backends = mocks(procs, 3)
    gw = gateway(procs, backends, policy)
    wait_for(lambda: all(b["healthy"] for b in metrics(gw)["backends"]), timeout=10.0, what="3 healthy")
    rng = random.Random(14)
    chats = [Chat(rng, f"tenant {i}: " + text(rng, 800), session=f"s{i}") for i in range(12)]
    for chat in chats:
        chat.turn(gw)
    homes = Counter(chat.served[0] for chat in chats)
    assert len(homes) == 3, homes
    removed = backends[2]
    path: Path = gw.config_path  # type: ignore[attr-defined]
    document = json.loads(path.read_text())
    document["backends"] = [{"url": m.url} for m in backends[:2]]
    path.write_text(json.dumps(document))
    gw.signal(signal.SIGHUP)
    kept = [m.port for m in backends[:2]]
    wait_for(lambda: [b["port"] for b in metrics(gw)["backends"]] == kept, timeout=10.0, what="reloaded")
    for _ in range(2):
        for chat in chats:
            chat.turn(gw)  # asserts 200: no errors across the reload
    for chat in chats:
        assert "m2" not in chat.served[1:], chat.served
        assert chat.served[1] == chat.served[2], chat.served  # the moved ones stick to their new home
        if chat.served[0] != "m2":
            assert len(set(chat.served)) == 1, chat.served  # the others stayed where they were
    assert mock_stats(removed)["chat_requests"] == homes["m2"]  # nothing more went to the removed one


# -- least_requests -------------------------------------------------------------------------------


def test_least_requests_sends_new_work_away_from_a_backend_stuck_on_long_streams(procs: Processes) -> None:
    stuck = procs.mock("--tokens", "400", "--token-rate", "10", name="stuck", wait=False)  # 40 s streams
    fast = [procs.mock(name=f"fast{i}", wait=False) for i in range(2)]
    backends = [procs.wait_healthy(m) for m in (stuck, *fast)]
    gw = gateway(procs, backends, "least_requests")
    outcomes: list[tuple[str, int]] = []

    def stream(i: int) -> None:
        body = {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": f"s{i}"}]}
        try:
            with httpx.stream("POST", gw.url + CHAT, json=body, timeout=60.0) as response:
                data = b"".join(response.iter_bytes())
            found = re.search(rb'"system_fingerprint":"([^"]+)"', data)
            outcomes.append((found.group(1).decode() if found else "?", response.status_code))
        except httpx.HTTPError as err:
            outcomes.append((type(err).__name__, 0))

    threads = []
    for i in range(15):
        thread = threading.Thread(target=stream, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
        # placed: either finished on a fast backend or still streaming on the stuck one
        wait_for(
            lambda n=i + 1: len(outcomes) + in_flight(gw)[stuck.port] == n,
            timeout=10.0,
            what=f"stream {i} placed",
        )
    on_stuck = mock_stats(stuck)["chat_requests"]
    # a long stream counts until it ends: after the first, the stuck backend gets nothing new
    assert on_stuck <= 2, (on_stuck, outcomes)
    assert in_flight(gw)[stuck.port] == on_stuck
    finished = Counter(name for name, status in outcomes if status == 200)
    assert sum(finished.values()) == 15 - on_stuck, outcomes
    assert set(finished) == {"fast0", "fast1"}, finished
