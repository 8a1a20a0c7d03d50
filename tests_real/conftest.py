"""Fixtures for the real-server checks: two llama-cpp-python servers and a gateway, once per session.

Opt-in (`make test-real`); `make test` never collects this directory. Each server is
started on a free port and killed by PID at the end; the logs of every process are
printed when a test fails.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator

import pytest

from tests_real.realservers import MODEL_A, MODEL_B, Cluster, Real


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Real]:
    cluster = Cluster(tmp_path_factory.mktemp("real"))
    try:
        a = cluster.llama_server(MODEL_A, "--embedding", "true")
        b = cluster.llama_server(MODEL_B, "--embedding", "true")
        gateway = cluster.gateway([a.url, b.url])
        yield Real(cluster, a, b, gateway)
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "real" in request.fixturenames:
        real: Real = request.getfixturevalue("real")
        sys.stderr.write(real.cluster.dump_logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
