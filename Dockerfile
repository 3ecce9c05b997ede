# p0-relay: a small runtime image with the binary, the shipped mappings and relay.yaml.
#
#   docker build -t p0-relay .        # builds the binary, then the image
#
# `--target runtime-base` is the image without its binary, the first stage so that no builder
# (BuildKit or the classic one, which builds every stage before its target) needs the Rust
# stage for it: the container test adds the binary CI built to it (`FROM` it, `COPY` the
# binary to /usr/local/bin/p0-relay); the entry point, user and health check come with it.

# The runtime's base: Debian bookworm (the container test may name a local copy of it).
ARG BASE_IMAGE=debian:bookworm-slim

# Everything the image holds but the binary.
FROM ${BASE_IMAGE} AS runtime-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --home /app --no-create-home relay \
 && mkdir -p /app/data && chown 10001:10001 /app/data
WORKDIR /app
COPY relay.yaml ./
COPY mappings ./mappings
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080
VOLUME ["/app/data"]
# Asks the relay's /readyz (address from relay.yaml); `|| exit 1` keeps Docker's codes 0 and 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s CMD p0-relay health || exit 1
ENTRYPOINT ["p0-relay"]
CMD ["serve", "--config", "relay.yaml"]

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin p0-relay

FROM runtime-base AS runtime
COPY --from=build /src/target/release/p0-relay /usr/local/bin/p0-relay
