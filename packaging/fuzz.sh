#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/fuzz_targets/) by hand, not in CI: each for FUZZ_SECONDS (default 600)
# on nightly Rust with AddressSanitizer, starting from the committed seeds (fuzz/corpus/TARGET) and
# growing a working corpus under target/fuzz-corpus/TARGET. A crash leaves its input in
# fuzz/artifacts/TARGET/; copy it to fuzz/regressions/TARGET/ (replayed by tests/fuzz_regressions.rs
# on stable) and fix the reader. Logs: target/fuzz-TARGET.log.
# Usage: [FUZZ_SECONDS=600] packaging/fuzz.sh [TARGET...]
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-600}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(snapshot slide label_manifest checkpoint run_config)
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Decoded snapshots above this are refused (a mutated header can claim any size).
export HISTOLENS_MAX_DECODE_MB=256
cargo +nightly fuzz build || exit 1
status=0
for t in "${targets[@]}"; do
  mkdir -p "target/fuzz-corpus/$t"
  echo "== $t: ${secs} s"
  cargo +nightly fuzz run "$t" "target/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 \
    >"target/fuzz-$t.log" 2>&1 || { status=1; echo "   $t FAILED: see target/fuzz-$t.log and fuzz/artifacts/$t/"; }
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE" "target/fuzz-$t.log" | sed 's/^/   /'
done
exit $status
