#!/usr/bin/env bash
# The browser tests' tools: Debian's Chromium (driven by playwright-core from tests/browser/,
# which never downloads a browser of its own) and Node.js 20 or later for the JavaScript client's
# and the browser tests' runner. Idempotent; fails loudly when something cannot be had.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
NODE_MAJOR_MIN=20

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x "${CHROMIUM}" ]; then
  echo "installing chromium"
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium
fi
if [ ! -x "${CHROMIUM}" ]; then
  echo "error: ${CHROMIUM} is still missing after installing Debian's chromium package" >&2
  exit 1
fi
# `chromium --version` goes through Debian's wrapper script; ask the binary it starts.
echo "chromium: $("${CHROMIUM}" --version 2>/dev/null | grep -o 'Chromium [0-9.]*' || echo present)"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "error: node and npm are needed (Node.js ${NODE_MAJOR_MIN} or later) for clients/js and tests/browser" >&2
  exit 1
fi
node_version=$(node --version)
node_major=${node_version#v}
node_major=${node_major%%.*}
if [ "${node_major}" -lt "${NODE_MAJOR_MIN}" ]; then
  echo "error: Node.js ${NODE_MAJOR_MIN} or later is needed, this is ${node_version}" >&2
  exit 1
fi
echo "node: ${node_version}, npm: $(npm --version)"
