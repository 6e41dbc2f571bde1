"""Triton twin of ``reference.layer_ema``: one launch, one program per LAYER (SPEC 2-4).

Each program, for each of its factors (the H and S of the layer):
1. finalises the raw statistic from the accumulators with the LayerTable's terms,
   ``raw[e] = sum over the terms with dst == e of buf[src] ** pow * coef / count ** q`` (each lane
   sums its entries' terms in order: NOTE: [term CSR]) into a scratch vector, read back after a
   barrier;
2. checks that every counted factor is finite (a non-finite one makes the whole layer keep its
   state and counts one skip);
3. applies the preset's EmaRule (+inf -> 1, -inf -> 0 then min-max of raw or state), writes
   ``state``, ``initialized``, ``fac`` (ones for factors without statistics) and ``counters``.

NOTE: [one program per layer] the non-finite guard is per layer, across its factors, so the layer
is the unit of work; factors are small (a few thousand entries) and the programs are independent.
NOTE: [ema block] So a program walks each of its factors five or six times (raw, guard, min-max,
EMA, fac), one BLOCK-wide step after another, each step a round trip to memory (three dependent
loads in the raw pass): its time grows with the trips through its largest factor, not with the
bytes.  BLOCK = 1024 over 8 warps (4 entries per thread, no spills: tests/triton_codegen.py)
makes a vocabulary-sized factor (8192 entries in the bench's GPT, 50257 in GPT-2's embedding and
head) 4x fewer trips than 256 over 4 warps; a small factor still takes one.  (A design argument:
bench_layer_ema's GPT-2 case times it on a GPU.)
float64 buffers fall back to the reference (parity runs); each layer's factors and the terms by
destination are derived from the table once and cached (NOTE: [table cache]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adafisher_fast import reference
from adafisher_fast.kernel_host import layer_factors, term_csr
from adafisher_fast.reference import EmaRule, LayerTable
from .host import on_device

BLOCK = 1024          # NOTE: [ema block]
NUM_WARPS = 8


@triton.jit
def _clip_inf(v):
    """+inf -> 1, -inf -> 0, as the min-max normalisation does first (SPEC 2)."""
    return tl.where(v == float("inf"), 1.0, tl.where(v == float("-inf"), 0.0, v))


@triton.jit
def _ema_minmax(v_ptr, start, end, BLOCK: tl.constexpr):
    """(min, max) over v[start:end] after +inf -> 1, -inf -> 0."""
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    hi = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(start, end, BLOCK):
        o = s + tl.arange(0, BLOCK)
        m = o < end
        v = tl.load(v_ptr + o, mask=m, other=0.0, volatile=True)
        v = _clip_inf(v)
        lo = tl.minimum(lo, tl.where(m, v, float("inf")))
        hi = tl.maximum(hi, tl.where(m, v, float("-inf")))
    return tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _layer_ema_kernel(buf_ptr, n_acc, t_ptr, t_src, t_pow, t_coef, t_q, t_factor,
                      factor_start, layer_factors, layer_fstart, raw_ptr, state_ptr, fac_ptr,
                      init_ptr, counters_ptr, decay, weight, decay_first, weight_first,
                      NORM_RAW: tl.constexpr, NORM_STATE: tl.constexpr, BLOCK: tl.constexpr):
    layer = tl.program_id(0)
    f0 = tl.load(layer_fstart + layer)
    f1 = tl.load(layer_fstart + layer + 1)
    # 1. raw statistics of every factor of the layer: each lane sums its entries' terms in order
    for fi in range(f0, f1):
        f = tl.load(layer_factors + fi)
        st = tl.load(factor_start + f)
        en = tl.load(factor_start + f + 1)
        for s in range(st, en, BLOCK):
            o = s + tl.arange(0, BLOCK)
            m = o < en
            t0 = tl.load(t_ptr + o, mask=m, other=0)
            nt = tl.load(t_ptr + o + 1, mask=m, other=0) - t0
            v = tl.zeros((BLOCK,), dtype=tl.float32)
            for j in range(0, tl.max(nt, axis=0)):
                tm = m & (j < nt)
                t = t0 + j
                b = tl.load(buf_ptr + tl.load(t_src + t, mask=tm, other=0), mask=tm, other=0.0)
                pw = tl.load(t_pow + t, mask=tm, other=0.0)
                q = tl.load(t_q + t, mask=tm, other=0.0)
                cnt = tl.load(buf_ptr + n_acc + tl.load(t_factor + t, mask=tm, other=0), mask=tm,
                              other=1.0)
                bp = tl.where(pw == 0.0, 1.0, tl.where(pw == 1.0, b, b * b))
                c2 = cnt * cnt
                cq = tl.where(q == 0.0, 1.0, tl.where(q == 1.0, cnt, tl.where(q == 2.0, c2, c2 * cnt)))
                v += tl.where(tm, bp * tl.load(t_coef + t, mask=tm, other=0.0) / cq, 0.0)
            tl.store(raw_ptr + o, v, mask=m)
    tl.debug_barrier()
    # 2. non-finite guard over the counted factors
    # loop-carried flags start as int32 tensors (a Python 0 would be a constexpr, which compiled
    # Triton refuses to re-assign inside loops / runtime ifs)
    bad = layer * 0
    for fi in range(f0, f1):
        f = tl.load(layer_factors + fi)
        cnt = tl.load(buf_ptr + n_acc + f)
        st = tl.load(factor_start + f)
        en = tl.load(factor_start + f + 1)
        nbad = tl.zeros((BLOCK,), dtype=tl.int32)
        for s in range(st, en, BLOCK):
            o = s + tl.arange(0, BLOCK)
            m = o < en
            v = tl.load(raw_ptr + o, mask=m, other=0.0, volatile=True)
            nbad += (m & ((v != v) | (v == float("inf")) | (v == float("-inf")))).to(tl.int32)
        bad = bad | ((cnt > 0) & (tl.sum(nbad, axis=0) > 0)).to(tl.int32)
    # 3. EMA, then H'/S'
    took = layer * 0
    for fi in range(f0, f1):
        f = tl.load(layer_factors + fi)
        cnt = tl.load(buf_ptr + n_acc + f)
        st = tl.load(factor_start + f)
        en = tl.load(factor_start + f + 1)
        init = tl.load(init_ptr + f) != 0
        upd = (cnt > 0) & (bad == 0)
        if upd:
            lo = 0.0
            scl = 1.0
            if NORM_RAW:
                lo, hi = _ema_minmax(raw_ptr, st, en, BLOCK)
                scl = hi - lo + 1e-6
            dc = tl.where(init, decay, decay_first)
            wt = tl.where(init, weight, weight_first)
            for s in range(st, en, BLOCK):
                o = s + tl.arange(0, BLOCK)
                m = o < en
                v = tl.load(raw_ptr + o, mask=m, other=0.0, volatile=True)
                if NORM_RAW:
                    v = _clip_inf(v)
                    v = (v - lo) / scl
                old = tl.load(state_ptr + o, mask=m, other=1.0)
                prior = tl.where(init, old, 1.0)
                tl.store(state_ptr + o, prior * dc + v * wt, mask=m)
            tl.store(init_ptr + f, 1)
        init = init | upd
        took = took | upd.to(tl.int32)
        tl.debug_barrier()
        lo2 = 0.0
        scl2 = 1.0
        if NORM_STATE:
            lo2, hi2 = _ema_minmax(state_ptr, st, en, BLOCK)
            scl2 = hi2 - lo2 + 1e-6
        for s in range(st, en, BLOCK):
            o = s + tl.arange(0, BLOCK)
            m = o < en
            v = tl.load(state_ptr + o, mask=m, other=0.0, volatile=True)
            if NORM_STATE:
                v = _clip_inf(v)
                v = (v - lo2) / scl2
            tl.store(fac_ptr + o, tl.where(init, v, 1.0), mask=m)
    c0 = tl.load(counters_ptr + 2 * layer)
    c1 = tl.load(counters_ptr + 2 * layer + 1)
    tl.store(counters_ptr + 2 * layer, c0 + took)
    tl.store(counters_ptr + 2 * layer + 1, c1 + bad)


@on_device
def layer_ema(buf: torch.Tensor, table: LayerTable, state: torch.Tensor, fac: torch.Tensor,
              initialized: torch.Tensor, counters: torch.Tensor, rule: EmaRule) -> None:
    """Same signature and semantics as ``reference.layer_ema`` (see the module docstring)."""
    if buf.dtype != torch.float32 or state.dtype != torch.float32:
        return reference.layer_ema(buf, table, state, fac, initialized, counters, rule)
    if table.n_layers == 0 or table.factor_layer.numel() == 0:
        return
    for name, t in (("buf", buf), ("state", state), ("fac", fac), ("initialized", initialized),
                    ("counters", counters)):
        if not t.is_contiguous():
            raise ValueError(f"layer_ema: {name} must be contiguous")
    ptr, src, pw, coef, q, factor = term_csr(table)     # NOTE: [term CSR]
    factors_by_layer, layer_fstart = layer_factors(table)
    raw = torch.empty(state.numel(), dtype=torch.float32, device=buf.device)
    _layer_ema_kernel[(table.n_layers,)](
        buf, table.n_acc, ptr, src, *(t.to(torch.float32) for t in (pw, coef, q)), factor,
        table.factor_start, factors_by_layer, layer_fstart,
        raw, state, fac, initialized.view(torch.uint8), counters,
        float(rule.decay), float(rule.weight), float(rule.decay_first), float(rule.weight_first),
        NORM_RAW=bool(rule.normalise_raw), NORM_STATE=bool(rule.normalise_state), BLOCK=BLOCK,
        num_warps=NUM_WARPS)
