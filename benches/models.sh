#!/usr/bin/env bash
# Forward throughput of the zoo's backbones in histolens (candle) against onnxruntime running the same
# graphs with the same weights, on 1 and 2 threads, measured in one run; prints the ratios and the
# training-step time. Usage: [ITERS=5] benches/models.sh [ARCHS] [BATCHES]
set -euo pipefail
cd "$(dirname "$0")/.."
archs=${1:-resnet50,efficientnet-lite0}
batches=${2:-1,8}
iters=${ITERS:-5}
cargo build --release --locked -q
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for t in 1 2; do
  ours=$(RAYON_NUM_THREADS=$t ./target/release/histolens bench model --arch "$archs" --batch "$batches" --iters "$iters" --save-dir "$dir" --json)
  base=$(python3 benches/onnxruntime_baseline.py "$dir" "$t" 224 "$iters" "$batches" "$archs")
  python3 - "$ours" "$base" <<'PY'
import json, sys
ours, base = json.loads(sys.argv[1]), {b["arch"]: b for b in json.loads(sys.argv[2])}
for r in ours:
    b = dict((k, v) for k, v in base[r["arch"]]["forward"])
    parts = [f"batch {n}: {ips:.1f} img/s vs onnxruntime {b[n]:.1f} (x{ips / b[n]:.2f})" for n, ips in r["forward"]]
    step = f"; train step batch {r['train_batch']}: {r['train_step_seconds']:.2f} s" if r["train_step_seconds"] else ""
    print(f"{r['arch']}, {r['threads']} thread(s): " + ", ".join(parts) + step)
PY
done
