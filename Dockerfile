# syntax=docker/dockerfile:1
# One build, two images:
#   docker build --target writer -t flare-storage-writer .
#   docker build --target reader -t flare-storage-reader .

FROM rust:1.95-bookworm AS build
# librdkafka is compiled from source by rdkafka-sys (make + a C compiler, zlib); protobuf code
# is generated in-process by protox, so no protoc is needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/flare-storage-writer target/release/flare-storage-reader target/release/flare-storage /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin flare
COPY --from=build /out/flare-storage /usr/local/bin/
USER 10001:10001
ENV LOG_FORMAT=json RUST_LOG=info

FROM runtime AS writer
COPY --from=build /out/flare-storage-writer /usr/local/bin/
EXPOSE 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["flare-storage-writer", "healthcheck"]
ENTRYPOINT ["flare-storage-writer"]

FROM runtime AS reader
COPY --from=build /out/flare-storage-reader /usr/local/bin/
# Where export jobs write when STORAGE_READER_EXPORT_DIR points here; a volume mounted on it
# takes this ownership, so the non-root reader can write.
USER 0:0
RUN mkdir -p /var/lib/flare-storage/exports && chown 10001:10001 /var/lib/flare-storage/exports
USER 10001:10001
EXPOSE 50051 9101
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["flare-storage-reader", "healthcheck"]
ENTRYPOINT ["flare-storage-reader"]
