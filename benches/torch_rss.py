"""PyTorch's peak RSS on the training step of ../shared/tools/torch_bench.py, one architecture per
process (that tool runs all four in one process, so its peak is theirs together).
Usage: torch_rss.py ARCH THREADS [ITERS] -> one JSON line: arch, threads, train img/s, peak RSS MiB."""
import json, resource, sys, time
import torch, torchvision, timm
arch, t = sys.argv[1], int(sys.argv[2]); iters = int(sys.argv[3]) if len(sys.argv) > 3 else 4
torch.set_num_threads(t); torch.manual_seed(0)
make = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=1000),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=1000),
    "inception-v3": lambda: torchvision.models.inception_v3(num_classes=1000, aux_logits=False, init_weights=False),
    "efficientnet-lite0": lambda: timm.create_model("efficientnet_lite0", pretrained=False),
}[arch]
m = make(); size = 299 if arch == "inception-v3" else 224
m.train(); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randn(8, 3, size, size); y = torch.randint(0, 1000, (8,))
def step():
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(m(x), y); loss.backward(); opt.step()
step(); s = time.perf_counter()
n = max(2, iters // 2)
for _ in range(n): step()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"arch": arch, "threads": t, "train_images_per_second": 8 * n / (time.perf_counter() - s), "peak_rss_mib": round(rss)}), flush=True)
