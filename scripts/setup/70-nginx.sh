#!/usr/bin/env bash
# nginx, which tests/scale_out.rs runs as a private load balancer in front of two gateways (its
# own config, pid and logs in a temporary folder; the system service is not used). Debian's
# package. Idempotent.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
  echo "nginx: $( (nginx -v || /usr/sbin/nginx -v) 2>&1)"
  exit 0
fi
echo "installing nginx"
as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends nginx
/usr/sbin/nginx -v
