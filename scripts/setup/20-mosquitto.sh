#!/usr/bin/env bash
# Mosquitto for the MQTT backend's tests: the broker on 127.0.0.1:1883 and the mosquitto_pub /
# mosquitto_sub clients the tests use as independent MQTT clients. The tests also start private
# brokers from the `mosquitto` binary and make TLS certificates with `openssl`. Idempotent: does
# nothing when everything is in place.
set -euo pipefail

HOST=127.0.0.1
PORT=1883
CONF=/etc/mosquitto/mosquitto.conf
LOG=/var/log/mosquitto/mosquitto.log

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

mosquitto_bin() {
  command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true
}

if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null \
  || [ -z "$(mosquitto_bin)" ] || ! command -v openssl >/dev/null; then
  echo "installing mosquitto, mosquitto-clients and openssl"
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq mosquitto mosquitto-clients openssl
fi

broker_answers() {
  # A real MQTT round trip, not just an open port.
  mosquitto_pub -h "$HOST" -p "$PORT" -q 1 -t wsbridge/setup/probe -n >/dev/null 2>&1
}

if broker_answers; then
  echo "mosquitto answers on $HOST:$PORT"
  exit 0
fi

if [ ! -f "$CONF" ]; then
  echo "error: no broker on $HOST:$PORT and no $CONF to start one from" >&2
  exit 1
fi
echo "starting mosquitto with $CONF"
# The Debian config writes its pid, log and database here as user mosquitto.
for dir in /run/mosquitto /var/log/mosquitto /var/lib/mosquitto; do
  as_root install -d "$dir"
  if id mosquitto >/dev/null 2>&1; then as_root chown mosquitto: "$dir"; fi
done
as_root "$(mosquitto_bin)" -d -c "$CONF"

for _ in $(seq 1 50); do
  if broker_answers; then
    echo "mosquitto answers on $HOST:$PORT"
    exit 0
  fi
  sleep 0.2
done
echo "error: mosquitto started but does not answer on $HOST:$PORT within 10s." >&2
echo "It must listen there and accept anonymous clients (listener $PORT $HOST, allow_anonymous true)." >&2
if [ -r "$LOG" ]; then tail -n 20 "$LOG" >&2; fi
exit 1
