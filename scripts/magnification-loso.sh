#!/usr/bin/env bash
# The magnification model's leave-one-source-out table, and the model trained on every shippable
# source, from the real data in ../shared/data (see its README: BACH is evaluation only).
#   scripts/magnification-loso.sh [OUT]       (default target/loso; about 15 minutes on 2 cores)
# Builds OUT/data (continuous pixel sizes, snapshot degradations, unlabelled pairs for the
# equivariance loss), runs `histolens eval magnification --loso` into OUT/folds and writes
# OUT/loso.{txt,csv,json}. The fold trained without BACH on every other source is the model to ship:
# OUT/folds/fold-bach/last.safetensors (packaging/export-model.py makes it f16).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/loso}
data=../shared/data
[ -d "$data" ] || { echo "no $data: nothing to evaluate on" >&2; exit 1; }
per_octave=${PER_OCTAVE:-150}
cargo build --release --locked --quiet
h=target/release/histolens
rm -rf "$out/data"
mkdir -p "$out"
# Known pixel size, trainable (CC0 / CC BY / MIT / Apache / BSD / TCGA): one group per dataset.
$h dataset magnification "$data/slides/CMU-1-Small-Region.svs" --group cmu1-aperio \
  --per-octave "$per_octave" --degrade --split train --seed 1 --out "$out/data"
$h dataset magnification "$data/known-mpp" --mpp-table "$data/known-mpp/SOURCES.tsv" \
  --per-octave "$per_octave" --degrade --split train --seed 2 --append --out "$out/data"
# BACH: evaluation only (CC BY-NC-ND), square pixels restored, no degradation added.
$h dataset magnification "$data/bach" --mpp 0.42 --pixel-aspect 0.75 --group bach \
  --per-octave 90 --split test --seed 3 --append --out "$out/data"
# H&E of unknown scale: pairs of one field at two scales, for the scale-equivariance loss.
unl="$out/unlabelled"
rm -rf "$unl"
mkdir -p "$unl"
for f in "$data"/tiles/*.png; do
  case "$(basename "$f")" in *ihc*|no-tissue*|almost-white*) continue ;; esac
  ln -s "$(realpath "$f")" "$unl/"
done
ln -s "$(realpath "$data/images/tiatoolbox-target-he.png")" "$(realpath "$data/images/stardist-he.jpg")" \
  "$(realpath "$data/slides/tcga-cr-7395-01a-01-ts1.svs")" "$unl/"
$h dataset magnification "$unl" --unlabelled --group unlabelled-tcga --per-octave "$per_octave" \
  --degrade --split train --seed 4 --append --out "$out/data"
# The large TCGA section as its own group (twice the pairs), and pairs from the large labelled sources
# in their own group, so that leave-one-source-out leaves them out with their source.
$h dataset magnification "$data/slides/tcga-cr-7395-01a-01-ts1.svs" --unlabelled --group unlabelled-tcga-slide \
  --per-octave $((2 * per_octave)) --degrade --split train --seed 5 --append --out "$out/data"
$h dataset magnification "$data/slides/CMU-1-Small-Region.svs" --unlabelled --group cmu1-aperio \
  --per-octave "$per_octave" --degrade --split train --seed 6 --append --out "$out/data"
for pair in "openslide-os1-hamamatsu/OS-1-detail.png openslide-os1" \
  "instanseg-he-example/HE_example.tif instanseg" "pcam-montage/pcam_readme_montage.jpg pcam"; do
  set -- $pair
  $h dataset magnification "$data/known-mpp/$1" --unlabelled --group "$2" --per-octave "$per_octave" \
    --degrade --split train --seed 7 --append --out "$out/data"
done
$h eval magnification --loso --data "$out/data/manifest.csv" --work "$out/folds" \
  --arch efficientnet-lite0 --start "imagenet:$data/weights/efficientnet-lite0-imagenet.safetensors" \
  --freeze-backbone --target log2 --multiscale --weight-decay 1.0 --epochs-asm "${EPOCHS_ASM:-30}" --epochs-constant "${EPOCHS_CONSTANT:-15}" \
  --lr "${LR:-1e-3}" --batch 64 ${EXTRA:-} --json "$out/loso.json" --csv "$out/loso.csv" | tee "$out/loso.txt"
