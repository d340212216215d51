#!/usr/bin/env python3
"""Baseline for `histolens bench tiles`: openslide-python's DeepZoomGenerator serving the same 256 px
tiles (no overlap) of every native level of the same slide, cold (fresh handle) then warm."""
import json
import sys
import time

import openslide
from openslide.deepzoom import DeepZoomGenerator


def run(path):
    slide = openslide.OpenSlide(path)
    dz = DeepZoomGenerator(slide, tile_size=256, overlap=0, limit_bounds=False)
    # DeepZoom levels whose size equals a native level: the same tiles histolens reads.
    native = [tuple(d) for d in slide.level_dimensions]
    levels = [z for z, dims in enumerate(dz.level_dimensions) if tuple(dims) in native]
    addresses = [(z, c, r) for z in levels for r in range(dz.level_tiles[z][1]) for c in range(dz.level_tiles[z][0])]
    t0 = time.perf_counter()
    for z, c, r in addresses:
        dz.get_tile(z, (c, r))
    cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    for z, c, r in addresses:
        dz.get_tile(z, (c, r))
    warm = time.perf_counter() - t1
    return {
        "tiles": len(addresses),
        "native_levels_matched": len(levels),
        "cold_seconds": cold,
        "warm_seconds": warm,
        "cold_tiles_per_second": len(addresses) / cold,
        "warm_tiles_per_second": len(addresses) / warm,
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1]), indent=2))
