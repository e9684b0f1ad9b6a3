#!/usr/bin/env bash
# Kafka for the `kafka` backend tests: a Tansu broker (a Kafka-protocol broker written in Rust) on
# 127.0.0.1:9092, and the pure-Python `kafka-python` client the tests use as an independent
# producer and consumer. Idempotent: installs only what is missing, starts the broker only when
# the port is closed, and fails loudly when something cannot be had.
set -euo pipefail
cd "$(dirname "$0")/../.."

TANSU_VERSION=0.6.0
KAFKA_PYTHON_VERSION=3.0.12
HOST=127.0.0.1
PORT=9092
LOG_DIR=target/kafka
LOG="${LOG_DIR}/tansu.log"

export PATH="${HOME}/.cargo/bin:${PATH}"

port_open() {
  (exec 3<>"/dev/tcp/${HOST}/${PORT}") 2>/dev/null
}

# `dynostore` gives the in-memory log of the shared broker; `libsql` the on-disk (SQLite) log of
# the private brokers that fault tests kill and restart. The marker records which build this is.
FEATURES=dynostore,libsql
MARKER="${HOME}/.cargo/tansu-${TANSU_VERSION}-features"
if ! command -v tansu >/dev/null 2>&1 || ! tansu --version 2>/dev/null | grep -q "${TANSU_VERSION}" \
  || [ "$(cat "${MARKER}" 2>/dev/null)" != "${FEATURES}" ]; then
  echo "installing tansu ${TANSU_VERSION} with ${FEATURES} (a long build on 2 cores, once)"
  # The broker serves only tests: optimisation level 1 compiles much faster than the release
  # profile's level 3 (bundled SQLite included) and is quick enough for them.
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    cargo install tansu --version "${TANSU_VERSION}" --locked --force --features "${FEATURES}"
  echo "${FEATURES}" >"${MARKER}"
fi

if ! python3 -c 'import kafka' >/dev/null 2>&1; then
  echo "installing kafka-python ${KAFKA_PYTHON_VERSION}"
  python3 -m pip install --quiet "kafka-python==${KAFKA_PYTHON_VERSION}"
fi
python3 -c 'import kafka' || { echo "kafka-python is not importable" >&2; exit 1; }

if port_open; then
  echo "a Kafka broker is already listening on ${HOST}:${PORT}"
  exit 0
fi

mkdir -p "${LOG_DIR}"
echo "starting tansu on ${HOST}:${PORT} (log: ${LOG})"
# setsid detaches the broker from this script's process group so it outlives the test run.
setsid nohup tansu broker \
  --listener-url "tcp://${HOST}:${PORT}" \
  --advertised-listener-url "tcp://${HOST}:${PORT}" \
  --storage-engine memory://tansu/ \
  >"${LOG}" 2>&1 </dev/null &
pid=$!

for _ in $(seq 1 100); do
  if port_open; then
    echo "tansu is up (pid ${pid})"
    exit 0
  fi
  if ! kill -0 "${pid}" 2>/dev/null; then
    echo "tansu exited before opening ${HOST}:${PORT}; its log:" >&2
    cat "${LOG}" >&2
    exit 1
  fi
  sleep 0.1
done
echo "tansu did not open ${HOST}:${PORT} within 10 s; its log:" >&2
tail -n 50 "${LOG}" >&2
exit 1
