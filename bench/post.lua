-- wrk script: POST the same OpenAI chat request on every call (cache-hit and
-- plain forwarding runs). The done() hook prints one machine-readable line,
-- "WRK_JSON {...}", parsed by bench/harness.py; wrk's own text follows as usual.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench-model","messages":[{"role":"system","content":"You are a terse assistant."},'
    .. '{"role":"user","content":"Name three prime numbers."}],"temperature":0,"max_tokens":64}'

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_json.lua")  -- done(): WRK_JSON
