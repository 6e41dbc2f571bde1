"""Triton twin of ``reference.norm_stats``: sums of squared normalised activations (Prop. 3.1).

x: (R, C, I) view of the layer input, float16/bfloat16/float32 (float64 buffers fall back to the
reference).  ``out[c] += sum_{r, i} xhat[r, c, i]^2`` in float32, xhat recomputed on the fly:
* mode="channel" (BatchNorm): statistics per channel over (r, i) (biased variance, as the layer
  normalises), or the given running ``mean``/``var``;
* mode="sample" (LayerNorm, GroupNorm, RMSNorm with center=False): per (r, group) statistics.

Kernels: ``_row_moments_kernel`` (one program per CHUNK entries of an (r, group) row: mean and
1/sqrt(var + eps), two passes over its entries: one contiguous row, or for a channels_last input
runs of C/G channels; NOTE: [moment chunks]) and the tiled column reduction of ``linear_stats``
with the affine normalisation applied before squaring (its AFFINE modes, as csrc's NOTE: [column
reduce]).

NOTE: [moment chunks] With one program per (r, group), a 3-D U-Net's GroupNorm(8) at batch 1
(256 channels over 64^3) would run on 8 SMs, each walking 2^23 entries twice.  A row of more than
CHUNK entries is split: each chunk's program writes its entries' mean m_k and centred sum of
squares M2_k (64 KiB of float32 per chunk, small enough that its second pass may be served from
L2; not measured), and ``_combine_moments_kernel`` joins them per row (Chan et al.):
mu = sum_k cnt_k m_k / n,  M2 = sum_k M2_k + sum_k cnt_k (m_k - mu)^2,  rs = 1/sqrt(M2 / n + eps)
(m_k = 0 without centring).  Rows of at most CHUNK entries (LayerNorm, RMSNorm, GroupNorm on small
maps) keep one program, which writes mu and rs itself, as before.  csrc/norm_stats.cu does the
same.

Channel statistics reuse the reduction itself: mean = sum x / N, var = sum (x - mean)^2 / N, as
the reference computes them; then sum xhat^2 = N var / (var + eps) per channel, without a third
pass over x (NOTE: [norm passes] in csrc/norm_stats.cu).  NOTE: [channel launches] Four
launches, two allocations and no fill: the sums, each program's stored in a row of a (R, C)
scratch (``partial_sums``: the same in any program order); ``_channel_rows_kernel`` adds the rows
up into the mean, written over the first row; the centred squares, stored the same way; and
``_channel_rows_kernel`` again for N var / (var + eps).  Done in torch between the passes, the
arithmetic on C entries was a dozen small ops, each a launch on a GPU and host time: an H200 run
timed this launcher at 0.17-0.48 ms on every BatchNorm shape (small ones too), the CUDA backend
at 0.02-0.14 ms.  The mean has a launch of its own because every program of the centred pass
needs it: each one adding up the R rows itself (three launches, 2026-12-04, not timed) read
R x R x C floats, 134 MB at ResNet-18's 256x512x4x4 (R = 256) against its 8.4 MB input, and its
compiled loop waited on one 4-byte load per row; the extra launch reads them once (0.5 MB there).
The rows are summed as (BLOCK_R, BLOCK_C) tiles, not one row after the other, for the same
reason; tiles of 32 channels, so that C = 512 runs on 16 programs, each with two (128, 32) tiles
at R = 256 (128-channel tiles left 4 programs there, 16 dependent loads each, in a launch on
its own).  Neither is timed on a GPU yet.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from adafisher_fast import reference
from .host import cdiv, columns, launch, next_pow2, on_device
from .linear_stats import _launch, partial_sums

BLOCK_ROW = 1024
CHUNK = 16384         # entries of a row per program (NOTE: [moment chunks])


@triton.jit
def _inv_sqrt(m2, n, eps):
    """1 / sqrt(m2 / n + eps), each operation rounded as IEEE (NOTE: [ieee rounding] in
    fisher_kernels/__init__.py).  ``n * 1.0``: n as float32, also where the JIT made n = 1 a
    constexpr."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(m2, n * 1.0) + eps))


@triton.jit
def _row_moments_kernel(x_ptr, mu_ptr, rs_ptr, m2_ptr, n, G, RS, GS, RUN, OS, eps, NC,
                        CHUNK: tl.constexpr, CENTER: tl.constexpr, RUNS: tl.constexpr,
                        SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, k), row = (r, group) of G, k < NC: the entries [k CHUNK, (k + 1) CHUNK) of
    the row's n, entry j at r * RS + group * GS + j, or with RUNS (a channels_last x: runs of
    RUN = C/G channels, OS = C apart) at r * RS + group * GS + (j // RUN) * OS + j % RUN.  Their
    mean (CENTER, else 0) to mu and centred sum of squares to m2, per program (SPLIT, NOTE:
    [moment chunks]); else (NC = 1) the row's mean to mu and 1/sqrt(var + eps) to rs."""
    pid = tl.program_id(0)
    row = pid // NC
    base = x_ptr + (row // G).to(tl.int64) * RS + (row % G).to(tl.int64) * GS
    lo = (n * 0 + pid % NC) * CHUNK         # (n's integer width: int64 when n is)
    hi = tl.minimum(n, lo + CHUNK)
    mu = 0.0
    if CENTER:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(lo, hi, BLOCK):
            o = s + tl.arange(0, BLOCK)
            at = (o // RUN) * OS + o % RUN if RUNS else o
            acc += tl.load(base + at, mask=o < hi, other=0.0).to(tl.float32)
        mu = tl.math.div_rn(tl.sum(acc, axis=0), (hi - lo).to(tl.float32))
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(lo, hi, BLOCK):
        o = s + tl.arange(0, BLOCK)
        at = (o // RUN) * OS + o % RUN if RUNS else o
        v = tl.load(base + at, mask=o < hi, other=0.0).to(tl.float32) - mu
        acc2 += tl.where(o < hi, v * v, 0.0)
    if SPLIT:
        tl.store(mu_ptr + pid, mu)
        tl.store(m2_ptr + pid, tl.sum(acc2, axis=0))
    else:
        tl.store(mu_ptr + row, mu)
        tl.store(rs_ptr + row, _inv_sqrt(tl.sum(acc2, axis=0), n, eps))


@triton.jit
def _combine_moments_kernel(pm_ptr, pm2_ptr, mu_ptr, rs_ptr, n, NC, eps, CHUNK: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Program row: mu and 1/sqrt(var + eps) of the row from its NC chunks' means and centred
    sums of squares (NOTE: [moment chunks])."""
    row = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, NC, BLOCK):
        k = s + tl.arange(0, BLOCK)
        cnt = tl.minimum(n - k.to(tl.int64) * CHUNK, CHUNK).to(tl.float32)
        acc += tl.where(k < NC, cnt * tl.load(pm_ptr + row * NC + k, mask=k < NC, other=0.0), 0.0)
    mu = tl.math.div_rn(tl.sum(acc, axis=0), n * 1.0)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, NC, BLOCK):
        k = s + tl.arange(0, BLOCK)
        cnt = tl.minimum(n - k.to(tl.int64) * CHUNK, CHUNK).to(tl.float32)
        d = tl.load(pm_ptr + row * NC + k, mask=k < NC, other=0.0) - mu
        acc2 += tl.where(k < NC, tl.load(pm2_ptr + row * NC + k, mask=k < NC, other=0.0)
                         + cnt * d * d, 0.0)
    tl.store(mu_ptr + row, mu)
    tl.store(rs_ptr + row, _inv_sqrt(tl.sum(acc2, axis=0), n, eps))


@triton.jit
def _channel_rows_kernel(p_ptr, mu_ptr, out_ptr, C, R, n, eps, FINISH: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column sums t[c] of p, R rows of partial sums (R, C) (NOTE: [channel launches]), then
    without FINISH mu[c] = t[c] / n (mu may be p's first row: a program reads only its own
    columns); with FINISH (t: the centred sums of squares) out[c] += n * var / (var + eps),
    var = t[c] / n, or 0 where var overflowed around a finite mean mu[c] (xhat is 0 there, as the
    layer's rsqrt(inf)); NOTE: [norm passes]."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = c < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(p_ptr + r[:, None].to(tl.int64) * C + c[None, :],
                       mask=(r < R)[:, None] & m[None, :], other=0.0)
    nf = n * 1.0
    t = tl.math.div_rn(tl.sum(acc, axis=0), nf)
    if FINISH:
        mu = tl.load(mu_ptr + c, mask=m, other=0.0)
        add = tl.where((t == float("inf")) & (tl.abs(mu) < float("inf")), 0.0,
                       nf * tl.math.div_rn(t, t + eps))
        tl.store(out_ptr + c, tl.load(out_ptr + c, mask=m, other=0.0) + add, mask=m)
    else:
        tl.store(mu_ptr + c, t, mask=m)


def _xhat_sq(x3, abk, out, mu, rs, per_row, g, cg, rps=1):
    """out[k] += sum of ((x - mu) * rs)^2 over x3's memory as (A, K, B) = abk, mu/rs per channel
    or per (row, group), rps rows of (A, K, B) per row of x."""
    _launch(x3, out, True, 1.0, 2 if per_row else 1, mu, rs, g, cg, rps, abk=abk)


@on_device
def norm_stats(x: torch.Tensor, out: torch.Tensor, mode: str, groups: int, eps: float,
               center: bool = True, mean: Optional[torch.Tensor] = None,
               var: Optional[torch.Tensor] = None) -> None:
    """Same signature and semantics as ``reference.norm_stats`` (see the module docstring)."""
    if mode not in ("channel", "sample"):
        raise ValueError(f"norm_stats: mode must be 'channel' or 'sample', got {mode!r}")
    if mode == "sample":
        reference.check_groups("norm_stats", x.shape[1], groups)
    else:
        reference.check_running("norm_stats", mean, var, x.shape[1])
    reference.check_out("norm_stats", out, x.shape[1])
    if out.dtype != torch.float32 or x.dtype == torch.float64 or not out.is_contiguous():
        return reference.norm_stats(x, out, mode, groups, eps, center, mean, var)
    r, c, i = x.shape
    if x.numel() == 0:
        return
    f32 = dict(dtype=torch.float32, device=x.device)
    if mode == "channel":
        # per-channel statistics: any (A, C, B) (NOTE: [memory order], [launch plans])
        x3, abk = columns(x, 1)
        if mean is None:                # NOTE: [channel launches]
            n = r * i
            sums = partial_sums(x3, False, 1.0, abk=abk)
            rows, mu = sums.shape[0], sums          # the mean: over sums' first row
            block_c = min(next_pow2(c), 32)         # one 128-byte line of a row per tile row
            grid = (cdiv(c, block_c),)
            meta = dict(BLOCK_R=max(1, min(next_pow2(rows), 4096 // block_c)), BLOCK_C=block_c,
                        enable_fp_fusion=False)     # separate roundings, as torch's ops (no FMA)
            launch(_channel_rows_kernel, grid, sums, mu, out, c, rows, n, float(eps), FINISH=False,
                   **meta)
            squares = partial_sums(x3, True, 1.0, 3, mu, abk=abk)
            launch(_channel_rows_kernel, grid, squares, mu, out, c, rows, n, float(eps),
                   FINISH=True, **meta)
            return
        rs = torch.rsqrt(var.to(torch.float32) + eps).contiguous()
        _xhat_sq(x3, abk, out, mean.to(torch.float32).contiguous(), rs, False, 1, 1)
        return
    cg = c // groups
    n = cg * i
    # channels_last (the (B, C, H*W) view of a GroupNorm input): x read where it lies as
    # (B * H*W, C, 1), each (sample, group) in runs of C/G channels (NOTE: [memory order])
    cl = i > 1 and c > 1 and not x.is_contiguous() and x.stride() == (c * i, 1, c)
    if not cl:
        x = x.contiguous()
    rows, nc = r * groups, cdiv(n, CHUNK)               # NOTE: [moment chunks]
    mu = torch.empty(rows, **f32)
    rs = torch.empty(rows, **f32)
    pm, pm2 = (torch.empty(rows * nc, **f32) for _ in range(2)) if nc > 1 else (mu, rs)
    launch(_row_moments_kernel, (rows * nc,),
           x, pm, rs, pm2, n, groups, c * i, cg if cl else n, cg, c, float(eps), nc, CHUNK=CHUNK,
           CENTER=bool(center), RUNS=cl, SPLIT=nc > 1, BLOCK=min(BLOCK_ROW, next_pow2(n)),
           enable_fp_fusion=True)
    if nc > 1:
        launch(_combine_moments_kernel, (rows,), pm, pm2, mu, rs, n, nc, float(eps), CHUNK=CHUNK,
               BLOCK=min(BLOCK_ROW, next_pow2(nc)), enable_fp_fusion=True)
    # channels_last: x's memory as (B * H*W, C, 1)
    _xhat_sq(x, (r * i, c, 1) if cl else (r, c, i), out, mu, rs, True, groups, cg, i if cl else 1)
