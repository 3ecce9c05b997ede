# p0-relay: a small runtime image with the binary, the shipped mappings and relay.yaml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin p0-relay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /app relay \
 && mkdir -p /app/data && chown relay /app/data
WORKDIR /app
COPY --from=build /src/target/release/p0-relay /usr/local/bin/p0-relay
COPY relay.yaml ./
COPY mappings ./mappings
USER relay
EXPOSE 8080
VOLUME ["/app/data"]
# Asks the relay's /readyz (address from relay.yaml); `|| exit 1` keeps Docker's codes 0 and 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s CMD p0-relay health || exit 1
ENTRYPOINT ["p0-relay"]
CMD ["serve", "--config", "relay.yaml"]
