"""Prometheus exposition (issue 6): `/metrics/prometheus` and `/metrics` with `Accept: text/plain`.

The text is parsed with the reference parser (`prometheus_client.parser`), so
anything a Prometheus server would reject fails here. After known traffic
through real `ntonix mock` backends the figures must add up: request counters,
cache counters, per-backend latency histograms (cumulative buckets whose `+Inf`
bucket equals `_count`), the time-to-first-token histogram after a stream, and
the circuit state gauge once a backend's circuit opens.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Processes, chat_body

CHAT = "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}
PROM_CONTENT_TYPE = "text/plain; version=0.0.4"


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url + CHAT, content=json.dumps(body), headers={**JSON_HEADERS, **(headers or {})}, timeout=10
    )


def scrape(url: str, path: str = "/metrics/prometheus", accept: str | None = None) -> dict[str, Metric]:
    response = httpx.get(url + path, headers={"accept": accept} if accept else {}, timeout=5.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(PROM_CONTENT_TYPE)
    assert response.text.endswith("\n")
    families = list(text_string_to_metric_families(response.text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), "a metric family is declared twice"
    return {family.name: family for family in families}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    """The value of the one sample called `sample` with exactly `labels`."""
    family = families[_family_name(families, sample)]
    found = [s.value for s in family.samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, f"{sample}{labels}: {family.samples}"
    return float(found[0])


def _family_name(families: dict[str, Metric], sample: str) -> str:
    for suffix in ("", "_total", "_bucket", "_count", "_sum"):
        if suffix and sample.endswith(suffix) and sample[: -len(suffix)] in families:
            return sample[: -len(suffix)]
        if not suffix and sample in families:
            return sample
    raise AssertionError(f"no family for sample {sample}: {sorted(families)}")


def check_histogram(family: Metric, **labels: str) -> int:
    """Buckets of one series are cumulative, end in +Inf and agree with `_count`; answers the count."""
    assert family.type == "histogram"
    series = [s for s in family.samples if {k: v for k, v in s.labels.items() if k != "le"} == labels]
    buckets = [(float(s.labels["le"]), s.value) for s in series if s.name.endswith("_bucket")]
    [count] = [s.value for s in series if s.name.endswith("_count")]
    [total] = [s.value for s in series if s.name.endswith("_sum")]
    bounds = [bound for bound, _ in buckets]
    assert bounds == sorted(bounds)
    assert bounds[-1] == math.inf
    counts = [n for _, n in buckets]
    assert all(a <= b for a, b in itertools.pairwise(counts)), f"not cumulative: {counts}"
    assert counts[-1] == count
    assert total >= 0
    if count:
        assert total > 0
    return int(count)


def backend_labels(families: dict[str, Metric]) -> list[str]:
    return sorted(s.labels["backend"] for s in families["ntonix_backend_requests"].samples)


# -- traffic and figures -----------------------------------------------------------------------


def test_prometheus_figures_after_traffic(procs: Processes) -> None:
    mocks = [procs.mock(name="mock-a"), procs.mock(name="mock-b")]
    addresses = [f"127.0.0.1:{m.port}" for m in mocks]
    gateway = procs.gateway(backends=addresses)

    before = scrape(gateway.url)
    assert value(before, "ntonix_requests_total") == 0
    for address in addresses:
        assert value(before, "ntonix_backend_circuit_open", backend=address) == 0
        assert value(before, "ntonix_backend_healthy", backend=address) == 1
        assert check_histogram(before["ntonix_backend_latency_milliseconds"], backend=address) == 0
    assert check_histogram(before["ntonix_ttft_milliseconds"]) == 0

    unique = [chat_body(f"question {i}") for i in range(6)]
    for body in unique:
        assert post(gateway.url, body).headers["x-cache"] == "MISS"
    for body in unique[:4]:
        assert post(gateway.url, body).headers["x-cache"] == "HIT"
    with httpx.stream(
        "POST",
        gateway.url + CHAT,
        content=json.dumps(chat_body("stream me", stream=True)),
        headers=JSON_HEADERS,
        timeout=10,
    ) as stream:
        assert stream.status_code == 200
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    refused = httpx.post(
        gateway.url + CHAT, content=b"{}", headers={"content-type": "text/plain"}, timeout=10
    )
    assert refused.status_code == 415

    families = scrape(gateway.url)
    assert value(families, "ntonix_requests_total") == 12
    assert value(families, "ntonix_requests_success_total") == 11
    assert value(families, "ntonix_requests_error_total") == 1
    assert value(families, "ntonix_requests_active") == 0
    assert value(families, "ntonix_streams_active") == 0
    assert value(families, "ntonix_cache_hits_total") == 4
    assert value(families, "ntonix_cache_misses_total") == 6
    assert value(families, "ntonix_cache_enabled") == 1
    assert value(families, "ntonix_cache_entries") == 6
    assert 0 < value(families, "ntonix_cache_size_bytes") <= value(families, "ntonix_cache_max_size_bytes")
    assert value(families, "ntonix_uptime_seconds") > 0

    # 6 misses and 1 stream went to the backends, interleaved by the balancer.
    assert backend_labels(families) == sorted(addresses)
    per_backend = {a: value(families, "ntonix_backend_requests_total", backend=a) for a in addresses}
    assert sum(per_backend.values()) == 7
    assert all(n >= 3 for n in per_backend.values()), per_backend
    latency = families["ntonix_backend_latency_milliseconds"]
    for address in addresses:
        assert check_histogram(latency, backend=address) == per_backend[address]
        assert value(families, "ntonix_backend_errors_total", backend=address) == 0
        assert value(families, "ntonix_backend_circuit_open", backend=address) == 0
        assert value(families, "ntonix_backend_in_flight", backend=address) == 0

    assert check_histogram(families["ntonix_ttft_milliseconds"]) == 1
    assert check_histogram(families["ntonix_request_duration_milliseconds"]) == 12

    # The JSON view tells the same story.
    snapshot = httpx.get(gateway.url + "/metrics", timeout=5.0).json()
    assert snapshot["requests_total"] == value(families, "ntonix_requests_total")
    assert snapshot["cache_hits"] == value(families, "ntonix_cache_hits_total")
    assert snapshot["cache_misses"] == value(families, "ntonix_cache_misses_total")
    for entry in snapshot["backends"]:
        address = f"{entry['host']}:{entry['port']}"
        assert entry["requests"] == per_backend[address]


def test_metrics_content_negotiation(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    post(gateway.url, chat_body("negotiate"))

    plain = scrape(gateway.url, "/metrics", accept="text/plain")
    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    scraper = scrape(gateway.url, "/metrics", accept=prometheus_accept)
    dedicated = scrape(gateway.url)
    assert set(plain) == set(dedicated) == set(scraper)
    for families in (plain, scraper, dedicated):
        assert value(families, "ntonix_requests_total") == 1
        assert value(families, "ntonix_cache_misses_total") == 1

    # Without the header /metrics stays the JSON document of the spec.
    default = httpx.get(gateway.url + "/metrics", timeout=5.0)
    assert default.headers["content-type"].startswith("application/json")
    assert default.json()["requests_total"] == 1
    as_json = httpx.get(gateway.url + "/metrics", headers={"accept": "application/json"}, timeout=5.0)
    assert as_json.headers["content-type"].startswith("application/json")


def test_every_family_has_help_and_type(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    text = httpx.get(gateway.url + "/metrics/prometheus", timeout=5.0).text
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.type in {"counter", "gauge", "histogram"}, family
        assert family.documentation, family.name
        assert family.name.startswith("ntonix_")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    samples = {
        line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    suffixes = ("_bucket", "_sum", "_count")
    for name in samples:
        base = next(
            (name[: -len(s)] for s in suffixes if name.endswith(s) and name[: -len(s)] in declared), name
        )
        assert base in declared, f"sample {name} has no # TYPE line"


def test_circuit_state_gauge_opens_on_backend_failures(procs: Processes) -> None:
    mock = procs.mock()
    address = f"127.0.0.1:{mock.port}"
    gateway = procs.gateway(
        backends=[address],
        config={"circuit_breaker": {"failure_threshold": 2, "open_seconds": 60}, "cache": {"enabled": False}},
    )
    for i in range(2):
        failed = post(gateway.url, chat_body(f"fail {i}"), headers={"x-mock-status": "500"})
        assert failed.status_code == 500
    families = scrape(gateway.url)
    assert value(families, "ntonix_backend_circuit_open", backend=address) == 1
    assert value(families, "ntonix_backend_errors_total", backend=address) == 2
    assert value(families, "ntonix_backend_requests_total", backend=address) == 2
    assert check_histogram(families["ntonix_backend_latency_milliseconds"], backend=address) == 2
    assert value(families, "ntonix_requests_error_total") == 2
    assert value(families, "ntonix_cache_enabled") == 0
    assert value(families, "ntonix_cache_hits_total") == 0

    refused = post(gateway.url, chat_body("while open"))
    assert refused.status_code == 503
    after = scrape(gateway.url)
    assert value(after, "ntonix_backend_circuit_open", backend=address) == 1
    assert value(after, "ntonix_backend_requests_total", backend=address) == 2  # never reached it
    assert value(after, "ntonix_requests_error_total") == 3


def test_ipv6_backend_label_parses(procs: Processes) -> None:
    """An IPv6 backend's label (colons) parses; the label is the backend's host:port key."""
    gateway = procs.gateway(backends=["[::1]:9"], config={"health_check": {"interval_seconds": 60}})
    families = scrape(gateway.url)
    assert backend_labels(families) == ["::1:9"]
    assert value(families, "ntonix_backend_requests_total", backend="::1:9") == 0
