"""rpm and tpm end to end with exact counts: 429s, Retry-After, x-ratelimit-* on every answer, streams
counted (usage asked for and kept from the client), cache hits counted as requests but not tokens.

The mock's answers use 2 prompt tokens ("a bN" is two words) and 16 completion tokens: 18 a request.
GCRA with a 60 s period: a key may start a request while at least one token is left (used <= tpm - 1),
so with tpm 100 requests 1..6 (used 0, 18, ..., 90) pass and the 7th (used 108) gets 429.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.conftest import Processes, wait_for
from tests.security.conftest import ADMIN, MODEL, Cluster, chat

RPM3 = "sk-rpm3-Vb2Ke"
TPM = "sk-tpm-Ht6Ls"
HITS = "sk-hits-Qw5Ye"
STREAM = "sk-stream-Lr8Gd"
ASKED = "sk-asked-Wc3Px"
PER_REQUEST = 18


def limit_headers(answer: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in answer.headers.items() if k.startswith("x-ratelimit-")}


def test_rpm_exact_count_and_429(cluster: Cluster) -> None:
    remaining = []
    for i in range(3):
        answer = cluster.post(RPM3, chat(f"rpm {i}"))
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
        assert "x-ratelimit-limit-tokens" not in answer.headers  # the key has no tpm
        remaining.append(answer.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    refused = cluster.post(RPM3, chat("rpm 3"))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 19 <= int(refused.headers["retry-after"]) <= 20  # one request comes back every 20 s
    assert limit_headers(refused) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
    }
    # a refused request reaches no backend and spends nothing
    assert not [r for r in cluster.backend_requests() if "rpm 3" in r["body"]]
    assert cluster.post(RPM3, chat("rpm 4")).status_code == 429


def test_tpm_exact_count_from_answers(cluster: Cluster) -> None:
    statuses, remaining = [], []
    for i in range(8):
        answer = cluster.post(TPM, chat(f"a b{i}"))
        statuses.append(answer.status_code)
        if answer.status_code == 200:
            usage = answer.json()["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] == PER_REQUEST
            remaining.append(int(answer.headers["x-ratelimit-remaining-tokens"]))
    assert statuses == [200] * 6 + [429] * 2
    admin = {"authorization": f"Bearer {ADMIN}"}
    per_key = httpx.get(cluster.gateway.url + "/metrics", headers=admin, timeout=5).json()["keys"]
    assert per_key["tpm100"] == {"rpm": None, "tpm": 100, "rate_limited": 2, "tokens": 6 * PER_REQUEST}
    # the whole answer's headers already count its own tokens (a little drains meanwhile: 1.7/s)
    expected = [max(0, 100 - PER_REQUEST * (i + 1)) for i in range(6)]
    assert all(e <= r <= e + 3 for e, r in zip(expected, remaining, strict=True)), remaining
    refused = cluster.post(TPM, chat("a b9"))
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    assert 3 <= int(refused.headers["retry-after"]) <= 6  # 108 - 99 tokens to drain: 5.4 s


def stream(
    cluster: Cluster, key: str, content: str, **extra: object
) -> tuple[int, list[str], dict[str, str]]:
    body = chat(content, stream=True, **extra)
    headers = {"authorization": f"Bearer {key}"}
    with httpx.stream("POST", cluster.gateway.url + "/v1/chat/completions", json=body, headers=headers) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
        return r.status_code, events, dict(r.headers)


def test_streams_are_counted_and_the_client_sees_the_stream_it_asked_for(cluster: Cluster) -> None:
    statuses = []
    for i in range(7):
        status, events, _ = stream(cluster, STREAM, f"a s{i}")
        statuses.append(status)
        if status == 200:
            assert events[-1] == "data: [DONE]"
            assert not [e for e in events if '"usage"' in e], "the usage event the client did not ask for"
    assert statuses == [200] * 6 + [429]
    upstream = [json.loads(r["body"]) for r in cluster.backend_requests() if '"a s0"' in r["body"]]
    assert upstream and upstream[0]["stream_options"] == {"include_usage": True}


def test_a_client_that_asks_for_stream_usage_gets_it(cluster: Cluster) -> None:
    status, events, headers = stream(cluster, ASKED, "asked", stream_options={"include_usage": True})
    assert status == 200
    usage = [json.loads(e[5:]) for e in events if '"usage"' in e]
    assert len(usage) == 1 and usage[0]["choices"] == []
    assert headers["x-ratelimit-limit-tokens"] == "100000"


def test_cache_hits_count_as_requests_not_tokens(cluster: Cluster) -> None:
    first = cluster.post(HITS, chat("a hit"))
    assert first.headers["x-cache"] == "MISS"
    after_miss = int(first.headers["x-ratelimit-remaining-tokens"])
    assert 82 <= after_miss <= 85
    requests_left = [first.headers["x-ratelimit-remaining-requests"]]
    for _ in range(11):  # 11 more: 11 x 18 tokens would be far over tpm 100 if hits counted
        hit = cluster.post(HITS, chat("a hit"))
        assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT"
        assert int(hit.headers["x-ratelimit-remaining-tokens"]) >= after_miss
        requests_left.append(hit.headers["x-ratelimit-remaining-requests"])
    assert requests_left == [str(n) for n in range(11, -1, -1)]
    refused = cluster.post(HITS, chat("a hit"))
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_sighup_reloads_keys_and_a_bad_file_keeps_them(procs: Processes, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"key": "sk-first-Hn4", "name": "first"}]}))
    mock = procs.mock("--model", MODEL)
    gateway = procs.gateway([f"127.0.0.1:{mock.port}"], config={"auth": {"keys_file": str(keys_file)}})

    def status(key: str) -> int:
        answer = httpx.post(
            gateway.url + "/v1/chat/completions",
            json=chat("reload"),
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        return answer.status_code

    assert (status("sk-first-Hn4"), status("sk-second-Jq7")) == (200, 401)
    from ntonix.auth.keys import hash_key

    keys_file.write_text(json.dumps({"keys": [{"key_sha256": hash_key("sk-second-Jq7"), "name": "second"}]}))
    gateway.signal(1)  # SIGHUP
    wait_for(lambda: status("sk-second-Jq7") == 200, 10, what="the new key after SIGHUP")
    assert status("sk-first-Hn4") == 401
    keys_file.write_text('{"keys": [{"key": "no name"}')
    gateway.signal(1)
    wait_for(lambda: "reload failed" in gateway.log(), 10, what="the reload failure line")
    assert status("sk-second-Jq7") == 200
    failures = [line for line in gateway.log().splitlines() if "reload failed" in line]
    assert len(failures) == 1 and "auth.keys_file" in failures[0], failures
    assert "sk-second-Jq7" not in gateway.log() and "sk-first-Hn4" not in gateway.log()
