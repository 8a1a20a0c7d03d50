#!/usr/bin/env bash
# The body of `make demo`: two mock LLM backends serving different models (:8001 mock-a with
# llama-3.1-8b; :8002 mock-b with qwen2.5-coder and bge-small) and the NTONIX gateway on :8080 in front
# of them, with the curl lines to try. Run from the repo root with .venv/bin on PATH and the
# package installed (the Makefile does both). Ctrl-C (or SIGTERM to this script) stops everything: the
# gateway and the mocks are stopped by PID whenever this script exits, however it exits.
set -euo pipefail

GATEWAY_PORT=8080
MOCK_PORTS=(8001 8002)
MOCK_NAMES=(mock-a mock-b)
# Per mock, its --model options (space-separated; the first is its default model).
MOCK_MODELS=("llama-3.1-8b" "qwen2.5-coder bge-small")
HEALTH_DEADLINE_SECONDS=20

if ! command -v ntonix >/dev/null 2>&1; then
    echo "demo: 'ntonix' is not on PATH; run 'make demo' (it builds and installs the package)" >&2
    exit 1
fi
MOCK=(ntonix mock)

gateway_pid=""
mock_pids=()
stop_and_wait() {
    for pid in "$@"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        wait "$pid" 2>/dev/null || true
    done
}
cleanup() {
    trap - EXIT INT TERM
    if [[ -n "${traffic_pid:-}" ]]; then
        kill "$traffic_pid" 2>/dev/null || true
    fi
    # The gateway first, so that it drains before its backends go away.
    if [[ -n "$gateway_pid" ]]; then
        stop_and_wait "$gateway_pid"
    fi
    if ((${#mock_pids[@]})); then
        stop_and_wait "${mock_pids[@]}"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for i in "${!MOCK_PORTS[@]}"; do
    model_args=()
    for model in ${MOCK_MODELS[$i]}; do
        model_args+=(--model "$model")
    done
    "${MOCK[@]}" --host 127.0.0.1 --port "${MOCK_PORTS[$i]}" --name "${MOCK_NAMES[$i]}" --token-rate 20 \
        "${model_args[@]}" &
    mock_pids+=("$!")
done

deadline=$((SECONDS + HEALTH_DEADLINE_SECONDS))
for i in "${!MOCK_PORTS[@]}"; do
    port=${MOCK_PORTS[$i]}
    until curl -sf -o /dev/null "http://127.0.0.1:$port/health"; do
        if ! kill -0 "${mock_pids[$i]}" 2>/dev/null; then
            echo "demo: ${MOCK_NAMES[$i]} on :$port exited (port busy?)" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "demo: ${MOCK_NAMES[$i]} on :$port not healthy after ${HEALTH_DEADLINE_SECONDS}s" >&2
            exit 1
        fi
        sleep 0.1
    done
done

url="http://localhost:$GATEWAY_PORT"
json="-H 'Content-Type: application/json'"
cat <<EOF

Mock backends up: ${MOCK_NAMES[0]} on :${MOCK_PORTS[0]} (${MOCK_MODELS[0]}), ${MOCK_NAMES[1]} on :${MOCK_PORTS[1]} (${MOCK_MODELS[1]// /, }).
Starting the NTONIX gateway on :$GATEWAY_PORT (Ctrl-C stops everything). Try, from another terminal:

  # the models the cluster serves
  curl -s $url/v1/models

  # a chat to each model (system_fingerprint says which backend answered)
  curl -s $url/v1/chat/completions $json \\
       -d '{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Hello, NTONIX!"}]}'
  curl -s $url/v1/chat/completions $json \\
       -d '{"model":"qwen2.5-coder","messages":[{"role":"user","content":"Write a Python haiku"}]}'

  # an embedding
  curl -s $url/v1/embeddings $json -d '{"model":"bge-small","input":["first text","second text"]}'

  # a chat streamed token by token
  curl -sN $url/v1/chat/completions $json \\
       -d '{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Stream, please"}],"stream":true}'

  # one request twice: the first is a cache MISS, the second a HIT
  for i in 1 2; do curl -s -o /dev/null -D - $url/v1/chat/completions $json \\
       -d '{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Cache me"}]}' | grep -i '^x-cache'; done

  curl -s $url/health
  curl -s $url/metrics
  curl -s $url/cache/stats

  # the live dashboard (a little demo traffic keeps it moving for two minutes)
  $url/dashboard

EOF

backend_args=()
for port in "${MOCK_PORTS[@]}"; do
    backend_args+=(--backend "localhost:$port")
done
# Not `exec`: this shell stays to stop everything when the gateway ends or a signal comes. The gateway
# runs as a job and is waited for, because `wait` (unlike a foreground command) lets the traps run at once.
ntonix run --port "$GATEWAY_PORT" "${backend_args[@]}" &
gateway_pid=$!

# A little traffic so the dashboard is alive when opened: a few requests every two seconds for two
# minutes, across both models, some repeated (cache hits) and some streamed. Stopped with the demo.
demo_traffic() {
    command -v curl >/dev/null 2>&1 || return 0
    local i model
    sleep 2
    for i in $(seq 1 60); do
        for model in llama-3.1-8b qwen2.5-coder; do
            curl -s -o /dev/null "$url/v1/chat/completions" -H 'Content-Type: application/json' \
                -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"demo $((i % 5))\"}]}" || true
        done
        curl -s -o /dev/null "$url/v1/chat/completions" -H 'Content-Type: application/json' \
            -d "{\"model\":\"llama-3.1-8b\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"stream $i\"}]}" || true
        sleep 2
    done
}
demo_traffic >/dev/null 2>&1 &
traffic_pid=$!
status=0
wait "$gateway_pid" || status=$?
gateway_pid=""
exit "$status"
