"""Where the gateway's CPU goes: µs per cache miss, per cache hit and per stream chunk, by component.

    .venv/bin/python bench/profile.py                      # the table, docs/profile/*.svg, results JSON
    .venv/bin/python bench/profile.py --cases miss --no-perf --no-pyspy   # CPU per request only
    .venv/bin/python bench/profile.py --ab base=/work/wt-base --ab new=.  # A/B of two source trees
    make profile                                           # the first line

The gateway runs with its defaults (`bench/ntonix-bench.json`: threads = cores, access log on, only the
log level lowered), like `make bench`: gateway and backend on core 0, wrk (and the profilers) on core 1.

- miss: cache off, nginx `return 200` backend, `wrk -t1 -c64 -s bench/post.lua`;
- hit: cache on, the same request every time (primed), the same wrk;
- stream: cache off, `ntonix mock --tokens 24 --token-rate 20` (a paced stream: every event is one
  chunk), `wrk -c200 -s bench/stream.lua`; CPU per chunk = CPU / (streams x chunks per stream);
- burst (`--cases burst`, not in the default set): the same with `--token-rate 0` (the mock writes
  all 26 events at once, as `make bench`'s streaming rows do), `wrk -c64`; per event.

CPU: utime and stime of every thread of the gateway from /proc/PID/task/*/stat around each wrk run
(median of `--rounds`), grouped by thread: the asyncio loop (the main thread: Python, Granian's
protocol calls, the bridge), Granian's HTTP threads, the forwarder's tokio threads (`ntonix-io`).
Attribution inside each group: `perf record -e cpu-clock -g` (shared object of the sampled
instruction; for kernel samples the syscall or path it is in), and inside the interpreter's share of
the loop thread `py-spy record --native` (which Python code is running). Both profilers run in
their own wrk run, so their overhead is not in the CPU figures. Flame graphs (`--out`): per case, the
Python view (py-spy) and the whole-process view (perf, every thread).
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clients
import harness
from harness import BENCH, CLIENT_CPU, HOST, ROOT, Procs, free_port, http_call, pinned, run_wrk, wait_ready

CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_RATE = 20  # tokens per second per stream
STREAM_CONNS = 200
GROUPS = ("loop", "granian", "client", "other")
GROUP_LABEL = {
    "loop": "asyncio loop thread",
    "granian": "Granian HTTP threads",
    "client": "forwarder tokio threads (ntonix-io)",
    "other": "other threads",
}


# --------------------------------------------------------------------------- processes


@dataclass
class Variant:
    label: str
    tree: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pythonpath(self) -> str:
        return str(self.tree / "python")


def parse_variant(text: str) -> Variant:
    """`label=PATH[,NAME=VALUE...]`: a source tree (its python/ with its own _core) and extra env."""
    label, _, rest = text.partition("=")
    path, *pairs = rest.split(",")
    env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    return Variant(label, Path(path).resolve(), env)


def start_gateway(procs: Procs, v: Variant, name: str, backend_port: int, cache: bool) -> tuple[Any, int]:
    port = free_port()
    config = json.loads((BENCH / "ntonix-bench.json").read_text())
    config["server"]["port"] = port
    config["backends"] = [{"host": HOST, "port": backend_port, "weight": 1}]
    config["cache"]["enabled"] = cache
    path = procs.workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "ntonix", "run", "--config", str(path), "--port", str(port)]
    cmd += ["--backend", f"{HOST}:{backend_port}", "--log-level", "warning"]
    extra = v.env.get("PYTHONPATH")
    env = {**v.env, "PYTHONPATH": v.pythonpath + (f":{extra}" if extra else "")}
    proc = procs.start(name, cmd, env)
    problem = wait_ready(proc, port, "/health", 30.0)
    if problem is not None:
        raise RuntimeError(f"{name}: {problem}")
    return proc, port


def start_mock(procs: Procs, v: Variant, rate: float) -> int:
    port = free_port()
    cmd = [sys.executable, "-m", "ntonix", "mock", "--host", HOST, "--port", str(port), "--tokens", "24"]
    cmd += ["--token-rate", f"{rate:g}", "--threads", "1", "--model", "bench-model"]
    proc = procs.start(f"mock-{rate:g}", cmd, {"PYTHONPATH": v.pythonpath})
    problem = wait_ready(proc, port, "/health", 20.0)
    if problem is not None:
        raise RuntimeError(f"mock: {problem}")
    return port


def thread_group(pid: int, tid: int, comm: str) -> str:
    """Granian's runtime threads keep the name of the thread that started them (python, ntonix)."""
    if tid == pid:
        return "loop"
    if comm.startswith("ntonix-io"):
        return "client"
    if comm.startswith(("python", "ntonix", "granian", "tokio")):
        return "granian"
    return "other"


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (comm, utime, stime) in clock ticks."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            text = (task / "stat").read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[int(task.name)] = (comm, int(fields[11]), int(fields[12]))
    return out


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    script: str
    conns: int
    unit: str  # "request" or "chunk"
    chunks: int = 1  # chunks per request (streams)


@dataclass
class Measured:
    rps: float
    requests: int
    us: dict[str, tuple[float, float]]  # group -> (user, sys) µs per unit
    threads: dict[str, str]
    latency: tuple[float, float] | None = None  # sequential TTFT p50, whole stream p50 (ms)

    @property
    def total(self) -> float:
        return sum(u + s for u, s in self.us.values())


def measure(pid: int, port: int, case: Case, seconds: int) -> Measured:
    before = thread_ticks(pid)
    run = run_wrk(port, case.script, case.conns, seconds)
    after = thread_ticks(pid)
    if not run.get("ok") or run["error_total"]:
        raise RuntimeError(f"{case.name}: wrk failed or saw errors: {run}")
    units = run["requests"] * case.chunks
    sums: dict[str, list[int]] = {g: [0, 0] for g in GROUPS}
    names: dict[str, set[str]] = defaultdict(set)
    for tid, (comm, utime, stime) in after.items():
        u0, s0 = before.get(tid, (comm, 0, 0))[1:]
        group = thread_group(pid, tid, comm)
        sums[group][0] += utime - u0
        sums[group][1] += stime - s0
        names[group].add(comm)
    scale = 1e6 / CLK_TCK / units
    us = {g: (u * scale, s * scale) for g, (u, s) in sums.items()}
    return Measured(run["rps"], run["requests"], us, {g: ",".join(sorted(n)) for g, n in names.items()})


def median_measured(runs: list[Measured]) -> Measured:
    us = {
        g: (statistics.median(r.us[g][0] for r in runs), statistics.median(r.us[g][1] for r in runs))
        for g in GROUPS
    }
    return Measured(
        statistics.median(r.rps for r in runs), sum(r.requests for r in runs), us, runs[0].threads
    )


def load(port: int, case: Case, seconds: int) -> Callable[[], None]:
    return lambda: run_wrk(port, case.script, case.conns, seconds) and None


# --------------------------------------------------------------------------- perf


FRAME = re.compile(r"^\s*([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")
KERNEL_WAKE = ("unix_", "eventfd", "futex", "ep_poll", "epoll", "pipe_")
KERNEL_NET = ("tcp", "inet_", "ip_", "net_rx", "sock_", "skb", "__dev_queue", "loopback")
KERNEL_SCHED = ("schedule", "finish_task_switch", "try_to_wake_up", "pick_next")


def perf_available() -> str | None:
    if shutil.which("perf") is None:
        return "perf is not installed (apt-get install linux-perf)"
    probe = subprocess.run(
        ["perf", "record", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"], capture_output=True
    )
    if probe.returncode != 0:
        return "perf cannot record here: " + probe.stderr.decode(errors="replace").strip()[-200:]
    return None


def perf_record(
    pid: int, seconds: int, workdir: Path, drive: Callable[[], None]
) -> list[tuple[str, list[tuple[str, str]]]]:
    """Samples of the gateway while `drive` loads it: (thread group, frames leaf first as (sym, dso))."""
    data = workdir / f"perf-{pid}.data"
    cmd = ["perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-p", str(pid), "-o", str(data)]
    rec = subprocess.Popen(
        pinned(CLIENT_CPU, [*cmd, "--", "sleep", str(seconds)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    drive()
    rec.wait(timeout=seconds + 30)
    text = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym,dso"], capture_output=True, text=True
    ).stdout
    samples = []
    head: tuple[str, int] | None = None
    frames: list[tuple[str, str]] = []
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if head is not None:
                samples.append((thread_group(pid, head[1], head[0]), frames))
            head, frames = None, []
        elif line[0].isspace():
            match = FRAME.match(line)
            if match:
                frames.append((match.group(2), match.group(3)))
        else:
            parts = line.split()
            with contextlib.suppress(ValueError, IndexError):
                head = (" ".join(parts[:-1]), int(parts[-1]))
    with contextlib.suppress(OSError):
        data.unlink()
    return samples


def perf_category(frames: list[tuple[str, str]]) -> str:
    if not frames:
        return "user: unknown"
    dso = frames[0][1]
    if "kernel" in dso:
        syms = [s for s, d in frames if "kernel" in d]
        if any(s.startswith(KERNEL_WAKE) or any(k in s for k in KERNEL_WAKE) for s in syms):
            return "kernel: wake-ups (futex, epoll, socket pairs)"
        if any(any(k in s for k in KERNEL_NET) for s in syms):
            return "kernel: TCP (client and upstream sockets)"
        if any(s.startswith(KERNEL_SCHED) for s in syms):
            return "kernel: scheduler (thread switches)"
        return "kernel: other (page faults, timers, memory)"
    base = os.path.basename(dso)
    if "_granian" in base:
        return "user: Granian (.so)"
    if "_core" in base:
        return "user: ntonix._core (Rust)"
    if "python" in base:
        return "user: Python interpreter"
    if base.startswith(("libc", "libm", "ld-linux", "libpthread")):
        return "user: libc (malloc, memcpy)"
    return "user: other"


def perf_collapsed(samples: list[tuple[str, list[tuple[str, str]]]]) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for group, frames in samples:
        names = tuple(f"{sym} [{os.path.basename(dso)}]" for sym, dso in reversed(frames))
        stacks[(GROUP_LABEL[group], *names)] += 1
    return stacks


# --------------------------------------------------------------------------- py-spy


PYSPY_CATS = (
    "Python: ntonix pipeline",
    "Python: Granian's RSGI glue",
    "Python: asyncio event loop",
)
SYSCALL_LEAF = re.compile(
    r"^(__)?(libc_)?(send|recv|write|read|epoll_wait|sendmsg|recvmsg|writev|readv|futex|syscall)"
)


def pyspy_record(
    pid: int, seconds: int, rate: int, workdir: Path, drive: Callable[[], None]
) -> Counter[tuple[str, ...]]:
    raw = workdir / f"pyspy-{pid}.txt"
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [
        str(exe) if exe.exists() else "py-spy",
        "record",
        "--native",
        "--threads",
        "--rate",
        str(rate),
        "--pid",
        str(pid),
    ]
    cmd += ["--duration", str(seconds), "--format", "raw", "--output", str(raw)]
    spy = subprocess.Popen(pinned(CLIENT_CPU, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    drive()
    _, err = spy.communicate(timeout=seconds + 60)
    stacks: Counter[tuple[str, ...]] = Counter()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}")
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def is_loop_stack(stack: tuple[str, ...]) -> bool:
    return any("_run_once" in f or "run_forever" in f or "runners.py" in f for f in stack)


def pyspy_category(stack: tuple[str, ...]) -> str | None:
    """Category of one loop-thread sample's interpreter time; None: native code perf accounts for."""
    leaf = stack[-1]
    if "_granian" in leaf or "_core" in leaf or SYSCALL_LEAF.match(leaf):
        return None
    if any("(ntonix/" in f for f in stack):
        return PYSPY_CATS[0]
    if any("(granian/" in f for f in stack):
        return PYSPY_CATS[1]
    return PYSPY_CATS[2]


# --------------------------------------------------------------------------- split


def split(
    m: Measured, perf: list[tuple[str, list[tuple[str, str]]]] | None, py: Counter[tuple[str, ...]] | None
) -> list[tuple[str, str, float]]:
    """(component, detail, µs per unit) rows; the per-group µs from /proc, the shares from the profilers."""
    rows: list[tuple[str, str, float]] = []
    by: dict[str, Counter[str]] = defaultdict(Counter)
    for group, frames in perf or []:
        by[group][perf_category(frames)] += 1
    py_share: Counter[str] = Counter()
    for stack, count in (py or Counter()).items():
        if is_loop_stack(stack):
            cat = pyspy_category(stack)
            if cat is not None:
                py_share[cat] += count
    for group in GROUPS:
        user, system = m.us[group]
        if user + system < 0.05:
            continue
        cats = by.get(group)
        if not cats:
            rows.append((GROUP_LABEL[group], "user (not profiled)", user))
            rows.append((GROUP_LABEL[group], "kernel (not profiled)", system))
            continue
        user_n = sum(n for c, n in cats.items() if c.startswith("user"))
        kern_n = sum(n for c, n in cats.items() if c.startswith("kernel"))
        for cat, n in sorted(cats.items(), key=lambda kv: -kv[1]):
            share = user * n / user_n if cat.startswith("user") else system * n / kern_n
            if cat == "user: Python interpreter" and group == "loop" and py_share:
                total = sum(py_share.values())
                for pcat, pn in py_share.most_common():
                    rows.append((GROUP_LABEL[group], pcat, share * pn / total))
                continue
            rows.append((GROUP_LABEL[group], cat, share))
    return rows


COMPONENT = (
    (
        "Granian (HTTP server)",
        lambda g, c: (
            c == "user: Granian (.so)"
            or c == "Python: Granian's RSGI glue"
            or (g == "granian" and c in ("user: libc (malloc, memcpy)", "user: other", "user: unknown"))
        ),
    ),
    ("Python pipeline (ntonix code)", lambda g, c: c == "Python: ntonix pipeline"),
    (
        "asyncio loop, bridge and thread hops",
        lambda g, c: (
            c == "Python: asyncio event loop"
            or (c == "user: Python interpreter" and g != "loop")
            or (c == "user: ntonix._core (Rust)" and g == "loop")
            or (g == "loop" and c in ("user: libc (malloc, memcpy)", "user: other", "user: unknown"))
            or c.startswith(("kernel: wake-ups", "kernel: scheduler"))
        ),
    ),
    ("Rust client (rust/forward, hyper)", lambda g, c: g == "client" and c.startswith("user")),
    ("kernel: TCP", lambda g, c: c.startswith("kernel: TCP")),
    ("kernel: other", lambda g, c: c.startswith("kernel: other") or c.startswith("kernel (")),
)


def components(rows: list[tuple[str, str, float]]) -> list[tuple[str, float]]:
    label_group = {v: k for k, v in GROUP_LABEL.items()}
    out: dict[str, float] = {name: 0.0 for name, _ in COMPONENT}
    out["unattributed"] = 0.0
    for group_label, cat, us in rows:
        g = label_group[group_label]
        for name, test in COMPONENT:
            if test(g, cat):
                out[name] += us
                break
        else:
            out["unattributed"] += us
    return [(k, v) for k, v in out.items() if v > 0.005 or k != "unattributed"]


# --------------------------------------------------------------------------- flame graphs


def color(name: str) -> str:
    if "[kernel" in name:
        return "#f0a050"
    if "_granian" in name or "granian/" in name:
        return "#7fa7e0"
    if "_core" in name:
        return "#80c080"
    if "(ntonix/" in name:
        return "#f07060"
    if ".py" in name:
        return "#e8c060"
    return "#c8c8c8"


def flame_svg(stacks: Counter[tuple[str, ...]], title: str, width: int = 1400, row: int = 16) -> str:
    """A static flame graph (root at the bottom; hover a box for its name and share)."""
    root: dict[str, Any] = {"n": 0, "c": {}}
    for stack, count in stacks.items():
        node = root
        node["n"] += count
        for frame in stack:
            node = node["c"].setdefault(frame, {"n": 0, "c": {}})
            node["n"] += count
    total = root["n"] or 1
    rects: list[tuple[float, int, float, str, int]] = []

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total * width
            if w >= 0.6:
                rects.append((x, depth, w, name, child["n"]))
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    depth = max((d for _, d, _, _, _ in rects), default=0) + 1
    height = (depth + 3) * row
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        ' font-family="monospace" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="4" y="{row}" font-size="13">{html.escape(title)} ({total} samples)</text>',
    ]
    for x, d, w, name, n in rects:
        y = height - (d + 1) * row
        label = html.escape(name)
        out.append(
            f"<g><title>{label} ({n} samples, {n / total:.1%})</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="{color(name)}" rx="1"/>'
        )
        chars = int(w / 6.6)
        if chars >= 4:
            text = name if len(name) <= chars else name[: chars - 2] + ".."
            out.append(f'<text x="{x + 2:.1f}" y="{y + row - 4}">{html.escape(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- run


def git_commit(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def stream_chunks(port: int) -> int:
    status, _, body = http_call(port, "/v1/chat/completions", "POST", harness.STREAM_REQUEST, timeout=30)
    if status != 200 or not body.rstrip().endswith(b"[DONE]"):
        raise RuntimeError(f"stream check failed: {status} {body[-200:]!r}")
    return body.count(b"data:")


def run_case(
    procs: Procs, v: Variant, case_name: str, args: argparse.Namespace, backends: dict[str, int]
) -> tuple[Case, Any, int]:
    if case_name == "stream":
        case = Case("stream", "stream.lua", STREAM_CONNS, "chunk")
        proc, port = start_gateway(procs, v, f"gw-{v.label}-stream", backends["mock"], cache=False)
        case.chunks = stream_chunks(port)
    elif case_name == "burst":  # an unpaced stream: the mock writes every event at once
        case = Case("burst", "stream.lua", 64, "chunk")
        proc, port = start_gateway(procs, v, f"gw-{v.label}-burst", backends["mock0"], cache=False)
        case.chunks = stream_chunks(port)
    elif case_name == "hit":
        case = Case("hit", "post.lua", 64, "request")
        proc, port = start_gateway(procs, v, f"gw-{v.label}-hit", backends["nginx"], cache=True)
        http_call(port, "/v1/chat/completions", "POST", harness.CHAT_REQUEST)
        _, headers, _ = http_call(port, "/v1/chat/completions", "POST", harness.CHAT_REQUEST)
        if headers.get("x-cache") != "HIT":
            raise RuntimeError(f"hit case: no cache hit ({headers})")
    else:
        case = Case("miss", "post.lua", 64, "request")
        proc, port = start_gateway(procs, v, f"gw-{v.label}-miss", backends["nginx"], cache=False)
    run_wrk(port, case.script, case.conns, 2)  # warm-up
    return case, proc, port


def start_backends(procs: Procs, v: Variant, cases: Iterable[str]) -> dict[str, int]:
    nofile = harness.raise_nofile()
    backend_port = free_port()
    harness.start_nginx(procs, "backend", nofile, backend_port, backend_port=backend_port)
    out = {"nginx": backend_port}
    if "stream" in cases:
        out["mock"] = start_mock(procs, v, STREAM_RATE)
    if "burst" in cases:
        out["mock0"] = start_mock(procs, v, 0)
    return out


def profile(args: argparse.Namespace) -> int:
    v = Variant("profile", Path(args.tree).resolve(), dict(e.split("=", 1) for e in args.env))
    cases = args.cases.split(",")
    perf_problem = None if args.no_perf else perf_available()
    if perf_problem:
        print(f"perf: {perf_problem}; relying on py-spy --native", file=sys.stderr)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "commit": git_commit(v.tree),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "perf": perf_problem or ("off" if args.no_perf else "on"),
            "seconds": args.seconds,
            "rounds": args.rounds,
            "load_average": list(os.getloadavg()),
        },
        "cases": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="ntonix-profile-"))
    procs = Procs(workdir, None)
    try:
        backends = start_backends(procs, v, cases)
        for name in cases:
            case, proc, port = run_case(procs, v, name, args, backends)
            runs = [measure(proc.pid, port, case, args.seconds) for _ in range(args.rounds)]
            m = median_measured(runs)
            print(f"{name}: {m.rps:,.0f} req/s, {m.total:.1f} µs per {case.unit}", file=sys.stderr)
            perf = py = None
            if not args.no_perf and perf_problem is None:
                perf = perf_record(proc.pid, args.seconds, workdir, load(port, case, args.seconds + 1))
                (out_dir / f"{name}-perf.svg").write_text(
                    flame_svg(perf_collapsed(perf), f"NTONIX {name}: perf, every thread of the gateway")
                )
            if not args.no_pyspy:
                py = pyspy_record(
                    proc.pid, args.seconds, args.rate, workdir, load(port, case, args.seconds + 1)
                )
                (out_dir / f"{name}-python.svg").write_text(
                    flame_svg(py, f"NTONIX {name}: py-spy --native, threads holding the GIL")
                )
            rows = split(m, perf, py)
            results["cases"][name] = {
                "unit": case.unit,
                "chunks_per_stream": case.chunks,
                "connections": case.conns,
                "rps": m.rps,
                "total_us": m.total,
                "groups": {g: {"user_us": u, "sys_us": s} for g, (u, s) in m.us.items()},
                "threads": m.threads,
                "rows": rows,
                "components": components(rows),
                "runs": [{"rps": r.rps, "total_us": r.total} for r in runs],
            }
            procs.stop(proc)
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    cases = results["cases"]
    names = list(cases)
    lines = [
        f"{meta['date']}, git {meta['commit']}, {meta['cpu']}, {meta['cores']} cores, "
        f"load average {meta['load_average'][0]:.2f}; "
        f"median of {meta['rounds']} runs of {meta['seconds']} s; "
        f"perf: {meta['perf']}.",
        "",
        "| component | " + " | ".join(f"{n} (µs/{cases[n]['unit']})" for n in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    comps: dict[str, dict[str, float]] = defaultdict(dict)
    for n in names:
        for comp, us in cases[n]["components"]:
            comps[comp][n] = us
    for comp, vals in comps.items():
        lines.append(f"| {comp} | " + " | ".join(f"{vals.get(n, 0.0):.1f}" for n in names) + " |")
    lines.append(
        "| **total (from /proc)** | " + " | ".join(f"**{cases[n]['total_us']:.1f}**" for n in names) + " |"
    )
    lines.append("| req/s | " + " | ".join(f"{cases[n]['rps']:,.0f}" for n in names) + " |")
    lines += ["", "By thread and profile category (µs per unit):", ""]
    lines.append("| thread | category | " + " | ".join(names) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in names) + " |")
    detail: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for n in names:
        for group, cat, us in cases[n]["rows"]:
            detail[(group, cat)][n] = detail[(group, cat)].get(n, 0.0) + us
    for (group, cat), vals in detail.items():
        lines.append(f"| {group} | {cat} | " + " | ".join(f"{vals.get(n, 0.0):.1f}" for n in names) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- A/B


def ab(args: argparse.Namespace) -> int:
    """Interleaved A/B: per case, one gateway per variant, then `rounds` x (one wrk run per variant)."""
    variants = [parse_variant(text) for text in args.ab]
    cases = args.cases.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="ntonix-cpu-ab-"))
    procs = Procs(workdir, None)
    results: dict[str, dict[str, list[Measured]]] = {c: {v.label: [] for v in variants} for c in cases}
    units: dict[str, str] = {}
    try:
        backends = start_backends(procs, variants[0], cases)
        for name in cases:
            running = [(v, *run_case(procs, v, name, args, backends)) for v in variants]
            for _ in range(args.rounds):
                for v, case, proc, port in running:
                    m = measure(proc.pid, port, case, args.seconds)
                    if name == "burst":  # sequential streams, like make bench's streaming rows
                        lat = clients.stream_latency(HOST, port, harness.STREAM_REQUEST, 300, 60.0)
                        if lat.errors:
                            raise RuntimeError(f"burst {v.label}: {lat.error_samples[:3]}")
                        m.latency = (lat.ttft_p50_ms, lat.total_p50_ms)
                    results[name][v.label].append(m)
                    units[name] = case.unit
                    print(
                        f"{name} {v.label}: {m.rps:,.0f} req/s {m.total:.1f} µs/{case.unit}", file=sys.stderr
                    )
            for _, _, proc, _ in running:
                procs.stop(proc)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{stamp}, {cpu_model()}, load average {os.getloadavg()[0]:.2f}, {args.rounds} x {args.seconds} s")
    for name in cases:
        base = None
        for v in variants:
            runs = results[name][v.label]
            rps = [round(r.rps) for r in runs]
            us = [round(r.total, 1) for r in runs]
            med = statistics.median(us)
            base = base or med
            print(
                f"{name:6} {v.label:12} req/s median {statistics.median(rps):>7,.0f} {rps}; "
                f"µs/{units[name]} median {med:.1f} min {min(us):.1f} ({med / base:.2f}x) {us}"
            )
            if runs and runs[0].latency is not None:
                ttft = [r.latency[0] for r in runs if r.latency]
                whole = [r.latency[1] for r in runs if r.latency]
                print(
                    f"{'':19} sequential: TTFT p50 median {statistics.median(ttft):.3f} ms, "
                    f"whole stream p50 median {statistics.median(whole):.3f} ms"
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="miss,hit,stream")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--no-perf", action="store_true")
    parser.add_argument("--no-pyspy", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "profile"))
    parser.add_argument("--json", default=str(BENCH / "results" / "profile.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--tree", default=str(ROOT), help="source tree whose python/ the gateway runs")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="gateway env")
    parser.add_argument("--ab", action="append", metavar="LABEL=TREE[,ENV=VALUE...]", help="A/B mode")
    args = parser.parse_args(argv)
    harness.raise_nofile()
    return ab(args) if args.ab else profile(args)


if __name__ == "__main__":
    sys.exit(main())
