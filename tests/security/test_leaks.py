"""Keys never show in logs, metrics or error answers; cache answers never cross keys (cache.scope key).

Every key of the shared gateway was used by the time the grep runs (this module's first test sends each one,
and a wrong one); the gateway logs at debug level, so any line that could carry a header would.
"""

from __future__ import annotations

import httpx

from tests.conftest import Processes
from tests.security.conftest import ADMIN, KEYS, MODEL, Cluster, chat

WRONG = "sk-wrong-Yy0Pl"
A, B = "sk-cache-A-Jd4Nc", "sk-cache-B-Kf9Tz"


def test_no_key_in_logs_metrics_or_errors(cluster: Cluster) -> None:
    bodies: list[str] = []
    for key in [*KEYS, WRONG]:
        for body in (chat("leak check"), {"model": MODEL}, chat("leak", model="no-such-model"), "not json"):
            answer = cluster.post(key, body)
            bodies.append(answer.text + str(answer.headers))
        with httpx.stream(
            "POST",
            cluster.gateway.url + "/v1/chat/completions",
            json=chat("leak stream", stream=True),
            headers={"authorization": f"Bearer {key}"},
        ) as streamed:
            bodies.append(streamed.read().decode())
    admin = {"authorization": f"Bearer {ADMIN}"}
    for path in ("/metrics", "/metrics/prometheus", "/cache/stats", "/v1/models", "/"):
        bodies.append(httpx.get(cluster.gateway.url + path, headers=admin, timeout=5).text)
    bodies.append(httpx.get(cluster.gateway.url + "/metrics", timeout=5).text)  # the 401
    log = cluster.gateway.log()
    assert "key=open" in log and "key=rpm3" in log  # names are logged ...
    for secret in [*KEYS, WRONG, ADMIN]:
        assert secret not in log, f"{secret} in the gateway log"  # ... keys never
        for text in bodies:
            assert secret not in text, f"{secret} in an answer: {text[:300]}"
    # nor does any key reach the backend (its own log records the requests it saw)
    upstream = str(cluster.backend_requests(limit=1000))
    assert not [s for s in [*KEYS, ADMIN] if s in upstream]


def test_cache_hits_never_cross_keys(cluster: Cluster) -> None:
    body = chat("a question two teams ask")
    first_a = cluster.post(A, body)
    assert first_a.headers["x-cache"] == "MISS"
    assert cluster.post(A, body).headers["x-cache"] == "HIT"
    first_b = cluster.post(B, body)
    assert first_b.headers["x-cache"] == "MISS"  # B never gets A's answer ...
    assert cluster.post(B, body).headers["x-cache"] == "HIT"  # ... it gets its own
    assert len([r for r in cluster.backend_requests() if "two teams" in r["body"]]) == 2


def test_global_scope_shares_answers_between_keys(procs: Processes) -> None:
    """The documented default: with `cache.scope: global` every key shares the one namespace."""
    from tests.security.conftest import start

    shared = start(procs, cache={"scope": "global"})
    body = chat("a shared question")
    assert shared.post(A, body).headers["x-cache"] == "MISS"
    assert shared.post(B, body).headers["x-cache"] == "HIT"
