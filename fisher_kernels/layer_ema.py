"""Triton twin of ``reference.layer_ema``: one launch, one program per LAYER (SPEC 2-4).

Each program walks each of its factors (the H and S of the layer) two or three times:
1. finalises the raw statistic from the accumulators with the LayerTable's terms,
   ``raw[e] = sum over the terms with dst == e of buf[src] ** pow * coef / count ** q`` (each lane
   sums its entries' terms in order: NOTE: [term CSR]; the program sums an entry of more than
   WIDE_TERMS terms: NOTE: [wide entries] in kernel_host.py) into a scratch vector, and reduces
   on the way whether it is finite and (official preset) its min and max after +inf -> 1,
   -inf -> 0;
   a non-finite counted factor makes the whole layer keep its state and counts one skip;
2. after a barrier, applies the preset's EmaRule to ``state`` and ``initialized``, reducing the new
   state's min and max on the way (paper preset), or writing ``fac`` in the same walk (official);
3. (paper preset, or a factor that took no update) writes ``fac``: ones for factors without
   statistics; and the ``counters``.

NOTE: [one program per layer] the non-finite guard is per layer, across its factors, so the layer
is the unit of work; factors are small (a few thousand entries) and the programs are independent.
NOTE: [ema block] So a program's time grows with the walks through its largest factor, one
BLOCK-wide step after another, each step a round trip to memory (three dependent loads in the raw
walk), not with the bytes.  Hence each reduction rides on a walk that is made anyway (two walks
for the official preset, three for the paper's, where separate passes took five), and BLOCK =
1024 over 8 warps (4 entries per thread) makes a vocabulary-sized factor (8192 entries in the
bench's GPT, 50257 in GPT-2's embedding and head) 4x fewer steps than 256 over 4 warps; a small
factor still takes one.  (A design argument: bench_layer_ema's GPT-2 case times it on a GPU.)
ptxas gives these 256 threads 128 registers each; the official preset's walk spills 56-72 bytes
to the stack there (triton 3.9 on sm_90, 3.6 on sm_80 and sm_90: tests/triton_codegen.py), all
of it outside the walks' loops (the SASS): the values kept from one walk to the next.
float64 buffers fall back to the reference (parity runs); each layer's factors and the terms by
destination are derived from the table once and cached (NOTE: [table cache]).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from adafisher_fast import reference
from adafisher_fast.kernel_host import WIDE_TERMS, layer_factors, term_csr
from adafisher_fast.reference import EmaRule, LayerTable
from .host import launch, on_device

BLOCK = 1024          # NOTE: [ema block]
NUM_WARPS = 8


@triton.jit
def _clip_inf(v):
    """+inf -> 1, -inf -> 0, as the min-max normalisation does first (SPEC 2)."""
    return tl.where(v == float("inf"), 1.0, tl.where(v == float("-inf"), 0.0, v))


@triton.jit
def _lo_hi(lo, hi, v, m):
    """Running (min, max) vectors with v's masked lanes, after +inf -> 1, -inf -> 0."""
    v = _clip_inf(v)
    return tl.minimum(lo, tl.where(m, v, float("inf"))), tl.maximum(hi, tl.where(m, v, float("-inf")))


@triton.jit
def _terms(buf_ptr, n_acc, t, tm, t_src, t_pow, t_coef, t_q, t_factor):
    """The values of terms ``t`` (lanes ``tm``; 0 elsewhere): buf[src] ** pow * coef /
    count ** q, the powers by multiplication."""
    b = tl.load(buf_ptr + tl.load(t_src + t, mask=tm, other=0), mask=tm, other=0.0)
    pw = tl.load(t_pow + t, mask=tm, other=0.0)
    q = tl.load(t_q + t, mask=tm, other=0.0)
    cnt = tl.load(buf_ptr + n_acc + tl.load(t_factor + t, mask=tm, other=0), mask=tm, other=1.0)
    bp = tl.where(pw == 0.0, 1.0, tl.where(pw == 1.0, b, b * b))
    c2 = cnt * cnt
    cq = tl.where(q == 0.0, 1.0, tl.where(q == 1.0, cnt, tl.where(q == 2.0, c2, c2 * cnt)))
    return tl.where(tm, tl.math.div_rn(bp * tl.load(t_coef + t, mask=tm, other=0.0), cq), 0.0)


@triton.jit
def _layer_program(buf_ptr, n_acc, t_ptr, t_src, t_pow, t_coef, t_q, t_factor, factor_start,
                   layer_factors, layer_fstart, raw_ptr, mm_ptr, state_ptr, fac_ptr, init_ptr,
                   counters_ptr, decay, weight, decay_first, weight_first,
                   NORM_RAW: tl.constexpr, NORM_STATE: tl.constexpr, BLOCK: tl.constexpr,
                   WIDE: tl.constexpr):
    """Program ``layer``: its factors' walks (the module docstring)."""
    layer = tl.program_id(0)
    f0 = tl.load(layer_fstart + layer)
    f1 = tl.load(layer_fstart + layer + 1)
    # 1. raw statistics of every factor of the layer (each lane sums its entries' terms in order),
    # the guard over the counted factors and (NORM_RAW) each factor's min and max, into mm_ptr.
    # Loop-carried flags start as int32 tensors (a Python 0 would be a constexpr, which compiled
    # Triton refuses to re-assign inside loops / runtime ifs).
    bad = layer * 0
    for fi in range(f0, f1):
        f = tl.load(layer_factors + fi)
        st = tl.load(factor_start + f)
        en = tl.load(factor_start + f + 1)
        nbad = tl.zeros((BLOCK,), dtype=tl.int32)
        lo = tl.full((BLOCK,), float("inf"), tl.float32)
        hi = tl.full((BLOCK,), float("-inf"), tl.float32)
        for s in range(st, en, BLOCK):
            o = s + tl.arange(0, BLOCK)
            m = o < en
            t0 = tl.load(t_ptr + o, mask=m, other=0)
            nt = tl.load(t_ptr + o + 1, mask=m, other=0) - t0
            wide = nt > WIDE                                # NOTE: [wide entries]
            nt = tl.where(wide, 0, nt)
            v = tl.zeros((BLOCK,), dtype=tl.float32)
            for j in range(0, tl.max(nt, axis=0)):
                v += _terms(buf_ptr, n_acc, t0 + j, m & (j < nt), t_src, t_pow, t_coef, t_q,
                            t_factor)
            while tl.max(wide.to(tl.int32), axis=0) > 0:    # lowest such entry first
                e = tl.min(tl.where(wide, o, en), axis=0)
                w0 = tl.load(t_ptr + e)
                w1 = tl.load(t_ptr + e + 1)
                acc = tl.zeros((BLOCK,), dtype=tl.float32)
                for ws in range(w0, w1, BLOCK):
                    t = ws + tl.arange(0, BLOCK)
                    acc += _terms(buf_ptr, n_acc, t, t < w1, t_src, t_pow, t_coef, t_q, t_factor)
                v = tl.where(o == e, tl.sum(acc, axis=0), v)
                wide = wide & (o != e)
            tl.store(raw_ptr + o, v, mask=m)
            nbad += (m & ((v != v) | (v == float("inf")) | (v == float("-inf")))).to(tl.int32)
            if NORM_RAW:
                lo, hi = _lo_hi(lo, hi, v, m)
        bad = bad | ((tl.load(buf_ptr + n_acc + f) > 0) & (tl.sum(nbad, axis=0) > 0)).to(tl.int32)
        if NORM_RAW:
            tl.store(mm_ptr + 2 * f, tl.min(lo, axis=0))
            tl.store(mm_ptr + 2 * f + 1, tl.max(hi, axis=0))
    tl.debug_barrier()
    # 2. EMA, then H'/S'
    took = layer * 0
    for fi in range(f0, f1):
        f = tl.load(layer_factors + fi)
        cnt = tl.load(buf_ptr + n_acc + f)
        st = tl.load(factor_start + f)
        en = tl.load(factor_start + f + 1)
        init = tl.load(init_ptr + f) != 0
        upd = (cnt > 0) & (bad == 0)
        lo = tl.full((BLOCK,), float("inf"), tl.float32)
        hi = tl.full((BLOCK,), float("-inf"), tl.float32)
        if upd:
            rlo = 0.0
            scl = 1.0
            if NORM_RAW:
                rlo = tl.load(mm_ptr + 2 * f, volatile=True)
                scl = tl.load(mm_ptr + 2 * f + 1, volatile=True) - rlo + 1e-6
            dc = tl.where(init, decay, decay_first)
            wt = tl.where(init, weight, weight_first)
            for s in range(st, en, BLOCK):
                o = s + tl.arange(0, BLOCK)
                m = o < en
                v = tl.load(raw_ptr + o, mask=m, other=0.0, volatile=True)
                if NORM_RAW:
                    v = tl.math.div_rn(_clip_inf(v) - rlo, scl)
                old = tl.load(state_ptr + o, mask=m, other=1.0)
                new = tl.where(init, old, 1.0) * dc + v * wt
                tl.store(state_ptr + o, new, mask=m)
                if NORM_STATE:
                    lo, hi = _lo_hi(lo, hi, new, m)
                else:
                    tl.store(fac_ptr + o, new, mask=m)     # fac = state: no third walk
            tl.store(init_ptr + f, 1)
        elif NORM_STATE:
            if init:
                for s in range(st, en, BLOCK):
                    o = s + tl.arange(0, BLOCK)
                    m = o < en
                    lo, hi = _lo_hi(lo, hi, tl.load(state_ptr + o, mask=m, other=0.0), m)
        init = init | upd
        took = took | upd.to(tl.int32)
        if NORM_STATE or not upd:
            slo = 0.0
            scl2 = 1.0
            if NORM_STATE:
                tl.debug_barrier()
                slo = tl.min(lo, axis=0)
                scl2 = tl.max(hi, axis=0) - slo + 1e-6
            for s in range(st, en, BLOCK):
                o = s + tl.arange(0, BLOCK)
                m = o < en
                v = tl.load(state_ptr + o, mask=m, other=0.0, volatile=True)
                if NORM_STATE:
                    v = tl.math.div_rn(_clip_inf(v) - slo, scl2)
                tl.store(fac_ptr + o, tl.where(init, v, 1.0), mask=m)
    c0 = tl.load(counters_ptr + 2 * layer)
    c1 = tl.load(counters_ptr + 2 * layer + 1)
    tl.store(counters_ptr + 2 * layer, c0 + took)
    tl.store(counters_ptr + 2 * layer + 1, c1 + bad)


@triton.jit
def _layer_ema_kernel(buf_ptr, n_acc, t_ptr, t_src, t_pow, t_coef, t_q, t_factor,
                      factor_start, layer_factors, layer_fstart, raw_ptr, mm_ptr, state_ptr, fac_ptr,
                      init_ptr, counters_ptr, decay, weight, decay_first, weight_first, found_inf,
                      NORM_RAW: tl.constexpr, NORM_STATE: tl.constexpr, BLOCK: tl.constexpr,
                      WIDE: tl.constexpr, FOUND_INF: tl.constexpr):
    """One program per layer, or (FOUND_INF, ``found_inf`` non-zero) no change at all."""
    go = True
    if FOUND_INF:               # every program reads the same value
        go = tl.load(found_inf) == 0.0
    if go:
        _layer_program(buf_ptr, n_acc, t_ptr, t_src, t_pow, t_coef, t_q, t_factor, factor_start,
                       layer_factors, layer_fstart, raw_ptr, mm_ptr, state_ptr, fac_ptr, init_ptr,
                       counters_ptr, decay, weight, decay_first, weight_first, NORM_RAW,
                       NORM_STATE, BLOCK, WIDE)


@on_device
def layer_ema(buf: torch.Tensor, table: LayerTable, state: torch.Tensor, fac: torch.Tensor,
              initialized: torch.Tensor, counters: torch.Tensor, rule: EmaRule,
              found_inf: Optional[torch.Tensor] = None) -> None:
    """Same signature and semantics as ``reference.layer_ema`` (see the module docstring)."""
    if buf.dtype != torch.float32 or state.dtype != torch.float32:
        return reference.layer_ema(buf, table, state, fac, initialized, counters, rule, found_inf)
    reference.check_ema_found_inf(found_inf, state, fac, initialized, counters)
    if table.n_layers == 0 or table.factor_layer.numel() == 0:
        return
    for name, t in (("buf", buf), ("state", state), ("fac", fac), ("initialized", initialized),
                    ("counters", counters)):
        if not t.is_contiguous():
            raise ValueError(f"layer_ema: {name} must be contiguous")
    ptr, src, pw, coef, q, factor = term_csr(table)     # NOTE: [term CSR]
    factors_by_layer, layer_fstart = layer_factors(table)
    raw = torch.empty(state.numel(), dtype=torch.float32, device=buf.device)
    minmax = torch.empty(2 * table.factor_layer.numel(), dtype=torch.float32, device=buf.device)
    launch(
        _layer_ema_kernel, (table.n_layers,),
        buf, table.n_acc, ptr, src, *(t.to(torch.float32) for t in (pw, coef, q)), factor,
        table.factor_start, factors_by_layer, layer_fstart,
        raw, minmax, state, fac, initialized.view(torch.uint8), counters,
        float(rule.decay), float(rule.weight), float(rule.decay_first), float(rule.weight_first),
        found_inf, NORM_RAW=bool(rule.normalise_raw), NORM_STATE=bool(rule.normalise_state),
        BLOCK=BLOCK, WIDE=WIDE_TERMS, FOUND_INF=found_inf is not None, num_warps=NUM_WARPS,
        enable_fp_fusion=False)     # NOTE: [fp fusion] in fisher_kernels/__init__.py
