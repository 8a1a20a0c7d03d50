"""Container packaging (issue 6): Dockerfile, docker-compose.yml and .dockerignore, checked without Docker.

Docker cannot run in the test environment, so these tests read the files: the
Dockerfile has a builder stage that makes the wheel and a slim runtime stage
that installs it and runs `ntonix run` as a non-root user; every file it COPYs
exists and is not excluded by .dockerignore; the compose file parses, names the
gateway and the two mocks with the right commands, ports and NTONIX_BACKENDS,
and those command lines parse with the real CLI. The HEALTHCHECK snippets are
run for real against a gateway and a mock.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

import click
import pytest
import yaml

from ntonix.cli import main as cli_main
from ntonix.config import load_settings
from tests.conftest import REPO, Processes, free_port

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"
CONFIG_IN_IMAGE = "/etc/ntonix/ntonix.json"


class Instruction(NamedTuple):
    keyword: str
    args: str


class Stage(NamedTuple):
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by stage; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name, []))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD arguments as a list (JSON exec form, or shell form split like sh would)."""
    return list(json.loads(args)) if args.startswith("[") else shlex.split(args)


def copy_sources(args: str) -> tuple[list[str], str]:
    """The sources and destination of a COPY without --from."""
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1], words[-1]


def python_snippet(command: list[str]) -> str:
    """The code of a `python -c CODE` command."""
    assert command[0] in ("python", "python3"), command
    assert command[1] == "-c", command
    return command[2]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_has_a_builder_and_a_runtime_stage(stages: list[Stage]) -> None:
    assert [s.name for s in stages] == ["builder", "runtime"]
    builder, runtime = stages
    assert builder.base.startswith("python:3.11-slim")
    assert runtime.base.startswith("python:3.11-slim")
    build_steps = " ".join(builder.all("RUN"))
    assert "rustup" in build_steps or "cargo" in build_steps
    assert re.search(r"maturin build --release --out (\S+)", build_steps)


def test_runtime_stage_installs_the_wheel_without_rust(stages: list[Stage]) -> None:
    builder, runtime = stages
    out_dir = re.search(r"maturin build --release --out (\S+)", " ".join(builder.all("RUN")))
    assert out_dir is not None
    copied = [args for args in runtime.all("COPY") if args.startswith("--from=builder")]
    assert len(copied) == 1
    assert out_dir[1].rstrip("/") in copied[0]
    steps = " ".join(runtime.all("RUN"))
    assert re.search(r"pip install .*ntonix-\*\.whl", steps)
    for tool in ("rustup", "cargo", "maturin", "build-essential", "gcc"):
        assert tool not in steps


def test_runtime_stage_runs_the_gateway_as_non_root(stages: list[Stage]) -> None:
    runtime = stages[-1]
    command = exec_form(runtime.last("ENTRYPOINT")) + exec_form(runtime.last("CMD"))
    assert command == ["ntonix", "run", "--config", CONFIG_IN_IMAGE]
    user = runtime.last("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert any(user.split(":")[0] in args for args in runtime.all("RUN") if "useradd" in args)
    assert sorted(runtime.last("EXPOSE").split()) == ["8080", "8443"]
    # The config the command names is copied in, from the repository's shipped config.
    assert any(
        copy_sources(args) == (["config/ntonix.json"], CONFIG_IN_IMAGE) for args in runtime.all("COPY")
    )
    assert runtime.instructions.index(Instruction("USER", user)) > max(
        i for i, ins in enumerate(runtime.instructions) if ins.keyword == "RUN"
    ), "USER must come after the last RUN that needs root"


def test_healthcheck_uses_urllib_against_health(stages: list[Stage]) -> None:
    healthcheck = stages[-1].last("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options
    snippet = python_snippet(exec_form(command))
    assert "urllib.request" in snippet
    assert "/health" in snippet
    compile(snippet, "<healthcheck>", "exec")


def test_every_copied_file_exists_and_is_not_dockerignored(stages: list[Stage]) -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in ignored), "negations are not handled by this test"
    sources = [
        src
        for stage in stages
        for args in stage.all("COPY") + stage.all("ADD")
        if not args.startswith("--from")
        for src in copy_sources(args)[0]
    ]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"Dockerfile COPYs {source}, which does not exist"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        kept = [f for f in files if not _ignored(f.relative_to(REPO).as_posix(), ignored)]
        assert kept, f"{source} is entirely excluded by .dockerignore"
        if path.is_file():
            assert kept == [path], f"{source} is excluded by .dockerignore"


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `relative`: a pattern matches the path or one of its parent folders."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    suffixes = ["/".join(parts[i:]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(tail, pattern[3:]) for tail in suffixes):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_builder_copies_everything_the_build_reads(stages: list[Stage]) -> None:
    """Cargo refuses a manifest whose targets are missing; maturin reads the readme and python-source."""
    copied = {
        src.rstrip("/")
        for args in stages[0].all("COPY")
        if not args.startswith("--from")
        for src in copy_sources(args)[0]
    }
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"Cargo.toml", "Cargo.lock", "pyproject.toml", pyproject["project"]["readme"]}
    needed.add(pyproject["tool"]["maturin"]["python-source"])
    needed.add(Path(cargo["lib"]["path"]).parts[0])
    needed |= {f"benches/{bench['name']}.rs" for bench in cargo.get("bench", [])}
    for item in sorted(needed):
        assert item in copied or any(item.startswith(c + "/") for c in copied), (
            f"builder does not COPY {item}"
        )


def test_dockerignore_keeps_local_builds_out() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    for heavy in (".git", ".venv", "target", "dist"):
        assert heavy in patterns
    assert any(p.startswith("python/ntonix/") and p.endswith(".so") for p in patterns)


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_names_the_gateway_and_two_mocks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", "mock-a", "mock-b"}
    for service in services.values():
        build = service.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context", ".")
        assert context == ".", "every service builds (or shares) the image of this repository's Dockerfile"

    gateway = services["gateway"]
    assert gateway["command"][:1] == ["run"]
    assert environment(gateway)["NTONIX_BACKENDS"] == "mock-a:8001,mock-b:8002"
    published = {str(p).split(":")[-1] for p in gateway["ports"]}
    assert {"8080", "8443"} <= published
    assert set(gateway["depends_on"]) == {"mock-a", "mock-b"}
    grace = gateway.get("stop_grace_period", "10s")
    assert int(grace.rstrip("s")) > 30, "docker stop must wait longer than the drain grace"
    assert gateway["ulimits"]["nofile"]["soft"] >= 65536, "two descriptors per open stream"

    for name, port in (("mock-a", "8001"), ("mock-b", "8002")):
        command = services[name]["command"]
        assert command[0] == "mock"
        assert command[command.index("--port") + 1] == port
        assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable from the gateway container
        snippet = python_snippet(services[name]["healthcheck"]["test"][1:])
        assert f":{port}/health" in snippet
        compile(snippet, f"<{name} healthcheck>", "exec")


def test_compose_command_lines_parse_with_the_real_cli(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        name, *args = service["command"]
        command = cli_main.commands[name]
        with command.make_context(name, list(args)) as context:  # raises click.UsageError on a bad option
            assert isinstance(context, click.Context)


def test_compose_backends_replace_the_shipped_config(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["gateway"])
    settings = load_settings(str(REPO / "config" / "ntonix.json"), env, None)
    assert [(b.host, b.port) for b in settings.backends] == [("mock-a", 8001), ("mock-b", 8002)]
    assert settings.server.port == 8080
    assert settings.server.ssl_port == 8443
    assert settings.server.bind_address == "0.0.0.0"


# -- health checks, run for real ---------------------------------------------------------------


def _run_snippet(snippet: str, env: dict[str, str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", snippet], env={**os.environ, **env}, capture_output=True, timeout=30
    )
    return done.returncode


def test_image_healthcheck_passes_on_a_live_gateway_and_fails_without_one(
    stages: list[Stage], procs: Processes
) -> None:
    snippet = python_snippet(exec_form(stages[-1].last("HEALTHCHECK").partition("CMD ")[2]))
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    assert _run_snippet(snippet, {"NTONIX_PORT": str(gateway.port)}) == 0
    assert _run_snippet(snippet, {"NTONIX_PORT": str(free_port())}) != 0


def test_compose_mock_healthcheck_passes_on_a_live_mock(compose: dict[str, Any], procs: Processes) -> None:
    snippet = python_snippet(compose["services"]["mock-a"]["healthcheck"]["test"][1:])
    mock = procs.mock()
    assert _run_snippet(snippet.replace(":8001/", f":{mock.port}/"), {}) == 0
