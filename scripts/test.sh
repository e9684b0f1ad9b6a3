#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: make sure the brokers and tools the tests use are
# there, then formatting, lints and every test. Safe to rerun; each setup step skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

for setup in scripts/setup/*.sh; do
  echo "==> ${setup}"
  bash "${setup}"
done

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "==> cargo test"
cargo test --all-targets
echo "==> all tests passed"
