"""Microbenchmark of ``conv_stats`` (SPEC 4.2): conv patch sums of squares without im2col.

Cases: every conv layer of ResNet-50 (batch 64, 224x224) and ResNet-18 CIFAR (batch 256, 32x32),
identical input geometries merged, fp32 and bf16.  Baselines timed beside the backends:

* ``released``: the released code's im2col as it runs (SPEC 8's target is at least 30x faster than
  this; its anchors time it: 3.76 ms on an H100 at 64x64x56x56 k3), ``released_stats`` below;
* ``im2col``: a leaner im2col, ``F.unfold`` then square and sum: one patch matrix, no permuted
  copy, no batched matrix product.  On an H200 (2026-12-04) it took 1.97 ms at 256x64x32x32 k3,
  where the released code's took 5.67 ms on an H100: 31x and 60x the ``x2sum`` row of each GPU
  (0.064 and 0.094 ms), so about half the released code's time;
* ``floor``: ``torch.linalg.vector_norm(x, dim=0, dtype=torch.float32)``, one read of x (one
  reduction kernel, float32 accumulation) and nothing else, the bandwidth floor (on CUDA; the CPU
  converts a bf16/fp16 x to float32 first);
* ``x2sum``: ``x.square().sum(0)``, the expression SPEC 8's "one read" anchor times; eager torch
  writes and reads back the square (~3x x's bytes), so it is no floor.

The ``ratio`` column is time / the ``released`` baseline's time (0.033 = 30x faster).

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
    """A leaner im2col than the released code's: ``F.unfold``'s patch matrix squared and summed
    over batch and positions (out laid out like conv_stats' output: (group, C/g, kh, kw) == (C,
    kh, kw))."""
    p = F.unfold(x, kernel_size, dilation=dilation, padding=[lo for lo, _ in padding], stride=stride)
    out.add_(p.to(out.dtype).square().sum(dim=(0, 2)))


def released_stats(x, out, kernel_size, stride, padding, groups):
    """The released code's conv H statistic, op for op (2-D convs, the only ones it hooks): zero
    padding of the layer's size (dilation ignored, as it ignores it), both spatial dims unfolded,
    the patch features moved last by a copy, (B, g, Ho, Wo, C/g, kh, kw), then
    ``einsum("ij,ij->j")`` over that (B*g*Ho*Wo, C/g*kh*kw) matrix in x's dtype, which torch runs as
    a batched matrix product.  Its bias column (a copy with a column of ones) and the division by
    B*L are left out.  Its C/g*kh*kw entries go to the head of ``out``: with groups=1 they are
    conv_stats' (C, kh, kw) sums."""
    (ph, _), (pw, _) = padding
    x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    b, c, hh, ww = x.shape
    (kh, kw), (sh, sw) = kernel_size, stride
    p = x.view(b, groups, c // groups, hh, ww).unfold(3, kh, sh).unfold(4, kw, sw)
    d = c // groups * kh * kw
    p = p.permute(0, 1, 3, 4, 2, 5, 6).reshape(-1, d)
    out[:d].add_(torch.einsum("ij,ij->j", p, p))


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

    def released():
        x, acc = inputs()
        return lambda: released_stats(x, acc, k, s, pad, g)

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
                baselines=[("released", released), ("im2col", im2col), ("floor", floor),
                           ("x2sum", x2sum)],
                kernel=list(k), stride=list(s), **extra)


def run(h: Harness) -> None:
    run_cases(h, OP, cases(h), ratio_to="released")
