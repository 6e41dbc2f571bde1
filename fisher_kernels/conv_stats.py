"""Triton twin of ``reference.conv_stats``: conv patch sums of squares WITHOUT im2col (SPEC 4.2).

x: (B, C, *spatial), d = 1, 2 or 3 spatial dims, float16/bfloat16/float32 (float64 buffers fall
back to the reference).  out: (groups * D,) float32, D = C/groups * prod(kernel), laid out like a
conv weight (channel, *kernel).  Returns L, the output positions per sample.

Two launches, neither of the patch matrix's size (one for a pointwise conv: NOTE: [pointwise
convs]):
1. Q[c, *spatial] = sum_b x[b, c, *spatial]^2 (``linear_stats`` over the batch: one read of x,
   in x's memory order, so a channels_last x is not copied: NOTE: [memory order] in host.py),
   left as R rows of partial sums over parts of the batch (``partial_sums``): every entry is
   stored, none added, so Q needs no zero fill (a launch per conv call) and its sums do not
   depend on the order the programs run in.  The split aims at ~1024 programs of up to 128
   columns, so R x C x prod(spatial) stays under 2^18 entries (1 MiB) or R is 1;
2. one program per (channel, block of output positions, block of kernel offsets) sums Q's rows
   over that part of each offset's output lattice (strided, dilated) and adds it atomically
   (stores it for an ordered sum under deterministic algorithms: NOTE: [ordered partials] in
   linear_stats.py).  Zero padding is applied by masking; reflect/replicate/circular pad the
   small map Q with torch first (padding commutes with the square and the batch sum: it only
   copies or zeroes positions).  1-D/2-D convs run as 3-D ones with unit leading dims.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from adafisher_fast import reference
from .host import cdiv, column_layout, launch, memory_order, next_pow2, on_device
from .linear_stats import _launch as _column_sums, _n_partials, partial_sums

_column_module = sys.modules[partial_sums.__module__]   # (its interpreting(), which tests patch)

TILE = 2048     # (kernel offsets x output positions) per program
MAX_KO = 32     # kernel offsets per program (a 3x3x3 kernel's 27 in one)
TARGET_PROGRAMS = 8192   # lattice programs per launch, about (NOTE: [lattice groups])
WIDE_FROM = 2 ** 31      # a channel's map extent from here: int64 offsets (NOTE: [map offsets])


@triton.jit
def _lattice_sum_kernel(q_ptr, out_ptr, R, QR, QC, Q0, Q1, Q2, S0, S1, S2, P0, P1, P2, K0, K1,
                        K2, D0, D1, D2, T0, T1, T2, N0, N1, N2, N_LBLK, N_LGRP, LPG,
                        BLOCK_KO: tl.constexpr, BLOCK_L: tl.constexpr, PARTIAL: tl.constexpr,
                        WIDE: tl.constexpr):
    """Program (c * N_LBLK + l-block, block of kernel offsets): out[c * K + koff] += sum over the
    l-block of the output lattice of sum_r Q[r, c, koff*dil + l*stride - pad], Q (R, C, S0, S1,
    S2) with strides (QR, QC, Q0, Q1, Q2), read as 0 outside the map (zero padding).
    NOTE: [lattice split] one tile per program, added atomically: a channel per program would
    leave a 3-channel first layer with a handful of programs on a GPU of 132 SMs.  PARTIAL
    (deterministic algorithms): out is an (N_LBLK, C * K) scratch, the program's sums stored in
    row l-block (NOTE: [ordered partials] in linear_stats.py).

    NOTE: [map offsets] An entry's offset within its channel's map, y0 * Q0 + y1 * Q1 + y2 * Q2,
    is an int32 unless the map's extent (its padded size, or C times it in channels_last order)
    reaches 2^31 (WIDE, chosen on the host): in int64, two registers for each of a thread's 16
    entries, the 15 launch configurations per arch of the tests and benchmarks that fill the tile
    took 77-96 registers a thread on sm_80 and sm_90 (triton 3.9, tests/triton_codegen.py), most
    of them 88-96 (20 warps an SM); in int32 72-80 (24 warps), one of them 95-96."""
    c = tl.program_id(0) // N_LGRP
    lg = tl.program_id(0) % N_LGRP
    K = K0 * K1 * K2
    koff = tl.program_id(1) * BLOCK_KO + tl.arange(0, BLOCK_KO)
    km = koff < K
    k2 = koff % K2
    k1 = (koff // K2) % K1
    k0 = koff // (K1 * K2)
    base = q_ptr + tl.cast(c, tl.int64) * QC
    acc = tl.zeros((BLOCK_KO,), dtype=tl.float32)
    # NOTE: [lattice groups] a program sums LPG consecutive l-blocks: the grid (and the ordered
    # partials' scratch, one row per group) stays bounded however large the output lattice is
    for lb in range(lg * LPG, tl.minimum(lg * LPG + LPG, N_LBLK)):
        l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        lm = l < N0 * N1 * N2
        i2 = l % N2
        i1 = (l // N2) % N1
        i0 = l // (N1 * N2)
        y0 = k0[:, None] * D0 + (i0 * T0)[None, :] - P0
        y1 = k1[:, None] * D1 + (i1 * T1)[None, :] - P1
        y2 = k2[:, None] * D2 + (i2 * T2)[None, :] - P2
        ok = (km[:, None] & lm[None, :] & (y0 >= 0) & (y0 < S0) & (y1 >= 0) & (y1 < S1)
              & (y2 >= 0) & (y2 < S2))
        if WIDE:
            at = base + y0.to(tl.int64) * Q0 + y1.to(tl.int64) * Q1 + y2.to(tl.int64) * Q2
        else:
            at = base + (y0 * Q0 + y1 * Q1 + y2 * Q2)
        v = tl.load(at, mask=ok, other=0.0)
        for r in range(1, R):
            v += tl.load(at + tl.cast(r, tl.int64) * QR, mask=ok, other=0.0)
        acc += tl.sum(v, axis=1)
    at = out_ptr + tl.cast(c, tl.int64) * K + koff
    if PARTIAL:
        n_ch = tl.num_programs(0) // N_LGRP
        tl.store(at + tl.cast(lg, tl.int64) * n_ch * K, acc, mask=km)
    else:
        # NOTE: [relaxed atomics] in linear_stats.py
        tl.atomic_add(at, acc, mask=km, sem="relaxed")


def pointwise(kernel_size: Sequence[int], stride: Sequence[int], padding) -> bool:
    """NOTE: [pointwise convs] A 1x1 conv at stride 1 without padding (ResNet bottlenecks',
    MobileNet's and EfficientNet's pointwise convs) sees each input position once: its patch
    statistic is the per-channel sum of squares over batch and positions, linear_stats' column
    sum, one launch straight into ``out`` with no batch map (dilation, groups and padding_mode do
    not change it).  csrc's conv_stats takes the same path (``conv_pointwise``)."""
    return (all(k == 1 for k in kernel_size) and all(s == 1 for s in stride)
            and not any(p for lo_hi in padding for p in lo_hi))


def _padded(q: torch.Tensor, pad: list, mode: str) -> torch.Tensor:
    """Q (R, C, *spatial), a batch of R maps, padded (reflect/replicate/circular), contiguous:
    the layout the plan's strides assume (F.pad's output layout for a channels_last Q differs
    between the meta device, where the plan is made, and the CPU)."""
    return F.pad(q, pad, mode=mode).contiguous()


class _Plan(NamedTuple):
    """What a conv_stats call does, worked out from its metadata once (NOTE: [launch plans])."""
    n_pos: int                  # output positions per sample (the return value)
    empty: bool                 # x has no entries: nothing to launch
    dense: bool                 # x read where it lies, else from a contiguous copy
    columns: Optional[tuple]    # a pointwise conv's (A, K, B) column sum, else None
    rows: tuple                 # the batch map's sums: x's memory as (B, C * spatial, 1)
    q_view: tuple               # (shape, strides) of Q (R, C, *spatial) over those sums
    pad: Optional[list]         # F.pad's flat padding of Q (reflect/replicate/circular), or None
    grid: tuple
    args: tuple                 # the lattice kernel's arguments after q and dst
    meta: dict                  # and its constexprs
    partial: int                # rows of the ordered partial sums' scratch, 0: atomic adds


@functools.lru_cache(maxsize=1024)
def _plan(shape: torch.Size, strides: tuple, n_out: int, kernel_size: tuple, stride: tuple,
          padding: tuple, dilation: tuple, groups: int, padding_mode: str, det: bool,
          target: int, interpret: bool, wide_from: int) -> _Plan:
    """The call's checks, and its plan, worked out on a meta x of that shape and those
    strides.  ``target`` (TARGET_PROGRAMS), ``interpret`` (the column sum's split) and
    ``wide_from`` (WIDE_FROM) are part of the key, so that a changed tuning constant is not
    answered from the cache."""
    nd = len(kernel_size)
    if nd not in (1, 2, 3) or len(shape) != nd + 2:
        raise ValueError(f"conv_stats: x must be (B, C, *spatial) with {nd} spatial dims, got "
                         f"shape {tuple(shape)}")
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"conv_stats: unknown padding_mode {padding_mode!r}")
    x = torch.empty_strided(shape, strides, device="meta")
    reference.check_groups("conv_stats", shape[1], groups)
    ktot = math.prod(kernel_size)
    if n_out != shape[1] * ktot:
        reference.check_out("conv_stats", x.new_empty(n_out), shape[1] * ktot)
    sizes = reference.conv_sizes(x, kernel_size, stride, padding, dilation)
    n_pos = math.prod(sizes)
    if x.numel() == 0:
        return _Plan(n_pos, True, True, None, (), (), None, (), (), {}, 0)
    if pointwise(kernel_size, stride, padding):
        dense, abk = column_layout(shape, strides, 1)
        return _Plan(n_pos, False, dense, abk, (), (), None, (), (), {}, 0)
    # Q in x's memory order when x is dense with the batch outermost (channels_last: Q is
    # (*spatial, C)), read through its strides (NOTE: [memory order])
    order = None if x.is_contiguous() else memory_order(x)
    dense = order is None and x.is_contiguous() or order is not None and order[0] == 0
    if not dense:
        x, order = x.contiguous(), None
    xp = x if order is None else x.permute(order)
    b, c, spatial = shape[0], shape[1], list(shape[2:])
    rows = (b, x.numel() // b, 1)
    q = x.new_empty(_n_partials(*rows), rows[1]).view(-1, *xp.shape[1:])
    if order is not None:
        q = q.permute([0] + [order.index(d) for d in range(1, nd + 2)])
    q_view, pad, pads = (tuple(q.shape), q.stride()), None, list(padding)
    if padding_mode != "zeros" and any(p for lo_hi in pads for p in lo_hi):
        pad = [p for lo_hi in reversed(pads) for p in lo_hi]
        q = _padded(q, pad, padding_mode)
        spatial, pads = list(q.shape[2:]), [(0, 0)] * nd
    # run as 3-D: unit leading dims
    zeros, ones = [0] * (3 - nd), [1] * (3 - nd)
    Q = zeros + list(q.stride()[2:])
    S = ones + spatial
    P = zeros + [p[0] for p in pads]
    K = ones + list(kernel_size)
    D = ones + list(dilation)
    T = ones + list(stride)
    N = ones + sizes
    block_ko = min(next_pow2(ktot), MAX_KO)
    block_l = max(1, min(next_pow2(n_pos), TILE // block_ko))
    n_lblk = cdiv(n_pos, block_l)
    n_kob = cdiv(ktot, block_ko)
    # NOTE: [lattice groups]: about TARGET_PROGRAMS programs, never fewer l-groups than needed
    lpg = cdiv(n_lblk, max(1, min(n_lblk, cdiv(target, c * n_kob))))
    n_lgrp = cdiv(n_lblk, lpg)
    return _Plan(n_pos, False, dense, None, rows, q_view, pad, (c * n_lgrp, n_kob),
                 (q.shape[0], q.stride(0), q.stride(1), *Q, *S, *P, *K, *D, *T, *N, n_lblk,
                  n_lgrp, lpg),
                 dict(BLOCK_KO=block_ko, BLOCK_L=block_l, PARTIAL=n_lgrp > 1 and det,
                      WIDE=sum((n - 1) * q for n, q in zip(S, Q)) >= wide_from,
                      enable_fp_fusion=True),
                 n_lgrp if n_lgrp > 1 and det else 0)


@on_device
def conv_stats(x: torch.Tensor, out: torch.Tensor, kernel_size: Sequence[int],
               stride: Sequence[int], padding: Sequence[Tuple[int, int]],
               dilation: Sequence[int], groups: int, padding_mode: str = "zeros") -> int:
    """Same signature and semantics as ``reference.conv_stats`` (see the module docstring)."""
    if out.dtype != torch.float32 or x.dtype == torch.float64 or not out.is_contiguous():
        return reference.conv_stats(x, out, kernel_size, stride, padding, dilation, groups,
                                    padding_mode)
    plan = _plan(x.shape, x.stride(), out.numel(), tuple(kernel_size), tuple(stride),
                 tuple(map(tuple, padding)), tuple(dilation), groups, padding_mode,
                 torch.are_deterministic_algorithms_enabled(), TARGET_PROGRAMS,
                 _column_module.interpreting(), WIDE_FROM)
    if plan.empty:
        return plan.n_pos
    if not plan.dense:
        x = x.contiguous()
    if plan.columns is not None:
        _column_sums(x, out, True, 1.0, abk=plan.columns)
        return plan.n_pos
    q = partial_sums(x, True, 1.0, abk=plan.rows)
    if plan.pad is not None:
        q = _padded(q.as_strided(*plan.q_view), plan.pad, padding_mode)
    dst = out.new_empty(plan.partial, out.numel()) if plan.partial else out
    launch(_lattice_sum_kernel, plan.grid, q, dst, *plan.args, **plan.meta)
    if plan.partial:
        out.add_(dst.sum(0))
    return plan.n_pos
