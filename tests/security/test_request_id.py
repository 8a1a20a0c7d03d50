"""X-Request-ID: kept only when 1-128 characters of [A-Za-z0-9._:-], else replaced by a UUID4; no header
or log line can be injected through it."""

from __future__ import annotations

import socket
import uuid

import pytest

from tests.security.conftest import Cluster, chat

KEY = "sk-open-Xa7Wq"
KEPT = ["a", "req-1", "A.b_c:d-e", "x" * 128, "0" * 64, str(uuid.uuid4())]
REPLACED = [
    "x" * 129,
    "has space",
    "semi;colon",
    'quote"d',
    "<script>alert(1)</script>",
    "new\\nline",
    "tab\there",
    "caf\u00e9",
    "a,b",
    "key=value",
    "%0d%0aSet-Cookie:x",
]


def request_id(cluster: Cluster, value: str) -> tuple[str, str]:
    content = f"request id {uuid.uuid4()}"  # a fresh prompt: a miss, so the backend sees the request
    answer = cluster.post(KEY, chat(content), headers={"x-request-id": value.encode("utf-8")})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-request-id"], content


@pytest.mark.parametrize("value", KEPT)
def test_valid_ids_are_kept(cluster: Cluster, value: str) -> None:
    assert request_id(cluster, value)[0] == value


@pytest.mark.parametrize("value", REPLACED)
def test_other_ids_are_replaced_by_a_uuid4(cluster: Cluster, value: str) -> None:
    got, content = request_id(cluster, value)
    assert got != value
    assert uuid.UUID(got).version == 4
    # the backend saw the gateway's id, not the client's
    seen = [r["headers"] for r in cluster.backend_requests() if content in r["body"]]
    assert len(seen) == 1 and seen[0]["x-request-id"] == got


def test_no_header_or_log_line_injected_over_the_wire(cluster: Cluster) -> None:
    """Raw bytes a library would refuse to send: a bare CR or LF inside the value, obs-fold."""
    body = b'{"model":"llama-3.1-8b","messages":[{"role":"user","content":"raw id"}]}'
    attempts = [
        b"X-Request-ID: abc\rInjected: 1\r\n",
        b"X-Request-ID: abc\nInjected: 1\r\n",
        b"X-Request-ID: abc\r\n Injected: folded\r\n",
        b"X-Request-ID: abc\x00def\r\n",
    ]
    for header in attempts:
        with socket.create_connection(("127.0.0.1", cluster.gateway.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\n".encode()
                + header
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        status = int(head.split(b" ", 2)[1])
        assert status in (200, 400), head  # parsed as one odd value or refused by the HTTP parser
        assert b"injected" not in head
        if status == 200:
            rid = next(line for line in head.split(b"\r\n") if line.startswith(b"x-request-id:"))
            value = rid.split(b":", 1)[1].strip().decode()
            # a bare LF ends the line for the parser (value "abc", a header of its own follows, as if the
            # client had sent two): anything else is replaced
            assert value == "abc" or uuid.UUID(value).version == 4, value
    log = cluster.gateway.log()
    assert not [line for line in log.splitlines() if line.lstrip().lower().startswith("injected")]
