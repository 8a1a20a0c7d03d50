"""A/B of two source trees of NTONIX on the same machine, interleaved: is the new one slower?

Run: `.venv/bin/python bench/tree_ab.py --old /path/to/old/checkout [--new .] [--rounds 5] [--seconds 5]`
(each tree needs its own built `.venv`, e.g. a `git worktree` of the old commit with `make build`).

Both gateways run with the benchmark's defaults (bench/ntonix-bench.json: threads = cores, access
log on, level warning) in front of the same nginx `return 200` backend (and `ntonix mock` for
streams), pinned to core 0 like every `make bench` server, wrk and the stream client on core 1. Each
round measures old then new (then new then old in the next round, so drift hits both alike):
cache-off misses and cache hits at 64 connections (wrk + bench/post.lua), unique-prompt misses
(bench/unique.lua, cache on) and sequential streams (TTFT and whole stream, 300 per round), plus
the gateway's own CPU time per request (utime + stime of its process tree over the wrk run: the
figure least disturbed by other load on the machine). Prints medians and the new/old ratio of
each; writes bench/results/tree_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients
import harness
from harness import HOST, Procs, free_port, raise_nofile, run_wrk, start_nginx, wait_ready


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of `pids`, in clock ticks."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def start_gateway(procs: Procs, tree: Path, name: str, backend_port: int, cache: bool) -> int:
    port = free_port()
    config = json.loads((harness.BENCH / "ntonix-bench.json").read_text())
    config["server"]["port"] = port
    config["backends"] = [{"host": HOST, "port": backend_port, "weight": 1}]
    config["cache"]["enabled"] = cache
    path = procs.workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    exe = str(tree / ".venv" / "bin" / "ntonix")
    proc = procs.start(name, [exe, "run", "--config", str(path), "--log-level", "warning"])
    problem = wait_ready(proc, port, "/health", 30.0)
    if problem is not None:
        raise RuntimeError(f"{name} did not start: {problem}\n{proc.log_tail()}")
    return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=harness.ROOT)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    nofile = raise_nofile()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    results: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    with tempfile.TemporaryDirectory(prefix="ntonix-tree-ab-") as tmp:
        procs = Procs(Path(tmp), None)
        try:
            backend_port = free_port()
            start_nginx(procs, "backend", nofile, backend_port, backend_port=backend_port)
            mock = harness.start_mock(procs, "mock", 24, 0, 1)
            if mock.problem:
                raise RuntimeError(mock.problem)
            ports: dict[str, dict[str, int]] = {}
            for tree, root in trees.items():
                ports[tree] = {
                    "miss": start_gateway(procs, root, f"{tree}-miss", backend_port, False),
                    "cache": start_gateway(procs, root, f"{tree}-cache", backend_port, True),
                    "stream": start_gateway(procs, root, f"{tree}-stream", mock.port, False),
                }
            gateways = {
                tree: {
                    kind: p.pid for p in procs.running for kind in ports[tree] if p.name == f"{tree}-{kind}"
                }
                for tree in trees
            }
            for tree in trees:  # warm-up: fills the caches, opens the pools
                for kind, script in (("miss", "post.lua"), ("cache", "post.lua"), ("cache", "unique.lua")):
                    run_wrk(ports[tree][kind], script, 64, 2)
                clients.stream_latency(HOST, ports[tree]["stream"], harness.STREAM_REQUEST, 50, deadline_s=30)
            for round_no in range(args.rounds):
                order = list(trees) if round_no % 2 == 0 else list(reversed(trees))
                for tree in order:
                    got = results[tree]
                    for case, kind, script in (
                        ("miss req/s", "miss", "post.lua"),
                        ("hit req/s", "cache", "post.lua"),
                        ("unique miss req/s", "cache", "unique.lua"),
                    ):
                        pids = harness.process_tree(gateways[tree][kind])
                        before = cpu_ticks(pids)
                        run = run_wrk(ports[tree][kind], script, 64, args.seconds)
                        used_us = (cpu_ticks(pids) - before) / os.sysconf("SC_CLK_TCK") * 1e6
                        if not run.get("ok") or run["error_total"]:
                            raise RuntimeError(f"{tree} {case}: {run}")
                        got.setdefault(case, []).append(run["rps"])
                        got.setdefault(case.replace("req/s", "p99 ms"), []).append(run["p99_ms"])
                        got.setdefault(case.replace("req/s", "CPU us/req"), []).append(
                            used_us / max(1, run["requests"])
                        )
                    lat = clients.stream_latency(
                        HOST, ports[tree]["stream"], harness.STREAM_REQUEST, 300, deadline_s=60
                    )
                    if lat.errors:
                        raise RuntimeError(f"{tree} streams: {lat.error_samples[:2]}")
                    got.setdefault("stream TTFT p50 ms", []).append(lat.ttft_p50_ms)
                    got.setdefault("stream total p50 ms", []).append(lat.total_p50_ms)
                print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            procs.stop_all()
    table: list[dict[str, Any]] = []
    print(f"{'case':<24}{'old':>12}{'new':>12}{'new/old':>9}")
    for case in results["old"]:
        old, new = statistics.median(results["old"][case]), statistics.median(results["new"][case])
        table.append({"case": case, "old": old, "new": new, "ratio": new / old})
        print(f"{case:<24}{old:>12.2f}{new:>12.2f}{new / old:>9.2f}")
    out = harness.BENCH / "results" / "tree_ab.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "table": table, "runs": results})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
