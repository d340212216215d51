#!/usr/bin/env bash
# Fault test: a real magnification training run killed with SIGKILL at N random moments (default 20),
# resumed each time, then finished; checks that log.jsonl holds every epoch exactly once, that no
# temporary file is left, and that a second writer is refused while one holds the run.
#   scripts/kill-resume.sh [N] [OUT]        (default 20 kills, target/kill-resume; a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-20}
out=${2:-target/kill-resume}
cargo build --release --locked --quiet
h=target/release/histolens
export HISTOLENS_DATA_DIR="$out/data-dir"
rm -rf "$out" && mkdir -p "$out"
$h dataset magnification assets/samples/CMU-1-Small-Region.svs --mpp 0.499 --magnifications 5,10,20,40 \
  --per-magnification 8 --out "$out/data" >/dev/null
args=(train magnification --data "$out/data/manifest.csv" --run "$out/run" --arch resnet18 --size 64
  --batch 8 --epochs-asm 8 --epochs-constant 4 --steps-per-epoch 3 --target log2 --device cpu)
train() { "$h" "${args[@]}"; }
for i in $(seq "$kills"); do
  # The binary itself in the background (not a subshell), so that kill -9 reaches it.
  "$h" "${args[@]}" >/dev/null 2>&1 &
  pid=$!
  if [ "$i" -eq 1 ]; then
    sleep 0.5
    if train >/dev/null 2>"$out/second.err"; then
      echo "FAIL: a second writer was not refused" >&2; exit 1
    fi
    grep -q "being written by another process" "$out/second.err" || { cat "$out/second.err"; exit 1; }
  fi
  sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", 0.2 + rand() * 3 }')"
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
train >/dev/null
epochs=$(python3 -c "import json,sys; print(','.join(str(json.loads(l)['epoch']) for l in open(sys.argv[1])))" "$out/run/log.jsonl")
expected=$(seq -s, 1 12)
[ "$epochs" = "$expected" ] || { echo "FAIL: log epochs $epochs, expected $expected" >&2; exit 1; }
if ls -A "$out/run" | grep -q '\.tmp$'; then echo "FAIL: temporary files left" >&2; exit 1; fi
echo "ok: $kills kills, log epochs $epochs, no temporary file, second writer refused"
