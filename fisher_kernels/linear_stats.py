"""Triton twin of ``reference.linear_stats``: per-feature sums (of squares) into ``out``.

x: any shape, float16/bfloat16/float32 (float64 buffers fall back to the torch reference: the
float64 path exists for parity tests, not speed); viewed as (A, K, B) with K = x.shape[dim].
``out[k] += scale * sum_{a, b} f(x[a, k, b])``, f = square or identity, accumulated in float32.

Grid: (cdiv(K, BLOCK_K) * cdiv(B, BLOCK_B), SPLIT_A): the (K, B) blocks share axis 0, whose
limit is 2^31 - 1, for B alone would pass the 65535 of axis 1 at B > 8.4M (a BatchNorm3d's
per-channel positions of a 256^3 volume).  Each program sums (BLOCK_A x BLOCK_K x
BLOCK_B) tiles over its share of the A rows in registers (NOTE: [tile shape]), reduces over B and
adds its partial sum with one atomic add per feature (NOTE: [atomic partial sums]), or stores it
for a sum in a fixed order under deterministic algorithms (NOTE: [ordered partials]).
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from adafisher_fast import reference
from .host import cdiv, columns, interpreting, launch, next_pow2, on_device

# NOTE: [atomic partial sums] the A axis (rows: batch x positions) is split so that the grid
# has about TARGET_PROGRAMS programs (the CUDA kernel's ~2048 blocks of 256 threads, in programs
# of 128): a Linear input (B = 1) of 16k rows x 768 features was 64 programs under the old fixed
# split, under half of an H100's 132 SMs.  Partial sums meet in ``out`` through atomic adds
# (order-dependent in the last float32 bit, like any parallel reduction); MAX_BLOCK_K keeps the
# tile narrow in K when B is small, so that the split costs few atomics (one per feature per
# program).  Unmeasured yet on a GPU: the benchmark's linear_stats rows decide.
#
# NOTE: [relaxed atomics] Triton's atomics default to acq_rel: on sm_90 each compiles to a full
# fence (MEMBAR.ALL.GPU: the warp waits for all its memory operations in flight), an atomic that
# returns its old value, and an L1 invalidation (CCTL.IVALL) that drops every cached line of the
# SM, the other programs' too; the embedding counts made eight of each per program, one per
# vector of tokens.  A sum that no program of the launch reads back needs no order (the launch's
# end orders it for the next one), so the statistics kernels add with sem="relaxed": a plain
# reduction (REDG), nothing waited for (tests/test_triton_codegen.py checks the PTX).
#
# NOTE: [ordered partials] Atomic adds meet in whatever order the programs finish, so the last bits
# of a sum change from run to run.  Under torch.use_deterministic_algorithms(True) each program
# stores its partial sums in a row of a (programs, K) scratch instead, and the rows are summed in a
# fixed order into ``out``: the same bits on every run, the same grid, one more small read.  Here
# torch sums them; csrc/reduce.cuh does the same with its own small kernel.
TARGET_PROGRAMS = 1024
MAX_BLOCK_K = 128
TILE = 2048     # elements per program step: 8 KiB of float32 in registers over 4 warps
WIDE_FROM = 2 ** 31 - 2 * TILE   # A or B from here: int64 program offsets (NOTE: [wide offsets])


@triton.jit
def _column_reduce_kernel(x_ptr, out_ptr, mu_ptr, rs_ptr, A, K, B_Q, rows_per_prog, G, CG, RPS,
                          scale, SQUARE: tl.constexpr, AFFINE: tl.constexpr, BLOCK_A: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, B_DIV: tl.constexpr,
                          PARTIAL: tl.constexpr, WIDE: tl.constexpr):
    """out[k] += scale * sum over this program's rows a and its B block of f(x[a, k, b]), with
    f(v) = v or v^2 (SQUARE) of v, or of (v - mu[s]) * rs[s] (norm_stats' xhat): s = k (AFFINE 1)
    or s = (a // RPS) * G + k // CG (AFFINE 2: RPS rows per sample), or of v - mu[k] (AFFINE 3:
    norm_stats' centred pass); AFFINE 0 reads neither mu nor rs.
    PARTIAL: out is a (programs, K) scratch, this program's row stored, not added.
    B = B_Q * B_DIV: NOTE: [plane alignment].  WIDE: NOTE: [wide offsets]."""
    B = B_Q * B_DIV
    n_kb = tl.cdiv(K, BLOCK_K)
    pid_k = tl.program_id(0) % n_kb
    pid_b = tl.program_id(0) // n_kb
    pid_a = tl.program_id(1)
    if WIDE:
        pid_b, pid_a = pid_b.to(tl.int64), pid_a.to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    km = offs_k < K
    kb = km[None, :, None] & (offs_b[None, None, :] < B)
    tile = offs_k[None, :, None].to(tl.int64) * B + offs_b[None, None, :]
    if BLOCK_B == 1:
        # NOTE: [contiguous K] B == 1 (a Linear's rows, and only then BLOCK_B == 1): the tile is
        # BLOCK_K consecutive elements from a multiple of BLOCK_K, which the compiler does not see
        # through the int64 product; told so, it loads 16 bytes per thread where the rows are
        # 16-byte aligned (tests/test_triton_codegen.py checks the PTX), not one element
        tile = tl.max_contiguous(tl.multiple_of(tile, [1, BLOCK_K, 1]), [1, BLOCK_K, 1])
    acc = tl.zeros((BLOCK_A, BLOCK_K, BLOCK_B), dtype=tl.float32)
    a0 = pid_a * rows_per_prog
    a1 = tl.minimum(a0 + rows_per_prog, A)
    row_stride = tl.cast(K, tl.int64) * B
    if AFFINE == 3:
        mu3 = tl.load(mu_ptr + offs_k, mask=km, other=0.0)[None, :, None]
    for s in range(a0, a1, BLOCK_A):
        rows = s + offs_a
        rm = rows < a1
        mask = rm[:, None, None] & kb
        v = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * row_stride + tile, mask=mask,
                    other=0.0).to(tl.float32)
        if AFFINE == 1:
            mu = tl.load(mu_ptr + offs_k, mask=km, other=0.0)[None, :, None]
            rs = tl.load(rs_ptr + offs_k, mask=km, other=0.0)[None, :, None]
            v = tl.where(mask, (v - mu) * rs, 0.0)
        elif AFFINE == 2:
            si = (rows // RPS)[:, None] * G + offs_k[None, :] // CG
            sm = rm[:, None] & km[None, :]
            mu = tl.load(mu_ptr + si, mask=sm, other=0.0)[:, :, None]
            rs = tl.load(rs_ptr + si, mask=sm, other=0.0)[:, :, None]
            v = tl.where(mask, (v - mu) * rs, 0.0)
        elif AFFINE == 3:
            v = tl.where(mask, v - mu3, 0.0)
        if SQUARE:
            v = v * v
        acc += v
    tot = tl.sum(tl.sum(acc, axis=2), axis=0) * scale
    if PARTIAL:
        row = pid_a * tl.cdiv(B, BLOCK_B) + pid_b
        tl.store(out_ptr + row.to(tl.int64) * K + offs_k, tot, mask=km)
    else:
        tl.atomic_add(out_ptr + offs_k, tot, mask=km, sem="relaxed")   # NOTE: [relaxed atomics]


def tiles(a: int, k: int, b: int):
    """``_tiles``, memoised: a training loop asks for the same few shapes every iteration."""
    return _tiles(a, k, b, interpreting())


@functools.lru_cache(maxsize=1024)
def _tiles(a: int, k: int, b: int, interpret: bool):
    """(BLOCK_A, BLOCK_K, BLOCK_B, rows per program, grid) of the (A, K, B) column reduction.

    NOTE: [tile shape] about TILE elements per step: B (contiguous) first, up to 128, then K (up
    to MAX_BLOCK_K), then rows of A; A is split over the programs (NOTE: [atomic partial sums]),
    not at all under the interpreter, where programs run one after the other and only add
    Python overhead."""
    block_b = min(next_pow2(b), 128)
    block_k = max(1, min(next_pow2(k), TILE // block_b, MAX_BLOCK_K))
    block_a = max(1, min(next_pow2(a), TILE // (block_b * block_k)))
    tiles_kb = cdiv(k, block_k) * cdiv(b, block_b)
    split = 1 if interpret else max(1, min(cdiv(TARGET_PROGRAMS, tiles_kb), cdiv(a, block_a)))
    rows = cdiv(cdiv(a, split), block_a) * block_a     # whole tiles per program
    grid = (cdiv(k, block_k) * cdiv(b, block_b), cdiv(a, rows))
    return block_a, block_k, block_b, rows, grid


def _launch(x3: torch.Tensor, out: torch.Tensor, square: bool, scale: float, affine: int = 0,
            mu: torch.Tensor = None, rs: torch.Tensor = None, g: int = 1, cg: int = 1,
            rps: int = 1, abk: Tuple[int, int, int] = None) -> None:
    """x3: contiguous (A, K, B), or (``abk`` given) any tensor whose memory is that (A, K, B)
    (``host.columns``: no view made, NOTE: [launch plans]); out: contiguous float32 (K,);
    affine/mu/rs/g/cg/rps: see the kernel."""
    abk = abk or tuple(x3.shape)
    if not math.prod(abk):
        return
    args = (square, scale, affine, mu, rs, g, cg, rps)
    if _n_partials(*abk) > 1 and torch.are_deterministic_algorithms_enabled():
        out.add_(partial_sums(x3, *args, abk=abk).sum(0))
    else:
        _run(x3, abk, out, False, *args)


def partial_sums(x3: torch.Tensor, square: bool, scale: float, affine: int = 0,
                 mu: torch.Tensor = None, rs: torch.Tensor = None, g: int = 1, cg: int = 1,
                 rps: int = 1, abk: Tuple[int, int, int] = None) -> torch.Tensor:
    """``_launch``'s sums before the programs' partial sums meet: (R, K) float32, one row per
    program along A and B (NOTE: [ordered partials]), each entry stored once, so the scratch
    needs no zero fill; x3 (or abk) non-empty."""
    abk = abk or tuple(x3.shape)
    dst = torch.empty(_n_partials(*abk), abk[1], dtype=torch.float32, device=x3.device)
    _run(x3, abk, dst, True, square, scale, affine, mu, rs, g, cg, rps)
    return dst


def _n_partials(a: int, k: int, b: int) -> int:
    """Programs that sum parts of one feature: the rows of ``partial_sums``."""
    _, _, block_b, _, grid = tiles(a, k, b)
    return cdiv(b, block_b) * grid[1]


def _run(x3, abk, dst, partial, square, scale, affine, mu, rs, g, cg, rps) -> None:
    a, k, b = abk
    block_a, block_k, block_b, rows, grid = tiles(a, k, b)
    # NOTE: [plane alignment] the JIT marks an integer argument divisible by 16 or not at all, so a
    # 14x14 plane (B = 196 = 4 * 49) would read one element per thread; B passed as B_Q * B_DIV,
    # B_DIV the power of two (up to 16) dividing it, tells the compiler that plane rows start
    # B_DIV-element aligned, and it loads up to B_DIV elements at once (8 or 16 bytes).  (B of 2^31
    # and more stays whole: B_Q * B_DIV would be an int32 product there.)
    b_div = min(b & -b, 16) if b < 2 ** 31 else 1
    # NOTE: [wide offsets] a program id is int32, and so are pid * BLOCK_B and pid * rows, which
    # wrap (to negative offsets, inside the mask) once A or B nears 2^31: such a launch widens them
    # to int64 first.  Only there: 64-bit row indices cost divisions in AFFINE 2's loop.
    wide = max(a, b) >= WIDE_FROM
    launch(_column_reduce_kernel, grid,
           x3, dst, dst if mu is None else mu, dst if rs is None else rs, a, k, b // b_div, rows,
           g, cg, rps, float(scale), SQUARE=square, AFFINE=affine, BLOCK_A=block_a,
           BLOCK_K=block_k, BLOCK_B=block_b, B_DIV=b_div, PARTIAL=partial, WIDE=wide,
           enable_fp_fusion=True)


@on_device
def linear_stats(x: torch.Tensor, out: torch.Tensor, dim: int = -1, square: bool = True,
                 scale: float = 1.0) -> None:
    """Same signature and semantics as ``reference.linear_stats`` (see the module docstring)."""
    reference.check_dim("linear_stats", x, dim)
    reference.check_out("linear_stats", out, x.shape[dim])
    if out.dtype == torch.float64 or x.dtype == torch.float64:
        return reference.linear_stats(x, out, dim, square, scale)
    x3, abk = columns(x, dim % x.dim())          # NOTE: [memory order], [launch plans]
    if out.is_contiguous() and out.dtype == torch.float32:
        _launch(x3, out, square, scale, abk=abk)
    else:
        tmp = torch.zeros(abk[1], dtype=torch.float32, device=out.device)
        _launch(x3, tmp, square, scale, abk=abk)
        out.add_(tmp.to(out.dtype))
