#!/usr/bin/env bash
# Builds a large tiled pyramidal TIFF (about 60000 x 60000 px) from the bundled CC0 sample with vips,
# for the memory and throughput benchmarks. Never commit the result. Usage: benches/make-large-pyramid.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-data/large-pyramid.tiff}
mkdir -p "$(dirname "$out")"
[ -f "$out" ] && { echo "$out exists"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
vips openslideload assets/samples/CMU-1-Small-Region.svs "$tmp/base.v"
vips flatten "$tmp/base.v" "$tmp/rgb.v" --background 255
vips replicate "$tmp/rgb.v" "$tmp/big.v" 28 21
vips crop "$tmp/big.v" "$tmp/crop.v" 0 0 60000 60000
vips tiffsave "$tmp/crop.v" "$out" --tile --tile-width 256 --tile-height 256 --pyramid \
  --compression jpeg --Q 85 --bigtiff --xres 2004.008 --yres 2004.008 --resunit cm
ls -l "$out"
