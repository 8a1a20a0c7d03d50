"""A bounded fuzz of request bodies and headers (hypothesis): the gateway stays up and answers every
request with a documented status, in the OpenAI error shape when it is the gateway's own answer."""

from __future__ import annotations

import json
import string
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.conftest import MODEL, OTHER, Cluster

KEY = "sk-fuzz-Mn2Bv"
# Every status the gateway documents (README "API" and "Keys and limits", SECURITY.md), plus the
# mock's 404 for an unknown POST /v1/... path it does not serve.
DOCUMENTED = {200, 204, 400, 401, 403, 404, 405, 413, 415, 429, 431, 502, 503, 504}
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
    f"/v1/models/{MODEL}",
    "/v1/fuzz",
    "/",
    "/health",
    "/ready",
    "/metrics",
    "/cache/stats",
    "/nowhere",
]
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
SEEN: Counter[int] = Counter()  # statuses the fuzz got, checked for variety at the end
SKIPPED = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": json_values}
    ),
    max_size=3,
)
chat_like = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL, OTHER, "nope", ""]) | json_values},
    optional={
        "messages": messages | json_values,
        "prompt": json_values,
        "input": json_values,
        "stream": st.booleans() | json_values,
        "stream_options": json_values,
        "max_tokens": st.integers(min_value=-2, max_value=50) | json_values,
    },
)
bodies = (
    chat_like.map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
)
header_names = st.text(TOKEN_CHARS, min_size=1, max_size=20).filter(
    lambda n: n.lower() not in SKIPPED and not n.lower().startswith("x-mock")
)
header_values = st.text(string.printable.strip() + " ", max_size=60).map(str.strip)
headers = st.dictionaries(header_names, header_values, max_size=8)
# Weighted towards requests that get past authentication and into the pipeline.
VALID = f"Bearer {KEY}"
auth = st.sampled_from([VALID, VALID, VALID, VALID, f"bearer {KEY}", None, "Bearer sk-nope", "Basic abc"])
content_types = st.sampled_from(
    ["application/json"] * 4 + [None, "text/plain", "application/json; charset=utf-8"]
)
methods = st.sampled_from(["POST"] * 6 + ["GET", "GET", "PUT", "DELETE", "HEAD", "OPTIONS"])
paths = st.sampled_from(PATHS[:5] * 3 + PATHS)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same 150 requests every run: a failure reproduces, no flake
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    method=methods,
    path=paths,
    body=bodies,
    extra=headers,
    authorization=auth,
    content_type=content_types,
)
def test_fuzzed_requests_get_documented_answers(
    cluster: Cluster,
    method: str,
    path: str,
    body: bytes,
    extra: dict[str, str],
    authorization: str | None,
    content_type: str | None,
) -> None:
    sent: dict[str, Any] = dict(extra)
    if authorization is not None:
        sent["authorization"] = authorization
    if content_type is not None:
        sent["content-type"] = content_type
    with httpx.Client(timeout=15) as client:
        request = client.build_request(method, cluster.gateway.url + path, content=body, headers=sent)
        response = client.send(request)
        response.read()
    assert response.status_code in DOCUMENTED, (response.status_code, response.text[:300])
    SEEN[response.status_code] += 1
    own = response.status_code >= 400 and "x-mock-name" not in response.headers and method != "HEAD"
    if own:  # the gateway's own answers are OpenAI-shaped errors (a HEAD answer has no body)
        error = response.json()["error"]
        assert {"message", "type", "code"} <= set(error)


def test_gateway_survived_the_fuzz(cluster: Cluster) -> None:
    print(f"fuzz statuses: {dict(sorted(SEEN.items()))}")
    # the fuzz reached past authentication and into the pipeline, not only the 401 wall
    assert {200, 400, 401} <= set(SEEN), SEEN
    assert cluster.gateway.alive()
    assert httpx.get(cluster.gateway.url + "/health", timeout=5).json() == {"status": "healthy"}
    assert "Traceback" not in cluster.gateway.log()
