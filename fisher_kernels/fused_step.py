"""Triton twin of ``reference.fused_step``: the AdaFisher / AdaFisherW update of every parameter.

Per element (SPEC 1), math in float32, state (m) in the parameter dtype:
    g = grad (+ wd * p unless decoupled);  m = beta * m + (1 - beta) * g
    F = fac[s_off + r*s_r + c*s_c] * fac[h_off + r*h_r + c*h_c + ((r + h_ph) // h_gr) * h_gs]
        + Lambda
    p -= lr * (m / (1 - beta^t) / F (+ wd * p if decoupled))
with (r, c) the element's position in the parameter's (rows x cols) view (NOTE: [param map] in
reference.py).  Each element of p, g and m is read once and p, m written once; F is computed from
the small fac vector, never materialised.

NOTE: [pointer tables] The update is ONE launch per (param dtype, grad dtype) pair -- one launch
for a model in one dtype: chunk tables map each program to (parameter, chunk: NOTE: [chunk size])
and hold each parameter's size and meta row, an int64 table each parameter's data pointers (p, g,
m), and a float32 table its hyper-parameters (lr, beta, 1 - beta, wd, Lambda, ln beta), and with
tensor lrs an int64 table their addresses (NOTE: [tensor lr] in kernel_host.py). The tables live on
the device and are cached: the chunk and meta tables by sizes, layouts and meta rows, the pointers
by the pointers and step addresses, the hyper-parameters by value, so a training loop uploads them
once, new gradient tensors only the pointers, an LR schedule only the small hyper-parameter table,
always from pinned memory without stalling the host; and a CUDA graph replays them safely (NOTE:
[capturable] in optimizer.py). GradScaler's ``found_inf``, when given, is read by every program,
which all skip when it is non-zero (NOTE: [GradScaler]). A dtype pair whose parameters are all
zero-size launches nothing and uploads no table; its step counts advance as the reference's. The
kernel computes the bias correction 1 - beta^t = -expm1(t * ln beta) in float32 within a few
roundings for every beta and t (relative error under 2e-7 measured, beta = 0.9999 included; NOTE:
[bias correction]). The Triton interpreter (TRITON_INTERPRET=1, CPU tests) runs this same kernel:
it dereferences the tables' integers as host addresses, so the CPU tests check the GPU's code path
(all but the concurrency of its programs).

NOTE: [step tickets] Step counts kept on the kernel's device (float32, as the optimizer keeps them
for the GPU kernels, NOTE: [device steps]) are read through a table of their addresses: every
program reads its parameter's t, then takes a ticket (an atomic add on a counter cached with the
tables) before its update; the last program to take one re-arms the counter and, after its own
update, increments every step count.  So the step is one launch, no program can see a
half-updated count, and there is no host read of t.  The ticket orders the reads of t (release;
only the last program needs acquire), not the update: taken after it, as at first, it put a full
fence (MEMBAR.ALL.GPU) behind each program's stores, so every program waited for its 4-8 KB of
stores to drain, and, with acquire, an L1 invalidation (CCTL.IVALL) that dropped the cached fac
and table lines of the other programs on its SM (sm_90 SASS, triton 3.9; not timed on a GPU).  Step
counts kept on the host are incremented there and their values uploaded (the csrc twin does the
same, NOTE: [step chunks] in csrc/fused_step.cu).

float64 parameters go through the reference (parity runs).  Contiguous and channels_last parameters
are updated in place (NOTE: [row transpose] in adafisher_fast/kernel_host.py), a gradient in
another layout read through a copy in the parameter's; in other layouts p, g and m are copied
contiguous and p, m copied back.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from adafisher_fast import kernel_host, reference
from .host import cdiv, launch, on_device

NUM_WARPS = 8         # 256 threads a program, as csrc's blocks
MAX_REGISTERS = {4: 64, 2: 80}     # by parameter element size: 4 or 3 programs an SM (NOTE: [chunk
                                   # size]), csrc's launch bounds (NOTE: [step registers])
BLOCK_BYTES = 4096    # of each parameter a program updates at a time: a 16-byte word a thread
MAX_CHUNK_BLOCKS = 16  # NOTE: [chunk size]: a program's chunk is at most 16 blocks
TARGET_PROGRAMS = 8192      # and the chunks a launch has, about, when it has more blocks
# A row of the meta table: NOTE: [param map]'s columns, then T (NOTE: [row transpose]), then (m, s)
# for cols, T and h_gr (NOTE: [magic division]).  ``_update`` loads the map's columns by position
# (tests/test_fused_step.py pins their order).
COL = {name: i for i, name in enumerate(reference.META_COLS + ("T", "magics"))}
N_META = COL["magics"] + 6
N_HYPER = 6           # lr, beta, 1 - beta, wd, Lambda, ln(beta)
STEP_BLOCK = 256      # step counts the last program increments per iteration (NOTE: [step tickets])


N_META_C: tl.constexpr = tl.constexpr(N_META)     # the same numbers, visible inside kernels
T_COL: tl.constexpr = tl.constexpr(COL["T"])
MAGIC_COL: tl.constexpr = tl.constexpr(COL["magics"])
N_HYPER_C: tl.constexpr = tl.constexpr(N_HYPER)


@triton.jit
def _bias_correction(t, ln_beta):
    """1 - beta^t = -expm1(t * ln beta) from float32 scalars t and ln beta (NOTE: [bias
    correction]).

    NOTE: [bias correction] 1 - exp(x) first rounds exp(x) ~ 1 to float32, an absolute error of
    6e-8 that the subtraction turns into 6e-8 / (1 - beta^t) relative: 1.7e-4 at beta = 0.9999,
    t = 1 (the former 1 - exp2(t * log2 beta)).  Instead, expm1 as libm computes it: x = n ln 2 + r
    with n an integer and |r| <= ln(2) / 2 (ln 2 split in two, so n * ln2_hi and the subtraction
    are exact), expm1(r) by its Taylor series to r^8 / 8! (the rest is under 1e-9 of it; each term
    is under a fifth of the one before, so Horner's rule adds no cancellation), then
    1 - e^x = (1 - 2^n) - 2^n expm1(r) with 2^n built from its exponent bits: both products exact,
    one rounding.  No exp (ex2.approx on the GPU) is involved: the interpreter runs the GPU's
    operations, rounded alike (no FMA contraction: NOTE: [fp fusion]).  x itself carries two
    roundings (ln beta, computed in float64 on the host and stored as float32, and the product
    t * ln beta), which expm1 passes on without growth for x <= 0.  x is clamped to [-40, 40]:
    1 - e^-40 is 1 in float32, and beta = 0 (ln beta = -inf) gives 1 as the reference does.
    Measured under the interpreter against float64 over 40,000 (beta, t), beta from 0 to
    1 - 1e-5 and t up to 1e7: at most 1.6e-7 relative (the former formula: 2.7e-3).  The csrc
    twin rounds 1 - pow(beta, t), computed in double, once (csrc/fused_step.cu).  Once per
    program, on scalars: a dozen multiply-adds.  Registers per
    thread (tests/triton_codegen.py, sm_80 and sm_90) as before in every configuration on triton
    3.6, and on 3.9 in all but two: sm_80 bf16/fp16 decoupled with host steps, 96 -> 128, what
    their device-step twins already used."""
    x = tl.minimum(tl.maximum(t * ln_beta, -40.0), 40.0)
    n = tl.floor(x * 1.4426950408889634 + 0.5)                    # round(x / ln 2)
    r = (x - n * 0.693145751953125) - n * 1.4286067653e-06        # ln 2 = hi + lo, hi 15 bits
    p = 2.48015873015873e-05 * r + 0.0001984126984126984          # 1/8!, 1/7!
    p = p * r + 0.001388888888888889                              # 1/6!
    p = p * r + 0.008333333333333333                              # 1/5!
    p = p * r + 0.041666666666666664                              # 1/4!
    p = p * r + 0.16666666666666666                               # 1/3!
    p = p * r + 0.5
    p = p * r + 1.0
    two_n = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)   # 2^n, |n| <= 58
    return (1.0 - two_n) - two_n * (r * p)


def magic(d: int) -> Tuple[int, int]:
    """(m, s) with n // d == (n * m) >> s for every 0 <= n < 2^31, and m < 2^32, for 1 <= d < 2^31.

    NOTE: [magic division] A 32-bit integer division by a value the compiler does not know is a
    float reciprocal plus a dozen integer corrections, signed ones more, and per element the
    step's row and group divisions were a fifth to a third of its main loop.  Instructions an
    iteration (a 16-byte word a thread; sm_90 SASS, triton 3.9), before and with this: float32
    238 and 187, float32 with groups 315 and 213, bfloat16 with groups 484 and 388; registers a
    thread 60-64 and 60-63 for float32 parameters, 78-80 and 64-72 for 16-bit ones (sm_80 and
    sm_90, tests/triton_codegen.py); not yet timed on a GPU.  Division by an
    invariant d is instead a multiply and a shift (Granlund and Montgomery, 1994, theorem 4.2):
    with l = ceil(log2 d) and m = ceil(2^(31 + l) / d), m d = 2^(31 + l) + e with 0 <= e < d
    <= 2^l, so n m / 2^(31 + l) = n / d + n e / (d 2^(31 + l)), the last term under 1 / d for
    n < 2^31: it cannot reach the next integer.  m <= 2^32 - 1, so the kernel's product of two
    32-bit operands is one wide multiply.  Computed here, once per parameter, into its meta row;
    ``_div`` is the kernel's side."""
    l = (d - 1).bit_length()
    return -(-(1 << (31 + l)) // d), 31 + l


@triton.jit
def _div(n, m, s):
    """n // d for int32 0 <= n < 2^31, from d's ``magic`` (m, s) (NOTE: [magic division])."""
    return ((n.to(tl.uint32).to(tl.uint64) * m.to(tl.uint32).to(tl.uint64)) >> s).to(tl.int32)


@triton.jit
def _update_block(p_ptr, g_ptr, m_ptr, fac_ptr, lo, left, cols, cols_tr, tr, s_base, s_r, s_c,
                  h_base, h_r, h_c, gr0, h_gr, h_gs, magics, lr, beta, omb, wd, lam, rbc,
                  DECOUPLED: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr,
                  MASKED: tl.constexpr, WIDE: tl.constexpr):
    """A block of BLOCK elements (p_ptr, g_ptr, m_ptr: its first element's), of which ``left``
    are the parameter's when MASKED, else all (NOTE: [vector loads]): the formula of the module
    docstring, ``rbc`` = 1 / (1 - beta^t).  F's indices from the chunk's origin (``_update``):
    element j of the block lies dr = (lo + j) // cols rows below the chunk's first row, and its
    row's H group is (gr0 + dr) // h_gr groups below the first row's.  ``magics``: (m, s) of
    cols, tr and h_gr, by which a launch that is not WIDE divides (NOTE: [magic division]).

    NOTE: [no groups] the group term serves H's (r // h_gr) * h_gs, and h_gs is 0 but for grouped
    convs and the exposed attention's q/k/v: a launch whose parameters have none (GROUPS false,
    chosen on the host) skips that division per element."""
    j = tl.arange(0, BLOCK)
    mask = (j < left) if MASKED else None
    zero = 0.0 if MASKED else None
    one = 1.0 if MASKED else None
    local = lo + j
    cm, cs, tm, ts, gm, gs = magics
    dr = local // cols if WIDE else _div(local, cm, cs)
    c = local - dr * cols
    if tr > 1:                                      # NOTE: [row transpose] in kernel_host.py
        q = c // tr if WIDE else _div(c, tm, ts)
        c = (c - q * tr) * cols_tr + q
    s_idx = s_base + dr * s_r + c * s_c
    h_idx = h_base + dr * h_r + c * h_c
    if GROUPS:
        h_idx += ((gr0 + dr) // h_gr if WIDE else _div(gr0 + dr, gm, gs)) * h_gs
    fs = tl.load(fac_ptr + s_idx, mask=mask, other=one).to(tl.float32)
    fh = tl.load(fac_ptr + h_idx, mask=mask, other=one).to(tl.float32)
    fd = fs * fh + lam
    p = tl.load(p_ptr + j, mask=mask, other=zero)
    pw = p.to(tl.float32)
    g = tl.load(g_ptr + j, mask=mask, other=zero).to(tl.float32)
    m = tl.load(m_ptr + j, mask=mask, other=zero).to(tl.float32)
    # NOTE: [no decay term] wd == 0 adds no term at all, as the reference and csrc (a 0 * p of an
    # inf parameter element would be NaN and poison its momentum for good)
    if not DECOUPLED:
        g = tl.where(wd != 0.0, g + wd * pw, g)
    m = m * beta + g * omb
    # NOTE: [division rounding] torch on CUDA divides a tensor by a CPU scalar as a multiply by its
    # correctly rounded reciprocal, and divides tensors with IEEE division; Triton's "/" is the
    # approximate div.full.f32.  div_rn reproduces the reference's rounding on the GPU (NOTE:
    # [ieee rounding] in fisher_kernels/__init__.py).
    upd = tl.math.div_rn(m * rbc, fd)
    if DECOUPLED:
        upd = tl.where(wd != 0.0, upd + wd * pw, upd)
    tl.store(m_ptr + j, m.to(p.dtype), mask=mask)
    tl.store(p_ptr + j, (pw - lr * upd).to(p.dtype), mask=mask)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, fac_ptr, start, chunk, n, meta_ptr, lr, beta, omb, wd, lam, bc,
            DECOUPLED: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
            GROUPS: tl.constexpr):
    """The chunk [start, min(start + chunk, n)) of one parameter, BLOCK elements at a time: its
    full blocks unmasked, the parameter's ragged last block masked (NOTE: [vector loads],
    [chunk size]).  Element start + j is at (r, c) of the parameter's (rows x cols) view, stored
    row-major (tr = 1) or transposed (tr = T > 1, NOTE: [row transpose] in kernel_host.py).

    NOTE: [row division] A 64-bit integer division compiles to a 32-bit fast path plus a
    subroutine for wide operands, and per element that code cost the kernel 168 registers per
    thread (under 100 without it; tests/triton_codegen.py reports them).  So the 64-bit divisions
    happen once per program, for the chunk's first element (its row r0, column offset o0 and r0's
    H group), and each element divides only its 32-bit offset from the chunk's first row:
    o0 + j < cols + CHUNK and (r0 + h_ph) % h_gr + dr < h_gr + CHUNK fit 31 bits, which a
    multiply and a shift divide (NOTE: [magic division]), unless WIDE (cols or h_gr of I32_LIMIT
    or more, chosen on the host), where every element divides its 64-bit offset from the
    parameter's first element (r0 = 0).

    NOTE: [32-bit indices] fac holds every layer's H and S (at most a few million entries), so
    every index into it fits 32 bits, and 32-bit arithmetic, which wraps, gets it right from
    operands taken modulo 2^32 (a row past 2^31 included).  64-bit indices held two registers an
    element each and took 64-bit multiply-adds: 96-128 registers a thread on triton 3.9, 72-80
    with these (tests/triton_codegen.py).  A fac of I32_LIMIT entries or more launches WIDE
    (``_launch``)."""
    cols = tl.load(meta_ptr + 1)
    s_base = tl.load(meta_ptr + 2)
    s_r = tl.load(meta_ptr + 3)
    s_c = tl.load(meta_ptr + 4)
    h_base = tl.load(meta_ptr + 5)
    h_r = tl.load(meta_ptr + 6)
    h_c = tl.load(meta_ptr + 7)
    h_gr = tl.maximum(tl.load(meta_ptr + 8), 1)
    h_gs = tl.load(meta_ptr + 9)
    gr0 = tl.load(meta_ptr + 10)        # h_ph: row 0's row in its group (WIDE: the chunk's too)
    tr = tl.load(meta_ptr + T_COL)
    magic_ptr = meta_ptr + MAGIC_COL
    magics = (tl.load(magic_ptr), tl.load(magic_ptr + 1), tl.load(magic_ptr + 2),
              tl.load(magic_ptr + 3), tl.load(magic_ptr + 4), tl.load(magic_ptr + 5))
    o0 = start
    if not WIDE:
        r0 = start // cols
        o0 = (start - r0 * cols).to(tl.int32)
        s_base = (s_base + r0 * s_r).to(tl.int32)
        h_base = h_base + r0 * h_r
        if GROUPS:
            g0 = (r0 + gr0) // h_gr
            gr0 = (r0 + gr0 - g0 * h_gr).to(tl.int32)
            h_base += g0 * h_gs
        h_base = h_base.to(tl.int32)
        cols = cols.to(tl.int32)
        s_r = s_r.to(tl.int32)
        s_c = s_c.to(tl.int32)
        h_r = h_r.to(tl.int32)
        h_c = h_c.to(tl.int32)
        h_gr = h_gr.to(tl.int32)
        h_gs = h_gs.to(tl.int32)
        tr = tr.to(tl.int32)
    cols_tr = cols // tr
    rbc = tl.math.div_rn(1.0, bc)
    p_ptr += start
    g_ptr += start
    m_ptr += start
    size = tl.minimum(chunk, n - start).to(tl.int32)
    n_full = size // BLOCK
    for _ in range(0, n_full):
        _update_block(p_ptr, g_ptr, m_ptr, fac_ptr, o0, BLOCK, cols, cols_tr, tr, s_base, s_r, s_c,
                      h_base, h_r, h_c, gr0, h_gr, h_gs, magics, lr, beta, omb, wd, lam, rbc,
                      DECOUPLED, BLOCK, GROUPS, False, WIDE)
        p_ptr += BLOCK
        g_ptr += BLOCK
        m_ptr += BLOCK
        o0 += BLOCK
    if n_full * BLOCK < size:
        _update_block(p_ptr, g_ptr, m_ptr, fac_ptr, o0, size - n_full * BLOCK, cols, cols_tr, tr,
                      s_base, s_r, s_c, h_base, h_r, h_c, gr0, h_gr, h_gs, magics, lr, beta, omb,
                      wd, lam, rbc, DECOUPLED, BLOCK, GROUPS, True, WIDE)


@triton.jit
def _program(chunk_param, chunk_start, chunk, ptrs, numels, meta, hyper, lr_ptrs, steps, n_steps,
             ticket, fac_ptr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr,
             BLOCK: tl.constexpr, WIDE: tl.constexpr, GROUPS: tl.constexpr,
             ALIGNED: tl.constexpr, DEVICE_STEPS: tl.constexpr, LR_PTRS: tl.constexpr,
             STEP_BLOCK: tl.constexpr):
    """One program's chunk of one parameter (NOTE: [chunk size]), after its step ticket (NOTE:
    [step tickets])."""
    pid = tl.program_id(0)
    i = tl.load(chunk_param + pid)
    start = tl.load(chunk_start + pid)
    p_ptr = tl.load(ptrs + 3 * i).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(ptrs + 3 * i + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(ptrs + 3 * i + 2).to(tl.pointer_type(P_DTYPE))
    n = tl.load(numels + i)
    hp = hyper + N_HYPER_C * i
    lr = tl.load(hp)
    if LR_PTRS:
        lr_at = tl.load(lr_ptrs + i)
        if lr_at != 0:
            lr = tl.load(lr_at.to(tl.pointer_type(tl.float32)))
    beta = tl.load(hp + 1)
    omb = tl.load(hp + 2)
    wd = tl.load(hp + 3)
    lam = tl.load(hp + 4)
    if DEVICE_STEPS:
        t = tl.load(tl.load(steps + i).to(tl.pointer_type(tl.float32))) + 1.0
    else:
        t = tl.load(steps + i)
    bc = _bias_correction(t, tl.load(hp + 5))
    # NOTE: [vector loads] pointers from a table carry no alignment, and a mask bound of unknown
    # divisibility varies per element: either makes every load and store 4 bytes wide.  With
    # every p/g/m pointer 16-byte aligned (ALIGNED, checked on the host) and the bound of a full
    # block a multiple of BLOCK (chunks start at multiples of BLOCK), they move 16 bytes; only
    # each parameter's last block is ragged.
    start = tl.multiple_of(start, BLOCK)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
    last = False
    if DEVICE_STEPS:                            # NOTE: [step tickets]
        tl.debug_barrier()                      # every thread of the program has read its t
        last = tl.atomic_add(ticket, 1, sem="release") == tl.num_programs(0) - 1
    _update(p_ptr, g_ptr, m_ptr, fac_ptr, start, chunk, n, meta + N_META_C * i, lr, beta, omb, wd,
            lam, bc, DECOUPLED, BLOCK, WIDE, GROUPS)
    if DEVICE_STEPS:
        if last:
            tl.atomic_xchg(ticket, 0, sem="acquire")        # re-armed; then every t was read
            tl.debug_barrier()                      # by one thread: the others wait for it
            for k in range(0, n_steps, STEP_BLOCK):
                j = k + tl.arange(0, STEP_BLOCK)
                on = j < n_steps
                sp = tl.load(steps + j, mask=on, other=0).to(tl.pointer_type(tl.float32))
                tl.store(sp, tl.load(sp, mask=on) + 1.0, mask=on)


@triton.jit
def _fused_step_kernel(chunk_param, chunk_start, chunk, ptrs, numels, meta, hyper, lr_ptrs,
                       steps, n_steps, ticket, fac_ptr, found_inf, P_DTYPE: tl.constexpr,
                       G_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr, BLOCK: tl.constexpr,
                       WIDE: tl.constexpr, GROUPS: tl.constexpr, ALIGNED: tl.constexpr,
                       DEVICE_STEPS: tl.constexpr, LR_PTRS: tl.constexpr,
                       FOUND_INF: tl.constexpr, STEP_BLOCK: tl.constexpr):
    """Every parameter of one dtype pair in one launch (NOTE: [pointer tables]), or (FOUND_INF,
    ``found_inf`` non-zero) no change at all.  ``steps``: the addresses of the n_steps float32
    step counts (DEVICE_STEPS, NOTE: [step tickets]), else the float32 values t of the
    parameters, already incremented on the host.  ``lr_ptrs`` (LR_PTRS): per parameter the
    address of its float32 lr tensor, or 0 for the hyper table's lr (NOTE: [tensor lr] in
    adafisher_fast/kernel_host.py)."""
    go = True
    if FOUND_INF:               # every program reads the same value: all skip, no ticket taken
        go = tl.load(found_inf) == 0.0
    if go:
        _program(chunk_param, chunk_start, chunk, ptrs, numels, meta, hyper, lr_ptrs, steps,
                 n_steps, ticket, fac_ptr, P_DTYPE, G_DTYPE, DECOUPLED, BLOCK, WIDE, GROUPS,
                 ALIGNED, DEVICE_STEPS, LR_PTRS, STEP_BLOCK)


I32_LIMIT = 2 ** 31 - MAX_CHUNK_BLOCKS * BLOCK_BYTES // 2    # NOTE: [row division]: cols and h_gr
                                                            # below this divide in 32 bits


def block_size(dtype: torch.dtype) -> int:
    """Elements of a parameter of ``dtype`` a program updates at a time (NOTE: [chunk size])."""
    return BLOCK_BYTES // dtype.itemsize


def chunk_size(numels: List[int], dtype: torch.dtype) -> int:
    """Elements a program steps in one launch over parameters of these sizes and ``dtype``
    (NOTE: [chunk size]; csrc's binding sizes its chunks alike)."""
    block = block_size(dtype)
    n_blocks = sum(cdiv(n, block) for n in numels)
    return block * max(1, min(MAX_CHUNK_BLOCKS, n_blocks // TARGET_PROGRAMS))


def _wide(rows) -> bool:
    """Whether some meta row (NOTE: [param map]) needs 64-bit per-element division."""
    return any(max(row[COL["cols"]], row[COL["h_gr"]]) >= I32_LIMIT for row in rows)


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class _Pair(NamedTuple):
    """The parameters of one (param dtype, grad dtype) pair as the launch takes them."""
    idx: List[int]                  # their indices in the op's lists, zero-size ones excluded
    ps: list                        # p, g, m as the kernel walks them (kernel_host.operands)
    gs: list
    ms: list
    trs: List[int]                  # NOTE: [row transpose]
    steps: list                     # their step counts, then the zero-size parameters'
    empty: List[int]                # the zero-size parameters' indices


_DTYPE = operator.attrgetter("dtype")
_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel


def _pairs(params: list, grads: list, moms: list) -> Tuple[Dict[tuple, tuple], List[int]]:
    """({(param dtype, grad dtype): (indices, zero-size indices)} of the parameters the kernel
    takes, the indices of the others (the reference steps them)); one dtype pair in C-level
    passes (NOTE: [step host path])."""
    pd, gd, md = (list(map(_DTYPE, lst)) for lst in (params, grads, moms))
    numels = list(map(_NUMEL, params))
    pset, gset = set(pd), set(gd)
    if (len(pset) == len(gset) == 1 and pd[0] in _TL and gd[0] in _TL and set(md) == pset
            and all(numels)):
        return {(pd[0], gd[0]): (list(range(len(params))), [])}, []
    pairs, ref_idx = {}, []
    for i, pdt, gdt, mdt, nel in zip(range(len(params)), pd, gd, md, numels):
        if pdt in _TL and gdt in _TL and mdt == pdt:
            pairs.setdefault((pdt, gdt), ([], []))[nel == 0].append(i)
        else:
            ref_idx.append(i)
    return pairs, ref_idx


@on_device
def fused_step(params: List[torch.Tensor], grads: List[torch.Tensor], moms: List[torch.Tensor],
               steps: List[torch.Tensor], fac: torch.Tensor, meta: torch.Tensor,
               hyper: List[Tuple[float, float, float, float]], decoupled: bool,
               found_inf: Optional[torch.Tensor] = None) -> None:
    """Same signature and semantics as ``reference.fused_step`` (see the module docstring)."""
    reference.check_step_lists(params, grads, moms, steps, meta, hyper, found_inf)
    by_value, lrs = kernel_host.split_lr(hyper, fac.device)      # NOTE: [tensor lr]
    # NOTE: [step host path] One pass per step over the parameters, reading what the cached tables
    # are keyed by; everything else (shape checks, table building) happens on a cache miss.  A hit
    # means the same p/g/m memory, sizes, layouts (T), steps and meta rows as a checked step, so
    # the launch is safe as it was then.  All pairs are looked up before any of them launches,
    # so a bad shape raises before any state changes.  That pass is the step's host cost, about
    # what AdamW(fused=True) spends per parameter (python -m bench.host), so the usual case (one
    # dtype pair, all contiguous, float lrs) is recognised by C-level passes (map over the
    # lists) rather than a Python call per parameter: on ResNet-18's 62 parameters the step's
    # host time went from 1.14-1.28x AdamW's to 0.78-0.83x (the 2-core CI host, kernels stubbed;
    # bench/README.md).
    meta_key = kernel_host.meta_token(meta)
    pairs, ref_idx = _pairs(params, grads, moms)
    launches = []               # (dtype pair, its parameters, what copy_back copies, tables)
    for (pdt, gdt), (idx, empty) in pairs.items():
        ps, gs, ms, trs, back = kernel_host.operands(idx, params, grads, moms, meta, meta_key)
        pair = _Pair(idx, ps, gs, ms, trs, [steps[i] for i in idx + empty], empty)
        lr_at = () if by_value is hyper else tuple(      # (split_lr's 'no tensor lr')
            0 if lrs[i] is None else lrs[i].data_ptr() for i in idx)
        key = (pdt, gdt, str(fac.device), fac.numel(), tuple(map(_PTR, pair.steps)),
               tuple(map(_PTR, ps)), tuple(map(_PTR, gs)), tuple(map(_PTR, ms)),
               tuple(map(_NUMEL, ps)), tuple(trs), tuple(idx), meta_key, lr_at)
        launches.append((pdt, gdt, pair, back, _cached(_TABLES, key, lambda: _build(
            pair, params, grads, moms, meta, meta_key, lr_at, fac.numel(), fac.device))))
    if found_inf is not None and any(tables and tables[2] is None for *_, tables in launches):
        raise ValueError(f"fused_step: found_inf needs the step counts as float32 on the kernel's "
                         f"device ({fac.device}), where the skip is decided (NOTE: [GradScaler])")
    if ref_idx:
        reference.check_step_shapes(params, grads, moms, ref_idx)
        reference.fused_step([params[i] for i in ref_idx], [grads[i] for i in ref_idx],
                             [moms[i] for i in ref_idx], [steps[i] for i in ref_idx], fac,
                             meta[ref_idx], [hyper[i] for i in ref_idx], decoupled, found_inf)
    fac_c = fac.contiguous()
    for pdt, gdt, pair, back, tables in launches:
        _launch(pair, tables, fac_c, by_value, decoupled, pdt, gdt, found_inf)
        kernel_host.copy_back(back)
    kernel_host.mark_written(params)        # NOTE: [version counters]


# NOTE: [pointer tables]: the pointer, step-address and lr-address tables keyed by (dtype pair,
# device, step addresses, pointers and sizes, meta rows, lr addresses), the chunk and meta tables
# by (device, sizes, layouts, meta rows), the hyper-parameter table by value: an LR schedule of
# float lrs re-uploads only the latter, one of tensor lrs nothing
_TABLES: Dict[tuple, tuple] = {}
_CHUNKS: Dict[tuple, tuple] = {}
_HYPER: Dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 8


def _upload(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host table to the device without stalling the host: a copy from pageable memory would
    wait for the stream (the whole backward pass) first; one from pinned memory is queued."""
    if dev.type != "cuda":
        return t.to(dev)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fused_step: a host table would be uploaded inside this CUDA-graph capture, and the "
            "graph would replay a stale copy: step counts kept on the host (capturable=False), or "
            "parameters, gradients or hyper-parameters that no eager step before the capture used; "
            "capture with capturable=True after an eager step with the same tensors and settings "
            "(NOTE: [capturable])")
    return t.pin_memory().to(dev, non_blocking=True)


def _cached(cache: dict, key: tuple, build):
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= _MAX_TABLES:
            cache.pop(next(iter(cache)))
        hit = cache[key] = build()
    return hit


def _device_steps(steps, dev) -> bool:
    """Whether every step count is a float32 tensor on ``dev``: read and incremented by the kernel
    through its address (NOTE: [step tickets]), else incremented on the host."""
    return all(t.device == dev and t.dtype == torch.float32 for t in steps)


def _build(pair: _Pair, params, grads, moms, meta, meta_key, lr_at, fac_numel, dev):
    """The device tables of one dtype pair after checking its shapes and meta rows: (chunk
    tables, pointer table, step address table or None (host steps), lr address table or None (no
    tensor lr, NOTE: [tensor lr]), ticket, aligned); () when every parameter of the pair is
    zero-size: no launch, so no tables (not None, which ``_cached`` would take for a
    miss every step).  The chunk tables (12 bytes a chunk: 5 MB for 7B parameters) depend on
    sizes, layouts and meta rows only, so new gradient tensors (``zero_grad()``'s default)
    rebuild just the pointers; the ticket is per pointer set, so two optimizers stepping at once
    never share one (NOTE: [step tickets])."""
    every = pair.idx + pair.empty
    reference.check_step_shapes(params, grads, moms, every)
    reference.check_meta(meta[every], [params[i] for i in every], fac_numel)
    if not pair.idx:
        return ()
    shape_key = (str(dev), pair.ps[0].dtype, tuple(pair.idx), tuple(map(_NUMEL, pair.ps)),
                 tuple(pair.trs), meta_key, MAX_CHUNK_BLOCKS, TARGET_PROGRAMS, I32_LIMIT)
    chunks = _cached(_CHUNKS, shape_key, lambda: _chunk_tables(pair, meta, dev))
    ptrs = _upload(torch.tensor(list(zip(*(map(_PTR, t) for t in (pair.ps, pair.gs, pair.ms)))),
                                dtype=torch.int64).reshape(-1, 3), dev)
    step_ptrs = None
    if _device_steps(pair.steps, dev):
        step_ptrs = _upload(torch.tensor(list(map(_PTR, pair.steps)), dtype=torch.int64), dev)
    lr_ptrs = _upload(torch.tensor(lr_at, dtype=torch.int64), dev) if any(lr_at) else None
    aligned = all(_PTR(t) % 16 == 0 for lst in (pair.ps, pair.gs, pair.ms) for t in lst)
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    return chunks, ptrs, step_ptrs, lr_ptrs, ticket, aligned


def _chunk_tables(pair: _Pair, meta, dev):
    """(n_chunks, chunk, [chunk_param, chunk_start, numels, meta rows with T], wide, groups),
    the tables on the device; groups: whether some parameter has an H group term (NOTE:
    [no groups]).

    NOTE: [chunk size] Both steps split a launch alike (csrc: NOTE: [step chunks] in
    csrc/fused_step.cu, the same constants in csrc/launchers.h): a program (block) of 256 threads
    steps a chunk of one parameter a block at a time, a block being a 16-byte word of p a thread
    (1024 float32 elements, 2048 bfloat16 or float16).  A chunk is one block while the launch has
    fewer than 2 * TARGET_PROGRAMS blocks (ResNet-18's 11M float32 parameters: 11k programs),
    else as many as make about TARGET_PROGRAMS chunks, at most MAX_CHUNK_BLOCKS (16384 float32
    elements).  So what a program does before its first load of p -- its chain of table loads
    (chunk, then pointers, size and hyper-parameters, then meta row and step count), the bias
    correction and the step ticket's atomic on the one counter every program shares -- is paid
    per chunk: GPT-2 small's 124M parameters take about 9k programs and tickets, where Triton's
    former 1024-element programs of 128 threads took 121k.  On an H200 (2026-12-04) those
    programs moved 67-68% of the copy bandwidth on 124M and 1.1B parameters, csrc's then
    65536-element chunks 80-86%; on 11M 58%, where those chunks, too few to fill the GPU, moved
    35% (hence the target).  256 threads with a word each, not 128 with two: in a loop, the
    compiler keeps each thread's per-element addresses live across iterations, and 128 threads
    with two float32 words took 80-96 registers a thread on sm_90.  MAX_REGISTERS bounds them as
    csrc's launch bounds do: by tests/triton_codegen.py (triton 3.9, sm_80 and sm_90) 60-64 for
    float32 parameters, 78-80 for 16-bit ones, no spills; without the bound ptxas took 48-58
    and 74-98 with 8-byte stack spills in 12 of the 48 configurations.  Not yet timed.  (Since
    NOTE: [magic division], the 16-bit ones take 64-72, and a bound of 64 would fit 4 programs
    an SM without a spill, as float32's: 16 more instructions an iteration, untimed, not made.)"""
    rows = [row + [tr] for row, tr in zip(meta[pair.idx].tolist(), pair.trs)]
    wide = _wide(rows)
    for row in rows:                # NOTE: [magic division]; a WIDE launch divides as it is
        divisors = (row[COL["cols"]], row[COL["T"]], max(row[COL["h_gr"]], 1))
        row += [x for d in divisors for x in magic(1 if wide else d)]
    numels = [p.numel() for p in pair.ps]
    chunk = chunk_size(numels, pair.ps[0].dtype)
    n_chunks = [cdiv(n, chunk) for n in numels]
    chunk_param = torch.repeat_interleave(torch.arange(len(n_chunks)),
                                          torch.tensor(n_chunks, dtype=torch.int64))
    chunk_start = torch.cat([torch.arange(k, dtype=torch.int64) * chunk for k in n_chunks] or
                            [torch.zeros(0, dtype=torch.int64)])
    tables = [_upload(t, dev) for t in (chunk_param.to(torch.int32), chunk_start,
                                         torch.tensor(numels, dtype=torch.int64),
                                         torch.tensor(rows, dtype=torch.int64).reshape(-1, N_META))]
    return (int(chunk_param.numel()), chunk, tables, wide,
            any(row[COL["h_gs"]] != 0 for row in rows))


def _hyper_table(pair: _Pair, hyper, dev) -> torch.Tensor:
    """float32 (P, N_HYPER): lr, beta, 1 - beta, wd, Lambda, ln beta (computed in float64, NOTE:
    [bias correction]) per parameter, cached."""
    hyp = tuple(map(hyper.__getitem__, pair.idx))
    return _cached(_HYPER, (str(dev),) + hyp, lambda: _upload(torch.tensor(
        [(lr, beta, 1 - beta, wd, lam, math.log(beta) if beta > 0 else -math.inf)
         for lr, beta, wd, lam in hyp], dtype=torch.float32), dev))


def _launch(pair: _Pair, tables, fac, hyper, decoupled, pdt, gdt, found_inf) -> None:
    """One launch over every parameter of the dtype pair (NOTE: [pointer tables]), which also
    increments the step counts (``pair.steps``) kept on the device (NOTE: [step tickets]),
    unless ``found_inf`` (not None) is non-zero."""
    steps = pair.steps
    if not tables:                  # only zero-size parameters: no launch, the counts advance
        for t in steps:             # as the reference's, wherever they are kept
            t += 1 if found_inf is None else (found_inf.reshape(()) == 0).to(t.dtype)
        return
    chunks, ptrs, step_table, lr_ptrs, ticket, aligned = tables
    n_chunks, chunk, (chunk_param, chunk_start, numels, rows), wide, groups = chunks
    wide = wide or fac.numel() >= I32_LIMIT         # NOTE: [32-bit indices]
    on_dev = step_table is not None
    if not on_dev:
        for t in steps:
            t += 1
        step_table = _upload(torch.tensor([float(t) for t in steps[:len(pair.idx)]],
                                          dtype=torch.float32), fac.device)
    hyper_table = _hyper_table(pair, hyper, fac.device)
    kernel_host.keep_if_captured(chunk_param, chunk_start, ptrs, numels, rows, hyper_table,
                                 step_table, ticket, lr_ptrs)   # NOTE: [captured tables]
    launch(
        _fused_step_kernel, (n_chunks,),
        chunk_param, chunk_start, chunk, ptrs, numels, rows, hyper_table, lr_ptrs,
        step_table, len(steps), ticket, fac, found_inf,
        P_DTYPE=_TL[pdt], G_DTYPE=_TL[gdt], DECOUPLED=bool(decoupled), BLOCK=block_size(pdt),
        WIDE=wide, GROUPS=groups, ALIGNED=aligned, DEVICE_STEPS=on_dev, LR_PTRS=lr_ptrs is not None,
        FOUND_INF=found_inf is not None, STEP_BLOCK=STEP_BLOCK,
        num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS[pdt.itemsize],
        enable_fp_fusion=False)     # NOTE: [fp fusion] in fisher_kernels/__init__.py
