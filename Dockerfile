# wsbridge container image: built in one stage, run from a small one as a non-root user.
#
#   docker build -t wsbridge .
#   docker run -p 8080:8080 wsbridge                      # the embedded default (memory broker)
#   docker run -p 8080:8080 -v ./my.toml:/etc/wsbridge/wsbridge.toml wsbridge \
#       run --config /etc/wsbridge/wsbridge.toml
#
# docker-compose.yml runs it with Mosquitto, RabbitMQ and Kafka (config/compose.toml).

FROM rust:1-bookworm AS build
# librdkafka is built from source by rdkafka-sys (make, a C compiler, zlib, OpenSSL for TLS).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY schemas schemas
COPY config config
# The console page and the JavaScript client it imports are embedded in the binary.
COPY console console
COPY clients/js/dist clients/js/dist
RUN cargo build --release --locked --bin wsbridge \
 && strip target/release/wsbridge

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin wsbridge
COPY --from=build /src/target/release/wsbridge /usr/local/bin/wsbridge
COPY config/compose.toml /etc/wsbridge/compose.toml
USER wsbridge
EXPOSE 8080
# Without an HTTP client in the image: a request over bash's /dev/tcp, healthy on HTTP 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/wsbridge"]
# The embedded default listens on 127.0.0.1, unreachable from outside a container: listen on
# every interface instead.
CMD ["run", "--listen", "0.0.0.0:8080"]
