#!/usr/bin/env python3
"""Cross-validation metrics of `histolens train dmsl --folds K` runs, from each fold's
val-predictions.csv (the last epoch's validation pairs), as mean ± sd over folds.

Per run and per level (fields, and images: the mean of an image's field probabilities):
accuracy, macro F1 and one-vs-rest macro AUC of the classes, and the AUC of tumour vs non-tumour
(the summed probability of the --tumour classes). Standard library only.

    scripts/dmsl-cv.py RUN [RUN ...] [--tumour insitu,invasive] [--markdown]
"""

import argparse
import csv
import statistics
import sys
from pathlib import Path


def auc(scores, positive):
    """ROC AUC (Mann-Whitney U, ties averaged); None without both classes."""
    pairs = sorted(zip(scores, positive))
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        rank_sum += mean_rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def metrics(rows, classes, tumour):
    """rows: (true class index, probabilities)."""
    n = len(classes)
    predicted = [max(range(n), key=lambda c: p[c]) for _, p in rows]
    truth = [t for t, _ in rows]
    accuracy = sum(a == b for a, b in zip(predicted, truth)) / len(rows)
    f1s, aucs = [], []
    for c in range(n):
        tp = sum(p == c and t == c for p, t in zip(predicted, truth))
        fp = sum(p == c and t != c for p, t in zip(predicted, truth))
        fn = sum(p != c and t == c for p, t in zip(predicted, truth))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        a = auc([p[c] for _, p in rows], [t == c for t in truth])
        if a is not None:
            aucs.append(a)
    out = {
        "acc": accuracy,
        "f1": sum(f1s) / n,
        "auc": sum(aucs) / len(aucs) if aucs else float("nan"),
    }
    tumour_idx = [classes.index(c) for c in tumour if c in classes]
    if tumour_idx:
        t = auc([sum(p[i] for i in tumour_idx) for _, p in rows], [x in tumour_idx for x in truth])
        out["tumour_auc"] = t if t is not None else float("nan")
    return out


def read_fold(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        classes = [c[2:] for c in reader.fieldnames if c.startswith("p_")]
        fields, by_image = [], {}
        for r in reader:
            probs = [float(r["p_" + c]) for c in classes]
            truth = classes.index(r["class"])
            fields.append((truth, probs))
            by_image.setdefault(r["source"], (truth, []))[1].append(probs)
    images = [
        (truth, [sum(col) / len(ps) for col in zip(*ps)]) for truth, ps in by_image.values()
    ]
    return classes, fields, images


def summarise(run, tumour):
    folds = sorted(Path(run).glob("fold-*/val-predictions.csv"))
    if not folds:
        sys.exit(f"{run}: no fold-*/val-predictions.csv")
    per_level = {"fields": [], "images": []}
    for f in folds:
        classes, fields, images = read_fold(f)
        per_level["fields"].append(metrics(fields, classes, tumour))
        per_level["images"].append(metrics(images, classes, tumour))
    return len(folds), per_level


def mean_sd(values):
    values = [v for v in values if v == v]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--tumour", default="insitu,invasive")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    tumour = [t for t in args.tumour.split(",") if t]
    keys = ["acc", "f1", "auc", "tumour_auc"]
    header = ["run", "folds", "level"] + ["accuracy", "macro F1", "macro AUC", "tumour AUC"]
    lines = []
    for run in args.runs:
        k, per_level = summarise(run, tumour)
        for level, ms in per_level.items():
            lines.append([Path(run).name, str(k), level] + [mean_sd([m.get(key, float("nan")) for m in ms]) for key in keys])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for l in lines:
            print("| " + " | ".join(l) + " |")
    else:
        widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
        for r in [header] + lines:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
