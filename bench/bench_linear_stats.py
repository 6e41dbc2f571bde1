"""Microbenchmark of ``linear_stats`` (SPEC 4.1): per-feature sums of squares.

Cases: the H inputs and S output gradients of a GPT-2-small block's Linear layers at 16 x 1024
tokens (dim=-1), and the conv output gradients of ResNet-50 / ResNet-18 (the conv S statistic,
dim=1), in fp32 and bf16.

Bytes model (effective bandwidth = bytes / median time):

| op            | bytes counted                                   |
|---------------|-------------------------------------------------|
| linear_stats  | read x (numel * elsize) + read/write out (2 * 4 * features) |
"""
from __future__ import annotations

from . import common, shapes
from .harness import Case, Harness, run_cases

OP = "linear_stats"


def cases(h: Harness):
    out = []
    items = [(lbl, shp, -1) for lbl, shp in shapes.gpt_linear_cases(h.smoke)] + \
            [(lbl, shp, 1) for lbl, shp in shapes.conv_out_cases(h.smoke)]
    for label, shape, dim in common.thin(h, items):
        for dt in common.dtypes(h):
            out.append(_case(h, label, shape, dim, dt))
    return out


def _case(h, label, shape, dim, dt):
    dtype = common.DTYPES[dt]
    feats = shape[dim]

    def build(ops):
        import torch
        x = torch.randn(shape, dtype=dtype, device=h.device)
        acc = torch.zeros(feats, dtype=torch.float32, device=h.device)
        return lambda: ops.linear_stats(x, acc, dim=dim)

    return Case(label, list(shape), dt, common.nbytes(shape, dtype) + 8 * feats, build, dim=dim)


def run(h: Harness) -> None:
    run_cases(h, OP, cases(h))
