#!/usr/bin/env bash
# Tile throughput of `histolens bench tiles` against openslide-python's DeepZoomGenerator on the same
# slide and the same tiles, measured in one run; prints the ratios. Usage: [LIMIT=N] benches/tiles.sh [SLIDE...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
slides=("$@")
[ ${#slides[@]} -gt 0 ] || slides=(assets/samples/CMU-1-Small-Region.svs)
for s in "${slides[@]}"; do
  list=$(mktemp)
  ours=$(./target/release/histolens bench tiles --threads 1,2 --json ${LIMIT:+--limit $LIMIT} --tiles-out "$list" "$s")
  base=$(/usr/bin/python3 benches/deepzoom_baseline.py "$s" "$list")
  rm -f "$list"
  python3 - "$s" "$ours" "$base" <<'PY'
import json, sys
name, ours, base = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"== {name}: {base['tiles']} tiles (DeepZoom) / {ours[0]['tiles']} tiles (histolens)")
print(f"DeepZoomGenerator (python3-openslide, 1 thread): cold {base['cold_tiles_per_second']:.0f} tiles/s, warm {base['warm_tiles_per_second']:.0f} tiles/s")
for r in ours:
    print(f"histolens, {r['threads']} loader thread(s): cold {r['cold_tiles_per_second']:.0f} tiles/s "
          f"(x{r['cold_tiles_per_second']/base['cold_tiles_per_second']:.2f}), warm {r['warm_tiles_per_second']:.0f} tiles/s "
          f"(x{r['warm_tiles_per_second']/base['warm_tiles_per_second']:.1f})")
PY
done
