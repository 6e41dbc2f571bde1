"""Microbenchmark of ``norm_stats`` (SPEC 4.3): sums of xhat^2 of normalisation layers, xhat
recomputed from the input.  The bytes model counts one read of x, the least any kernel can do;
with batch statistics the kernels read it twice (mean, then variance: NOTE: [norm passes] in
csrc/norm_stats.cu), so those cases reach at most half of the copy bandwidth.

Cases: the BatchNorm2d inputs (= the conv outputs) of ResNet-50 at batch 64 x 224x224 and of
ResNet-18 CIFAR at batch 256 (mode="channel", x viewed as (B, C, H*W)), GPT-2 small's LayerNorm
at 16 x 1024 tokens (mode="sample", x viewed as (R, 768, 1)), and a 3-D U-Net's GroupNorm(8) at
batch 1 over 256 x 32^3 (mode="sample", rows of 2^20 entries split over chunks: NOTE: [moment
chunks] in fisher_kernels/norm_stats.py); fp32 and bf16.

Bytes model:

| op          | bytes counted                                      |
|-------------|----------------------------------------------------|
| norm_stats  | read x once (numel * elsize) + read/write out (2 * 4 * C) |
"""
from __future__ import annotations

import torch

from . import common, shapes
from .harness import Case, Harness, run_cases

OP = "norm_stats"


def _items(smoke: bool):
    items, seen = [], set()
    for lbl, shp in shapes.conv_out_cases(smoke):
        key = (shp[0], shp[1], shp[2] * shp[3])
        if key not in seen:
            seen.add(key)
            items.append((f"bn {lbl.split()[0]} {key[0]}x{key[1]}x{key[2]}", key, "channel", 1))
    r, d = (32, 32) if smoke else (16 * 1024, 768)
    items.append((f"ln gpt2 {r}x{d}", (r, d, 1), "sample", 1))
    c, v = (16, 8192) if smoke else (256, 32 ** 3)
    items.append((f"gn unet3d 1x{c}x{v} g8", (1, c, v), "sample", 8))
    return items


def cases(h: Harness):
    out = []
    for label, shape, mode, groups in common.thin(h, _items(h.smoke)):
        for dt in common.dtypes(h):
            out.append(_case(h, label, shape, mode, groups, dt))
    return out


def _case(h, label, shape, mode, groups, dt):
    dtype = common.DTYPES[dt]

    def build(ops):
        x = torch.randn(shape, dtype=dtype, device=h.device)
        acc = torch.zeros(shape[1], dtype=torch.float32, device=h.device)
        return lambda: ops.norm_stats(x, acc, mode, groups, 1e-5, True)

    return Case(label, list(shape), dt, common.nbytes(shape, dtype) + 8 * shape[1], build, mode=mode)


def run(h: Harness) -> None:
    run_cases(h, OP, cases(h))
