#!/usr/bin/env bash
# The DMSL comparison of docs/dmsl-bach.md on BACH: one branch at the high magnification, one at
# the low, both without SIM (MM) and DMSL (SIM + weighted fusion), in 5-fold cross-validation by
# image (stratified by class; the folds are the same for every mode), for 5x + 20x and 10x + 20x.
# Then the table: accuracy, macro F1, macro AUC and tumour-vs-non-tumour AUC, per field and per
# image, mean ± sd over folds (scripts/dmsl-cv.py).
#
# BACH is CC BY-NC-ND: its pairs, the frozen-feature caches and every model trained here stay in
# OUT and the cache folder, never in the repository.
#
#   scripts/dmsl-comparison.sh [OUT]        (default /tmp/histolens-dmsl-bach)
#   env: BACH (../shared/data/bach), ARCHS (efficientnet-lite0), PAIRS ("5 10"), MODES
#        ("high low mm sim"), EPOCHS (6), FOLDS (5), HISTOLENS (target/release/histolens)
#
# EfficientNet-Lite0 starts from ImageNet with all but its last block frozen and cached; the other
# backbones have no ImageNet weights here and train whole from random (days on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/histolens-dmsl-bach}
BACH=${BACH:-../shared/data/bach}
HL=${HISTOLENS:-target/release/histolens}
WEIGHTS=${WEIGHTS:-../shared/data/weights/efficientnet-lite0-imagenet.safetensors}
[ -x "$HL" ] || cargo build --release
for arch in ${ARCHS:-efficientnet-lite0}; do
    case $arch in
        inception-v3) px=299 ;;
        *) px=224 ;;
    esac
    case $arch in
        efficientnet-lite0) start=(--start "imagenet:$WEIGHTS" --freeze all-but-last-block --cache-frozen) ;;
        *) start=(--start random --freeze none) ;;
    esac
    for low in ${PAIRS:-5 10}; do
        data=$OUT/pairs-$low+20x-${px}px
        if [ ! -f "$data/pairs.csv" ]; then
            "$HL" dataset dmsl --folder "$BACH@0.42um" --pixel-aspect 0.75 --high 20 --low "$low" \
                --field-px "$px" --splits 1,0,0 --out "$data"
        fi
        for mode in ${MODES:-high low mm sim}; do
            "$HL" train dmsl --data "$data/pairs.csv" --run "$OUT/runs/$arch-$low+20x-$mode" \
                --arch "$arch" "${start[@]}" --mode "$mode" --folds "${FOLDS:-5}" \
                --epochs "${EPOCHS:-6}" --batch 32 --lr 1e-3
        done
    done
done
python3 scripts/dmsl-cv.py --markdown "$OUT"/runs/*
