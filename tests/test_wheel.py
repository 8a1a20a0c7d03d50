"""The wheel (issue 6): one abi3 wheel that installs and runs with no Rust toolchain.

The test reuses the newest `dist/ntonix-*.whl` when it is newer than every
source file (so `make wheel` followed by `make test` builds once), else builds
one with `maturin build --release --out dist` (the `make wheel` recipe; a few
minutes from cold). It then installs the wheel into a fresh virtual environment
with pip (dependencies from the package index, binary wheels only), with `cargo`
and `rustc` removed from PATH, and runs the installed `ntonix` entry point: the
help text, then a real request through `ntonix run` in front of `ntonix mock`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Proc, Processes, chat_body, free_port

DIST = REPO / "dist"
BUILD_TIMEOUT = 1200.0
# Everything that ends up in the wheel or decides how it is built.
SOURCE_GLOBS = ("rust/**/*.rs", "python/ntonix/**/*.py", "python/ntonix/**/*.pyi", "python/ntonix/py.typed")
SOURCE_FILES = ("Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + 300)]


def sources_mtime() -> float:
    paths = [p for pattern in SOURCE_GLOBS for p in REPO.glob(pattern)]
    paths += [REPO / name for name in SOURCE_FILES if (REPO / name).exists()]
    return max(p.stat().st_mtime for p in paths)


def version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def fresh_wheel() -> Path | None:
    """The newest dist/ wheel of this version, if no source changed since it was built."""
    wheels = sorted(DIST.glob(f"ntonix-{version()}-*.whl"), key=lambda p: p.stat().st_mtime)
    if wheels and wheels[-1].stat().st_mtime > sources_mtime():
        return wheels[-1]
    return None


@pytest.fixture(scope="module")
def wheel() -> Path:
    found = fresh_wheel()
    if found is not None:
        return found
    started = time.time()
    build = subprocess.run(
        [sys.executable, "-m", "maturin", "build", "--release", "--out", str(DIST)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, f"maturin build failed:\n{build.stdout}\n{build.stderr}"
    # Not fresh_wheel(): a source edited while the build ran must not fail the test.
    built = [p for p in DIST.glob(f"ntonix-{version()}-*.whl") if p.stat().st_mtime >= started - 1]
    assert built, f"maturin build left no wheel in {DIST}:\n{build.stderr}"
    return max(built, key=lambda p: p.stat().st_mtime)


def without_rust_path() -> str:
    """PATH minus every directory that holds cargo or rustc."""
    keep = [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry
        and not any(shutil.which(tool, path=entry) for tool in ("cargo", "rustc"))
        and ".cargo" not in entry
    ]
    return os.pathsep.join(keep)


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed; answers (its bin directory, the Rust-free environment)."""
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    path = os.pathsep.join([str(bin_dir), without_rust_path()])
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CARGO_HOME", "RUSTUP_HOME"}
        and not key.startswith("NTONIX_")
    }
    env |= {"PATH": path, "VIRTUAL_ENV": str(venv), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    assert shutil.which("cargo", path=path) is None
    assert shutil.which("rustc", path=path) is None
    install = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--only-binary=:all:", str(wheel)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"
    return bin_dir, env


# -- the wheel file ----------------------------------------------------------------------------


def test_wheel_is_abi3_and_holds_the_package(wheel: Path) -> None:
    assert "abi3" in wheel.name
    assert wheel.name.startswith(f"ntonix-{version()}-cp311-abi3-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "ntonix/__init__.py",
        "ntonix/cli.py",
        "ntonix/app.py",
        "ntonix/mock.py",
        "ntonix/_core.pyi",
        "ntonix/py.typed",
    ):
        assert expected in names
    extensions = [n for n in names if n.startswith("ntonix/_core") and n.endswith(".so")]
    assert extensions == ["ntonix/_core.abi3.so"]
    assert not any(n.startswith(("tests/", "rust/", "bench/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ntonix=ntonix.cli:main" in zipfile.ZipFile(wheel).read(metadata).decode().replace(" ", "")


# -- installed without Rust --------------------------------------------------------------------


def test_installed_package_comes_from_the_venv(installed: tuple[Path, dict[str, str]]) -> None:
    bin_dir, env = installed
    where = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "import ntonix, ntonix._core as c; print(ntonix.__file__); print(c.__file__)",
        ],
        env=env,
        cwd=bin_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(bin_dir.parent), line


def test_installed_cli_help(installed: tuple[Path, dict[str, str]]) -> None:
    bin_dir, env = installed
    helped = subprocess.run(
        [str(bin_dir / "ntonix"), "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "config", "mock"):
        assert command in helped.stdout
    run_help = subprocess.run(
        [str(bin_dir / "ntonix"), "run", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run_help.returncode == 0, run_help.stderr
    assert "--backend" in run_help.stdout


def _spawn(procs: Processes, argv: list[str], port: int, env: dict[str, str], name: str) -> Proc:
    log_path = procs.tmp_path / f"wheel-{name}.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=procs.tmp_path)
    proc = Proc(popen, port, log_path)
    procs.procs.append(proc)  # killed by PID at teardown, output shown on failure
    return procs.wait_healthy(proc, timeout=30.0)


def test_installed_gateway_answers_through_installed_mock(
    installed: tuple[Path, dict[str, str]], procs: Processes
) -> None:
    bin_dir, env = installed
    ntonix = str(bin_dir / "ntonix")
    mock_port, gateway_port = free_port(), free_port()
    _spawn(procs, [ntonix, "mock", "--host", "127.0.0.1", "--port", str(mock_port)], mock_port, env, "mock")
    gateway = _spawn(
        procs,
        [
            ntonix,
            "run",
            "--port",
            str(gateway_port),
            "--bind",
            "127.0.0.1",
            "--threads",
            "2",
            "--backend",
            f"127.0.0.1:{mock_port}",
        ],
        gateway_port,
        env,
        "gateway",
    )
    body = json.dumps(chat_body("from the wheel"))
    headers = {"content-type": "application/json"}
    first = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers=headers, timeout=10)
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] == "MISS"
    assert "from the wheel" in first.json()["choices"][0]["message"]["content"]
    second = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers=headers, timeout=10)
    assert second.headers["x-cache"] == "HIT"
    assert second.content == first.content
    streamed = json.dumps(chat_body("streamed from the wheel", stream=True))
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", content=streamed, headers=headers, timeout=10
    ) as stream:
        assert stream.status_code == 200
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert len(events) > 2
    assert events[-1] == "data: [DONE]"
    assert httpx.get(gateway.url + "/metrics", timeout=5).json()["requests_total"] == 3
