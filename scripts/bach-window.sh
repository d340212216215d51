#!/usr/bin/env bash
# BACH in a real window (Xvfb, software Vulkan): screenshots of the labelling view with BACH's four
# class folders dropped in, of the training panel training a DMSL run on them (ImageNet
# EfficientNet-Lite0, last block trained on cached frozen features), and of that run's model drawing
# its heatmap, with Grad-CAM following the view, over the bundled CC0 slide.
#
#   scripts/bach-window.sh [OUT]        (default target/bach-window; PER_CLASS images per class, 4)
#
# BACH is CC BY-NC-ND: the screenshots, pairs and models stay in OUT (never commit them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bach-window}
rm -rf "${out:?}/cache/heatmaps"
mkdir -p "$out"
out=$(cd "$out" && pwd)
bach=$(cd ../shared/data/bach && pwd)
weights=$(cd ../shared/data/weights && pwd)/efficientnet-lite0-imagenet.safetensors
cargo build --release --locked -q
bin=$PWD/target/release/histolens
export XDG_RUNTIME_DIR; XDG_RUNTIME_DIR=$(mktemp -d); chmod 700 "$XDG_RUNTIME_DIR"
export HISTOLENS_DATA_DIR="$out/data" HISTOLENS_CACHE_DIR="$out/cache"

# A subset of BACH's class folders (links), as a user would drop them.
rm -rf "$out/bach" && mkdir -p "$out/bach"
for class in benign insitu invasive normal; do
    mkdir -p "$out/bach/$class"
    ls "$bach/$class" | head -n "${PER_CLASS:-4}" | while read -r f; do
        ln -s "$bach/$class/$f" "$out/bach/$class/$f"
    done
done

# The run the panel trains: the same dataset the labels view builds, at BACH's scale.
$bin dataset dmsl --folder "$out/bach@0.42um" --pixel-aspect 0.75 --high 20 --low 5 --field-px 224 \
    --out "$out/pairs" >/dev/null
rm -rf "$out/run"
$bin train dmsl --data "$out/pairs/pairs.csv" --run "$out/run" --arch efficientnet-lite0 \
    --start "imagenet:$weights" --freeze all-but-last-block --cache-frozen --epochs 0 >/dev/null
python3 - "$out/run/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["epochs"] = 8
json.dump(c, open(p, "w"))
PY

export OUT=$out BIN=$bin
xvfb-run -a -s "-screen 0 1280x800x24" bash -euo pipefail -c '
  shot() { sleep "$2"; import -window root "$OUT/$1.png"; }
  $BIN --label "$OUT/bach" & pid=$!
  shot labels 25; kill $pid; wait $pid || true
  $BIN --train-run "$OUT/run" & pid=$!
  shot training-early 40
  while ! grep -q "\"epoch\":8" "$OUT/run/log.jsonl" 2>/dev/null; do sleep 5; done
  shot training-done 5; kill $pid; wait $pid || true
  $BIN assets/samples/CMU-1-Small-Region.svs --dmsl-model "$OUT/run/last.safetensors" --heatmap --gradcam & pid=$!
  # The heatmap sidecar appears as fields are classified; then give it time to finish.
  for _ in $(seq 60); do ls "$OUT"/cache/heatmaps/*.heatmap.safetensors >/dev/null 2>&1 && break; sleep 5; done
  shot heatmap 30; kill $pid; wait $pid || true
'
echo "screenshots: $out/labels.png $out/training-early.png $out/training-done.png $out/heatmap.png"
