"""The live dashboard (SPEC §12, issue 15) in a real headless Chromium driven by Selenium.

Every test opens `GET /dashboard` on a real gateway subprocess in front of real
mock backends and reads the page the way a person would: what it shows after
its own once-a-second polls. Chromium and chromedriver are Debian's
(`make browser-deps` installs them). The page must log no console error,
fetch nothing outside the gateway's origin, list every backend, move its
counters when traffic flows, and mark a killed backend unhealthy within the
health interval. The counters test leaves the page in a demo state with
traffic and saves the screenshot the README shows (docs/dashboard.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Proc, Processes, chat_body

# The README's picture is refreshed only on request (`NTONIX_SCREENSHOT=docs/dashboard.png`), so a
# test run leaves the work tree clean; otherwise the screenshot goes to a temporary file.
SCREENSHOT_TARGET = os.environ.get("NTONIX_SCREENSHOT")
HEALTH_INTERVAL = 0.2
UNHEALTHY_AFTER = 2
MODEL = "llama-3.1-8b-instruct"
NO_DATA = "\u2013"  # what the page shows before it has a figure

pytestmark = pytest.mark.timeout(120)


# ---- browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("chromium / chromedriver are missing: run `make browser-deps` (Debian packages)")
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1360,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: WebDriver, gateway: Proc) -> None:
    driver.set_window_size(1360, 1000)
    driver.get(gateway.url + "/dashboard")
    drain_logs(driver)


def drain_logs(driver: WebDriver) -> tuple[list[dict[str, Any]], list[str]]:
    """Console entries and the URLs of every network request since the last call."""
    console = driver.get_log("browser")
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return console, urls


def until(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float, what: str) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, f"timed out: {what}")


def page_state(driver: WebDriver) -> dict[str, Any]:
    """What the page shows now, read from the DOM in one script call (no stale element handles)."""
    return dict(
        driver.execute_script(
            """
            const text = (id) => document.getElementById(id).textContent.trim();
            const rows = [...document.querySelectorAll('#backends tbody tr[data-backend]')];
            return {
              status: document.getElementById('status').dataset.state,
              locked: !document.getElementById('auth').hidden,
              rps: text('rps'), total: text('requests-total'), errors: text('errors-total'),
              hits: text('cache-hits'), misses: text('cache-misses'), hitRate: text('hit-rate'),
              streams: text('streams'), ttft: text('ttft-p50'),
              backends: rows.map((r) => ({
                addr: r.dataset.backend, healthy: r.dataset.healthy,
                health: r.querySelector('.health').textContent.trim(),
                requests: r.querySelector('.requests').textContent.trim(),
              })),
            };
            """
        )
    )


def chart_seconds(driver: WebDriver) -> str:
    """Seconds of history the chart draws (the page keeps it on the SVG element)."""
    return str(driver.execute_script("return document.getElementById('chart').dataset.seconds || '0'"))


def number(text: str) -> float:
    """A count as the page prints it (`1234`, `12.3k`); an en dash is no data yet."""
    if text in ("", NO_DATA):
        return -1.0
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


# ---- cluster ------------------------------------------------------------------------------------


def start_cluster(procs: Processes, mocks: int) -> tuple[Proc, list[Proc]]:
    backends = [procs.mock("--model", MODEL, name=f"gpu-{i}") for i in range(mocks)]
    gateway = procs.gateway(
        [f"127.0.0.1:{b.port}" for b in backends],
        config={
            "health_check": {
                "interval_seconds": HEALTH_INTERVAL,
                "timeout_seconds": 0.5,
                "unhealthy_threshold": UNHEALTHY_AFTER,
            }
        },
    )
    return gateway, backends


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, list[Proc]]]:
    processes = Processes(tmp_path_factory.mktemp("dashboard"))
    try:
        yield start_cluster(processes, 3)
    finally:
        processes.close()


# ---- tests --------------------------------------------------------------------------------------


def test_page_is_self_contained_html(cluster: tuple[Proc, list[Proc]]) -> None:
    gateway, _ = cluster
    answer = httpx.get(gateway.url + "/dashboard", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    csp = answer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    page = answer.text.replace("http://www.w3.org/2000/svg", "")  # a namespace name, never fetched
    assert re.findall(r"https?://|@import|\bsrc=|url\((?!#)", page) == []


def test_loads_without_console_errors_or_foreign_requests(
    browser: WebDriver, cluster: tuple[Proc, list[Proc]]
) -> None:
    gateway, _ = cluster
    browser.get(gateway.url + "/dashboard")
    until(browser, lambda d: page_state(d)["status"] == "live", 10, "page live")
    # Several polls, so every request the page makes on its own has been made.
    seen: list[str] = []
    console: list[dict[str, Any]] = []

    def polled_three_times(d: WebDriver) -> bool:
        logs, urls = drain_logs(d)
        console.extend(logs)
        seen.extend(urls)
        return sum(urlsplit(u).path == "/metrics" for u in seen) >= 3

    until(browser, polled_three_times, 10, "three polls of /metrics")
    logs, urls = drain_logs(browser)
    console.extend(logs)
    seen.extend(urls)
    assert [e for e in console if e["level"] == "SEVERE"] == []
    origin = gateway.url
    foreign = [u for u in seen if not (u.startswith(origin + "/") or u.startswith("data:"))]
    assert foreign == [], foreign
    assert {urlsplit(u).path for u in seen} >= {"/dashboard", "/metrics", "/cache/stats"}


def test_shows_every_backend(browser: WebDriver, cluster: tuple[Proc, list[Proc]]) -> None:
    gateway, backends = cluster
    open_page(browser, gateway)
    expected = {f"127.0.0.1:{b.port}" for b in backends}

    def all_listed(d: WebDriver) -> list[dict[str, Any]] | None:
        rows = page_state(d)["backends"]
        return rows if {r["addr"] for r in rows} == expected else None

    rows = until(browser, all_listed, 10, f"rows for {expected}")
    assert [r["health"] for r in rows] == ["healthy"] * len(expected)
    text = browser.find_element(By.ID, "backend-count").text
    assert text == f"· {len(expected)} of {len(expected)} healthy"


def test_counters_move_with_traffic_and_screenshot(
    browser: WebDriver, cluster: tuple[Proc, list[Proc]], tmp_path: Path
) -> None:
    gateway, _ = cluster
    open_page(browser, gateway)
    before = until(browser, lambda d: (s := page_state(d))["status"] == "live" and s, 10, "page live")
    stop = threading.Event()
    errors: list[BaseException] = []
    sent = [0]

    def traffic() -> None:
        """A few seconds of mixed load: repeats (cache hits), fresh prompts, bad bodies, slow streams."""
        try:
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    burst = 3 + (i % 7) + (6 if 12 < i % 40 < 20 else 0)
                    for j in range(burst):
                        content = f"prompt {j % 4}" if j % 3 else f"fresh {i}-{j}"
                        client.post("/v1/chat/completions", json=chat_body(content, model=MODEL))
                        sent[0] += 1
                    if i % 5 == 0:
                        client.post("/v1/chat/completions", content=b"{not json")
                        sent[0] += 1
                    stop.wait(0.25)
        except BaseException as err:
            errors.append(err)

    def slow_stream(n: int) -> None:
        try:
            with (
                httpx.Client(base_url=gateway.url, timeout=60) as client,
                client.stream(
                    "POST",
                    "/v1/chat/completions",
                    json=chat_body(f"story {n}", stream=True, model=MODEL),
                    headers={"X-Mock-Token-Rate": "20", "X-Mock-Tokens": "400"},
                ) as answer,
            ):
                for _ in answer.iter_bytes():
                    if stop.is_set():
                        break
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=traffic)] + [
        threading.Thread(target=slow_stream, args=(n,)) for n in range(3)
    ]
    for thread in threads:
        thread.start()
    try:

        def moved(d: WebDriver) -> dict[str, Any] | None:
            s = page_state(d)
            ok = (
                number(s["total"]) >= number(before["total"]) + 40
                and number(s["rps"]) > 0
                and number(s["hits"]) > 0
                and number(s["errors"]) > 0
                and s["streams"] == "3"
                and all(number(r["requests"]) > 0 for r in s["backends"])
            )
            return s if ok else None

        state = until(browser, moved, 20, "counters moving with traffic")
        assert state["hitRate"].endswith("%")
        # Leave the chart some history, then photograph the page as it is under load.
        until(browser, lambda d: float(chart_seconds(d)) >= 18, 25, "18 s of chart history")
        # The whole page in one picture: the window is its height plus the browser's own frame.
        frame, height = browser.execute_script(
            "return [outerHeight - innerHeight, document.documentElement.scrollHeight]"
        )
        browser.set_window_size(1360, int(frame) + int(height))
        until(browser, lambda d: page_state(d)["ttft"] != NO_DATA, 10, "TTFT shown")
        shot = Path(SCREENSHOT_TARGET) if SCREENSHOT_TARGET else tmp_path / "dashboard.png"
        shot.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        # The same page on a phone: no sideways scrolling of the page itself (tables scroll inside).
        browser.set_window_size(390, 844)
        until(
            browser,
            lambda d: d.execute_script(
                "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
            ),
            5,
            "no horizontal overflow at phone width",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert errors == []
    console, _ = drain_logs(browser)
    assert [e for e in console if e["level"] == "SEVERE"] == []


def test_killed_backend_shows_unhealthy_within_the_health_interval(
    browser: WebDriver, procs: Processes
) -> None:
    gateway, backends = start_cluster(procs, 2)
    open_page(browser, gateway)
    victim, survivor = (f"127.0.0.1:{b.port}" for b in backends)
    until(browser, lambda d: len(page_state(d)["backends"]) == 2, 10, "both backends listed")
    backends[0].kill()
    killed = time.monotonic()

    def victim_down(d: WebDriver) -> dict[str, dict[str, Any]] | None:
        rows = {r["addr"]: r for r in page_state(d)["backends"]}
        return rows if rows[victim]["healthy"] == "false" else None

    # Checks every interval, `unhealthy_threshold` failures in a row, then one page poll (1 s),
    # plus slack for a busy machine.
    budget = HEALTH_INTERVAL * (UNHEALTHY_AFTER + 1) + 1.0 + 2.0
    rows = until(browser, victim_down, budget, f"{victim} shown unhealthy")
    elapsed = time.monotonic() - killed
    assert rows[victim]["health"] == "unhealthy"
    assert rows[survivor]["health"] == "healthy"
    assert elapsed < budget
    assert browser.find_element(By.ID, "backend-count").text == "· 1 of 2 healthy"


def unlock_with_key(browser: WebDriver, url: str, key: str) -> None:
    """A fresh tab is asked for the key; a wrong one is refused, the right one kept for the tab."""
    browser.get(url)
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    until(browser, lambda d: page_state(d)["locked"], 10, "key prompt shown")
    assert browser.find_element(By.ID, "auth-key").get_attribute("type") == "password"
    browser.find_element(By.ID, "auth-key").send_keys("wrong")
    browser.find_element(By.ID, "auth-submit").click()
    until(browser, lambda d: d.find_element(By.ID, "auth-error").is_displayed(), 10, "refusal shown")
    browser.find_element(By.ID, "auth-key").send_keys(key)
    browser.find_element(By.ID, "auth-submit").click()
    until(browser, lambda d: (s := page_state(d))["status"] == "live" and not s["locked"], 10, "unlocked")
    assert browser.execute_script("return sessionStorage.getItem('ntonix.adminKey')") == key
    browser.refresh()  # the tab keeps the key: no second prompt
    until(browser, lambda d: page_state(d)["status"] == "live", 10, "live again after reload")
    assert not page_state(browser)["locked"]
    console, _ = drain_logs(browser)
    # The refused polls show up as network 401s; nothing else may be logged as an error. (A page of
    # an earlier test, polling a gateway that test has since stopped, may have logged a refused
    # connection to its own origin before the browser left it: that is not this page's error.)
    here = "/".join(url.split("/", 3)[:3])  # http://host:port
    errors = [e for e in console if e["level"] == "SEVERE" and " 401 " not in e["message"]]
    assert [e for e in errors if "http://" not in e["message"] or here in e["message"]] == []


def test_admin_key_prompt(browser: WebDriver, procs: Processes) -> None:
    """With `auth.admin_key` the page itself stays public (it holds no data); its polls of /metrics and
    /cache/stats get 401 until the person types the key, which the page then sends as a Bearer token."""
    backend = procs.mock("--model", MODEL)
    gateway = procs.gateway([f"127.0.0.1:{backend.port}"], config={"auth": {"admin_key": "s3cret"}})
    assert httpx.get(gateway.url + "/dashboard", timeout=5).status_code == 200
    assert httpx.get(gateway.url + "/metrics", timeout=5).status_code == 401
    unlock_with_key(browser, gateway.url + "/dashboard", "s3cret")
    polls = [line for line in gateway.log().splitlines() if "path=/metrics" in line]
    assert any("status=401" in line for line in polls) and any("status=200" in line for line in polls)
