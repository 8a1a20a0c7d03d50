# syntax=docker/dockerfile:1
# NTONIX container image: build the abi3 wheel with Rust + maturin, then install it into a slim
# runtime with no compiler. Build: `docker build -t ntonix .`; try it: `docker compose up`.
# Runtime: non-root user, HTTP on 8080 and (with ssl.enabled and certificates mounted) HTTPS on 8443.
# Configuration: /etc/ntonix/ntonix.json, overridden by NTONIX_* variables (NTONIX_BACKENDS=host:port,...).

# ---- builder: Rust toolchain + maturin -> /dist/ntonix-*-abi3-*.whl --------------------------------
FROM python:3.11-slim AS builder

# Debian's rustc is older than Cargo.toml's rust-version, so the toolchain comes from rustup.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y --no-modify-path --profile minimal --default-toolchain stable \
    && cargo --version
RUN pip install --no-cache-dir "maturin>=1.7,<2.0"

WORKDIR /src
# Everything the wheel is built from (Cargo.toml names the bench target, so benches/ must exist).
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust ./rust
COPY benches ./benches
COPY python ./python
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    maturin build --release --out /dist

# ---- runtime: the wheel and its Python dependencies only ------------------------------------------
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/ntonix --shell /usr/sbin/nologin ntonix
COPY --from=builder /dist/ /tmp/dist/
RUN pip install --only-binary=:all: /tmp/dist/ntonix-*.whl && rm -rf /tmp/dist
COPY config/ntonix.json /etc/ntonix/ntonix.json

USER ntonix
WORKDIR /home/ntonix
EXPOSE 8080 8443

# SIGTERM drains requests in flight for server.shutdown_grace_seconds (30 s in the shipped config):
# give `docker stop` a longer timeout (`--time 35`, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NTONIX_PORT', '8080') + '/health', timeout=2)"

ENTRYPOINT ["ntonix"]
CMD ["run", "--config", "/etc/ntonix/ntonix.json"]
