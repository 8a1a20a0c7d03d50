# NTONIX — one entry point for building, testing, linting, benchmarking and the demo.
# Everything installs itself: Python packages into .venv from pyproject extras,
# crates through Cargo, Debian tools through apt-get when missing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

RUST_SRC := $(shell find rust benches -name '*.rs' 2>/dev/null) Cargo.toml
PY_SRC   := $(shell find python -name '*.py' -o -name '*.pyi' 2>/dev/null) pyproject.toml

.PHONY: all venv build browser-deps redis-deps test test-rust test-python lint lint-rust lint-python fmt demo bench wheel clean

all: build

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "maturin>=1.7,<2.0"
	touch $@

venv: $(VENV)/.created

# Builds the extension in release mode and installs the package (editable Python part)
# with its test and lint extras into .venv.
$(VENV)/.built: $(VENV)/.created $(RUST_SRC) pyproject.toml
	$(VENV)/bin/maturin develop --release --quiet --extras test,lint
	touch $@

build: $(VENV)/.built

test: build lint test-rust test-python

test-rust: build
	cargo test --quiet --all-targets

# Debian's Chromium and its driver for the dashboard's browser tests (tests/test_dashboard.py).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

# Debian's redis-server for the shared cache tier's tests (tests/test_redis_tier.py start their own).
redis-deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; \
	fi

test-python: build browser-deps redis-deps
	$(PY) -m pytest -q

lint: lint-rust lint-python

lint-rust:
	cargo fmt --check
	cargo clippy --quiet --all-targets -- -D warnings

lint-python: build
	$(VENV)/bin/ruff check python tests bench mock
	$(VENV)/bin/ruff format --check python tests bench mock
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest ntonix._core

fmt: venv
	cargo fmt
	$(VENV)/bin/ruff format python tests bench mock
	$(VENV)/bin/ruff check --fix python tests bench mock

demo: build
	@bash mock/demo.sh

bench: build
	@bash bench/run.sh

wheel: venv
	$(VENV)/bin/maturin build --release --out dist

clean:
	rm -rf $(VENV) target dist .pytest_cache .mypy_cache .ruff_cache
