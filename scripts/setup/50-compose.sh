#!/usr/bin/env bash
# docker-compose, with which the tests validate docker-compose.yml (`config` needs no engine).
# Debian's package, without the engine it recommends. Idempotent.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if command -v docker-compose >/dev/null; then
  echo "docker-compose: $(docker-compose version --short 2>/dev/null || echo present)"
  exit 0
fi
echo "installing docker-compose"
as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker-compose
docker-compose version --short
