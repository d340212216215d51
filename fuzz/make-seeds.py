#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora (fuzz/corpus/TARGET/), small files made from the bundled CC0 sample.

Needs vips (libvips-tools), Pillow, numpy and tifffile (pip install tifffile). The seeds are committed;
run this again only to change them. Each snapshot and slide seed starts with the byte that picks the
file's extension in histolens::fuzzing.
"""
import io
import json
import struct
from pathlib import Path

import subprocess
import tempfile

import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
SAMPLE = ROOT.parent / "assets/samples/CMU-1-Small-Region.svs"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def tissue(w, h, x=900, y=1500):
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "crop.png"
        subprocess.run(["vips", "crop", str(SAMPLE), str(png), str(x), str(y), str(w), str(h)], check=True)
        return np.asarray(Image.open(png).convert("RGB"))


def snapshots():
    rgb = Image.fromarray(tissue(32, 24))
    kinds = {0: "png", 1: "jpg", 2: "tif", 3: "bmp", 4: "webp"}
    pil_format = {"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "bmp": "BMP", "webp": "WEBP"}
    for sel, ext in kinds.items():
        buf = io.BytesIO()
        rgb.save(buf, pil_format[ext])
        put("snapshot", f"rgb.{ext}", bytes([sel]) + buf.getvalue())
    # Other channel layouts: grey 16-bit PNG, RGBA PNG, palette PNG, grey JPEG, CMYK JPEG, grey TIFF.
    grey16 = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
    for name, img, sel, fmt in [
        ("grey16.png", grey16, 0, "PNG"),
        ("rgba.png", rgb.convert("RGBA"), 0, "PNG"),
        ("palette.png", rgb.convert("P"), 0, "PNG"),
        ("grey.jpg", rgb.convert("L"), 1, "JPEG"),
        ("cmyk.jpg", rgb.convert("CMYK"), 1, "JPEG"),
        ("grey.tif", rgb.convert("L"), 2, "TIFF"),
    ]:
        buf = io.BytesIO()
        img.save(buf, fmt)
        put("snapshot", name, bytes([sel]) + buf.getvalue())


def tiled_tiff(description, levels, extra=()):
    """A tiled pyramid (zlib tiles of 32 px) with `description` on its first directory, then any
    `extra` stripped images (name, array) as Aperio stores its label and macro."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for i, a in enumerate(levels):
            tw.write(
                a,
                tile=(32, 32),
                compression="zlib",
                photometric="rgb",
                description=description if i == 0 else None,
                resolution=(1e4 / 0.5, 1e4 / 0.5) if i == 0 else None,
                resolutionunit="CENTIMETER" if i == 0 else None,
                metadata=None,
            )
        for name, a in extra:
            tw.write(a, photometric="rgb", description=f"Aperio Image Library v10.0.50\n{name} 32x24", metadata=None)
    return buf.getvalue()


def slides():
    base = tissue(96, 64)
    half = base[::2, ::2].copy()
    aperio = (
        "Aperio Image Library v10.0.50\r\n96x64 [0,0 96x64] (32x32) JPEG/RGB Q=70"
        "|AppMag = 20|MPP = 0.4990|ScanScope ID = SS1234"
    )
    put("slide", "aperio.svs", bytes([0]) + tiled_tiff(aperio, [base, half], [("label", base[:24, :32].copy())]))
    put("slide", "generic.tiff", bytes([1]) + tiled_tiff("generic pyramid", [base, half]))


def label_manifests():
    csv = (
        "path,class,magnification,mpp,group,split\n"
        "images/a.png,tumour,,,patient-1,train\n"
        "images/b.png,stroma,,,patient-2,val\n"
        "images/c.png,,20,0.5,patient-2,\n"
        "/abs/d.jpg,tumour,,,,test\n"
    )
    classes = json.dumps({"classes": ["tumour", "stroma", "glass"]})
    put("label_manifest", "classes.bin", csv.encode() + b"\0" + classes.encode())
    put("label_manifest", "plain.csv", csv.encode())


def safetensors(metadata, tensors):
    """A safetensors file: header length, JSON header (tensors and __metadata__), data."""
    header, data = {}, b""
    for name, arr in tensors:
        raw = arr.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def checkpoints():
    for model in ["hagnifinder", "dmsl-demo"]:
        path = ROOT.parent / f"assets/models/{model}.safetensors"
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        meta = header["__metadata__"]
        # The real header's metadata with two of its tensors, made small: every loader check runs.
        names = sorted(k for k in header if k != "__metadata__")[:2]
        tensors = [(name, np.zeros([min(d, 2) for d in header[name]["shape"]], np.float32)) for name in names]
        put("checkpoint", f"{model}.safetensors", safetensors(meta, tensors))


def run_configs():
    augment = {"flips": True, "max_rotation_deg": 15.0, "stain": 0.05, "brightness": 0.05,
               "blur_probability": 0.1, "jpeg_probability": 0.1}
    magnification = {
        "arch": "efficientnet-lite0", "start": "random", "freeze_backbone": False, "input_size": 224,
        "batch": 8, "epochs_asm": 2, "epochs_constant": 1, "lr": 0.001, "weight_decay": 0.01,
        "patience": 5, "min_lr": 5e-6, "target": "linear", "augment": augment,
        "steps_per_epoch": 4, "seed": 0,
    }
    dmsl = {
        "arch": "resnet18", "mode": "sim", "start": {"checkpoint": "/runs/a/best.safetensors"},
        "freeze": "all-but-last-block", "weights": [0.5, 0.5], "alpha": 0.5, "beta": 0.5, "batch": 8,
        "epochs": 3, "lr": 0.001, "weight_decay": 0.0, "patience": 5, "min_lr": 1e-6,
        "augment": augment, "grey_probability": 0.1, "steps_per_epoch": None, "fold": [1, 5], "seed": 7,
    }
    mag_log = {"epoch": 1, "round": 1, "train_loss": 3.2, "val_loss": 2.9, "val_mae": 2.1,
               "val_acc1": 0.4, "lr": 0.001, "m": None, "images_per_second": 5.0, "seconds": 12.0}
    for name, cfg, task, log in [("magnification", magnification, "magnification", mag_log),
                                 ("dmsl", dmsl, "dmsl", {"epoch": 1, "train_loss": 0.7})]:
        parts = [json.dumps(cfg), json.dumps({"task": task, "data": "/data/manifest.csv"}), json.dumps(log) + "\n"]
        put("run_config", f"{name}.bin", "\0".join(parts).encode())


if __name__ == "__main__":
    snapshots()
    slides()
    label_manifests()
    checkpoints()
    run_configs()
    for d in sorted(CORPUS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")
