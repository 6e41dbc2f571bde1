"""Triton twin of ``reference.linear_stats``: per-feature sums (of squares) into ``out``.

x: any shape, float16/bfloat16/float32 (float64 buffers fall back to the torch reference: the
float64 path exists for parity tests, not speed); viewed as (A, K, B) with K = x.shape[dim].
``out[k] += scale * sum_{a, b} f(x[a, k, b])``, f = square or identity, accumulated in float32.

Grid: (cdiv(K, BLOCK_K), cdiv(B, BLOCK_B), SPLIT_A).  Each program sums a (BLOCK_K x BLOCK_B) tile
over its share of the A rows in registers, reduces over B and adds its partial sum with one atomic
add per feature (NOTE: [atomic partial sums]).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from adafisher_fast import reference

# NOTE: [atomic partial sums] the A axis (rows: batch x positions) is split over at most
# MAX_SPLIT_A programs so that large inputs fill the GPU; partial sums meet in ``out`` through
# atomic adds (order-dependent in the last float32 bit, like any parallel reduction).
MAX_SPLIT_A = 64


@triton.jit
def _linear_stats_kernel(x_ptr, out_ptr, A, K, B, rows_per_prog, scale,
                         SQUARE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_a = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (offs_k[:, None] < K) & (offs_b[None, :] < B)
    tile = offs_k[:, None].to(tl.int64) * B + offs_b[None, :]
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    a0 = pid_a * rows_per_prog
    a1 = tl.minimum(a0 + rows_per_prog, A)
    row_stride = tl.cast(K, tl.int64) * B
    x_row = x_ptr + a0.to(tl.int64) * row_stride + tile
    for a in range(a0, a1):
        v = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x_row += row_stride
        if SQUARE:
            v = v * v
        acc += v
    tot = tl.sum(acc, axis=1) * scale
    tl.atomic_add(out_ptr + offs_k, tot, mask=offs_k < K)


def _launch(x3: torch.Tensor, out: torch.Tensor, square: bool, scale: float) -> None:
    """x3: contiguous (A, K, B); out: contiguous float32 (K,)."""
    a, k, b = x3.shape
    if x3.numel() == 0:
        return
    block_b = min(triton.next_power_of_2(b), 128)
    block_k = max(1, min(triton.next_power_of_2(k), 2048 // block_b))
    split = max(1, min(MAX_SPLIT_A, a))
    rows = triton.cdiv(a, split)
    grid = (triton.cdiv(k, block_k), triton.cdiv(b, block_b), triton.cdiv(a, rows))
    _linear_stats_kernel[grid](x3, out, a, k, b, rows, float(scale), SQUARE=square,
                               BLOCK_K=block_k, BLOCK_B=block_b)


def linear_stats(x: torch.Tensor, out: torch.Tensor, dim: int = -1, square: bool = True,
                 scale: float = 1.0) -> None:
    """Same signature and semantics as ``reference.linear_stats`` (see the module docstring)."""
    if out.dtype == torch.float64 or x.dtype == torch.float64:
        return reference.linear_stats(x, out, dim, square, scale)
    dim = dim % x.dim()
    k = x.shape[dim]
    x3 = x.reshape(math.prod(x.shape[:dim]), k, math.prod(x.shape[dim + 1:])).contiguous()
    if out.is_contiguous() and out.dtype == torch.float32:
        _launch(x3, out, square, scale)
    else:
        tmp = torch.zeros(k, dtype=torch.float32, device=out.device)
        _launch(x3, tmp, square, scale)
        out.add_(tmp.to(out.dtype))
