-- wrk script: POST a streaming chat request on every call (bench/profile.py's stream case); wrk reads
-- each chunked SSE answer to its end. The done() hook prints the same WRK_JSON line as post.lua.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench-model","stream":true,"messages":[{"role":"user","content":"Count to twenty-four."}],'
    .. '"max_tokens":64}'

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_json.lua")  -- done(): WRK_JSON
