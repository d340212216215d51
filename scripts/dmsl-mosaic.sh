#!/usr/bin/env bash
# Heatmaps that can be checked: for each fold of a `train dmsl --folds` run, a 3x3 mosaic slide
# (pyramidal TIFF at 0.42 µm/px) of nine of that fold's held-out BACH images (two or three of each
# class), its heatmap from the fold's model, and each cell's majority class against its own
# (`heatmap --check`). Prints the per-cell accuracy over all folds.
#
#   scripts/dmsl-mosaic.sh RUN [OUT]     e.g. RUN=/tmp/histolens-dmsl-bach/runs/efficientnet-lite0-5+20x-sim
#   env: HISTOLENS (target/release/histolens)
#
# BACH is CC BY-NC-ND: the mosaics and heatmaps stay in OUT, never in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$1
OUT=${2:-$RUN/mosaics}
HL=${HISTOLENS:-target/release/histolens}
mkdir -p "$OUT"
for fold in "$RUN"/fold-*; do
    k=$(basename "$fold")
    # Nine held-out images, classes in turn (the sources are paths as the dataset was built).
    mapfile -t images < <(python3 - "$fold/val-predictions.csv" <<'PY'
import csv, sys
by_class = {}
for r in csv.DictReader(open(sys.argv[1])):
    by_class.setdefault(r["class"], [])
    if r["source"] not in by_class[r["class"]]:
        by_class[r["class"]].append(r["source"])
picked, i = [], 0
while len(picked) < 9 and any(i < len(v) for v in by_class.values()):
    for c in sorted(by_class):
        if i < len(by_class[c]) and len(picked) < 9:
            picked.append(by_class[c][i])
    i += 1
print("\n".join(picked))
PY
)
    "$HL" dataset mosaic "${images[@]}" --out "$OUT/$k.tiff" --mpp 0.42 --pixel-aspect 0.75 --cols 3
    "$HL" heatmap "$OUT/$k.tiff" --model "$fold/last.safetensors" --out "$OUT/$k" \
        --check "$OUT/$k.tiff.regions.geojson" | grep -E "^region|regions right"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
checks = [json.load(open(p)) for p in sorted(pathlib.Path(sys.argv[1]).glob("fold-*/check.json"))]
right, total = sum(c["right"] for c in checks), sum(c["total"] for c in checks)
print(f"mosaic cells right: {right} of {total} ({100 * right / max(total, 1):.1f}%) over {len(checks)} folds")
PY
