"""A/B: cache-miss req/s through the gateway with `routing.policy` round_robin vs prefix.

Run: `.venv/bin/python bench/policy_ab.py` (needs wrk; gateway and mock on core 0, wrk on core 1;
3 rounds of 5 s per policy at 64 connections, cache off, a 10 KB prompt so the prefix index works).
"""

import json
import re
import socket
import statistics
import subprocess
import tempfile
import time

import httpx

PY = "/work/main/.venv/bin/python"


def free() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def gateway(policy: str, mock_port: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free()
    cfg = tempfile.mktemp(suffix=".json")
    with open(cfg, "w") as fh:
        json.dump(
            {"cache": {"enabled": False}, "routing": {"policy": policy}, "logging": {"level": "warning"}}, fh
        )
    args = ["taskset", "-c", "0", PY, "-m", "ntonix", "run", "--config", cfg, "--port", str(port)]
    args += [
        "--bind",
        "127.0.0.1",
        "--backend",
        f"127.0.0.1:{mock_port}",
        "--backend",
        f"localhost:{mock_port}",
    ]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return proc, url


def wrk(url: str, lua: str) -> float:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c64", "-d5s", "-s", lua, url + "/v1/chat/completions"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match is not None, out
    return float(match.group(1))


def main() -> None:
    mock_port = free()
    mock = subprocess.Popen(["taskset", "-c", "0", PY, "-m", "ntonix", "mock", "--port", str(mock_port)])
    time.sleep(2)
    prompt = "You are a careful assistant. " * 350  # ~10 KB
    body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": prompt}]})
    lua = tempfile.mktemp(suffix=".lua")
    with open(lua, "w") as fh:
        fh.write(f'wrk.method="POST"\nwrk.body=[[{body}]]\nwrk.headers["Content-Type"]="application/json"\n')
    results: dict[str, list[float]] = {"round_robin": [], "prefix": []}
    try:
        for _ in range(3):
            for policy in results:
                proc, url = gateway(policy, mock_port)
                try:
                    results[policy].append(wrk(url, lua))
                finally:
                    proc.terminate()
                    proc.wait()
    finally:
        mock.terminate()
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(
        {k: [round(x) for x in v] for k, v in results.items()},
        medians,
        medians["prefix"] / medians["round_robin"],
    )


if __name__ == "__main__":
    main()
