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
HEALTHCHECK --interval=10s --timeout=2s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080"]
ENTRYPOINT ["p0-relay"]
CMD ["serve", "--config", "relay.yaml"]
