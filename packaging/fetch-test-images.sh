#!/usr/bin/env bash
# Extracts scikit-image's bundled photographs chelsea.png (a cat) and coffee.png (espresso) from the
# PyPI wheel into target/test-images, for the ImageNet sanity test. Skips quietly when PyPI is unreachable.
set -uo pipefail
cd "$(dirname "$0")/.."
out=target/test-images
[ -f "$out/chelsea.png" ] && [ -f "$out/coffee.png" ] && exit 0
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "scikit-image==0.26.0" 2>/dev/null; then
  echo "fetch-test-images: scikit-image wheel unavailable; the ImageNet test will be skipped" >&2
  exit 0
fi
python3 - "$tmp" "$out" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/scikit_image-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("chelsea.png", "coffee.png"):
        member = next(m for m in z.namelist() if m.endswith("skimage/data/" + name))
        open(sys.argv[2] + "/" + name, "wb").write(z.read(member))
PY
