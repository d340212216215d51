#!/usr/bin/env bash
# End-to-end: the release binary in a real window under Xvfb on software Vulkan (lavapipe).
# Opens a slide, zooms with the wheel and keys, pans by dragging at several zoom levels, takes
# screenshots, and writes frame-time percentiles. Usage: packaging/e2e-window.sh [SLIDE] [OUT_DIR]
# HEATMAP=1 computes the DMSL heatmap while panning (frame times then measure the window under that
# load); GRADCAM=1 has Grad-CAM follow the view (maps recomputed as it moves, one laid over the slide);
# MPP=X calibrates a slide whose metadata has no µm/px (e.g. the TCGA slide in ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
slide=${1:-assets/samples/CMU-1-Small-Region.svs}
out=${2:-target/e2e}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --locked
export XDG_RUNTIME_DIR; XDG_RUNTIME_DIR=$(mktemp -d); chmod 700 "$XDG_RUNTIME_DIR"
export HISTOLENS_DATA_DIR="$out/data"
mkdir -p "$HISTOLENS_DATA_DIR"
if [ -n "${HEATMAP:-}" ]; then
  # A fresh link: the heatmap's sidecar goes beside it (not beside the original), and none is reused.
  rm -rf "$out/slide"; mkdir -p "$out/slide"; ln -s "$(realpath "$slide")" "$out/slide/"
  slide="$out/slide/$(basename "$slide")"
fi
if [ -n "${MPP:-}" ]; then
  printf '{"%s": {"mpp": %s, "objective_power": null}}\n' "$(realpath "$slide")" "$MPP" > "$HISTOLENS_DATA_DIR/calibrations.json"
fi
extra=""
[ -n "${HEATMAP:-}" ] && extra="--heatmap"
[ -n "${GRADCAM:-}" ] && extra="$extra --gradcam"
export SLIDE="$slide" OUT="$out" EXTRA="$extra"
xvfb-run -a -s "-screen 0 1280x800x24" bash -euo pipefail -c '
  RUST_LOG=${RUST_LOG:-warn,histolens=info} ./target/release/histolens --cache-mb 512 --continuous-repaint --frame-stats "$OUT/frames.json" $EXTRA "$SLIDE" >"$OUT/app.log" 2>&1 &
  app=$!
  source packaging/window-lib.sh
  wait_for_window "$OUT/app.log"
  sleep 4
  import -window root "$OUT/01-open.png"
  # Zoom in with the wheel around a point on the tissue, then pan by dragging, at three zoom levels.
  cx=500; cy=420
  shot=2
  for zoom in 1 2 3; do
    xdotool mousemove $cx $cy
    for _ in $(seq 6); do xdotool click 4; sleep 0.05; done
    sleep 1.5
    import -window root "$OUT/0${shot}-zoom${zoom}.png"; shot=$((shot+1))
    # Drag the content up and to the left: the view moves down and right across the tissue.
    xdotool mousemove $cx $cy mousedown 1
    for _ in $(seq 50); do xdotool mousemove_relative -- -5 -3; sleep 0.016; done
    xdotool mouseup 1
    sleep 1.5
  done
  import -window root "$OUT/0${shot}-panned.png"; shot=$((shot+1))
  # Keyboard: zoom out twice, pan right, fit.
  xdotool key minus minus Right Right
  sleep 1
  import -window root "$OUT/0${shot}-keys.png"; shot=$((shot+1))
  xdotool key f
  sleep 1
  import -window root "$OUT/0${shot}-fit.png"
  grep -E "VmHWM|VmRSS" /proc/$app/status > "$OUT/rss.txt" || true
  xdotool key ctrl+q
  for _ in $(seq 40); do kill -0 $app 2>/dev/null || break; sleep 0.25; done
  kill $app 2>/dev/null || true
'
echo "screenshots and frames.json in $out"
cat "$out/frames.json" 2>/dev/null || echo "(no frame statistics written)"
cat "$out/rss.txt" 2>/dev/null || true
