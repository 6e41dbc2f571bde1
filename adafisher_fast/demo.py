"""``python -m adafisher_fast.demo``: a small CNN on scikit-learn's bundled handwritten digits (real
data, no download) trained with AdaFisher, AdaFisherW, AdamW and SGD; prints a table and writes a
loss-curve PNG.  Runs on the GPU when there is one, in well under 3 minutes on a CPU."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from . import AdaFisher, AdaFisherW


def _data(device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0       # (1797, 1, 8, 8)
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr.to(device), xte.to(device), ytr.to(device), yte.to(device)


def _model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))


# learning rates: AdaFisher's defaults (official preset: F ~ Lambda, so lr/Lambda is the step)
OPTIMIZERS = {
    "AdaFisher": lambda m: AdaFisher(m, lr=1e-3, TCov=10),
    "AdaFisherW": lambda m: AdaFisherW(m, lr=1e-3, TCov=10, weight_decay=1e-2),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2),
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=5e-2, momentum=0.9),
}


def run(epochs: int = 6, batch: int = 64, out: str = "demo_loss.png", seed: int = 0):
    from tqdm import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xtr, xte, ytr, yte = _data(device)
    rows, curves = [], {}
    steps_per_epoch = (len(xtr) + batch - 1) // batch
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(seed)
        model = _model().to(device)
        opt = make(model)
        losses, times = [], []
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"{name:>10}", leave=False)
        for ep in range(epochs):
            perm = torch.randperm(len(xtr), device=device)
            for i in range(0, len(xtr), batch):
                idx = perm[i:i + batch]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        tail = losses[-steps_per_epoch:]
        times.sort()
        rows.append((name, sum(tail) / len(tail), acc, 1e3 * times[len(times) // 2],
                     getattr(opt, "backend", "torch.optim")))
        curves[name] = losses

    print(f"\ndigits CNN, {epochs} epochs, batch {batch}, device {device}")
    print("| optimizer | final train loss | test accuracy | ms / step | backend |")
    print("|---|---|---|---|---|")
    for name, loss, acc, ms, backend in rows:
        print(f"| {name} | {loss:.4f} | {100 * acc:.2f}% | {ms:.2f} | {backend} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        k = 10
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1])
                  for i in range(len(losses))]
        ax.plot(smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (running mean of 10)")
    ax.set_title("digits CNN")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"loss curves written to {out}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="demo_loss.png")
    a = ap.parse_args(argv)
    run(a.epochs, a.batch, a.out)


if __name__ == "__main__":
    main()
