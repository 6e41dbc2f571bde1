"""Microbenchmark of ``conv_stats`` (SPEC 4.2): conv patch sums of squares without im2col.

Cases: every conv layer of ResNet-50 (batch 64, 224x224) and ResNet-18 CIFAR (batch 256, 32x32),
identical input geometries merged, fp32 and bf16.  Baselines timed beside the backends:

* ``im2col``: what the released code does, ``F.unfold`` then square and sum (the SPEC 8 target is
  at least 30x faster than this);
* ``floor``: ``torch.linalg.vector_norm(x, dim=0, dtype=torch.float32)``, one read of x (one
  reduction kernel, float32 accumulation) and nothing else, the bandwidth floor (on CUDA; the CPU
  converts a bf16/fp16 x to float32 first);
* ``x2sum``: ``x.square().sum(0)``, the expression SPEC 8's "one read" anchor times; eager torch
  writes and reads back the square (~3x x's bytes), so it is no floor.

The ``ratio`` column is time / im2col time (0.033 = 30x faster).

Bytes model (the same for every backend and baseline, so GB/s compare directly):

| op          | bytes counted                                                     |
|-------------|-------------------------------------------------------------------|
| conv_stats  | read x once (numel * elsize) + read/write out (2 * 4 * C*kh*kw)   |
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import common, shapes
from .harness import Case, Harness, run_cases

OP = "conv_stats"


def im2col_stats(x, out, kernel_size, stride, padding, dilation, groups):
    """The released code's H statistic: unfold the patches, square, sum over batch and positions
    (out laid out like conv_stats' output: (group, C/g, kh, kw) == (C, kh, kw))."""
    p = F.unfold(x, kernel_size, dilation=dilation, padding=[lo for lo, _ in padding], stride=stride)
    out.add_(p.to(out.dtype).square().sum(dim=(0, 2)))


def cases(h: Harness):
    out = []
    for c in common.thin(h, shapes.conv_cases(h.smoke)):
        for dt in common.dtypes(h):
            out.append(_case(h, c, dt))
    return out


def _case(h, c, dt):
    dtype = common.DTYPES[dt]
    xs, k, s, pad, dil, g = (c["x_shape"], c["kernel_size"], c["stride"], c["padding"],
                             c["dilation"], c["groups"])
    d_out = xs[1] * math.prod(k)

    def inputs():
        x = torch.randn(xs, dtype=dtype, device=h.device)
        return x, torch.zeros(d_out, dtype=torch.float32, device=h.device)

    def build(ops):
        x, acc = inputs()
        return lambda: ops.conv_stats(x, acc, k, s, pad, dil, g, "zeros")

    def im2col():
        x, acc = inputs()
        return lambda: im2col_stats(x, acc, k, s, pad, dil, g)

    def floor():
        x, _ = inputs()
        return lambda: torch.linalg.vector_norm(x, dim=0, dtype=torch.float32)

    def x2sum():
        x, _ = inputs()
        return lambda: x.square().sum(0)

    extra = {}
    if c["anchor"]:
        extra = {"anchor_im2col_ms": c["anchor"][0], "anchor_x2sum_ms": c["anchor"][1]}
    return Case(c["label"], list(xs), dt, common.nbytes(xs, dtype) + 8 * d_out, build,
                baselines=[("im2col", im2col), ("floor", floor), ("x2sum", x2sum)],
                kernel=list(k), stride=list(s), **extra)


def run(h: Harness) -> None:
    run_cases(h, OP, cases(h), ratio_to="im2col")
