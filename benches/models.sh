#!/usr/bin/env bash
# Forward throughput of the zoo's backbones in histolens (candle + histolens-kernels) against
# onnxruntime running the same graphs with the same weights, on 1 and 2 threads, measured in one run;
# prints the ratios and the training-step time. Shared machines are noisy: each engine is measured in
# ROUNDS alternating rounds and the best round of each counts.
# Usage: [ITERS=8] [ROUNDS=3] benches/models.sh [ARCHS] [BATCHES]
set -euo pipefail
cd "$(dirname "$0")/.."
archs=${1:-resnet50,efficientnet-lite0}
batches=${2:-1,8}
iters=${ITERS:-8}
rounds=${ROUNDS:-3}
cargo build --release --locked -q
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for t in 1 2; do
  for r in $(seq "$rounds"); do
    # The training step (batch 8) is timed in the first round only.
    train=$([ "$r" = 1 ] && echo 8 || echo 0)
    RAYON_NUM_THREADS=$t ./target/release/histolens bench model --arch "$archs" --batch "$batches" \
      --iters "$iters" --train-batch "$train" --save-dir "$dir" --json > "$dir/ours-$t-$r.json"
    python3 benches/onnxruntime_baseline.py "$dir" "$t" 224 "$iters" "$batches" "$archs" > "$dir/ort-$t-$r.json"
  done
  python3 - "$dir" "$t" <<'PY'
import glob, json, os, sys
d, t = sys.argv[1], sys.argv[2]
best, step = {}, {}
for engine in ("ours", "ort"):
    for f in glob.glob(os.path.join(d, f"{engine}-{t}-*.json")):
        for r in json.load(open(f)):
            for n, ips in r["forward"]:
                key = (engine, r["arch"], n)
                best[key] = max(best.get(key, 0.0), ips)
            if r.get("train_step_seconds"):
                step[r["arch"]] = (r["train_batch"], r["train_step_seconds"])
for arch in dict.fromkeys(a for (_, a, _) in best):
    parts = [f"batch {n}: {best[('ours', arch, n)]:.1f} img/s vs onnxruntime {best[('ort', arch, n)]:.1f} "
             f"(x{best[('ours', arch, n)] / best[('ort', arch, n)]:.2f})"
             for (e, a, n) in sorted(best) if e == "ours" and a == arch]
    s = f"; train step batch {step[arch][0]}: {step[arch][1]:.2f} s" if arch in step else ""
    print(f"{arch}, {t} thread(s): " + ", ".join(parts) + s)
PY
done
