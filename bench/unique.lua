-- wrk script: POST a chat request whose prompt carries a counter, so every
-- request is new to any cache (NTONIX cache-miss run with the cache enabled).
-- Each wrk thread gets its own prefix so counters never collide across threads.
local counter = 0
local prefix = ""

function setup(thread)
  thread:set("tid", tostring(math.random(1, 1000000000)))
end

function init(args)
  prefix = tostring(tid or "0") .. "-" .. tostring(os.time())
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local body = '{"model":"bench-model","messages":[{"role":"system","content":"You are a terse assistant."},'
      .. '{"role":"user","content":"Name three prime numbers. #' .. prefix .. '-' .. counter
      .. '"}],"temperature":0,"max_tokens":64}'
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
