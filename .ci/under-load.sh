#!/usr/bin/env bash
# `make test-under-load`: `make test` RUNS times in a row (default 3) while LOAD_CORES busy loops
# (default 1) keep that many cores busy. Stops at the first failing run; each run's log and time
# go to $LOG_DIR (default .ci/under-load/). Issue 9's "three runs in a row under load".
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
LOAD_CORES="${LOAD_CORES:-1}"
LOG_DIR="${LOG_DIR:-.ci/under-load}"
mkdir -p "$LOG_DIR"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for _ in $(seq 1 "$LOAD_CORES"); do
    (while :; do :; done) &
    pids+=("$!")
done
echo "==> $LOAD_CORES busy loop(s) started (pids ${pids[*]}); $RUNS runs of make test; logs in $LOG_DIR"
for run in $(seq 1 "$RUNS"); do
    start=$(date +%s)
    if make test >"$LOG_DIR/run-$run.log" 2>&1; then
        result=passed
    else
        result=FAILED
    fi
    summary=$(grep -E '^[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s' "$LOG_DIR/run-$run.log" | tail -n 1)
    echo "run $run/$RUNS: $result in $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg): $summary"
    [[ "$result" == passed ]] || { echo "see $LOG_DIR/run-$run.log"; exit 1; }
done
echo "==> $RUNS runs in a row passed under load"
