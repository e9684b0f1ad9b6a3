#!/usr/bin/env bash
# protoc, used by the transform tests as an independent Protobuf encoder/decoder
# (`protoc --encode/--decode`). wsbridge itself never needs it. Idempotent.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if command -v protoc >/dev/null; then
  echo "protoc: $(protoc --version)"
  exit 0
fi
echo "installing protobuf-compiler"
as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq protobuf-compiler
protoc --version
