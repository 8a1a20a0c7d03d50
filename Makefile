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

.PHONY: all venv build browser-deps redis-deps test test-rust test-python test-under-load lint lint-rust lint-python fmt demo bench profile wheel clean

all: build

$(VENV)/.created:
	@echo "==> Creating $(VENV) and installing maturin (about 30 s)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "maturin>=1.7,<2.0"
	touch $@

venv: $(VENV)/.created

BUILD_NOTICE := ==> Building the Rust extension in release mode: about 2 minutes the first time on 2 cores (crates compile once), seconds after that

# Builds the extension in release mode and installs the package (editable Python part)
# with its test and lint extras into .venv. That install contains the runtime-only one.
$(VENV)/.built: $(VENV)/.created $(RUST_SRC) pyproject.toml
	@echo "$(BUILD_NOTICE)"
	$(VENV)/bin/maturin develop --release --quiet --extras test,lint
	touch $@ $(VENV)/.runtime

# The package alone, without the test and lint extras: all `make demo` needs.
$(VENV)/.runtime: $(VENV)/.created $(RUST_SRC) pyproject.toml
	@echo "$(BUILD_NOTICE)"
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(VENV)/.built

test: build lint test-rust test-python

test-rust: build
	@echo "==> Rust tests (cargo test compiles a debug build first: about 2 minutes the first time)"
	cargo test --quiet --all-targets
	cargo test --quiet --manifest-path bench/streamload/Cargo.toml --target-dir target/streamload

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
	@echo "==> Python tests (a few minutes: real gateway and mock processes)"
	$(PY) -m pytest -q

# Issue 9's proof: `make test` three times in a row with one core kept busy (RUNS=, LOAD_CORES=).
test-under-load: build
	@bash .ci/under-load.sh

lint: lint-rust lint-python

lint-rust:
	@echo "==> Rust lints (clippy checks every target: about a minute the first time)"
	cargo fmt --check
	cargo clippy --quiet --all-targets -- -D warnings
	cargo fmt --check --manifest-path bench/streamload/Cargo.toml
	cargo clippy --quiet --all-targets --manifest-path bench/streamload/Cargo.toml --target-dir target/streamload -- -D warnings

lint-python: build
	$(VENV)/bin/ruff check python tests bench mock
	$(VENV)/bin/ruff format --check python tests bench mock
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest ntonix._core

fmt: venv
	cargo fmt
	cargo fmt --manifest-path bench/streamload/Cargo.toml
	$(VENV)/bin/ruff format python tests bench mock
	$(VENV)/bin/ruff check --fix python tests bench mock

demo: $(VENV)/.runtime
	@bash mock/demo.sh

bench: build
	@bash bench/run.sh

wheel: venv
	$(VENV)/bin/maturin build --release --out dist

clean:
	rm -rf $(VENV) target dist .pytest_cache .mypy_cache .ruff_cache

# ---- make test-real: opt-in, not part of `make test` -------------------------------------------
# Two real llama-cpp-python OpenAI-compatible servers (CPU) behind the gateway, serving a tiny
# random-weight GGUF model generated here (tests_real/make_model.py; nothing from a model hub).
# The server lives in its own venv (.real/venv); its wheel is built once from PyPI's sdist
# (about 10 minutes on 2 cores) and cached in .real/wheels. See docs/real-servers.md.
REAL        := .real
REAL_PY     := $(REAL)/venv/bin/python
LLAMA_VER   := 0.3.16
LLAMA_SDIST := $(REAL)/sdist/llama_cpp_python-$(LLAMA_VER).tar.gz
LLAMA_CMAKE := -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
REAL_VOCAB  := ggml-vocab-llama-spm.gguf

.PHONY: test-real

$(REAL)/venv/.created:
	$(PYTHON) -m venv $(REAL)/venv
	$(REAL_PY) -m pip install --quiet --upgrade pip
	$(REAL_PY) -m pip install --quiet scikit-build-core cmake ninja gguf
	touch $@

# --no-build-isolation: otherwise pip compiles cmake from source just to read the metadata.
$(LLAMA_SDIST): $(REAL)/venv/.created
	$(REAL_PY) -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: \
		-d $(REAL)/sdist llama-cpp-python==$(LLAMA_VER)

$(REAL)/wheels/.built-$(LLAMA_VER): $(LLAMA_SDIST)
	@mkdir -p $(REAL)/wheels
	@echo "building llama-cpp-python $(LLAMA_VER) from source (about 10 minutes on 2 cores)..."
	CMAKE_ARGS="$(LLAMA_CMAKE)" nice -n 15 $(REAL_PY) -m pip wheel --quiet --no-deps \
		--no-build-isolation -w $(REAL)/wheels $(LLAMA_SDIST)
	touch $@

$(REAL)/venv/.llama-$(LLAMA_VER): $(REAL)/wheels/.built-$(LLAMA_VER)
	$(REAL_PY) -m pip install --quiet \
		"$$(ls $(REAL)/wheels/llama_cpp_python-$(LLAMA_VER)-*.whl | head -n 1)[server]"
	touch $@

$(REAL)/model/tiny.gguf: tests_real/make_model.py $(LLAMA_SDIST) $(REAL)/venv/.created
	@mkdir -p $(REAL)/vocab
	tar -xzf $(LLAMA_SDIST) -C $(REAL)/vocab --strip-components=4 \
		llama_cpp_python-$(LLAMA_VER)/vendor/llama.cpp/models/$(REAL_VOCAB)
	$(REAL_PY) tests_real/make_model.py --vocab $(REAL)/vocab/$(REAL_VOCAB) --out $@

test-real: build $(REAL)/venv/.llama-$(LLAMA_VER) $(REAL)/model/tiny.gguf
	NTONIX_REAL_PYTHON=$(abspath $(REAL_PY)) NTONIX_REAL_MODEL=$(abspath $(REAL)/model/tiny.gguf) \
		$(PY) -m pytest tests_real -q -p no:cacheprovider

# ---- make profile: issue 16's "Where the time goes" (docs/benchmarks.md), about 3 minutes ----------
# CPU per miss, hit and stream chunk by thread (/proc), attributed with perf (Debian's linux-perf;
# without a usable perf, py-spy --native alone) and py-spy; writes docs/profile/*.svg and prints the table.
.PHONY: profile

profile: build
	@command -v perf >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y linux-perf; } || echo "perf unavailable: py-spy only"
	@command -v nginx >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx wrk; }
	$(PIP) install --quiet "py-spy>=0.4"
	$(PY) bench/profile.py

# ---- make bench-routing: issue 11's routing benchmark (docs/benchmarks.md, "Routing (issue 11)") ----
# A multi-turn chat trace over 4 KV-emulating mocks, NTONIX's policies against sglang-router and
# vllm-router (the `bench` extra lists them); about 5 minutes, BENCH_QUICK=1 about 1.5.
.PHONY: bench-routing

bench-routing: build
	$(PIP) install --quiet "aiohttp>=3.9" "sglang-router>=0.3" "vllm-router>=0.1.17"
	$(PY) bench/routing.py
