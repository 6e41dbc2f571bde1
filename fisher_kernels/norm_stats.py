"""Triton twin of ``reference.norm_stats``: sums of squared normalised activations (Prop. 3.1).

x: (R, C, I) view of the layer input, float16/bfloat16/float32 (float64 buffers fall back to the
reference).  ``out[c] += sum_{r, i} xhat[r, c, i]^2`` in float32, xhat recomputed on the fly:
* mode="channel" (BatchNorm): statistics per channel over (r, i) (biased variance, as the layer
  normalises), or the given running ``mean``/``var``;
* mode="sample" (LayerNorm, GroupNorm, RMSNorm with center=False): per (r, group) statistics.

Kernels: ``_row_moments_kernel`` (one program per (r, group): mean and 1/sqrt(var + eps), two passes
over one contiguous row) and ``_xhat_sq_kernel`` (the tiled column reduction of ``linear_stats``
with the affine normalisation applied before squaring).  Channel statistics reuse the reduction
itself: mean = sum x / N, var = sum (x - mean)^2 / N, as the reference computes them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from adafisher_fast import reference
from .linear_stats import _launch as _column_sums, tiles

BLOCK_ROW = 1024


@triton.jit
def _row_moments_kernel(x_ptr, mu_ptr, rs_ptr, n, eps, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * n
    mu = 0.0
    if CENTER:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, n, BLOCK):
            o = s + tl.arange(0, BLOCK)
            acc += tl.load(base + o, mask=o < n, other=0.0).to(tl.float32)
        mu = tl.sum(acc, axis=0) / n
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n, BLOCK):
        o = s + tl.arange(0, BLOCK)
        v = tl.load(base + o, mask=o < n, other=0.0).to(tl.float32) - mu
        acc2 += tl.where(o < n, v * v, 0.0)
    ms = tl.sum(acc2, axis=0) / n
    tl.store(mu_ptr + row, mu)
    tl.store(rs_ptr + row, 1.0 / tl.sqrt(ms + eps))


@triton.jit
def _xhat_sq_kernel(x_ptr, out_ptr, mu_ptr, rs_ptr, A, K, B, rows_per_prog, G, CG,
                    PER_ROW: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    """out[k] += sum_{a, b} ((x[a, k, b] - mu[s]) * rs[s])^2 with s = k (PER_ROW False) or
    s = a * G + k // CG (PER_ROW True); tiles as in linear_stats (NOTE: [tile shape])."""
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_a = tl.program_id(2)
    offs_a = tl.arange(0, BLOCK_A)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    km = offs_k < K
    kb = km[None, :, None] & (offs_b[None, None, :] < B)
    tile = offs_k[None, :, None].to(tl.int64) * B + offs_b[None, None, :]
    acc = tl.zeros((BLOCK_A, BLOCK_K, BLOCK_B), dtype=tl.float32)
    a0 = pid_a * rows_per_prog
    a1 = tl.minimum(a0 + rows_per_prog, A)
    row_stride = tl.cast(K, tl.int64) * B
    for s in range(a0, a1, BLOCK_A):
        rows = s + offs_a
        rm = rows < a1
        mask = rm[:, None, None] & kb
        if PER_ROW:
            si = rows[:, None] * G + offs_k[None, :] // CG
            sm = rm[:, None] & km[None, :]
            mu = tl.load(mu_ptr + si, mask=sm, other=0.0)[:, :, None]
            rs = tl.load(rs_ptr + si, mask=sm, other=0.0)[:, :, None]
        else:
            mu = tl.load(mu_ptr + offs_k, mask=km, other=0.0)[None, :, None]
            rs = tl.load(rs_ptr + offs_k, mask=km, other=0.0)[None, :, None]
        v = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * row_stride + tile, mask=mask,
                    other=0.0).to(tl.float32)
        xh = (v - mu) * rs
        acc += tl.where(mask, xh * xh, 0.0)
    tl.atomic_add(out_ptr + offs_k, tl.sum(tl.sum(acc, axis=2), axis=0), mask=km)


def _xhat_sq(x3, out, mu, rs, per_row, g, cg):
    a, k, b = x3.shape
    block_a, block_k, block_b, rows, grid = tiles(a, k, b)
    _xhat_sq_kernel[grid](x3, out, mu, rs, a, k, b, rows, g, cg, PER_ROW=per_row,
                          BLOCK_A=block_a, BLOCK_K=block_k, BLOCK_B=block_b)


def norm_stats(x: torch.Tensor, out: torch.Tensor, mode: str, groups: int, eps: float,
               center: bool = True, mean: Optional[torch.Tensor] = None,
               var: Optional[torch.Tensor] = None) -> None:
    """Same signature and semantics as ``reference.norm_stats`` (see the module docstring)."""
    if mode not in ("channel", "sample"):
        raise ValueError(f"norm_stats: mode must be 'channel' or 'sample', got {mode!r}")
    if out.dtype != torch.float32 or x.dtype == torch.float64 or not out.is_contiguous():
        return reference.norm_stats(x, out, mode, groups, eps, center, mean, var)
    r, c, i = x.shape
    if x.numel() == 0:
        return
    x3 = x.contiguous()
    f32 = dict(dtype=torch.float32, device=x.device)
    if mode == "channel":
        if mean is None:
            n = r * i
            s1 = torch.zeros(c, **f32)
            _column_sums(x3, s1, False, 1.0)
            mu = s1 / n
            s2 = torch.zeros(c, **f32)
            _xhat_sq(x3, s2, mu, torch.ones(c, **f32), False, 1, 1)
            var_ = s2 / n
        else:
            mu, var_ = mean.to(torch.float32), var.to(torch.float32)
        rs = torch.rsqrt(var_ + eps).contiguous()
        _xhat_sq(x3, out, mu.contiguous(), rs, False, 1, 1)
        return
    cg = c // groups
    mu = torch.empty(r * groups, **f32)
    rs = torch.empty(r * groups, **f32)
    n = cg * i
    _row_moments_kernel[(r * groups,)](x3, mu, rs, n, float(eps), CENTER=bool(center),
                                       BLOCK=min(BLOCK_ROW, triton.next_power_of_2(n)))
    _xhat_sq(x3, out, mu, rs, True, groups, cg)
