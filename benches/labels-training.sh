#!/usr/bin/env bash
# Issue 7's benchmarks, in a real window under Xvfb (software Vulkan), release build:
#  1. the labelling grid: 10,000 images (three class folders) added with --label, then scrolled with
#     the mouse wheel for about 30 s: frame-time percentiles while scrolling;
#  2. training: the same DMSL run (ResNet-18, batch 8) made by `histolens train dmsl` (the baseline)
#     and by the window's panel (--train-run on a copy of the CLI run's config), twice: once repainting
#     continuously (UI frame times during training: the worst case, a window that never rests) and
#     once as a window normally is, repainting on events (the panel's samples/s as a ratio of the
#     CLI's, from each run's log.jsonl).
# Usage: benches/labels-training.sh [OUT_DIR]; IMAGES=N (default 10000), EPOCHS, STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-labels-training}
images=${IMAGES:-10000}
epochs=${EPOCHS:-2}
steps=${STEPS:-12}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --locked -q
bin=$PWD/target/release/histolens
export XDG_RUNTIME_DIR; XDG_RUNTIME_DIR=$(mktemp -d); chmod 700 "$XDG_RUNTIME_DIR"

# 10,000 textured 160x160 JPEGs in three class folders (made once).
if [ "$(find "$out/tiles" -name '*.jpg' 2>/dev/null | wc -l)" -lt "$images" ]; then
  rm -rf "$out/tiles"
  python3 - "$out/tiles" "$images" <<'PY'
import sys, os, numpy as np
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
classes = {"epithelium": (200, 90, 140), "stroma": (235, 160, 200), "background": (240, 238, 240)}
for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
for i in range(n):
    c = list(classes)[i % 3]
    base = np.array(classes[c], dtype=np.float32)
    noise = rng.normal(0, 25, (160, 160, 1)).astype(np.float32)
    img = np.clip(base + noise * np.array([1.0, 0.8, 0.9]), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, c, f"{c}-{i:05d}.jpg"), quality=85)
PY
fi

export REPAINT=--continuous-repaint
window() { # window NAME ARGS...: runs the app, waits for its window, runs $ACTIONS, quits
  local name=$1; shift
  export HISTOLENS_DATA_DIR="$out/data-$name" APP_ARGS="$*" OUT="$out" NAME="$name" BIN="$bin"
  rm -rf "$HISTOLENS_DATA_DIR"; mkdir -p "$HISTOLENS_DATA_DIR"
  xvfb-run -a -s "-screen 0 1280x800x24" bash -euo pipefail -c '
    $BIN $REPAINT --frame-stats "$OUT/$NAME-frames.json" $APP_ARGS >"$OUT/$NAME.log" 2>&1 &
    app=$!
    source packaging/window-lib.sh
    wait_for_window "$OUT/$NAME.log" 240
    eval "$ACTIONS"
    grep -E "VmHWM" /proc/$app/status > "$OUT/$NAME-rss.txt" || true
    xdotool key ctrl+q
    for _ in $(seq 120); do kill -0 $app 2>/dev/null || break; sleep 0.5; done
    kill $app 2>/dev/null || true
  '
}

# 1. Scrolling the grid of 10,000 thumbnails (ONLY=training skips it).
if [ "${ONLY:-}" != training ]; then
export ACTIONS='
  sleep 8
  import -window root "$OUT/labels-top.png"
  xdotool mousemove 400 400
  for i in $(seq 300); do xdotool click 5; sleep 0.05; done
  import -window root "$OUT/labels-scrolled.png"
  for i in $(seq 150); do xdotool click 4; sleep 0.05; done
'
window labels --label "$out/tiles"
fi

# 2. Training: the CLI's run, then the same configuration in the panel.
pairs="$out/pairs"
if [ ! -f "$pairs/pairs.csv" ]; then
  $bin dataset dmsl --folder "$out/tiles@20" --field-um 64 --out "$pairs" --max-per-region 1 >/dev/null
fi
# The CLI's run is the baseline (kept between invocations: delete run-cli to redo it).
if [ ! -f "$out/run-cli/state.json" ]; then
  rm -rf "$out/run-cli"
  $bin train dmsl --data "$pairs/pairs.csv" --run "$out/run-cli" --arch resnet18 --epochs "$epochs" \
    --batch 8 --steps-per-epoch "$steps" --device cpu 2>/dev/null | tail -1
fi
panel_run() { # panel_run NAME SECONDS: the CLI run's configuration trained from the panel; with
              # SECONDS, the window quits after that long, else when the run's report is written
  rm -rf "$out/run-$1"
  mkdir -p "$out/run-$1"
  cp "$out/run-cli/config.json" "$out/run-cli/run.json" "$out/run-$1/"
  export RUN="$out/run-$1" LIMIT="${2:-}"
  export ACTIONS='
    sleep 20
    import -window root "$OUT/$NAME-running.png"
    if [ -n "$LIMIT" ]; then
      sleep "$LIMIT"
    else
      for _ in $(seq 2400); do [ -f "$RUN/report.json" ] && break; sleep 0.5; done
      sleep 2
    fi
    import -window root "$OUT/$NAME-end.png"
  '
  window "$1" --train-run "$RUN"
}
panel_run training 90
REPAINT="" panel_run training-idle

python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
def rate(run):
    lines = [json.loads(l) for l in open(os.path.join(out, run, "log.jsonl")) if l.strip()]
    return sum(l["pairs_per_second"] for l in lines) / len(lines), len(lines)
cli, n_cli = rate("run-cli")
idle, n_idle = rate("run-training-idle")
def rate_if_any(run):
    # The continuous-repaint run stops after a fixed time, possibly before its first epoch ends.
    try:
        return rate(run)
    except (FileNotFoundError, ZeroDivisionError):
        return None, 0
busy, n_busy = rate_if_any("run-training")
for name in ("labels", "training"):
    f = json.load(open(os.path.join(out, f"{name}-frames.json")))
    print(f"{name}: {f['frames']} frames, CPU p50 {f['cpu_p50_ms']:.1f} ms p99 {f['cpu_p99_ms']:.1f} ms, "
          f"interval p50 {f['interval_p50_ms']:.1f} ms p99 {f['interval_p99_ms']:.1f} ms")
print(f"training throughput, CLI: {cli:.2f} pairs/s ({n_cli} epochs)")
print(f"  panel, window repainting on events: {idle:.2f} pairs/s: x{idle / cli:.3f} of the CLI")
if busy:
    print(f"  panel, window repainting continuously: {busy:.2f} pairs/s: x{busy / cli:.3f} of the CLI")
else:
    print("  panel, window repainting continuously: no epoch finished within the window's time")
PY
echo "screenshots in $out"
