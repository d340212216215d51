#!/usr/bin/env bash
# Installs the .deb into a temporary root without a container (dpkg -x) and runs it from there:
# --version, `paths` (the packaged models and sample must be found under that root, not in the source
# tree), `info` and `predict` on the packaged sample, and checks the package's metadata, desktop entry
# and MIME types. Usage: packaging/test-deb.sh [DEB] (default: the newest in target/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(ls -t target/debian/histolens_*.deb | head -n1)}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg -x "$deb" "$root"
echo "package: $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version), $(du -h "$deb" | cut -f1)"
echo "depends: $(dpkg-deb -f "$deb" Depends)"
dpkg-deb -f "$deb" Depends | grep -q libopenslide0 || { echo "FAIL: no dependency on libopenslide0"; exit 1; }
bin="$root/usr/bin/histolens"
export HISTOLENS_DATA_DIR="$root/state"
"$bin" --version
paths=$("$bin" paths)
echo "$paths"
for what in "sample slide" "magnification model" "DMSL demo model"; do
  echo "$paths" | grep "^$what: $root/usr/bin/../share/histolens/" >/dev/null \
    || { echo "FAIL: $what is not the packaged one"; exit 1; }
done
sample="$root/usr/share/histolens/samples/CMU-1-Small-Region.svs"
"$bin" info "$sample" | head -n 5
"$bin" predict "$sample" --crops 4 --device cpu
if command -v desktop-file-validate >/dev/null; then
  desktop-file-validate "$root/usr/share/applications/histolens.desktop"
fi
grep -q "^Exec=histolens %f" "$root/usr/share/applications/histolens.desktop"
test -f "$root/usr/share/icons/hicolor/256x256/apps/histolens.png"
xmllint --noout "$root/usr/share/mime/packages/histolens.xml" 2>/dev/null || python3 -c "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])" "$root/usr/share/mime/packages/histolens.xml"
echo "OK: the package runs from a bare root and finds its own files"
