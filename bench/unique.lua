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

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_json.lua")  -- done(): WRK_JSON
