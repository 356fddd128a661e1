# syntax=docker/dockerfile:1
#
# The bace-token-broker image: a release build on Debian bookworm, copied onto distroless/cc
# (glibc, libgcc, CA certificates, tzdata; no shell, no package manager), run as the image's
# `nonroot` user 65532:65532, the user the Helm chart's securityContext names. The broker
# writes no files: it runs with a read-only root filesystem and needs no HOME.
#
# Build (BuildKit: Docker 23+ or `docker buildx build`) from the repository root:
#
#   docker build -t bace-token-broker:0.1.0 .
#
# The image's server is built without the fake BACE (`--no-default-features` drops the feature
# `demo`), so it has no `serve --demo`: try the demo from a checkout instead,
# `cargo run -- serve --demo`.
#
# Then push it where your cluster pulls from and set the chart's image.repository and
# image.tag (default: the chart's appVersion, which follows Cargo.toml's version).
#
# No Docker engine runs in the test environment; tests/python/test_container_runtime.py checks
# this file (runtime base, numeric non-root USER equal to the chart's runAsUser, entrypoint,
# ports) and runs the same binary as uid 65532 from a read-only directory with no HOME.

ARG RUST_VERSION=1.95

# === build ===
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# build.rs compiles proto/ with protox: no protoc needed.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# The workspace's members (crates/*: the BACE wire types the server links, and the test kit,
# fake BACE and benchmarks it does not): Cargo loads every member's manifest, and `--locked`
# checks Cargo.lock against all of them, so the build needs the whole directory.
COPY crates ./crates
# `--no-default-features`: the server without the feature `demo` (the embedded fake BACE).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin bace-token-broker \
    && mkdir -p /out \
    && cp target/release/bace-token-broker /out/ \
    && strip --strip-debug /out/bace-token-broker

# === runtime ===
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="bace-token-broker" \
      org.opencontainers.image.description="gRPC broker that keeps one valid BACE IoT OAuth2 token per account" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder --chmod=0555 /out/bace-token-broker /usr/local/bin/bace-token-broker
USER 65532:65532
# gRPC (service.port in the chart) and Prometheus metrics (metrics.port).
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/bace-token-broker"]
# The chart mounts its ConfigMap here and passes its own arguments.
CMD ["serve", "--config", "/etc/bace-token-broker/config.yaml"]
