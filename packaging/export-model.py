#!/usr/bin/env python3
"""Exports a histolens checkpoint for bundling: f32 tensors to f16, and the metadata's provenance
fields replaced by the given JSON (data description, notes, metrics). Usage:
    export-model.py IN.safetensors OUT.safetensors PROVENANCE.json
The output is checked by `histolens` on loading like any checkpoint (names, shapes, finiteness)."""
import json
import struct
import sys

import numpy as np

src, dst, prov_path = sys.argv[1:4]
raw = open(src, "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
header = json.loads(raw[8 : 8 + n])
data = raw[8 + n :]
meta = header.pop("__metadata__", {})
hist = json.loads(meta["histolens"])
prov = json.load(open(prov_path))
hist["provenance"].update(prov)
meta["histolens"] = json.dumps(hist)

out_header, chunks, offset = {"__metadata__": meta}, [], 0
for name in sorted(header):
    info = header[name]
    a, b = info["data_offsets"]
    arr = np.frombuffer(data[a:b], dtype={"F32": "<f4", "F16": "<f2"}[info["dtype"]])
    if not np.all(np.isfinite(arr)):
        sys.exit(f"{name} holds NaN/Inf")
    half = arr.astype("<f2")
    if not np.all(np.isfinite(half)):
        sys.exit(f"{name} overflows f16")
    buf = half.tobytes()
    out_header[name] = {"dtype": "F16", "shape": info["shape"], "data_offsets": [offset, offset + len(buf)]}
    chunks.append(buf)
    offset += len(buf)
hjson = json.dumps(out_header, separators=(",", ":")).encode()
hjson += b" " * (-len(hjson) % 8)
with open(dst + ".tmp", "wb") as f:
    f.write(struct.pack("<Q", len(hjson)) + hjson + b"".join(chunks))
import os
os.replace(dst + ".tmp", dst)
print(f"{dst}: {offset / 2**20:.1f} MiB of f16 tensors")
