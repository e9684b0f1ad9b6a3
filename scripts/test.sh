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

# Both suites below start target/debug/wsbridge (built by `cargo test --all-targets` above).
echo "==> JavaScript client (clients/js): build, check the committed dist/ is that build, test"
(
  cd clients/js
  npm ci --no-audit --no-fund
  npm run build
  # dist/ is committed; a build that changes or adds a file there means it is stale.
  git diff --exit-code -- dist
  untracked=$(git ls-files --others --exclude-standard -- dist)
  if [ -n "${untracked}" ]; then
    echo "clients/js/dist has files the build made that are not committed:" >&2
    echo "${untracked}" >&2
    exit 1
  fi
  npm test
)
echo "==> browser tests (tests/browser, headless Chromium); screenshots in target/browser/"
(
  cd tests/browser
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
  npm test
)
echo "==> all tests passed"
