# Multi-stage build: compile with the Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
# Cargo.toml names the benchmark and example targets; they must exist for the manifest to load.
COPY benches benches
COPY examples examples
RUN cargo build --release --locked --bin submitd

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10587 --home-dir /var/lib/submitd --create-home submitd \
    && mkdir -p /var/lib/submitd/data /var/lib/submitd/certs \
    && chown -R submitd:submitd /var/lib/submitd
# (Named volumes mounted on data/ and certs/ start with this ownership.)
COPY --from=build /src/target/release/submitd /usr/local/bin/submitd
USER submitd
WORKDIR /var/lib/submitd
EXPOSE 587 465
ENV SUBMITD_CONFIG=/etc/submitd/submitd.toml
ENTRYPOINT ["submitd"]
CMD ["serve"]
