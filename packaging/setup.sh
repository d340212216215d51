#!/usr/bin/env bash
# Installs the system packages histolens needs to build, test and run on Debian/Ubuntu.
#   libopenslide-dev + libclang-dev + pkg-config : openslide-rs (bindgen) against OpenSlide 3.4.1
#   mesa-vulkan-drivers                          : software Vulkan (lavapipe) for wgpu without a GPU
#   libxkbcommon-x11-0 libwayland-client0         : loaded at run time by winit
#   xvfb xdotool imagemagick                      : the end-to-end window test (packaging/e2e-window.sh)
#   libvips-tools python3-openslide               : benchmarks (large pyramid, DeepZoom baseline)
set -euo pipefail
pkgs=(
  build-essential pkg-config libclang-dev libopenslide-dev openslide-tools
  mesa-vulkan-drivers libvulkan1 libxkbcommon-x11-0 libwayland-client0 libx11-xcb1 libxcursor1 libxi6 libxrandr2
  xvfb xauth xdotool imagemagick libvips-tools python3-openslide
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust 1.95 or newer from https://rustup.rs" >&2
  exit 1
fi
# Photographs for the ImageNet sanity test of the model zoo (skipped when PyPI is unreachable).
bash "$(dirname "$0")/fetch-test-images.sh"
# The independent reference engine for parity tests and benchmarks (tests skip where this cannot install);
# Pillow decodes images for the predict benchmark's baseline pipeline.
python3 -c "import onnx, onnxruntime, numpy, PIL" 2>/dev/null \
  || python3 -m pip install --quiet onnx onnxruntime numpy pillow 2>/dev/null \
  || echo "setup: onnx/onnxruntime not installed; the parity test will be skipped" >&2
