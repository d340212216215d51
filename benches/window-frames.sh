#!/usr/bin/env bash
# The window's frame intervals against a bare eframe window with the same options, measured in the
# same Xvfb session on software Vulkan (lavapipe), release build, 1280x800, continuous repaint:
#   bare      an eframe window with histolens's options and one label (the baseline)
#   idle      the bundled slide shown, nothing moving
#   pan       panning at one-to-one zoom, 8 px per frame
#   heatmap   panning while the slide's DMSL heatmap computes
#   training  the training panel while a DMSL run trains (ResNet-18, batch 8)
# Usage: benches/window-frames.sh [OUT_DIR]; SECONDS_PER=N (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-window}
secs=${SECONDS_PER:-20}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --locked -q
bin=$PWD/target/release/histolens
export XDG_RUNTIME_DIR; XDG_RUNTIME_DIR=$(mktemp -d); chmod 700 "$XDG_RUNTIME_DIR"

# A small DMSL run for the training scenario: pairs from the bundled slide's demo regions.
pairs="$out/pairs"
if [ ! -f "$pairs/pairs.csv" ]; then
  $bin dataset dmsl --slide "assets/samples/CMU-1-Small-Region.svs=assets/models/dmsl-demo-regions.geojson" \
    --field-um 64 --max-per-region 8 --out "$pairs" >/dev/null
fi
rm -rf "$out/run" "$out/run-config"
$bin train dmsl --data "$pairs/pairs.csv" --run "$out/run-config" --arch resnet18 --epochs 0 \
  --batch 8 --device cpu >/dev/null
mkdir -p "$out/run"
cp "$out/run-config/config.json" "$out/run-config/run.json" "$out/run/"
# Many epochs: the run must still be training when the measurement ends.
python3 - "$out/run/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["epochs"] = 1000
json.dump(c, open(p, "w"))
PY

export OUT=$out BIN=$bin SECS=$secs
xvfb-run -a -s "-screen 0 1280x800x24" bash -euo pipefail -c '
  for s in bare idle pan heatmap training; do
    extra=""
    [ "$s" = training ] && extra="--train-run $OUT/run"
    $BIN bench window --scenario "$s" --seconds "$SECS" --json $extra >"$OUT/$s.json" 2>"$OUT/$s.log" &
    pid=$!
    sleep $(( SECS / 2 + 3 ))
    import -window root "$OUT/$s.png" || true
    wait $pid
  done
'
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = {s: json.load(open(os.path.join(out, f"{s}.json")))
        for s in ("bare", "idle", "pan", "heatmap", "training")}
b = rows["bare"]
print(f"{'scenario':<10} {'frames':>6} {'p50 ms':>8} {'p99 ms':>8} {'p50 / bare':>10} {'p99 / bare':>10} {'UI CPU p50':>10}")
for s, r in rows.items():
    print(f"{s:<10} {r['frames']:>6} {r['interval_p50_ms']:>8.1f} {r['interval_p99_ms']:>8.1f} "
          f"{r['interval_p50_ms'] / b['interval_p50_ms']:>10.2f} {r['interval_p99_ms'] / b['interval_p99_ms']:>10.2f} "
          f"{r['cpu_p50_ms']:>10.1f}")
PY
echo "screenshots in $out"
