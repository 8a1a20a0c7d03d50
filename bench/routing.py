"""Routing benchmark (issue 11, item 6; SPEC §13): a multi-turn chat trace over 4 KV-emulating mocks.

The trace: conversations of several tenants, each tenant with a long system prompt of its own; every
turn sends the whole conversation so far (system prompt, earlier user turns and assistant answers, the
new user turn), so a backend that served the previous turn holds all but the newest part of the prompt
in its (emulated) KV cache. Conversations start as a Poisson process; within one, the next turn follows
the previous answer after an exponential think time (a closed loop per conversation, like a chat UI).

The backends: 4 `ntonix mock` processes with the KV prefix cache emulation (an LRU of 64-character
blocks per mock, small enough that replicating every conversation everywhere does not fit) and a
prefill cost per uncached character that dominates time to first token.

The contestants, each started fresh in front of the same 4 mocks (reset through /mock/reset before
each run, so counters and KV caches start empty): NTONIX with `round_robin`, `least_requests`,
`session` and `prefix`; `sglang-router` and `vllm-router` (PyPI) with `cache_aware` and `round_robin`.
Every request streams (`stream_options.include_usage`); the client times the first `data:` event.

Per run: mean / p90 time to first token (all turns, and turns 2+), backend prefix-hit rate (sum of the
mocks' cached prompt characters / sum of prompt characters), prefill work (uncached characters), load
spread (max/mean requests per backend, peak requests in flight per backend), errors. Scenarios: `base`
(tenants equally frequent), `hotspot` (one tenant's system prompt in 80% of the conversations) and
`dies` (one backend killed with SIGKILL 40% into the trace; its stats are read just before).

Run with `make bench-routing` (or `python bench/routing.py`); `BENCH_QUICK=1` runs a smaller trace and
fewer contestants. Results: bench/results/routing.json (quick runs: routing-quick.json). Every process
started here is in its own process group and killed by that group's id on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MODEL = "mock-model"

# The backends' KV emulation and the trace's shape (the full run; BENCH_QUICK scales the trace down).
KV_BLOCK_CHARS = 64
KV_CAPACITY_BLOCKS = 384  # 24 KiB of prompt per mock: 4 system prompts plus a quarter of the live talk
PREFILL_US_PER_CHAR = 200.0  # 6 KB uncached = 1.2 s, the newest turn alone ~0.12 s
TOKENS, TOKEN_RATE = 24, 100.0  # each answer streams for ~0.24 s after its first token
SYSTEM_CHARS, USER_CHARS, REPLY_CHARS = 3000, 400, 200
HEALTH_INTERVAL_S = 1.0


def log(message: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- the trace


@dataclass
class Conversation:
    cid: str
    tenant: int
    start: float  # seconds after the trace's start
    users: list[str]
    replies: list[str]
    thinks: list[float]


@dataclass
class Trace:
    systems: list[str]
    conversations: list[Conversation]


def _text(rng: random.Random, vocabulary: list[str], chars: int) -> str:
    words: list[str] = []
    length = 0
    while length < chars:
        word = rng.choice(vocabulary)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:chars]


def make_trace(
    conversations: int, turns: int, tenants: int, rate: float, think_s: float, hotspot: bool, seed: int
) -> Trace:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    systems = [
        f"You are the assistant of tenant {t}. " + _text(rng, vocabulary, SYSTEM_CHARS)
        for t in range(tenants)
    ]
    weights = [0.8] + [0.2 / (tenants - 1)] * (tenants - 1) if hotspot else [1.0] * tenants
    convs: list[Conversation] = []
    start = 0.0
    for c in range(conversations):
        tenant = rng.choices(range(tenants), weights)[0] if hotspot else c % tenants
        convs.append(
            Conversation(
                cid=f"conv-{seed}-{c}",
                tenant=tenant,
                start=start,
                users=[f"Turn {k} of {c}: " + _text(rng, vocabulary, USER_CHARS) for k in range(turns)],
                replies=[_text(rng, vocabulary, REPLY_CHARS) for _ in range(turns)],
                thinks=[rng.expovariate(1.0 / think_s) for _ in range(turns)],
            )
        )
        start += rng.expovariate(rate)
    return Trace(systems, convs)


# --- processes


class Processes:
    """Every process started here, each in its own process group, killed by group id."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self._count += 1
        log_path = self.workdir / f"{self._count:02d}-{name}.log"
        # this checkout's package first, whatever the venv has installed
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")])),
        }
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, env=env, start_new_session=True
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, signal.SIGKILL)


@dataclass
class Mock:
    port: int
    name: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_mock(procs: Processes, mock: Mock) -> None:
    mock.proc = procs.start(
        mock.name,
        [
            str(BIN / "python"),
            "-m",
            "ntonix",
            "mock",
            "--host",
            HOST,
            "--port",
            str(mock.port),
            "--name",
            mock.name,
            "--kv-capacity",
            str(KV_CAPACITY_BLOCKS),
            "--kv-block-chars",
            str(KV_BLOCK_CHARS),
            "--prefill-us-per-char",
            str(PREFILL_US_PER_CHAR),
            "--tokens",
            str(TOKENS),
            "--token-rate",
            str(TOKEN_RATE),
        ],
    )


@dataclass
class Contestant:
    name: str  # row label
    kind: str  # ntonix | sglang-router | vllm-router
    policy: str

    def available(self) -> str | None:
        """None when it can run here, else why not."""
        if self.kind == "ntonix":
            return None
        binary = BIN / self.kind
        return None if binary.exists() else f"{binary} not installed (pip install {self.kind})"

    def command(self, port: int, mocks: list[Mock], workdir: Path) -> list[str]:
        urls = [m.url for m in mocks]
        if self.kind == "ntonix":
            config = {
                "backends": [{"url": u} for u in urls],
                "routing": {"policy": self.policy},
                "cache": {"enabled": False},
                "health_check": {"interval_seconds": HEALTH_INTERVAL_S, "timeout_seconds": 1.0},
                "logging": {"level": "warning", "access_log": False, "enable_colors": False},
            }
            path = workdir / f"ntonix-{self.policy}.json"
            path.write_text(json.dumps(config))
            return [
                str(BIN / "python"),
                "-m",
                "ntonix",
                "run",
                "--config",
                str(path),
                "--port",
                str(port),
                "--bind",
                HOST,
            ]
        log_level = "warn" if self.kind == "sglang-router" else "warning"
        prefix = [str(BIN / self.kind)] + (["launch"] if self.kind == "sglang-router" else [])
        return [
            *prefix,
            "--host",
            HOST,
            "--port",
            str(port),
            "--worker-urls",
            *urls,
            "--policy",
            self.policy,
            "--prometheus-port",
            str(free_port()),
            "--health-check-interval-secs",
            str(int(HEALTH_INTERVAL_S)),
            "--log-level",
            log_level,
        ]


CONTESTANTS = [
    Contestant("NTONIX round_robin", "ntonix", "round_robin"),
    Contestant("NTONIX least_requests", "ntonix", "least_requests"),
    Contestant("NTONIX session", "ntonix", "session"),
    Contestant("NTONIX prefix", "ntonix", "prefix"),
    Contestant("sglang-router cache_aware", "sglang-router", "cache_aware"),
    Contestant("sglang-router round_robin", "sglang-router", "round_robin"),
    Contestant("vllm-router cache_aware", "vllm-router", "cache_aware"),
    Contestant("vllm-router round_robin", "vllm-router", "round_robin"),
]
# The hotspot and dying-backend scenarios run the contestants that matter for the targets.
FOCUS = {
    "NTONIX round_robin",
    "NTONIX prefix",
    "sglang-router cache_aware",
    "vllm-router cache_aware",
}


# --- the client


@dataclass
class Result:
    turn: int
    ttft_s: float | None
    ok: bool
    error: str = ""
    conversation: str = ""
    backend: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0


def _field(line: bytes, key: bytes) -> str:
    """The string value after `key` in a JSON event line, without decoding it all ("" if absent)."""
    at = line.find(key)
    if at < 0:
        return ""
    start = at + len(key)
    return line[start : line.find(b'"', start)].decode()


async def _conversation(
    http: aiohttp.ClientSession, url: str, trace: Trace, conv: Conversation, t0: float, out: list[Result]
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, conv.start - (loop.time() - t0)))
    messages: list[dict[str, str]] = [{"role": "system", "content": trace.systems[conv.tenant]}]
    for k, user in enumerate(conv.users):
        messages.append({"role": "user", "content": user})
        body = {
            "model": MODEL,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": conv.cid,
        }
        start = time.perf_counter()
        ttft: float | None = None
        done = False
        error = ""
        backend = ""
        prompt_tokens = cached_tokens = 0
        try:
            async with http.post(
                url + "/v1/chat/completions", json=body, headers={"x-session-id": conv.cid}
            ) as response:
                if response.status != 200:
                    error = f"status {response.status}"
                else:
                    async for line in response.content:
                        if not line.startswith(b"data:"):
                            continue
                        if ttft is None:
                            ttft = time.perf_counter() - start
                            backend = _field(line, b'"system_fingerprint":"')
                        if line.startswith(b"data: [DONE]"):
                            done = True
                        elif b'"usage":{' in line:
                            usage = json.loads(line[5:]).get("usage") or {}
                            prompt_tokens = int(usage.get("prompt_tokens") or 0)
                            details = usage.get("prompt_tokens_details") or {}
                            cached_tokens = int(details.get("cached_tokens") or 0)
                    if not done:
                        error = "stream ended without [DONE]"
        except (TimeoutError, aiohttp.ClientError) as err:
            error = type(err).__name__
        out.append(
            Result(k + 1, ttft, done and not error, error, conv.cid, backend, prompt_tokens, cached_tokens)
        )
        messages.append({"role": "assistant", "content": conv.replies[k]})
        await asyncio.sleep(conv.thinks[k])


async def _get_json(http: aiohttp.ClientSession, url: str, method: str = "GET") -> dict[str, Any]:
    async with http.request(method, url) as response:
        data: dict[str, Any] = await response.json()
        return data


async def _play(url: str, trace: Trace, mocks: list[Mock], kill_at: float | None) -> tuple[list[Result], Any]:
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    out: list[Result] = []
    killed: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def kill_one() -> None:
            assert kill_at is not None
            await asyncio.sleep(kill_at)
            victim = mocks[-1]
            killed["stats"] = await _get_json(http, victim.url + "/mock/stats")
            killed["at_s"] = round(loop.time() - t0, 2)
            if victim.proc is not None:
                os.killpg(victim.proc.pid, signal.SIGKILL)
            log(f"killed {victim.name} at {killed['at_s']} s")

        tasks = [_conversation(http, url, trace, conv, t0, out) for conv in trace.conversations]
        if kill_at is not None:
            tasks.append(kill_one())
        await asyncio.gather(*tasks)
    return out, killed


def _wait_http(url: str, timeout: float, body: bytes | None = None) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _get(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def _mock_call(mock: Mock, path: str, method: str = "GET") -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(mock.url + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


# --- one run


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Run:
    scenario: str
    contestant: str
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    ttft_mean_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p90_ms: float = 0.0
    later_ttft_mean_ms: float = 0.0
    later_ttft_p90_ms: float = 0.0
    prompt_chars: int = 0
    cached_chars: int = 0
    hit_rate: float = 0.0
    prefill_chars: int = 0
    requests_per_backend: list[int] = field(default_factory=list)
    spread: float = 0.0
    spread_live: float = 0.0  # `dies`: over the backends that stayed up
    peak_in_flight: list[int] = field(default_factory=list)
    duration_s: float = 0.0
    loadavg_1m: list[float] = field(default_factory=list)
    killed: dict[str, Any] = field(default_factory=dict)
    gateway_routing: dict[str, Any] = field(default_factory=dict)  # NTONIX's /metrics `routing`
    skipped: str = ""


def run_one(
    procs: Processes, contestant: Contestant, mocks: list[Mock], trace: Trace, scenario: str, workdir: Path
) -> Run:
    run = Run(scenario, contestant.name)
    reason = contestant.available()
    if reason:
        run.skipped = reason
        log(f"{scenario} / {contestant.name}: NOT AVAILABLE ({reason})")
        return run
    for mock in mocks:  # a backend killed by the previous run comes back first
        if mock.proc is None or mock.proc.poll() is not None:
            start_mock(procs, mock)
            if not _wait_http(mock.url + "/health", 20):
                raise SystemExit(f"mock {mock.name} did not come up")
    port = free_port()
    proc = procs.start(contestant.name.replace(" ", "-"), contestant.command(port, mocks, workdir))
    url = f"http://{HOST}:{port}"
    probe = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ready?"}]}).encode()
    try:
        if not _wait_http(url + "/v1/chat/completions", 30, probe):
            run.skipped = f"did not answer within 30 s (log: {proc.log_path})"  # type: ignore[attr-defined]
            log(f"{scenario} / {contestant.name}: NOT AVAILABLE ({run.skipped})")
            return run
        time.sleep(HEALTH_INTERVAL_S * 1.5)  # every backend seen healthy by the router's own checks
        for mock in mocks:
            _mock_call(mock, "/mock/reset", "POST")
        kill_at = None
        if scenario == "dies":
            kill_at = 0.4 * max(c.start for c in trace.conversations)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        results, killed = asyncio.run(_play(url, trace, mocks, kill_at))
        run.duration_s = round(time.perf_counter() - started, 1)
        run.loadavg_1m = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        if contestant.kind == "ntonix":
            with contextlib.suppress(OSError, ValueError):
                run.gateway_routing = _get(url + "/metrics").get("routing", {})
    finally:
        procs.stop(proc)
    stats = []
    for mock in mocks:
        if mock.proc is not None and mock.proc.poll() is None:
            stats.append(_mock_call(mock, "/mock/stats"))
        else:
            stats.append(killed.get("stats", {}))
            mock.proc = None
    run.killed = {"backend": mocks[-1].name, "at_s": killed["at_s"]} if killed else {}
    _summarise(run, results, stats)
    if os.environ.get("ROUTING_DUMP"):
        dump = Path(os.environ["ROUTING_DUMP"]) / f"{scenario}-{contestant.name.replace(' ', '-')}.json"
        dump.write_text(json.dumps([asdict(r) for r in results]))
    log(
        f"{scenario} / {contestant.name}: TTFT mean {run.ttft_mean_ms:.0f} ms p90 {run.ttft_p90_ms:.0f} ms, "
        f"hit {run.hit_rate:.1%}, prefill {run.prefill_chars:,} chars, spread {run.spread:.2f} "
        f"{run.requests_per_backend}, peak {run.peak_in_flight}, errors {run.errors}, {run.duration_s} s"
    )
    return run


def _summarise(run: Run, results: list[Result], stats: list[dict[str, Any]]) -> None:
    run.requests = len(results)
    failed = [r for r in results if not r.ok]
    run.errors = len(failed)
    for r in failed:
        run.error_kinds[r.error] = run.error_kinds.get(r.error, 0) + 1
    ttfts = [r.ttft_s * 1000 for r in results if r.ok and r.ttft_s is not None]
    later = [r.ttft_s * 1000 for r in results if r.ok and r.ttft_s is not None and r.turn > 1]
    run.ttft_mean_ms = round(statistics.fmean(ttfts), 1) if ttfts else 0.0
    run.ttft_p50_ms = round(_percentile(ttfts, 0.5), 1)
    run.ttft_p90_ms = round(_percentile(ttfts, 0.9), 1)
    run.later_ttft_mean_ms = round(statistics.fmean(later), 1) if later else 0.0
    run.later_ttft_p90_ms = round(_percentile(later, 0.9), 1)
    run.prompt_chars = sum(int(s.get("prompt_chars_total", 0)) for s in stats)
    run.cached_chars = sum(int(s.get("prompt_chars_cached", 0)) for s in stats)
    run.prefill_chars = run.prompt_chars - run.cached_chars
    run.hit_rate = round(run.cached_chars / run.prompt_chars, 4) if run.prompt_chars else 0.0
    run.requests_per_backend = [int(s.get("chat_requests", 0)) for s in stats]
    mean = statistics.fmean(run.requests_per_backend) if run.requests_per_backend else 0.0
    run.spread = round(max(run.requests_per_backend) / mean, 3) if mean else 0.0
    run.peak_in_flight = [int(s.get("peak_in_flight", 0)) for s in stats]
    if run.killed:  # the spread that matters is over the backends still up
        live = run.requests_per_backend[:-1]
        run.spread_live = round(max(live) / statistics.fmean(live), 3) if sum(live) else 0.0


# --- the report


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True)
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


def markdown(runs: list[Run]) -> str:
    lines = [
        "| scenario | contestant | TTFT mean ms | TTFT p90 ms | turns 2+ mean / p90 ms "
        "| prefix-hit rate | prefill work (uncached chars) | requests per backend | spread max/mean "
        "| peak in flight | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in runs:
        if r.skipped:
            lines.append(f"| {r.scenario} | {r.contestant} | NOT AVAILABLE: {r.skipped} |||||||||")
            continue
        spread = f"{r.spread:.2f}" + (f" ({r.spread_live:.2f} over the 3 up)" if r.killed else "")
        lines.append(
            f"| {r.scenario} | {r.contestant} | {r.ttft_mean_ms:.0f} | {r.ttft_p90_ms:.0f} | "
            f"{r.later_ttft_mean_ms:.0f} / {r.later_ttft_p90_ms:.0f} | {r.hit_rate:.1%} | "
            f"{r.prefill_chars:,} | {' '.join(map(str, r.requests_per_backend))} | {spread} | "
            f"{' '.join(map(str, r.peak_in_flight))} | {r.errors} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    quick = bool(os.environ.get("BENCH_QUICK"))
    parser.add_argument("--conversations", type=int, default=16 if quick else 32)
    parser.add_argument("--turns", type=int, default=4 if quick else 6)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rate", type=float, default=4.0, help="conversations started per second (Poisson)")
    parser.add_argument("--think", type=float, default=0.3, help="mean think time between turns, s")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--only", default="", help="comma-separated contestant names (default: all)")
    parser.add_argument("--scenarios", default="base" if quick else "base,hotspot,dies")
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results" / ("routing-quick.json" if quick else "routing.json")
    )
    args = parser.parse_args()

    chosen = [c for c in CONTESTANTS if not args.only or c.name in args.only.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="ntonix-routing-"))
    procs = Processes(workdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    runs: list[Run] = []
    try:
        mocks = [Mock(free_port(), f"m{i}") for i in range(4)]
        for mock in mocks:
            start_mock(procs, mock)
        for mock in mocks:
            if not _wait_http(mock.url + "/health", 30):
                raise SystemExit(f"mock {mock.name} did not come up (log in {workdir})")
        for scenario in args.scenarios.split(","):
            trace = make_trace(
                args.conversations,
                args.turns,
                args.tenants,
                args.rate,
                args.think,
                scenario == "hotspot",
                args.seed,
            )
            for contestant in chosen:
                if scenario != "base" and contestant.name not in FOCUS:
                    continue
                runs.append(run_one(procs, contestant, mocks, trace, scenario, workdir))
    finally:
        procs.close()
    document = {
        "command": "make bench-routing" + (" (BENCH_QUICK=1)" if quick else ""),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "commit": _commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "trace": {
            "conversations": args.conversations,
            "turns": args.turns,
            "tenants": args.tenants,
            "rate_per_s": args.rate,
            "think_mean_s": args.think,
            "system_chars": SYSTEM_CHARS,
            "user_chars": USER_CHARS,
            "reply_chars": REPLY_CHARS,
            "seed": args.seed,
        },
        "mocks": {
            "count": 4,
            "kv_capacity_blocks": KV_CAPACITY_BLOCKS,
            "kv_block_chars": KV_BLOCK_CHARS,
            "prefill_us_per_char": PREFILL_US_PER_CHAR,
            "tokens": TOKENS,
            "token_rate": TOKEN_RATE,
        },
        "runs": [asdict(r) for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown(runs))
    log(f"wrote {args.out}; process logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
