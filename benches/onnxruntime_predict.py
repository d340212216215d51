#!/usr/bin/env python3
"""Baseline for `histolens bench predict`: the same magnification pipeline in Python and onnxruntime.

Each file is decoded with Pillow; its central region (at most 4096 px a side) is padded with white to
the model's input size if smaller, cut into the same centred grid of crops, each scored for background
with the same tissue rule (bright and unsaturated = glass), and up to `max_crops` crops with the least
background are normalised as histolens does and run through the whole Hagnifinder model (backbone,
global average pool, head with the constant m) built as an ONNX graph from the same safetensors weights
(tests/parity/onnx_parity.py). The estimate is the median over the crops.

`histolens bench predict --save-dir DIR` writes DIR/predict.json (model, files, histolens' crop
positions and predictions); this script times the same work, checks that its crops and predictions agree
with histolens' (within --tol relative for lossless files, 10 --tol for JPEG files, whose decoders differ;
printed on stderr, exit status 1 when they do not), and prints its timings as JSON.

usage: onnxruntime_predict.py DIR THREADS [--tol 1e-3] [--list]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "parity"))
import onnx_parity as op  # noqa: E402

MAX_SNAPSHOT_SIDE = 4096  # src/magnification/estimate.rs
MAX_BACKGROUND = 0.4
BRIGHT = 200  # src/data/tissue.rs
MAX_GLASS_SATURATION = np.float32(0.10)
LOSSY = (".jpg", ".jpeg", ".webp")


class Pipeline:
    def __init__(self, model_path, threads, max_crops):
        meta = json.loads(op.read_safetensors_metadata(model_path)["histolens"])
        if meta["task"] != "magnification":
            sys.exit(f"{model_path} is not a magnification model")
        self.size = int(meta["input_size"][0])
        self.max_crops = max_crops
        self.log2 = meta["constants"].get("target_log2", 0.0) > 0.5
        # As src/data/tensor.rs, in f32: p * (1 / (255 std)) - mean / std.
        mean = np.array(meta["normalization"]["mean"], dtype=np.float32)
        std = np.array(meta["normalization"]["std"], dtype=np.float32)
        self.scale = np.float32(1.0) / (np.float32(255.0) * std)
        self.shift = mean / std
        t0 = time.perf_counter()
        model = op.hagnifinder_model(op.read_safetensors(model_path), meta["arch"], self.size,
                                     meta["constants"]["asm_m"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.session_seconds = time.perf_counter() - t0

    @staticmethod
    def decode(path):
        """The file's pixels (H, W, 3 or 4) in its central region, as estimate_snapshot reads it."""
        im = Image.open(path)
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA")
        a = np.asarray(im)
        h, w = a.shape[:2]
        rw, rh = min(w, MAX_SNAPSHOT_SIDE), min(h, MAX_SNAPSHOT_SIDE)
        x0, y0 = (w - rw) // 2, (h - rh) // 2
        return a[y0:y0 + rh, x0:x0 + rw], [x0, y0, rw, rh]

    def crops(self, a):
        """estimate_image's crops: (N, size, size, 3) uint8 and their corners in the padded region."""
        size = self.size
        if a.shape[2] == 4:  # over white, as data::augment::to_rgb
            al = a[..., 3:4].astype(np.uint32)
            a = ((a[..., :3].astype(np.uint32) * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
        h, w = a.shape[:2]
        if w < size or h < size:
            ow, oh = max(w, size), max(h, size)
            out = np.full((oh, ow, 3), 255, dtype=np.uint8)
            out[(oh - h) // 2:(oh - h) // 2 + h, (ow - w) // 2:(ow - w) // 2 + w] = a
            a, h, w = out, oh, ow
        nx, ny = w // size, h // size
        ox, oy = (w - nx * size) // 2, (h - ny * size) // 2
        grid = a[oy:oy + ny * size, ox:ox + nx * size]
        r, g, b = grid[..., 0], grid[..., 1], grid[..., 2]
        mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
        bright = r.astype(np.uint16) + g + b > 3 * BRIGHT + 2  # (r + g + b) / 3 > BRIGHT in integers
        # Saturation in f32 as histolens; a dark pixel (max 0) is not bright, whatever its saturation.
        sat = (mx - mn).astype(np.float32) / np.maximum(mx, 1).astype(np.float32)
        background = bright & (sat < MAX_GLASS_SATURATION)
        frac = background.reshape(ny, size, nx, size).sum(axis=(1, 3)).ravel() / float(size * size)
        order = np.argsort(frac, kind="stable")
        on_tissue = int((frac <= MAX_BACKGROUND).sum())
        take = min(len(order), 3) if on_tissue == 0 else min(on_tissue, max(self.max_crops, 1))
        cells = [[ox + int(k % nx) * size, oy + int(k // nx) * size] for k in order[:take]]
        return np.stack([a[y:y + size, x:x + size] for x, y in cells]), cells, [w, h]

    def model(self, crops):
        x = crops.astype(np.float32) * self.scale - self.shift
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        (out,) = self.sess.run(None, {"input": x})
        out = out.astype(np.float64)
        return np.exp2(out) if self.log2 else out

    def run(self, path):
        """(predictions, cells, padded size, region, [decode, crops, model] seconds)."""
        t0 = time.perf_counter()
        a, region = self.decode(path)
        t1 = time.perf_counter()
        crops, cells, padded = self.crops(a)
        t2 = time.perf_counter()
        predictions = self.model(crops)
        magnification = median(predictions)
        t3 = time.perf_counter()
        return predictions, magnification, cells, padded, region, [t1 - t0, t2 - t1, t3 - t2]


def median(v):
    v = sorted(x for x in v if np.isfinite(x))
    if not v:
        return float("nan")
    pos = 0.5 * (len(v) - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("threads", type=int)
    ap.add_argument("--tol", type=float, default=1e-3, help="max |a - b| / max |b| of a file's crop predictions")
    ap.add_argument("--list", action="store_true", help="print every file's estimates")
    a = ap.parse_args()
    with open(os.path.join(a.dir, "predict.json")) as f:
        saved = json.load(f)
    p = Pipeline(saved["model"], a.threads, saved["max_crops"])
    log = lambda s: print(s, file=sys.stderr)

    files = [f for f in saved["files"] if f["kind"] == "image"]
    skipped = len(saved["files"]) - len(files)
    if skipped:
        log(f"onnxruntime baseline: {skipped} whole slide(s) skipped (Pillow reads snapshots only)")

    # Agreement, one pass (which also warms up). Lossless files must give the same crops and predictions
    # within --tol; JPEG files the same crops and predictions within 10 --tol, since Pillow's JPEG decoder
    # and histolens' differ by a grey level here and there.
    ok, worst, disagree = 0, {False: 0.0, True: 0.0}, []
    counts = {False: 0, True: 0}
    for f in files:
        name = os.path.relpath(f["path"])
        try:
            preds, mag, cells, padded, region, _ = p.run(f["path"])
        except Exception as e:  # noqa: BLE001 (a file histolens also fails on is not a disagreement)
            if f["error"] is None:
                disagree.append(f"{name}: onnxruntime baseline failed ({e}), histolens read it")
            continue
        if f["error"] is not None:
            disagree.append(f"{name}: histolens failed ({f['error']}), the baseline read it")
            continue
        theirs = np.array(f["predictions"])
        same_crops = cells == f["cells"] and padded == f["padded"] and region == f["region"]
        rel = float(np.abs(preds - theirs).max() / max(np.abs(theirs).max(), 1e-12)) \
            if len(preds) == len(theirs) else float("inf")
        lossy = f["path"].lower().endswith(LOSSY)
        counts[lossy] += 1
        if same_crops and rel <= (10 * a.tol if lossy else a.tol):
            ok += 1
            worst[lossy] = max(worst[lossy], rel)
        else:
            disagree.append(f"{name}: crops {'agree' if same_crops else 'DIFFER'}, predictions differ by "
                            f"{rel:.1e} relative (histolens {f['magnification']:.4f}x, onnxruntime {mag:.4f}x)")
        if a.list or f["path"] == saved["first"]:
            log(f"  {name}: histolens {f['magnification']:.4f}x, onnxruntime {mag:.4f}x over {len(preds)} crop(s)"
                f"{'' if same_crops else ' (DIFFERENT crops)'}, crop predictions differ by {rel:.1e} relative"
                f"{' (JPEG)' if lossy else ''}")
    log(f"  agreement, {a.threads} thread(s): {ok} of {len(files)} file(s) with the same crops and predictions; "
        f"largest difference {worst[False]:.1e} relative over {counts[False]} lossless file(s), "
        f"{worst[True]:.1e} over {counts[True]} JPEG file(s) (two JPEG decoders)")
    for d in disagree:
        log("  DISAGREE " + d)

    # (a) The first file: one warm-up, then the median of `iters` runs.
    first = saved["first"]
    p.run(first)
    runs = [p.run(first) for _ in range(saved["iters"])]
    parts = np.array([r[5] for r in runs])
    # (b) Every file, `passes` timed passes (the agreement pass warmed up).
    pass_seconds, failed, crops = [], 0, 0
    for _ in range(saved["passes"]):
        failed, crops = 0, 0
        t0 = time.perf_counter()
        for f in files:
            try:
                crops += len(p.run(f["path"])[0])
            except Exception:  # noqa: BLE001 (as histolens, a file that cannot be read counts as failed)
                failed += 1
        pass_seconds.append(time.perf_counter() - t0)
    seconds = float(np.median(pass_seconds))
    print(json.dumps({
        "threads": a.threads,
        "session_seconds": p.session_seconds,
        "first": {
            "path": first,
            "iters": saved["iters"],
            "crops": len(runs[0][0]),
            "magnification": runs[0][1],
            "end_to_end_seconds": float(np.median(parts.sum(axis=1))),
            "decode_seconds": float(np.median(parts[:, 0])),
            "crops_seconds": float(np.median(parts[:, 1])),
            "model_seconds": float(np.median(parts[:, 2])),
        },
        "all": {
            "files": len(files),
            "failed": failed,
            "skipped_slides": skipped,
            "crops": crops,
            "passes": saved["passes"],
            "seconds": seconds,
            "predictions_per_second": (len(files) - failed) / seconds,
            "crops_per_second": crops / seconds,
        },
        "agreement": {"files": len(files), "agree": ok, "max_relative_difference_lossless": worst[False],
                      "max_relative_difference_jpeg": worst[True], "disagree": disagree},
    }))
    sys.exit(1 if disagree else 0)


if __name__ == "__main__":
    main()
