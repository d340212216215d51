#!/usr/bin/env python3
"""Where DMSL's Grad-CAM maps fall on held-out BACH images, measured instead of shown (BACH is
CC BY-NC-ND: its crops cannot be committed). For each image: `histolens gradcam` at both depths of
both branches (the central field at the model's scale, the class the model gives it), then, per map,
the share of its mass on tissue and on nuclei against the share of the field they cover. A ratio
above 1 means the map seeks them out.

Tissue: not glass (glass = mean RGB above 200 and saturation below 0.10, as src/data/tissue.rs).
Nuclei: hematoxylin-dark pixels (mean RGB below 130 and blue above red).

    scripts/dmsl-gradcam.py MODEL OUT IMAGE... [--mpp 0.42 --pixel-aspect 0.75]
Needs numpy and Pillow (e.g. the PyTorch virtual environment of benches/training.sh).
"""
import argparse
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image


def masks(field):
    rgb = field.astype(np.float32)
    mean = rgb.mean(axis=2)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0)
    glass = (mean > 200) & (sat < 0.10)
    nuclei = (mean < 130) & (rgb[..., 2] > rgb[..., 0])
    return ~glass, nuclei


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--mpp", default="0.42")
    ap.add_argument("--pixel-aspect", default="0.75")
    ap.add_argument("--histolens", default="target/release/histolens")
    args = ap.parse_args()
    rows = []
    for image in args.images:
        out = pathlib.Path(args.out) / pathlib.Path(image).stem
        done = subprocess.run(
            [args.histolens, "gradcam", image, "--model", args.model, "--mpp", args.mpp,
             "--pixel-aspect", args.pixel_aspect, "--out", str(out)],
            capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr)
        predicted = done.stdout.split("\n")[0].split()[1]
        truth = pathlib.Path(image).parent.name
        for field_png in sorted(out.glob("*x-field.png")):
            m = field_png.name.split("-")[0]
            field = np.asarray(Image.open(field_png).convert("RGB"))
            tissue, nuclei = masks(field)
            for depth in ("low", "high"):
                cam = np.load(out / f"{m}-{depth}.npy")
                total = cam.sum() or 1.0
                row = {
                    "image": pathlib.Path(image).name, "class": truth, "predicted": predicted,
                    "map": f"{m} {depth}",
                    "tissue": (cam[tissue].sum() / total, tissue.mean()),
                    "nuclei": (cam[nuclei].sum() / total, nuclei.mean()),
                    "top10": np.sort(cam.ravel())[::-1][: cam.size // 10].sum() / total,
                }
                rows.append(row)
    print("| image | class | predicted | map | mass on tissue (area) | mass on nuclei (area) | nuclei enrichment | mass in top 10% |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        (mt, at), (mn, an) = r["tissue"], r["nuclei"]
        enrich = mn / an if an > 0 else float("nan")
        print(f"| {r['image']} | {r['class']} | {r['predicted']} | {r['map']} | {mt:.2f} ({at:.2f}) | "
              f"{mn:.2f} ({an:.2f}) | {enrich:.2f} | {r['top10']:.2f} |")
    # Per map: the mean nuclei enrichment and tissue share over the images.
    print()
    for name in sorted({r["map"] for r in rows}):
        sel = [r for r in rows if r["map"] == name]
        e = [r["nuclei"][0] / r["nuclei"][1] for r in sel if r["nuclei"][1] > 0]
        t = [r["tissue"][0] for r in sel]
        print(f"{name}: mean nuclei enrichment {np.mean(e):.2f}, mean mass on tissue {np.mean(t):.2f} over {len(sel)} images")


if __name__ == "__main__":
    main()
