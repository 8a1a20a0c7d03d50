"""One keyed gateway in front of one mock, shared by a module's tests (start-up costs CPU; state does not
leak between tests because each test uses its own key, prompt or request id)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import Proc, Processes

MODEL = "llama-3.1-8b"
OTHER = "qwen2.5-coder"
ADMIN = "sk-admin-Zq81"
# Each key a string that appears nowhere else, so a grep for it finds only a leak.
KEYS: dict[str, dict[str, Any]] = {
    "sk-open-Xa7Wq": {"name": "open"},
    "sk-llama-Pm3Ru": {"name": "llama-only", "models": [MODEL]},
    "sk-rpm3-Vb2Ke": {"name": "rpm3", "rpm": 3},
    "sk-tpm-Ht6Ls": {"name": "tpm100", "tpm": 100},
    "sk-cache-A-Jd4Nc": {"name": "cache-a"},
    "sk-cache-B-Kf9Tz": {"name": "cache-b"},
    "sk-hits-Qw5Ye": {"name": "hits", "rpm": 12, "tpm": 100},
    "sk-stream-Lr8Gd": {"name": "stream", "tpm": 100},
    "sk-asked-Wc3Px": {"name": "asked", "tpm": 100000},
    "sk-fuzz-Mn2Bv": {"name": "fuzz"},
}
ORIGIN = "https://app.example"


@dataclass
class Cluster:
    gateway: Proc
    mock: Proc

    def post(
        self, key: str | None, body: Any, path: str = "/v1/chat/completions", **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(self.gateway.url + path, json=body, headers=headers, timeout=10, **kw)

    def backend_requests(self, limit: int = 50) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.mock.url}/mock/requests?limit={limit}", timeout=5).json()
        return list(answer["requests"])


def chat(content: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def start(procs: Processes, **config: Any) -> Cluster:
    mock = procs.mock("--model", MODEL, "--model", OTHER)
    document: dict[str, Any] = {
        "auth": {"keys": [{"key": k, **v} for k, v in KEYS.items()], "admin_key": ADMIN},
        "cache": {"scope": "key"},
        "server": {"cors_origins": [ORIGIN]},
        "logging": {"level": "debug", "enable_colors": False},
    }
    for section, values in config.items():
        document.setdefault(section, {}).update(values)
    gateway = procs.gateway([f"127.0.0.1:{mock.port}"], config=document)
    return Cluster(gateway, mock)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    processes = Processes(tmp_path_factory.mktemp("security"))
    try:
        yield start(processes)
    finally:
        processes.close()
