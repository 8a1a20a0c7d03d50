"""A/B: gateway hit-path req/s with and without the dashboard open in headless Chromium.

Run: `.venv/bin/python bench/dashboard_ab.py` (needs wrk, chromium, chromedriver; gateway and mock on
core 0, wrk on core 1; 3 rounds of 5 s each way at 64 connections)."""

import json
import re
import socket
import statistics
import subprocess
import time

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service


def free():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


py = "/work/main/.venv/bin/python"
mp, gp = free(), free()
m = subprocess.Popen(
    ["taskset", "-c", "0", py, "-m", "ntonix", "mock", "--port", str(mp)], stderr=subprocess.DEVNULL
)
g = subprocess.Popen(
    [
        "taskset",
        "-c",
        "0",
        py,
        "-m",
        "ntonix",
        "run",
        "--port",
        str(gp),
        "--bind",
        "127.0.0.1",
        "--backend",
        f"127.0.0.1:{mp}",
        "--log-level",
        "warning",
    ],
    stderr=subprocess.DEVNULL,
)
url = f"http://127.0.0.1:{gp}"
for _ in range(100):
    try:
        if httpx.get(url + "/ready").status_code == 200:
            break
    except Exception:
        pass
    time.sleep(0.1)
body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hit me"}]})
httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
lua = "/tmp/hit.lua"
with open(lua, "w") as script:
    script.write(f'wrk.method="POST"\nwrk.body=[[{body}]]\nwrk.headers["Content-Type"]="application/json"\n')


def run():
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c64", "-d5s", "-s", lua, url + "/v1/chat/completions"],
        capture_output=True,
        text=True,
    ).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


o = Options()
o.add_argument("--headless=new")
o.add_argument("--no-sandbox")
o.add_argument("--disable-gpu")
res = {"closed": [], "open": []}
driver = None
try:
    for _rnd in range(3):
        res["closed"].append(run())
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
        driver.get(url + "/dashboard")
        time.sleep(2)
        res["open"].append(run())
        driver.quit()
        driver = None
finally:
    if driver:
        driver.quit()
    g.terminate()
    m.terminate()
print(
    {k: [round(v) for v in vs] for k, vs in res.items()},
    "median closed",
    statistics.median(res["closed"]),
    "open",
    statistics.median(res["open"]),
    "ratio",
    statistics.median(res["open"]) / statistics.median(res["closed"]),
)
