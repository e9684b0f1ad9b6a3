#!/usr/bin/env bash
# RabbitMQ for tests/amqp.rs: the broker listening on 127.0.0.1:5672 (guest/guest), plus the
# independent AMQP clients the tests cross-check the gateway with: Debian's amqp-tools
# (amqp-publish) and Python's pika. Idempotent; each step is skipped when already done.
set -euo pipefail

PIKA_VERSION=1.3.2
PORT=5672

packages=()
command -v rabbitmq-server >/dev/null 2>&1 || packages+=(rabbitmq-server)
command -v amqp-publish >/dev/null 2>&1 || packages+=(amqp-tools)
if ((${#packages[@]})); then
  echo "installing ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if ! python3 -c "import pika, sys; sys.exit(pika.__version__ != '${PIKA_VERSION}')" 2>/dev/null; then
  echo "installing pika ${PIKA_VERSION}"
  python3 -m pip install --quiet --disable-pip-version-check "pika==${PIKA_VERSION}"
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/${PORT}") 2>/dev/null; }

if ! port_open || ! rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; then
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "starting rabbitmq-server"
    rabbitmq-server -detached
  fi
  # The first calls can fail before the node has registered; keep asking for a minute.
  for _ in $(seq 1 60); do
    if rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 && port_open; then
      break
    fi
    sleep 1
  done
fi

if ! port_open; then
  echo "RabbitMQ is not listening on 127.0.0.1:${PORT}; see /var/log/rabbitmq/" >&2
  exit 1
fi
if ! rabbitmqctl -q list_users 2>/dev/null | grep -q '^guest'; then
  echo "RabbitMQ has no guest user; the tests log in as guest/guest from 127.0.0.1" >&2
  exit 1
fi
echo "RabbitMQ is up on 127.0.0.1:${PORT}"
