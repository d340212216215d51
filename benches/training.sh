#!/usr/bin/env bash
# Training throughput of histolens against PyTorch CPU eager on the same step (batch 8, forward +
# backward + AdamW; 224 px, 299 px for Inception-v3), on 1 and 2 threads, measured in one run: the
# ratio table of issue 19, and both engines' peak RSS per architecture (PyTorch's from
# benches/torch_rss.py: the same step, one architecture per process, as histolens's is measured).
# PyTorch runs ../shared/tools/torch_bench.py from a virtual environment OUTSIDE the repository:
#   python3 -m venv ~/torch-venv && ~/torch-venv/bin/pip install torch==2.5.1 torchvision==0.20.1 timm
# Usage: TORCH_VENV=~/torch-venv [ROUNDS=2] benches/training.sh [ITERS]   (not in CI: minutes, 3 GB of wheels)
# Each engine's best of ROUNDS alternating rounds is kept: on a shared machine single runs vary by 30%.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TORCH_VENV:-$HOME/torch-venv}
iters=${1:-4}
rounds=${ROUNDS:-2}
bench=../shared/tools/torch_bench.py
[ -x "$venv/bin/python" ] || { echo "no PyTorch virtual environment at $venv (see the header)" >&2; exit 1; }
[ -f "$bench" ] || { echo "no $bench" >&2; exit 1; }
cargo build --release --locked -q
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for r in $(seq 1 "$rounds"); do
  for t in 1 2; do
    # One process per architecture: the peak RSS of one is not inflated by memory the allocator kept
    # from another.
    for arch in resnet18 resnet50 inception-v3 efficientnet-lite0; do
      size=$([ "$arch" = inception-v3 ] && echo 299 || echo 224)
      RAYON_NUM_THREADS=$t ./target/release/histolens bench model --arch "$arch" --size "$size" \
        --batch 1 --iters "$iters" --train-batch 8 --json > "$dir/ours-$r-$t-$arch.json"
    done
    "$venv/bin/python" "$bench" "$t" "$iters" > "$dir/torch-$r-$t.jsonl"
  done
done
for arch in resnet18 resnet50 inception-v3 efficientnet-lite0; do
  "$venv/bin/python" benches/torch_rss.py "$arch" 2 "$iters" >> "$dir/torch-rss.jsonl"
done
python3 - "$dir" <<'PY'
import glob, json, os, sys
d = sys.argv[1]
def keep_best(table, r):
    # The fastest round; its peak RSS with it.
    key = (r["arch"], r["threads"])
    if key not in table or r["train_images_per_second"] > table[key]["train_images_per_second"]:
        table[key] = r
ours = {}
for f in glob.glob(os.path.join(d, "ours-*.json")):
    for r in json.load(open(f)):
        keep_best(ours, r)
torch = {}
for f in glob.glob(os.path.join(d, "torch-*.jsonl")):
    for line in open(f):
        keep_best(torch, json.loads(line))
torch_rss = {}
for line in open(os.path.join(d, "torch-rss.jsonl")):
    r = json.loads(line)
    torch_rss[r["arch"]] = r["peak_rss_mib"]
print(f"{'arch':<20} {'threads':>7} {'histolens img/s':>16} {'PyTorch img/s':>14} {'ratio':>7} {'peak RSS MiB (histolens / PyTorch, 2 threads)':>46}")
for arch in ("resnet18", "resnet50", "inception-v3", "efficientnet-lite0"):
    for t in (1, 2):
        o, p = ours.get((arch, t)), torch.get((arch, t))
        if not o or not p:
            continue
        a, b = o["train_images_per_second"], p["train_images_per_second"]
        rss = f"{o.get('peak_rss_mib') or '-'} / {torch_rss.get(arch, '-')}" if t == 2 else ""
        print(f"{arch:<20} {t:>7} {a:>16.2f} {b:>14.2f} {a / b:>6.2f}x {rss:>46}")
PY
