#!/usr/bin/env bash
# Build outpost's fuzz targets (fuzz/, cargo fuzz) and run each for a bounded time, starting
# from the checked-in corpus. Fails on the first crash, and says how to keep it as a regression.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 30 s, every target)
#
# FUZZ_SANITIZER=address runs under AddressSanitizer (slower; the default is none: the code
# under test is safe Rust, and libFuzzer still catches panics, aborts and stack overflows).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(manifest join_token protocol kustomize exec_frames)
fi
sanitizer=${FUZZ_SANITIZER:-none}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 1
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "the nightly toolchain is missing: rustup toolchain install nightly --profile minimal" >&2
  exit 1
fi

build_start=$(date +%s)
cargo +nightly fuzz build -s "$sanitizer" >/dev/null
echo "fuzz targets built in $(( $(date +%s) - build_start )) s"

summary=()
for t in "${targets[@]}"; do
  work="fuzz/target/corpus/$t"   # what libFuzzer adds; the checked-in seeds stay as they are
  mkdir -p "$work" "fuzz/artifacts/$t"
  log="fuzz/target/$t.log"
  echo "== fuzzing $t for ${secs}s"
  if ! cargo +nightly fuzz run -s "$sanitizer" "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo >&2
    echo "fuzz target $t crashed; the input is in fuzz/artifacts/$t/." >&2
    echo "Reproduce: cargo +nightly fuzz run -s $sanitizer $t fuzz/artifacts/$t/<file>" >&2
    echo "Keep it: fix the defect, copy the input to fuzz/corpus/$t/crash-<what>, and the normal" >&2
    echo "suite replays it (crates/outpost-core/tests/fuzz_corpus.rs)." >&2
    exit 1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
  summary+=("$t: $execs executions in ${secs}s, no crash")
done
printf '%s\n' "${summary[@]}"
