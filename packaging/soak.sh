#!/usr/bin/env bash
# Soak test, run by hand (not in CI): the release app in a real window under Xvfb (software Vulkan) for
# MINUTES of scripted panning and zooming on a large slide while the DMSL heatmap computes and Grad-CAM
# follows the view. Samples the process's RSS every 10 s (rss.csv), and reports its peak and its growth
# after the first five minutes against the tile cache budget, the frame-time percentiles, and every
# error or panic the app logged, and the app's own minute-by-minute RSS against its tile caches' fill.
# Usage: [MINUTES=30] [CACHE_MB=512] [MPP=X] [WORK="--heatmap --gradcam"] packaging/soak.sh [SLIDE] [OUT_DIR]
# (WORK: the background work; "" soaks the viewer alone, "--heatmap" the heatmap alone)
# (default slide: bench-data/large-pyramid.tiff from benches/make-large-pyramid.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
slide=${1:-bench-data/large-pyramid.tiff}
out=${2:-target/soak}
minutes=${MINUTES:-30}
cache_mb=${CACHE_MB:-512}
[ -f "$slide" ] || { echo "no slide at $slide (make one with benches/make-large-pyramid.sh)"; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --locked -q
export XDG_RUNTIME_DIR; XDG_RUNTIME_DIR=$(mktemp -d); chmod 700 "$XDG_RUNTIME_DIR"
export HISTOLENS_DATA_DIR="$out/data"
rm -rf "$HISTOLENS_DATA_DIR" "$out/slide"; mkdir -p "$HISTOLENS_DATA_DIR" "$out/slide"
# A fresh link, so that the heatmap's sidecar goes beside it and none is reused.
ln -s "$(realpath "$slide")" "$out/slide/"
slide="$out/slide/$(basename "$slide")"
if [ -n "${MPP:-}" ]; then
  printf '{"%s": {"mpp": %s, "objective_power": null}}\n' "$(realpath "$slide")" "$MPP" > "$HISTOLENS_DATA_DIR/calibrations.json"
fi
export SLIDE="$slide" OUT="$out" SECONDS_TOTAL=$((minutes * 60)) CACHE_MB="$cache_mb" WORK="${WORK---heatmap --gradcam}"
xvfb-run -a -s "-screen 0 1280x800x24" bash -euo pipefail -c '
  RUST_LOG=warn,histolens=info ./target/release/histolens --cache-mb "$CACHE_MB" --continuous-repaint \
    --frame-stats "$OUT/frames.json" $WORK "$SLIDE" >"$OUT/app.log" 2>&1 &
  app=$!
  source packaging/window-lib.sh
  wait_for_window "$OUT/app.log"
  echo "seconds,rss_kb" > "$OUT/rss.csv"
  start=$(date +%s); next_sample=0; round=0
  while :; do
    now=$(( $(date +%s) - start ))
    [ "$now" -ge "$SECONDS_TOTAL" ] && break
    kill -0 $app 2>/dev/null || { echo "the app exited after ${now} s"; break; }
    if [ "$now" -ge "$next_sample" ]; then
      echo "$now,$(awk "/VmRSS/ {print \$2}" /proc/$app/status)" >> "$OUT/rss.csv"
      next_sample=$((now + 10))
    fi
    # One round: zoom in at a point that moves around the view, pan across, zoom out, sometimes fit.
    round=$((round + 1))
    x=$(( 200 + (round * 137) % 700 )); y=$(( 150 + (round * 89) % 500 ))
    xdotool mousemove $x $y
    for _ in $(seq $(( 2 + round % 5 ))); do xdotool click 4; sleep 0.05; done
    sleep 0.5
    xdotool mousedown 1
    for _ in $(seq 30); do xdotool mousemove_relative -- $(( round % 2 ? 6 : -6 )) $(( round % 3 ? -4 : 4 )); sleep 0.016; done
    xdotool mouseup 1
    sleep 0.5
    for _ in $(seq $(( 2 + round % 5 ))); do xdotool click 5; sleep 0.05; done
    [ $((round % 7)) -eq 0 ] && xdotool key f
    sleep 1
  done
  import -window root "$OUT/end.png"
  xdotool key ctrl+q
  for _ in $(seq 60); do kill -0 $app 2>/dev/null || break; sleep 0.5; done
  kill $app 2>/dev/null || true
'
python3 - "$out" "$cache_mb" <<'PY'
import csv, json, os, sys
out, cache_mb = sys.argv[1], int(sys.argv[2])
rows = [(int(r["seconds"]), int(r["rss_kb"])) for r in csv.DictReader(open(os.path.join(out, "rss.csv"))) if r["rss_kb"]]
peak = max(kb for _, kb in rows) / 1024
after5 = [kb for s, kb in rows if s >= 300]
growth = (after5[-1] - after5[0]) / 1024 if len(after5) > 1 else float("nan")
print(f"{rows[-1][0] / 60:.1f} min, {len(rows)} RSS samples: peak {peak:.0f} MiB (cache budget {cache_mb} MiB), "
      f"growth from minute 5 to the end {growth:+.0f} MiB")
f = json.load(open(os.path.join(out, "frames.json")))
print(f"frames {f['frames']}: CPU p50 {f['cpu_p50_ms']:.1f} ms p99 {f['cpu_p99_ms']:.1f} ms, "
      f"interval p50 {f['interval_p50_ms']:.1f} ms p99 {f['interval_p99_ms']:.1f} ms")
log = open(os.path.join(out, "app.log")).read().splitlines()
bad = [l for l in log if " ERROR " in l or "panicked" in l]
cams = sum("Grad-CAM of" in l for l in log)
print(f"Grad-CAM fields computed: {cams}; errors or panics logged: {len(bad)}")
for l in bad[:10]:
    print("  " + l)
# The app's own once-a-minute memory lines: RSS against how full the tile caches are.
import re
mem = [l.split("memory: ", 1)[1] for l in log if "memory: RSS" in l]
if mem:
    print(f"memory reports ({len(mem)}), first, middle and last:")
    for l in sorted({0, len(mem) // 2, len(mem) - 1}):
        print(f"  minute {l + 1}: {mem[l]}")
    # What is not tile cache: RSS minus decoded tiles minus textures. Bounded memory means this stays
    # level while the caches fill up to their budget.
    margins = []
    for m in mem:
        n = [int(x) for x in re.findall(r"(\d+) (?:of \d+ )?MiB", m)]
        if len(n) == 3:
            margins.append(n[0] - n[1] - n[2])
    if len(margins) > 2:
        later = margins[2:]
        print(f"RSS outside the tile caches from minute 3: {min(later)} to {max(later)} MiB "
              f"(first {later[0]}, last {later[-1]})")
PY
