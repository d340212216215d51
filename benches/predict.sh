#!/usr/bin/env bash
# Magnification estimates from file to prediction in histolens against the same pipeline in Python and
# onnxruntime (Pillow decode, the same crops on tissue and normalisation, the whole Hagnifinder model as
# an ONNX graph with the same weights: benches/onnxruntime_predict.py), on 1 and 2 threads in one run.
# Prints the end-to-end time of the first file and the predictions/s over all files, with the ratios
# histolens/onnxruntime, and checks that both give the same crops and predictions; then the training
# throughput (images/s of one training step at batch 8) of each backbone. The baseline runs the first
# pass on the image as it is; histolens also reads the image resampled toward 0.5 µm/px, up to twice
# (next_zoom in src/magnification/estimate.rs), so the ratios count up to three times the model work on our
# side; the agreement check is of the first pass.
#
# Usage: [ITERS=10] [PASSES=3] benches/predict.sh [FILE [PATH...]]
# FILE (default: ../shared/data/images/tiatoolbox-target-he.png, a 1000x1000 H&E snapshot) is timed end
# to end; FILE and the PATHs (default: ../shared/data/images and ../shared/data/known-mpp, folders
# recursively) give the predictions/s. Needs python3 with numpy, Pillow, onnx and onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data
iters=${ITERS:-10}
passes=${PASSES:-3}
if [ $# -ge 1 ]; then
  first=$1
  shift
  rest=("$@")
else
  first=$data/images/tiatoolbox-target-he.png
  rest=("$data/images" "$data/known-mpp")
fi
python3 -c "import numpy, PIL, onnx, onnxruntime" 2>/dev/null || {
  echo "benches/predict.sh needs python3 with numpy, Pillow, onnx and onnxruntime" \
    "(python3 -m pip install numpy Pillow onnx onnxruntime)" >&2
  exit 1
}
cargo build --release --locked -q
bin=./target/release/histolens
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
status=0
echo "magnification estimates: histolens against Pillow + onnxruntime (time ratio < 1 and rate ratio > 1: histolens faster)"
for t in 1 2; do
  echo "$t thread(s):"
  ours=$(RAYON_NUM_THREADS=$t "$bin" bench predict --iters "$iters" --passes "$passes" --save-dir "$dir" --json "$first" "${rest[@]}")
  list=()
  if [ "$t" = 1 ]; then list=(--list); fi
  base=$(python3 benches/onnxruntime_predict.py "$dir" "$t" "${list[@]}") || status=1
  python3 - "$ours" "$base" <<'PY'
import json, os, sys
ours, base = json.loads(sys.argv[1]), json.loads(sys.argv[2])
o, b = ours["first"], base["first"]
split = lambda r: f"decode {r['decode_seconds']:.4f}, crops {r['crops_seconds']:.4f}, model {r['model_seconds']:.4f}" \
    if r.get("decode_seconds") is not None else "no split"
print(f"  end to end, {os.path.basename(o['path'])} ({o['crops']} crops, histolens {o['magnification']:.3f}x, "
      f"onnxruntime {b['magnification']:.3f}x): histolens {o['end_to_end_seconds']:.4f} s ({split(o)}) vs "
      f"onnxruntime {b['end_to_end_seconds']:.4f} s ({split(b)}): x{o['end_to_end_seconds'] / b['end_to_end_seconds']:.2f} time")
oa, ba = ours["all"], base["all"]
print(f"  all files, {oa['files']} file(s) ({oa['failed']} failed, {oa['crops']} crops) vs {ba['files']} "
      f"({ba['failed']} failed, {ba['crops']} crops): histolens {oa['predictions_per_second']:.2f} predictions/s "
      f"({oa['crops_per_second']:.1f} crops/s) vs onnxruntime {ba['predictions_per_second']:.2f} "
      f"({ba['crops_per_second']:.1f} crops/s): x{oa['predictions_per_second'] / ba['predictions_per_second']:.2f} rate")
print(f"  model load: histolens {ours['model_load_seconds']:.3f} s, onnxruntime graph + session {base['session_seconds']:.3f} s (not timed above)")
PY
done
echo "training throughput (one training step: forward, loss, backward, AdamW; batch 8, 224 px)"
for t in 1 2; do
  RAYON_NUM_THREADS=$t "$bin" bench model --arch resnet18,resnet50,inception-v3,efficientnet-lite0 \
    --batch 1 --iters 1 --train-batch 8 --json | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    s, n = r["train_step_seconds"], r["train_batch"]
    print("  %s, %d thread(s): %.2f images/s (%.2f s a step at batch %d)" % (r["arch"], r["threads"], n / s, s, n))
'
done
if [ "$status" != 0 ]; then
  echo "DISAGREE: onnxruntime's crops or predictions differ from histolens' (see above)" >&2
fi
exit "$status"
