-- wrk script: POST chat requests drawn uniformly from DISTINCT prompts (env, default 2000), so the
-- cache sees first sightings (misses) and repeats (hits); bench/workers.py reads the WRK_JSON line.
local distinct = tonumber(os.getenv("DISTINCT") or "2000")

function setup(thread)
  thread:set("seed", math.random(1, 1000000000))
end

function init(args)
  math.randomseed(seed or 1)
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  local body = '{"model":"mock-model","messages":[{"role":"user","content":"Shared tier prompt #'
      .. math.random(1, distinct) .. '"}],"temperature":0,"max_tokens":16}'
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"errors":%d,"status":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
