#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or an already prepared one.
# Installs what the tests need, then runs formatting, lint and every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs); it is the only thing this script does not install" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

log "format"
cargo fmt --all -- --check
log "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "tests"
cargo nextest run --workspace --locked --no-fail-fast
