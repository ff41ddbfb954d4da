# sensorhub image: a release build in the official Rust image, run from a slim Debian with
# nothing added but the binary, its broker configuration and the CA bundle.
#   docker build -t sensorhub .
#   docker run -p 1883:1883 -p 1884:1884 -p 8000:8000 \
#     -e MONGODB_URI=mongodb://mongo:27017 -e REDIS_URL=redis://redis:6379 sensorhub
# docker-compose.yml wires it to MongoDB and Redis.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, against placeholder sources: this layer is rebuilt only when a manifest,
# Cargo.lock or the vendored rumqttd (patched, see patches/rumqttd/) change, not on every edit
# of src/. Cargo loads every workspace member, so the benchmark crate (bench/) is here as its
# manifest and a placeholder: it is never built, and its sources stay out of the build context
# (.dockerignore).
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY bench/Cargo.toml ./bench/
RUN mkdir src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources. index.html and ../../rumqttd.toml are compiled in with include_str!.
COPY src ./src
COPY rumqttd.toml ./
# COPY keeps the files' old modification times, which can predate the placeholder build's
# outputs; touching the crate roots makes cargo rebuild the crate itself. Only the service's
# binary: the root package's other targets and the benchmark crate stay out of the build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin sensorhub \
 && install -D -m 0755 target/release/sensorhub /out/sensorhub
# The release profile keeps line tables for readable backtraces; compressing the debug sections
# (which std's backtrace reads) shrinks the binary about 2.5 times without losing them.
RUN objcopy --compress-debug-sections=zlib /out/sensorhub

# ---- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim

# Debian's CA bundle (package ca-certificates, present in the Rust image), for TLS clients that
# read the system store. Copied rather than installed with apt: no package manager run, no apt
# lists in a layer, and the same file. (The MongoDB driver carries its own webpki roots.)
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt

# A fixed numeric uid/gid, so orchestrators can check runAsNonRoot and volumes can be
# chowned ahead of time.
RUN groupadd --system --gid 10001 sensorhub \
 && useradd --system --uid 10001 --gid sensorhub --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin sensorhub \
 && install -d -o sensorhub -g sensorhub -m 0750 /var/lib/sensorhub /var/lib/sensorhub/journal

COPY --from=build /out/sensorhub /usr/local/bin/sensorhub
# Read from the working directory; the same settings are also built into the binary.
COPY rumqttd.toml /app/rumqttd.toml
WORKDIR /app

# The local log: readings live here between the broker's acknowledgement and MongoDB, so it must
# outlive the container. A fresh named volume takes this directory's owner from the image.
ENV SENSORHUB_JOURNAL_DIR=/var/lib/sensorhub/journal
VOLUME ["/var/lib/sensorhub"]

USER 10001:10001
# MQTT 3.1.1, MQTT 5, HTTP API (GET /health/ready, /health/live, /docs, /metrics), MQTT over TLS when
# SENSORHUB_MQTTS_LISTEN=0.0.0.0:8883 and a certificate are set. Without SENSORHUB_MQTT_AUTH
# (or SENSORHUB_MQTT_ALLOW_ANONYMOUS=true) MQTT listens on the container's loopback only.
EXPOSE 1883 1884 8000 8883
# Readiness (GET /health/ready: MQTT listeners, the local log's disk, MongoDB, Redis). The image
# has no HTTP client: bash's /dev/tcp sends the request. Docker keeps HEALTHCHECK; the OCI image
# format has none (podman needs --format docker), so docker-compose.yml repeats it. Liveness for
# an orchestrator that restarts: GET /health/live. With HTTPS (SENSORHUB_TLS_CERT) this plain
# request fails: probe with a client that speaks TLS instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /health/ready HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# Runs with a read-only root filesystem (`docker run --read-only`, compose's read_only): the
# process writes only under SENSORHUB_JOURNAL_DIR, on the volume, and needs no /tmp.
# Secrets: MONGODB_URI_FILE, REDIS_URL_FILE, SENSORHUB_EXTERNAL_BROKER_FILE name mounted files
# (/run/secrets/...); SENSORHUB_MQTT_AUTH and SENSORHUB_TLS_CERT/KEY are paths to mounted ones.
# sensorhub is PID 1 and handles SIGTERM itself (ordered drain within shutdown_grace_secs).
ENTRYPOINT ["sensorhub"]
CMD ["serve"]
