#!/usr/bin/python3
"""Baseline for `histolens bench tiles`: openslide-python's DeepZoomGenerator serving the same 256 px
tiles (no overlap) of every native level of the same slide (or the tiles listed in a JSON file written
by `histolens bench tiles --tiles-out`), cold (fresh handle) then warm."""
import json
import sys
import time

import openslide
from openslide.deepzoom import DeepZoomGenerator


def run(path, tiles_json=None):
    slide = openslide.OpenSlide(path)
    dz = DeepZoomGenerator(slide, tile_size=256, overlap=0, limit_bounds=False)
    # The DeepZoom level whose size equals each native level: the same tiles histolens reads.
    dz_of = {}
    for level, dims in enumerate(slide.level_dimensions):
        for z, zdims in enumerate(dz.level_dimensions):
            # DeepZoom rounds level sizes up, OpenSlide down (1484 vs 1483): match within a pixel.
            if abs(zdims[0] - dims[0]) <= 1 and abs(zdims[1] - dims[1]) <= 1:
                dz_of[level] = z
    levels = sorted(dz_of.values())
    if tiles_json:
        wanted = json.load(open(tiles_json))
        addresses = [(dz_of[l], c, r) for l, c, r in wanted if l in dz_of]
    else:
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
    print(json.dumps(run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None), indent=2))
