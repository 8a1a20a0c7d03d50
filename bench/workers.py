"""1 worker against 2 workers sharing Redis: req/s and cache hit rate on this machine (issue 13).

Starts `redis-server`, `ntonix mock --tokens 16` and `ntonix run` (access log off) on free ports,
drives the gateway with `wrk` and `bench/shared.lua` (chat requests drawn uniformly from
`--distinct` prompts, so the run mixes first sightings and repeats), and reports per configuration
the requests per second, the p99 latency and the hit rate the clients saw, computed from the
backend's request count (hit rate = 1 - backend requests / gateway requests: whatever tier
answered). Configurations: 1 worker; 2 workers, each with only its L1; 2 workers sharing Redis.

Usage: `.venv/bin/python bench/workers.py [--seconds 10] [--distinct 2000] [--connections 32]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        time.sleep(0.05)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run_config(args: argparse.Namespace, tmp: Path, workers: int, redis_url: str) -> dict[str, Any]:
    mock_port, port = free_port(), free_port()
    ntonix = [sys.executable, "-m", "ntonix"]
    mock = subprocess.Popen(
        [*ntonix, "mock", "--port", str(mock_port), "--tokens", "16"], stdout=subprocess.DEVNULL
    )
    config = {
        "server": {"threads": 1, "workers": workers},
        "cache": {"redis_url": redis_url, "max_size_mb": 256, "redis_timeout_ms": args.redis_timeout_ms},
        "logging": {"level": "warning", "enable_colors": False, "access_log": False},
    }
    path = tmp / f"gw-{workers}-{bool(redis_url)}.json"
    path.write_text(json.dumps(config))
    gateway = subprocess.Popen(
        [*ntonix, "run", "--config", str(path), "--port", str(port), "--bind", "127.0.0.1",
         "--backend", f"127.0.0.1:{mock_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_up(f"http://127.0.0.1:{mock_port}/health")
        wait_up(f"http://127.0.0.1:{port}/health")
        time.sleep(1.0 if redis_url else 0.2)  # every worker's Redis connection up
        out = subprocess.run(
            ["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s", "-s", str(HERE / "shared.lua"),
             f"http://127.0.0.1:{port}/v1/chat/completions"],
            env={**os.environ, "DISTINCT": str(args.distinct)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
        wrk = json.loads(line.split(" ", 1)[1])
        backend = httpx.get(f"http://127.0.0.1:{mock_port}/mock/stats", timeout=5).json()["chat_requests"]
    finally:
        for proc in (gateway, mock):
            proc.terminate()
        for proc in (gateway, mock):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    requests = wrk["requests"]
    return {
        "workers": workers,
        "redis": bool(redis_url),
        "requests": requests,
        "req_per_s": requests / (wrk["duration_us"] / 1e6),
        "p99_ms": wrk["p99_us"] / 1000,
        "errors": wrk["errors"] + wrk["status"],
        "backend_requests": backend,
        "hit_rate": 1 - backend / requests if requests else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--distinct", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--redis-timeout-ms", type=float, default=25.0)
    parser.add_argument("--shared-only", action="store_true", help="only the rows with Redis")
    args = parser.parse_args()
    server_bin = shutil.which("redis-server")
    if server_bin is None or shutil.which("wrk") is None:
        raise SystemExit("needs redis-server and wrk (apt-get install redis-server wrk)")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = [] if args.shared_only else [run_config(args, tmp, 1, ""), run_config(args, tmp, 2, "")]
        for workers in (1, 2):
            redis_port = free_port()
            redis = subprocess.Popen(
                [server_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", name],
                stdout=subprocess.DEVNULL,
            )
            try:
                time.sleep(0.3)
                rows.append(run_config(args, tmp, workers, f"redis://127.0.0.1:{redis_port}/0"))
            finally:
                redis.kill()
                redis.wait(10)
    print(f"CPU: {cpu_model()} x {os.cpu_count()}; {args.seconds} s per row, {args.connections} connections,")
    print(
        f"{args.distinct} distinct prompts drawn uniformly, cache.redis_timeout_ms {args.redis_timeout_ms:g}"
    )
    print("| workers | shared Redis | req/s | p99 ms | hit rate | backend calls | errors |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['workers']} | {'yes' if r['redis'] else 'no'} | {r['req_per_s']:,.0f} | {r['p99_ms']:.1f} "
            f"| {r['hit_rate']:.3f} | {r['backend_requests']:,} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
