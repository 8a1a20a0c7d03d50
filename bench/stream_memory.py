"""Memory per open stream, by contestant and variant (issue 16 item 5): what one held stream costs.

The memory phase of the harness (`BENCH_PHASES=memory`), made repeatable and split up. For each
`--run` contestant, fresh processes: a slow mock (5 tokens over 20 s, the harness's pacing), the
proxy, 20 warm-up `/health` calls, idle RSS (median of 5 samples), then N streams opened at once
(`clients.hold_streams`) and RSS sampled while all are open; every stream must end with `[DONE]`.

    python bench/stream_memory.py --streams 1000 --reps 3 \
        --run nginx --run granian --run ntonix --run 'ntonix MALLOC_ARENA_MAX=2'

Contestants: `nginx` (unbuffered `proxy_pass`, bench/nginx/proxy.conf), `granian` (the bare Granian
app bench/stream_hello.py streaming by itself: no upstream; Granian's own floor), `ntonix` (`ntonix run`
with bench/ntonix-bench.json, cache off like the harness). Words after the name are `KEY=VALUE`
environment variables for the proxy only. `--trace` runs NTONIX under bench/traced_run.py and prints
the tracemalloc diff (by line), the GC-tracked objects per type and glibc's malloc bytes in use, per
stream, between idle and all streams open (its RSS is not the product's).
Servers on core 0, the clients on core 1 (when there are 2 cores). Every process is killed by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import clients
import harness

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
GRANIAN = str(Path(sys.executable).parent / "granian")
THREADS = str(os.cpu_count() or 1)


# `--pythonpath DIR` (another build of the package, e.g. with a debug `_core`) and `--wrap CMD` (a
# profiler prefix, e.g. `heaptrack -o /tmp/h`) apply to the NTONIX process only.
OPTIONS: dict[str, str] = {"pythonpath": str(ROOT / "python"), "wrap": "", "prompt_kb": "0"}


def env_for(extra: dict[str, str]) -> dict[str, str]:
    return {"PYTHONPATH": OPTIONS["pythonpath"], **extra}


def start_mock(procs: harness.Procs, tokens: int, rate: float) -> harness.Started:
    port = harness.free_port()
    cmd = [PYTHON, "-m", "ntonix", "mock", "--host", harness.HOST, "--port", str(port)]
    cmd += ["--tokens", str(tokens), "--token-rate", f"{rate:g}", "--threads", "2", "--model", "bench-model"]
    proc = procs.start("mock", cmd, env_for({}))
    problem = harness.wait_ready(proc, port, "/health", 20.0)
    if problem:
        raise SystemExit(f"mock: {problem}")
    return harness.Started(proc, port, "ntonix mock")


def start_proxy(
    procs: harness.Procs,
    name: str,
    extra: dict[str, str],
    mock_port: int,
    count: int,
    nofile: int,
    trace: Path | None,
) -> tuple[harness.Proc, int]:
    port = harness.free_port()
    if name == "nginx":
        proc = harness.start_nginx(
            procs,
            "proxy-mem",
            nofile,
            port,
            worker_connections=harness.stream_worker_connections(count),
            backend_port=mock_port,
            mock_port=mock_port,
            proxy_port=harness.free_port(),
            cache_port=harness.free_port(),
            stream_port=port,
        )
        return proc, port
    if name == "granian":
        cmd = [GRANIAN, "--interface", "rsgi", "--host", harness.HOST, "--port", str(port), "--workers", "1"]
        cmd += ["--runtime-threads", THREADS, "--http", "1", "--no-ws", "--backlog", "2048"]
        cmd += ["--backpressure", "65536", "--no-access-log", "--log-level", "warning"]
        cmd += ["--working-dir", str(BENCH), "stream_hello:app"]
        proc = procs.start("granian", cmd, extra)
    elif name == "ntonix":
        config = json.loads((BENCH / "ntonix-bench.json").read_text())
        config["server"]["port"] = port
        config["backends"] = [{"host": harness.HOST, "port": mock_port, "weight": 1}]
        config["cache"]["enabled"] = False
        path = procs.workdir / "ntonix.json"
        path.write_text(json.dumps(config))
        args = ["run", "--config", str(path), "--port", str(port), "--backend", f"{harness.HOST}:{mock_port}"]
        args += ["--log-level", "warning"]
        runner = [str(BENCH / "traced_run.py")] if trace is not None else ["-m", "ntonix"]
        env = env_for(extra)
        if trace is not None:
            env["TRACE_DIR"] = str(trace)
        proc = procs.start("ntonix", [*OPTIONS["wrap"].split(), PYTHON, *runner, *args], env)
    else:
        raise SystemExit(f"unknown contestant {name!r}")
    problem = harness.wait_ready(proc, port, "/health", 30.0)
    if problem:
        raise SystemExit(f"{name}: {problem}")
    return proc, port


def stream_request(prompt_kb: int) -> bytes:
    """The harness's streaming request, or one whose prompt is `prompt_kb` KiB (real chats are long)."""
    if not prompt_kb:
        return harness.STREAM_REQUEST
    words = "word " * (prompt_kb * 1024 // 5)
    body = {"model": "bench-model", "stream": True, "messages": [{"role": "user", "content": words}]}
    return json.dumps({**body, "max_tokens": 64}).encode()


def stop_wrapped(proc: harness.Proc) -> None:
    """SIGTERM the gateway alone, so that a profiler wrapping it writes its data before the group dies."""
    for pid in harness.process_tree(proc.pid):
        with contextlib.suppress(OSError):
            if b"ntonix" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=120)


def snapshot(proc: harness.Proc, trace: Path, n: int) -> None:
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not (trace / f"done-{n}").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no tracemalloc snapshot within 120 s")
        time.sleep(0.1)


def streams_active(port: int) -> int:
    _status, _headers, body = harness.http_call(port, "/metrics", timeout=5.0)
    return int(json.loads(body)["streams_active"])


def report_trace(trace: Path, count: int) -> dict[str, Any]:
    with (trace / "snap-1.pickle").open("rb") as fh:
        before: tracemalloc.Snapshot = pickle.load(fh)
    with (trace / "snap-2.pickle").open("rb") as fh:
        after: tracemalloc.Snapshot = pickle.load(fh)
    info1 = json.loads((trace / "info-1.json").read_text())
    info2 = json.loads((trace / "info-2.json").read_text())
    lines = []
    for stat in after.compare_to(before, "lineno")[:30]:
        frame = stat.traceback[0]
        where = f"{frame.filename.replace(str(ROOT) + '/', '')}:{frame.lineno}"
        lines.append((round(stat.size_diff / count, 1), round(stat.count_diff / count, 2), where))
    types = []
    for name, n in info2["types"].items():
        diff = n - info1["types"].get(name, 0)
        size = info2["sizes"][name] - info1["sizes"].get(name, 0)
        if diff >= count // 2:
            types.append((round(size / count, 1), round(diff / count, 2), name))
    types.sort(reverse=True)
    malloc = {k: round((info2["mallinfo"][k] - info1["mallinfo"][k]) / count, 1) for k in info2["mallinfo"]}

    # tracemalloc sees every Python allocation; those over 512 bytes come from malloc, the rest from
    # pymalloc's arenas (mmap): malloc in use minus Python's large blocks is the Rust side's heap.
    def large_blocks(snap: tracemalloc.Snapshot) -> int:
        return sum(t.size for t in snap.traces if t.size > 512)

    large = large_blocks(after) - large_blocks(before)
    # (the snapshots come first: the type census after them allocates too)
    python = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return {
        "python_bytes_per_stream": round(python / count, 1),
        "python_large_blocks_per_stream": round(large / count, 1),
        "malloc_in_use_per_stream": malloc["uordblks"] + malloc["hblkhd"],
        "malloc_arena_per_stream": malloc["arena"],
        "rust_heap_estimate_per_stream": round(malloc["uordblks"] + malloc["hblkhd"] - large / count, 1),
        "top_lines_bytes_count_where": lines,
        "gc_types_bytes_count_name": types[:25],
    }


def one(
    name: str, extra: dict[str, str], count: int, nofile: int, trace: bool, workdir: Path
) -> dict[str, Any]:
    hold_s = max(20.0, count / 200.0)
    procs = harness.Procs(workdir, None)
    proc: harness.Proc | None = None
    trace_dir = Path(tempfile.mkdtemp(prefix="trace-", dir=workdir)) if trace and name == "ntonix" else None
    try:
        mock = start_mock(procs, 5, 5 / hold_s)
        assert mock.proc is not None
        if name == "granian":
            extra = {"STREAM_EVENTS": "5", "STREAM_GAP": f"{hold_s / 5:g}", **extra}
        proc, port = start_proxy(procs, name, extra, mock.port, count, nofile, trace_dir)
        pids = harness.process_tree(proc.pid)
        for _ in range(20):
            with contextlib.suppress(OSError):
                harness.http_call(port, "/health", timeout=2.0)
        time.sleep(0.5)
        idle = int(statistics.median(harness.rss_kb(pids) for _ in range(5)))
        if trace_dir is not None:
            snapshot(proc, trace_dir, 1)
        snapped = False

        def sample() -> int:
            nonlocal snapped
            if trace_dir is not None and not snapped and streams_active(port) >= count:
                snapshot(proc, trace_dir, 2)
                snapped = True
            return harness.rss_kb(pids)

        held = clients.hold_streams(
            harness.HOST,
            port,
            stream_request(int(OPTIONS["prompt_kb"])),
            count,
            sample,
            open_deadline_s=hold_s - 3,
            total_deadline_s=hold_s * 2 + 60,
        )
        ok = held.all_open and held.completed == count and held.errors == 0
        result: dict[str, Any] = {
            "contestant": " ".join([name, *(f"{k}={v}" for k, v in extra.items())]),
            "streams": count,
            "idle_mib": round(idle / 1024, 1),
            "open_mib": round(held.rss_all_open_kb / 1024, 1),
            "kib_per_stream": round((held.rss_all_open_kb - idle) / count, 2) if held.all_open else None,
            "ok": ok,
            "errors": held.error_samples[:2],
        }
        if trace_dir is not None and snapped:
            result["trace"] = report_trace(trace_dir, count)
        return result
    finally:
        if OPTIONS["wrap"] and proc is not None:
            stop_wrapped(proc)
        procs.stop_all()
        if trace_dir is not None:
            shutil.rmtree(trace_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1000", help="comma-separated open-stream counts")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--run", action="append", default=[], help="contestant [KEY=VALUE ...]; repeatable")
    parser.add_argument("--trace", action="store_true", help="tracemalloc diff for ntonix contestants")
    parser.add_argument("--pythonpath", default=OPTIONS["pythonpath"], help="NTONIX's package directory")
    parser.add_argument("--prompt-kb", type=int, default=0, help="a user message of this many KiB")
    parser.add_argument("--wrap", default="", help="command prefix for the NTONIX process (a profiler)")
    args = parser.parse_args()
    OPTIONS.update(pythonpath=args.pythonpath, wrap=args.wrap, prompt_kb=str(args.prompt_kb))
    nofile = harness.raise_nofile()
    if harness.pinning():
        os.sched_setaffinity(0, {1})  # the clients; servers on core 0
    runs = args.run or ["nginx", "granian", "ntonix"]
    workdir = Path(tempfile.mkdtemp(prefix="stream-memory-"))
    try:
        for count in (int(c) for c in args.streams.split(",")):
            for rep in range(args.reps):
                for spec in runs:
                    name, *pairs = spec.split()
                    extra = dict(pair.split("=", 1) for pair in pairs)
                    result = one(name, extra, count, nofile, args.trace, workdir)
                    print(json.dumps({"rep": rep + 1, **result}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
