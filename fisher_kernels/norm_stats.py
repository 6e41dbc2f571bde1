"""Triton twin of ``reference.norm_stats``: sums of squared normalised activations (Prop. 3.1).

x: (R, C, I) view of the layer input, float16/bfloat16/float32 (float64 buffers fall back to the
reference).  ``out[c] += sum_{r, i} xhat[r, c, i]^2`` in float32, xhat recomputed on the fly:
* mode="channel" (BatchNorm): statistics per channel over (r, i) (biased variance, as the layer
  normalises), or the given running ``mean``/``var``;
* mode="sample" (LayerNorm, GroupNorm, RMSNorm with center=False): per (r, group) statistics.

Kernels: ``_row_moments_kernel`` (one program per (r, group): mean and 1/sqrt(var + eps), two passes
over its entries: one contiguous row, or for a channels_last input runs of C/G channels) and the
tiled column reduction of ``linear_stats`` with the affine normalisation applied before squaring
(its AFFINE modes, as csrc's NOTE: [column reduce]).
Channel statistics reuse the reduction itself: mean = sum x / N, var = sum (x - mean)^2 / N, as
the reference computes them; then sum xhat^2 = N var / (var + eps) per channel, without a third
pass over x (NOTE: [norm passes] in csrc/norm_stats.cu).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from adafisher_fast import reference
from .host import columns_view, next_pow2, on_device
from .linear_stats import _launch

BLOCK_ROW = 1024


@triton.jit
def _row_moments_kernel(x_ptr, mu_ptr, rs_ptr, n, G, RS, GS, RUN, OS, eps, CENTER: tl.constexpr,
                        RUNS: tl.constexpr, BLOCK: tl.constexpr):
    """Program row = (r, group) of G: mean (CENTER) and 1/sqrt(var + eps) of its n entries,
    entry j at r * RS + group * GS + j, or with RUNS (a channels_last x: runs of RUN = C/G
    channels, OS = C apart) at r * RS + group * GS + (j // RUN) * OS + j % RUN."""
    row = tl.program_id(0)
    base = x_ptr + (row // G).to(tl.int64) * RS + (row % G).to(tl.int64) * GS
    mu = 0.0
    if CENTER:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, n, BLOCK):
            o = s + tl.arange(0, BLOCK)
            at = (o // RUN) * OS + o % RUN if RUNS else o
            acc += tl.load(base + at, mask=o < n, other=0.0).to(tl.float32)
        mu = tl.sum(acc, axis=0) / n
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n, BLOCK):
        o = s + tl.arange(0, BLOCK)
        at = (o // RUN) * OS + o % RUN if RUNS else o
        v = tl.load(base + at, mask=o < n, other=0.0).to(tl.float32) - mu
        acc2 += tl.where(o < n, v * v, 0.0)
    ms = tl.sum(acc2, axis=0) / n
    tl.store(mu_ptr + row, mu)
    tl.store(rs_ptr + row, 1.0 / tl.sqrt(ms + eps))


def _xhat_sq(x3, out, mu, rs, per_row, g, cg, rps=1):
    """out[k] += sum of ((x - mu) * rs)^2, mu/rs per channel or per (row, group), rps rows of
    x3 per row of x."""
    _launch(x3, out, True, 1.0, 2 if per_row else 1, mu, rs, g, cg, rps)


@on_device
def norm_stats(x: torch.Tensor, out: torch.Tensor, mode: str, groups: int, eps: float,
               center: bool = True, mean: Optional[torch.Tensor] = None,
               var: Optional[torch.Tensor] = None) -> None:
    """Same signature and semantics as ``reference.norm_stats`` (see the module docstring)."""
    if mode not in ("channel", "sample"):
        raise ValueError(f"norm_stats: mode must be 'channel' or 'sample', got {mode!r}")
    if mode == "sample":
        reference.check_groups("norm_stats", x.shape[1], groups)
    reference.check_out("norm_stats", out, x.shape[1])
    if out.dtype != torch.float32 or x.dtype == torch.float64 or not out.is_contiguous():
        return reference.norm_stats(x, out, mode, groups, eps, center, mean, var)
    r, c, i = x.shape
    if x.numel() == 0:
        return
    f32 = dict(dtype=torch.float32, device=x.device)
    if mode == "channel":
        x3 = columns_view(x, 1)        # per-channel statistics: any (A, C, B) (NOTE: [memory order])
        if mean is None:
            n = r * i
            s1 = torch.zeros(c, **f32)
            _launch(x3, s1, False, 1.0)
            mu = s1 / n
            s2 = torch.zeros(c, **f32)
            _xhat_sq(x3, s2, mu, torch.ones(c, **f32), False, 1, 1)
            var_ = s2 / n
            # NOTE: [norm passes]; 0 where var overflowed around a finite mean (rsqrt(inf) = 0)
            out += n * torch.where(var_.isinf() & mu.isfinite(), 0.0, var_ / (var_ + eps))
            return
        rs = torch.rsqrt(var.to(torch.float32) + eps).contiguous()
        _xhat_sq(x3, out, mean.to(torch.float32).contiguous(), rs, False, 1, 1)
        return
    cg = c // groups
    n = cg * i
    # channels_last (the (B, C, H*W) view of a GroupNorm input): x read where it lies as
    # (B * H*W, C, 1), each (sample, group) in runs of C/G channels (NOTE: [memory order])
    cl = i > 1 and c > 1 and not x.is_contiguous() and x.stride() == (c * i, 1, c)
    if not cl:
        x = x.contiguous()
    mu = torch.empty(r * groups, **f32)
    rs = torch.empty(r * groups, **f32)
    _row_moments_kernel[(r * groups,)](x, mu, rs, n, groups, c * i, cg if cl else n, cg, c,
                                       float(eps), CENTER=bool(center), RUNS=cl,
                                       BLOCK=min(BLOCK_ROW, next_pow2(n)))
    x3 = x.permute(0, 2, 1).reshape(r * i, c, 1) if cl else x
    _xhat_sq(x3, out, mu, rs, True, groups, cg, i if cl else 1)
