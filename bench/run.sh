#!/usr/bin/env bash
# NTONIX benchmarks: `make bench` (full, ~21 min) or `BENCH_QUICK=1 make bench` (smoke, ~7 min).
# Installs nginx, wrk, matplotlib, sglang-router and vllm-router when missing, builds bench/streamload, then runs
# bench/harness.py pinned to core 1 (it pins every server to core 0). Every process started here or by the harness
# is killed by PID (process group) when this script exits, however it exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

need_apt=()
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v taskset >/dev/null 2>&1 || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
    echo "[bench] installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${need_apt[@]}"; then
        apt-get update
        apt-get install -y --no-install-recommends "${need_apt[@]}"
    fi
fi

if [[ ! -x "$PY" ]]; then
    echo "[bench] $PY missing: run 'make build' first (make bench does)" >&2
    exit 1
fi
if ! "$PY" -c 'import matplotlib' >/dev/null 2>&1; then
    echo "[bench] installing matplotlib into .venv"
    "$VENV/bin/pip" install --quiet "matplotlib>=3.8" || echo "[bench] matplotlib unavailable: no chart"
fi
# The Rust routers NTONIX is compared with (the `bench` extra); their rows say NOT AVAILABLE without them.
for spec in "sglang-router>=0.3" "vllm-router>=0.1.17"; do
    router="${spec%%>=*}"
    if [[ ! -x "$VENV/bin/$router" ]]; then
        echo "[bench] installing $router into .venv"
        "$VENV/bin/pip" install --quiet "$spec" || echo "[bench] $router unavailable: its rows are skipped"
    fi
done

# The stream_load phase's paced SSE mock and load client (bench/streamload: its own workspace, built
# into target/streamload so that `make clean` removes it); its rows say NOT AVAILABLE without it.
if command -v cargo >/dev/null 2>&1; then
    echo "[bench] building bench/streamload (cargo build --release)"
    nice -n 10 cargo build --release --quiet --manifest-path "$ROOT/bench/streamload/Cargo.toml" \
        --target-dir "$ROOT/target/streamload" || echo "[bench] bench/streamload did not build: stream_load skipped"
else
    echo "[bench] cargo missing: the stream_load phase is skipped"
fi

# Up to 10,000 streams through a proxy need ~2 fds each on the proxy: take the hard limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PIDFILE="$(mktemp /tmp/ntonix-bench-pids.XXXXXX)"
HARNESS_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n "$HARNESS_PID" ]] && kill -0 "$HARNESS_PID" 2>/dev/null; then
        kill -TERM "$HARNESS_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$HARNESS_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$HARNESS_PID" 2>/dev/null || true
    fi
    # Servers run in their own sessions: kill each recorded group by its leader's PID.
    while read -r pid; do
        [[ -n "$pid" ]] || continue
        kill -TERM -- "-$pid" 2>/dev/null || true
    done <"$PIDFILE"
    sleep 0.5
    while read -r pid; do
        [[ -n "$pid" ]] || continue
        kill -KILL -- "-$pid" 2>/dev/null || true
    done <"$PIDFILE"
    rm -f "$PIDFILE"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

pin=()
if [[ "$(nproc)" -ge 2 ]] && command -v taskset >/dev/null 2>&1; then
    pin=(taskset -c 1)
fi

# BENCH_NICE=-10 (say) gives every contestant and load generator the same higher priority
# on a machine shared with other work; the harness applies it to each server it starts.
if [[ -n "${BENCH_NICE:-}" ]]; then
    pin=(nice -n "$BENCH_NICE" "${pin[@]}")
fi

cd "$ROOT"
export BENCH_PIDFILE="$PIDFILE"
"${pin[@]}" "$PY" "$ROOT/bench/harness.py" "$@" &
HARNESS_PID=$!
wait "$HARNESS_PID"
