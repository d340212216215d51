#!/usr/bin/env bash
# Builds the Debian package (target/debian/histolens_*.deb) with cargo-deb: the release binary, the
# bundled models and sample, the desktop entry, icon and MIME types (metadata in Cargo.toml).
# Install it with: sudo apt install ./target/debian/histolens_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release --locked
cargo deb --no-build -p histolens
ls -l target/debian/*.deb
