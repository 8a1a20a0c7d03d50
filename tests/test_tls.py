"""TLS termination (issue 6): HTTPS on `ssl_port` beside plain HTTP on `port`, in one process.

Certificates are made in the test with `cryptography` (self-signed, valid for
127.0.0.1 and localhost) and trusted by the client through `verify=<cert path>`,
so the handshake is fully checked. One gateway serves both listeners, so an
answer cached through HTTP is a hit through HTTPS and both count in one set of
metrics. Bad certificate material must stop start-up with one line and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_httpserver import HTTPServer

from tests.conftest import REPO, Processes, backend_addr, chat_body, free_port, wait_for

CHAT = "/v1/chat/completions"
ANSWER = {
    "id": "chatcmpl-tls",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "mock-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "secure"}, "finish_reason": "stop"}],
}
START_DEADLINE = 20.0


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate and its private key (PEM), valid for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def trust(cert: Path) -> ssl.SSLContext:
    """A client context trusting only `cert` (hostname and chain fully checked)."""
    return ssl.create_default_context(cafile=str(cert))


def tls_config(cert: Path | str, key: Path | str, ssl_port: int) -> dict[str, Any]:
    return {
        "ssl": {"enabled": True, "cert_file": str(cert), "key_file": str(key)},
        "server": {"ssl_port": ssl_port},
    }


def post(client: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(url + CHAT, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.fixture
def backend(httpserver: HTTPServer) -> HTTPServer:
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request(CHAT, method="POST").respond_with_json(ANSWER)
    return httpserver


@pytest.fixture
def tls_gateway(procs: Processes, backend: HTTPServer, tmp_path: Path) -> tuple[Any, str, Path]:
    """A gateway with TLS on; answers (process, https base url, trusted cert path)."""
    cert, key = make_cert(tmp_path)
    ssl_port = free_port()
    gateway = procs.gateway(backends=[backend_addr(backend)], config=tls_config(cert, key, ssl_port))
    https = f"https://127.0.0.1:{ssl_port}"
    wait_for(
        lambda: httpx.get(https + "/health", verify=trust(cert), timeout=1.0).status_code == 200,
        what=https + "/health",
    )
    return gateway, https, cert


# -- serving -----------------------------------------------------------------------------------


def test_https_and_http_both_answer(tls_gateway: tuple[Any, str, Path]) -> None:
    gateway, https, cert = tls_gateway
    with httpx.Client(verify=trust(cert), timeout=10.0) as client:
        secure = client.get(https + "/health")
        assert secure.status_code == 200
        assert secure.json() == {"status": "healthy"}
        assert secure.http_version == "HTTP/1.1"
        index = client.get(https + "/")
        assert index.json()["name"] == "NTONIX"
        answer = post(client, https, chat_body("over tls"))
        assert answer.status_code == 200
        assert answer.json() == ANSWER
        assert answer.headers["x-request-id"]
    plain = httpx.get(gateway.url + "/health", timeout=5.0)
    assert plain.status_code == 200
    assert plain.json() == {"status": "healthy"}


def test_https_rejects_clients_that_do_not_trust_the_certificate(tls_gateway: tuple[Any, str, Path]) -> None:
    _, https, _ = tls_gateway
    with pytest.raises(httpx.ConnectError):
        httpx.get(https + "/health", timeout=5.0)  # default trust store: self-signed is refused


def test_plain_http_on_the_tls_port_is_not_served(tls_gateway: tuple[Any, str, Path]) -> None:
    _, https, _ = tls_gateway
    with pytest.raises(httpx.HTTPError):
        httpx.get(https.replace("https://", "http://") + "/health", timeout=5.0)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_accepted(tls_gateway: tuple[Any, str, Path], version: ssl.TLSVersion) -> None:
    """Like nginx's default: TLS 1.2 clients are still common on internal networks."""
    _, https, cert = tls_gateway
    port = int(https.rsplit(":", 1)[1])
    context = trust(cert)
    context.minimum_version = context.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == version.name.replace("_", ".")
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b'{"status":"healthy"}')


def test_http_and_https_share_one_cache_and_one_set_of_metrics(
    tls_gateway: tuple[Any, str, Path], backend: HTTPServer
) -> None:
    gateway, https, cert = tls_gateway
    body = chat_body("shared cache")
    with httpx.Client(timeout=10.0) as plain, httpx.Client(verify=trust(cert), timeout=10.0) as secure:
        first = post(plain, gateway.url, body)
        assert first.status_code == 200
        assert first.headers["x-cache"] == "MISS"
        second = post(secure, https, body)
        assert second.status_code == 200
        assert second.headers["x-cache"] == "HIT"
        assert second.content == first.content
        # And the other way round: filled over HTTPS, hit over HTTP.
        other = chat_body("filled over https")
        assert post(secure, https, other).headers["x-cache"] == "MISS"
        assert post(plain, gateway.url, other).headers["x-cache"] == "HIT"
        chats = [entry for entry, _ in backend.log if entry.path == CHAT]
        assert len(chats) == 2
        via_http = plain.get(gateway.url + "/metrics").json()
        via_https = secure.get(https + "/metrics").json()
    for snapshot in (via_http, via_https):
        assert snapshot["requests_total"] == 4
        assert snapshot["cache_hits"] == 2
        assert snapshot["cache_misses"] == 2
        assert snapshot["backends"][0]["requests"] == 2
    stats = httpx.get(gateway.url + "/cache/stats", timeout=5.0).json()
    assert stats["entries"] == 2


def test_http2_over_tls_via_alpn(tls_gateway: tuple[Any, str, Path]) -> None:
    gateway, https, cert = tls_gateway
    body = chat_body("over h2")
    with httpx.Client(http2=True, verify=trust(cert), timeout=10.0) as client:
        health = client.get(https + "/health")
        assert health.status_code == 200
        assert health.http_version == "HTTP/2"
        first = post(client, https, body)
        assert first.status_code == 200
        assert first.http_version == "HTTP/2"
        assert first.json() == ANSWER
        assert first.headers["x-cache"] == "MISS"
        again = post(client, https, body)
        assert again.headers["x-cache"] == "HIT"
        assert again.content == first.content
    # The plain listener stays HTTP/1.1 only (no h2c upgrade), and still shares the cache.
    plain = httpx.post(
        gateway.url + CHAT,
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=10.0,
    )
    assert plain.http_version == "HTTP/1.1"
    assert plain.headers["x-cache"] == "HIT"


# -- start-up failures -------------------------------------------------------------------------


def _one_line_failure(procs: Processes, backend: HTTPServer, config: dict[str, Any]) -> str:
    """Start a gateway meant to fail; answers its single output line after checking the exit."""
    proc = procs.gateway(backends=[backend_addr(backend)], config=config, wait=False)
    try:
        code = proc.popen.wait(timeout=START_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway still running {START_DEADLINE}s after a bad TLS set-up:\n{proc.log()}")
    output = proc.log()
    assert code != 0, output
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("ntonix: "), output
    return lines[0]


def test_missing_cert_file_stops_start_up(procs: Processes, backend: HTTPServer, tmp_path: Path) -> None:
    _, key = make_cert(tmp_path)
    missing = tmp_path / "nowhere.crt"
    line = _one_line_failure(procs, backend, tls_config(missing, key, free_port()))
    assert "ssl.cert_file" in line
    assert str(missing) in line


def test_missing_key_file_stops_start_up(procs: Processes, backend: HTTPServer, tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path)
    missing = tmp_path / "nowhere.key"
    line = _one_line_failure(procs, backend, tls_config(cert, missing, free_port()))
    assert "ssl.key_file" in line
    assert str(missing) in line


KEY_PROBLEMS = ["garbage", "empty", "directory", "encrypted", "certificate", "no_permission"]


@pytest.mark.parametrize("kind", KEY_PROBLEMS)
def test_unreadable_key_stops_start_up(
    procs: Processes, backend: HTTPServer, tmp_path: Path, kind: str
) -> None:
    cert, key = make_cert(tmp_path)
    if kind == "garbage":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    elif kind == "empty":
        key.write_bytes(b"")
    elif kind == "directory":
        key.unlink()
        key.mkdir()
    elif kind == "encrypted":
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        key.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    elif kind == "certificate":
        key.write_bytes(cert.read_bytes())
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        key.chmod(0)
    line = _one_line_failure(procs, backend, tls_config(cert, key, free_port()))
    assert "key_file" in line
    assert str(key) in line
    if kind == "encrypted":
        assert "encrypted" in line


def test_certificate_that_is_not_pem_stops_start_up(
    procs: Processes, backend: HTTPServer, tmp_path: Path
) -> None:
    cert, key = make_cert(tmp_path)
    cert.write_text("this is not a certificate\n")
    line = _one_line_failure(procs, backend, tls_config(cert, key, free_port()))
    assert "cert_file" in line
    assert str(cert) in line


def test_mismatched_cert_and_key_stop_start_up(procs: Processes, backend: HTTPServer, tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "two")
    line = _one_line_failure(procs, backend, tls_config(cert, other_key, free_port()))
    assert "do not match" in line
    assert str(cert) in line
    assert str(other_key) in line


def test_start_up_failure_is_written_to_stderr_only(backend: HTTPServer, tmp_path: Path) -> None:
    """The message goes to stderr (stdout stays clean for `ntonix config`-style piping)."""
    cert, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "two")
    config = tmp_path / "bad.json"
    config.write_text(
        json.dumps({**tls_config(cert, other_key, free_port()), "logging": {"enable_colors": False}})
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ntonix",
            "run",
            "--config",
            str(config),
            "--port",
            str(free_port()),
            "--bind",
            "127.0.0.1",
            "--backend",
            backend_addr(backend),
        ],
        capture_output=True,
        text=True,
        timeout=START_DEADLINE,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("ntonix: ssl"), done.stderr


def test_busy_ssl_port_stops_the_gateway(procs: Processes, backend: HTTPServer, tmp_path: Path) -> None:
    """If the HTTPS listener cannot bind, the gateway must not go on serving plain HTTP alone."""
    cert, key = make_cert(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ssl_port = busy.getsockname()[1]
        proc = procs.gateway(
            backends=[backend_addr(backend)], config=tls_config(cert, key, ssl_port), wait=False
        )
        try:
            code = proc.popen.wait(timeout=START_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gateway kept running without its HTTPS listener:\n{proc.log()}")
    output = proc.log()
    assert code == 2, output
    assert "Traceback" not in output
    assert "backtrace" not in output.lower()  # Granian's Rust error text is cut to its first line
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"ntonix: cannot listen on 127.0.0.1:{ssl_port}: "), output
