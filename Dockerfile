# One image with every clinflow binary: clinflow-api, clinflow-worker,
# clinflow-audit-sink and clinflow-ingest (docker-compose.yml picks the
# command). Multi-stage: dependencies are compiled in their own layer from
# cargo-chef's recipe (only Cargo.toml/Cargo.lock), so a source change
# rebuilds the workspace crates only.
#
#   docker build -t clinflow .
#
# Queries are checked at build time against the committed .sqlx/ data
# (SQLX_OFFLINE=true): the build needs no database.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
# cargo-chef and cargo-auditable from crates.io, pinned; --locked uses their
# own Cargo.lock.
RUN cargo install cargo-chef --version 0.1.78 --locked \
 && cargo install cargo-auditable --version 0.7.7 --locked
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
COPY --from=planner /build/recipe.json recipe.json
# The dependency layer: rebuilt only when a manifest or Cargo.lock changes.
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
# cargo auditable: each binary carries its dependency list (a linker section
# that stripping keeps), so `cargo audit bin` or a scanner can check a
# deployed binary against advisories without its source.
RUN cargo auditable build --release --locked \
      --bin clinflow-api --bin clinflow-worker --bin clinflow-audit-sink --bin clinflow-ingest \
 && mkdir -p /out \
 && cp target/release/clinflow-api target/release/clinflow-worker \
       target/release/clinflow-audit-sink target/release/clinflow-ingest /out/ \
 && strip /out/*

# The runtime: glibc of the same Debian release as the builder, CA
# certificates (the system roots, for an https:// server given no CA file)
# and curl for the health checks. Nothing else: TLS is rustls with ring,
# compiled in (deny.toml bans OpenSSL and any other provider).
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid so volume ownership is predictable; no shell, no home.
RUN groupadd --system --gid 10001 clinflow \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin clinflow \
 && mkdir -p /var/lib/clinflow/audit \
 && chown -R 10001:10001 /var/lib/clinflow
COPY --from=builder /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/clinflow
ENV LOG_FORMAT=json RUST_LOG=info
# Defaults for a container: listen on every interface of the container's
# (private) network; compose publishes only the api's port.
ENV API_ADDR=0.0.0.0:8080
EXPOSE 8080 9101 9102 9103
CMD ["clinflow-api"]
