-- wrk script: POST the same OpenAI chat request on every call (cache-hit and
-- plain forwarding runs). The done() hook prints one machine-readable line,
-- "WRK_JSON {...}", parsed by bench/harness.py; wrk's own text follows as usual.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench-model","messages":[{"role":"system","content":"You are a terse assistant."},'
    .. '{"role":"user","content":"Name three prime numbers."}],"temperature":0,"max_tokens":64}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
