"""Triton twin of ``reference.embedding_stats``: ``out[v] += number of tokens equal to v``.

idx: int32/int64 tensor of any shape; out: float32 (float64 falls back to the reference).  One
atomic add of 1 per token; out-of-range tokens are not counted, as in the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adafisher_fast import reference
from .host import cdiv, launch, on_device
from .linear_stats import WIDE_FROM

BLOCK = 1024   # tokens per program: a large batch x sequence fills the GPU with few programs


@triton.jit
def _embedding_stats_kernel(idx_ptr, out_ptr, n, V, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:        # NOTE: [wide offsets] in linear_stats.py
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tok = tl.load(idx_ptr + offs, mask=m, other=0).to(tl.int64)
    ok = m & (tok >= 0) & (tok < V)
    ones = tl.full((BLOCK,), 1.0, tl.float32)
    # NOTE: [relaxed atomics] in linear_stats.py
    tl.atomic_add(out_ptr + tok, ones, mask=ok, sem="relaxed")


@on_device
def embedding_stats(idx: torch.Tensor, out: torch.Tensor) -> None:
    """Same signature and semantics as ``reference.embedding_stats``."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"embedding_stats: idx must be int32 or int64, got {idx.dtype}")
    if out.dtype != torch.float32 or not out.is_contiguous():
        return reference.embedding_stats(idx, out)
    flat = idx.reshape(-1).contiguous()
    n = flat.numel()
    if n == 0:
        return
    launch(_embedding_stats_kernel, (cdiv(n, BLOCK),), flat, out, n, out.numel(), BLOCK=BLOCK,
           WIDE=n >= WIDE_FROM, enable_fp_fusion=True)
