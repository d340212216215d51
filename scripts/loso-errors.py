#!/usr/bin/env python3
"""Where a leave-one-source-out table's errors are: from OUT/loso.json of scripts/magnification-loso.sh,
the share within ±25% of the network, the ruler and the fused estimate by true pixel size, the best a
per-image choice between network and ruler could do (an oracle: an upper bound, not a method), and the
fused share for other weights of the ruler (for reading only: a weight picked on this table would be
tuned to its held-out sources).
    python3 scripts/loso-errors.py OUT/loso.json"""
import json
import sys

import numpy as np


def within(e):
    return float(np.mean(np.abs(2.0 ** e - 1) <= 0.25)) if len(e) else float("nan")


images = json.load(open(sys.argv[1]))["images"]
t = np.log2([i["true_mpp"] for i in images])
n = np.log2([i["network_mpp"] for i in images])
f = np.log2([i["fused_mpp"] for i in images])
r = np.array([np.log2(i["ruler_mpp"]) if i["ruler_mpp"] else np.nan for i in images])
read = ~np.isnan(r)
print(f"{len(t)} images; within ±25%: network {within(n - t):.1%}, fused {within(f - t):.1%}; "
      f"the ruler reads {read.mean():.0%} of them")
oracle = np.where(read & (np.abs(r - t) < np.abs(n - t)), r, n)
print(f"oracle (the better of network and ruler for each image): {within(oracle - t):.1%}")
print("ruler weight in log space -> within ±25%, median |log2 error|:")
for w in [0.0, 0.3, 0.5, 0.61, 0.7, 1.0]:
    e = np.where(read, w * r + (1 - w) * n, n) - t
    print(f"  {w:.2f}: {within(e):.1%} {np.median(np.abs(e)):.3f}")
print("by true µm/px: n, network median signed error (octaves) and within ±25%, ruler the same")
for lo in np.arange(-2.5, 2.0, 0.5):
    s = (t >= lo) & (t < lo + 0.5)
    if not s.any():
        continue
    rs = s & read
    rerr = f"{np.median((r - t)[rs]):+.2f} {within((r - t)[rs]):4.0%}" if rs.any() else "  -"
    print(f"  {2 ** lo:.2f}-{2 ** (lo + 0.5):.2f} {s.sum():4d}  network {np.median((n - t)[s]):+.2f} "
          f"{within((n - t)[s]):4.0%}  ruler {rerr} (reads {rs.sum() / s.sum():.0%})")
