"""Host-side helpers of the two kernel backends (fisher_kernels/ and cuda_backend.py):
``layer_ema``'s terms by destination; for ``fused_step``, which memory layouts the kernels walk in
place and a cheap stand-in for the meta rows' values in cache keys.  Nothing here launches a
kernel."""
from __future__ import annotations

import itertools
from typing import Dict, Optional, Sequence, Tuple

import torch

from .reference import LayerTable, has_tensor_lr

# NOTE: [table cache] What the kernels need of a LayerTable beyond its tensors (its terms by
# destination, its factors by layer) is derived once per table and cached, keyed by the address of
# one of the table's tensors and holding that tensor, so the address cannot be reused by another
# table meanwhile.  An address key (not the tensor object) still hits when torch.compile hands the
# op other tensor objects over the same storage, and a hit launches nothing, so CUDA-graph capture
# may run it, and keeps what it returns (NOTE: [captured tables]).  A derivation reads nothing on
# the host either (``_sorted_starts``): no sync, also where the cache misses.
_TABLES: Dict[tuple, tuple] = {}


def _table_cached(build, table: LayerTable, anchor: torch.Tensor):
    key = (build, anchor.data_ptr(), anchor.numel(), str(anchor.device))
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) >= 32:
            _TABLES.pop(next(iter(_TABLES)))
        hit = _TABLES[key] = (anchor, build(table))
    keep_if_captured(*hit[1])
    return hit[1]


# NOTE: [captured tables] A CUDA graph replays each launch with the addresses it was captured
# with, and the device tables behind them (fused_step's pointer, block, step-address and
# hyper-parameter tables and ticket; layer_ema's terms and factors by layer) live in caches that
# evict their oldest entries: another optimizer's eager steps under an LR schedule, or new
# gradient tensors, pushed a captured step's tables out, and its replays read freed memory.  So
# the tables a launch uses while the stream is capturing are also kept here, for the life of the
# process: a few per graph (the block tables are the largest, 12 B per 1024 parameters), nothing
# more for a capture that uses tables already kept.  The LayerTable cache keeps what it returns
# during a capture itself (``_table_cached``), Triton's fused_step what its launch is given, and
# the CUDA binding its fused_step tables in bindings.cpp's device_table.
_CAPTURED: Dict[int, torch.Tensor] = {}


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def keep_if_captured(*tables: Optional[torch.Tensor]) -> None:
    """Keeps ``tables`` (None: no table) alive for good if a graph is being captured (NOTE:
    [captured tables])."""
    if capturing():
        for t in tables:
            if t is not None:
                _CAPTURED.setdefault(id(t), t)


def forget(tables: Sequence[LayerTable]) -> None:
    """Drops what the cache derived from these tables (a dropped optimizer's, a moved state's
    old one): each entry holds device tensors until 32 newer ones push it out."""
    anchors = {id(v) for t in tables for v in t if isinstance(v, torch.Tensor)}
    for key in [k for k, (anchor, _) in _TABLES.items() if id(anchor) in anchors]:
        del _TABLES[key]


# NOTE: [term CSR] Both kernels of layer_ema sum each raw entry's terms themselves, in term order
# (no atomics: the same bits on every run, whatever the number of terms per entry), so the terms are
# sorted by destination once per LayerTable (NOTE: [table cache]).
#
# NOTE: [wide entries] One lane per entry walked an entry's terms one after another, a round trip
# to memory each: the released code's norm-layer H[0]/H[1] sum over every channel (up to 512 terms
# in ResNet-18, 768 in GPT-2), and on an H200 (2026-12-04) ResNet-18's official-preset layer_ema
# took 0.139 ms (CUDA) and 0.669 ms (Triton), the paper preset's, with 23% more entries of one
# term each, 0.028 and 0.060 ms.  An entry with more than WIDE_TERMS terms is summed by the whole
# block / program, BLOCK terms a step, in a fixed tree order (the same bits on every run; another
# rounding than the sequential sum), the others as before.
WIDE_TERMS = 32


def _sorted_starts(keys: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order, starts [n + 1]) of int64 keys in [0, n): their stable sort order, and where each
    value's run starts in the sorted keys (starts[n] = keys.numel()).  By searchsorted, whose
    output size is known: bincount reads max(keys) on the host to size its own (a sync)."""
    order = torch.argsort(keys, stable=True)
    values = torch.arange(n + 1, dtype=keys.dtype, device=keys.device)
    return order, torch.searchsorted(keys[order], values)


def _build_term_csr(table: LayerTable) -> tuple:
    order, ptr = _sorted_starts(table.term_dst, table.n_raw)
    return (ptr,) + tuple(t[order].contiguous() for t in (table.term_src, table.term_pow,
                                                          table.term_coef, table.term_q,
                                                          table.term_factor))


def term_csr(table: LayerTable) -> tuple:
    """(ptr [n_raw + 1], src, pow, coef, q, factor): the table's terms sorted by destination
    (stably), entry e's terms at ptr[e]:ptr[e + 1]; same dtypes and device as the table."""
    return _table_cached(_build_term_csr, table, table.term_dst)


def _build_layer_factors(table: LayerTable) -> tuple:
    order, fstart = _sorted_starts(table.factor_layer, table.n_layers)
    return order.contiguous(), fstart


def layer_factors(table: LayerTable) -> tuple:
    """(factors [n_factors], fstart [n_layers + 1]): the table's factors sorted by layer (stably),
    layer l's at fstart[l]:fstart[l + 1]."""
    return _table_cached(_build_layer_factors, table, table.factor_layer)


# NOTE: [row transpose] The kernels walk p, g and m in memory order.  ``model.to(memory_format=
# torch.channels_last)`` stores a conv weight (O, I, *k) as (O, *k, I): row r (out channel) is still
# one run of cols = I * prod(k) elements, but within it memory position q holds column
# (q % I) * (cols / I) + q // I, a (cols/I x I) transpose.  The kernels take that T = I per parameter,
# so such a model is updated in place: no copy of p, g and m each step (5 extra passes, and tables
# rebuilt for every fresh copy's address), and a CUDA graph can capture it.
def row_transpose(row: Sequence[int], p: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> int:
    """How the kernels can walk p, g and m (same shape) in memory order: 1 row-major (contiguous,
    or any dense layout when F does not depend on the position: a factor-free row), T > 1 when
    each row of the (rows x cols) view (meta ``row``, NOTE: [param map]) is stored transposed as
    above, 0 when they need contiguous copies (other layouts, or g/m strides unlike p's).
    csrc/bindings.cpp checks the same."""
    if p.is_contiguous() and g.is_contiguous() and m.is_contiguous():
        return 1
    if g.stride() != p.stride() or m.stride() != p.stride():
        return 0
    rows, cols, _, s_r, s_c, _, h_r, h_c, _, h_gs, _ = (int(v) for v in row)
    if s_r == s_c == h_r == h_c == h_gs == 0:
        order = sorted(range(p.dim()), key=lambda d: -p.stride(d))
        return int(p.permute(order).is_contiguous())
    n = p.dim()
    if (n >= 3 and p.shape[1] > 1 and rows == p.shape[0] and rows * cols == p.numel()
            and p.permute(0, *range(2, n), 1).is_contiguous()):
        return p.shape[1]
    return 0


_LAYOUTS: Dict[tuple, int] = {}


def layout(i: int, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, meta: torch.Tensor,
           meta_key: int) -> Tuple[int, torch.Tensor]:
    """(T, g) of parameter i, a non-contiguous p, g, m: ``row_transpose`` of its meta row, after
    copying a gradient whose strides alone differ from p's into p's layout.  T = 0 means that p
    and m need contiguous copies too.  T is remembered by strides and ``meta_key`` (see
    ``meta_token``): a channels_last model asks the same every step."""
    if g.stride() != p.stride():
        if m.stride() == p.stride():
            g = torch.empty_like(p, dtype=g.dtype).copy_(g)     # p's strides, where p is dense
        return row_transpose(meta[i].tolist(), p, g, m), g
    key = (meta_key, i, p.shape, p.stride(), m.stride())
    tr = _LAYOUTS.get(key)
    if tr is None:
        if len(_LAYOUTS) >= 4096:
            _LAYOUTS.clear()
        tr = _LAYOUTS[key] = row_transpose(meta[i].tolist(), p, g, m)
    return tr, g


def kernel_operands(i: int, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, meta: torch.Tensor,
                    meta_key: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(p, g, m, T) as the fused-step kernels take parameter i: the tensors themselves when they
    are contiguous or store rows transposed (``layout``), else contiguous copies, which the
    caller copies back into p and m after the launch."""
    if p.is_contiguous() and g.is_contiguous() and m.is_contiguous():
        return p, g, m, 1
    tr, g = layout(i, p, g, m, meta, meta_key)                  # NOTE: [row transpose]
    if tr:
        return p, g, m, tr
    return p.contiguous(), g.contiguous(), m.contiguous(), 1


_CONTIGUOUS = torch.Tensor.is_contiguous


def operands(idx: Sequence[int], params: list, grads: list, moms: list, meta: torch.Tensor,
             meta_key: int) -> Tuple[list, list, list, list, list]:
    """(ps, gs, ms, trs, back): ``kernel_operands`` of parameters ``idx``, and the (p, m, pc, mc)
    that ``copy_back`` must copy after the launch.  All contiguous (the usual case): three
    C-level passes, no call per parameter (NOTE: [step host path] in fisher_kernels/fused_step.py)."""
    ps, gs, ms = ((params, grads, moms) if len(idx) == len(params) else   # (all of them)
                  ([lst[i] for i in idx] for lst in (params, grads, moms)))
    if all(map(_CONTIGUOUS, ps)) and all(map(_CONTIGUOUS, gs)) and all(map(_CONTIGUOUS, ms)):
        return ps, gs, ms, [1] * len(ps), []
    got = [kernel_operands(i, p, g, m, meta, meta_key) for i, p, g, m in zip(idx, ps, gs, ms)]
    back = [(p, m, pc, mc) for p, m, (pc, _, mc, _) in zip(ps, ms, got) if pc is not p or mc is not m]
    pc, gc, mc, trs = (list(col) for col in zip(*got))
    return pc, gc, mc, trs, back


def copy_back(back: list) -> None:
    """After the launch: p and m from the copies ``operands`` made of either (each on its own: a
    contiguous p may come with a copied m)."""
    for p, m, pc, mc in back:
        for dst, src in ((p, pc), (m, mc)):
            if src is not dst:
                dst.copy_(src)


def mark_written(params: Sequence[torch.Tensor]) -> None:
    """NOTE: [version counters] A kernel writes through pointers, which autograd does not see:
    ``fused_step`` bumps the version counters of the parameters it wrote, as the reference's
    in-place ops and torch's fused AdamW do.  Otherwise a graph that saved a parameter before the
    step (a GAN loop's retained graph, backward again after ``step()``) read the new values
    silently, where torch's optimizers raise "modified by an inplace operation"
    (tests/test_fused_step.py).  Not the momenta and step counts, which no graph saves: 0.125 us
    a tensor, 23 us a step for ResNet-18's 62 parameters with them (75k instructions of step()'s
    1.69M, bench.instructions), 8 us and 18k without.  A second bump (the reference's parameters, a
    custom op's) is harmless."""
    torch.autograd.graph.increment_version(params)


_META_SEEN: Dict[int, tuple] = {}       # id -> (meta tensor, its _version, its token), 8 at most
_META_TOKENS: Dict[tuple, int] = {}
_NEXT_TOKEN = itertools.count()


def meta_token(meta: torch.Tensor) -> int:
    """A small int standing for the meta rows' values in cache keys: each optimizer passes the
    same unchanged tensor every step, which is recognised without reading its rows again (for a
    few optimizers stepping in turn, a GAN's two)."""
    seen = _META_SEEN.get(id(meta))
    if seen is not None and seen[0] is meta and meta._version == seen[1]:
        return seen[2]
    rows = tuple(meta.reshape(-1).tolist())
    token = _META_TOKENS.get(rows)
    if token is None:
        if len(_META_TOKENS) >= 32:
            _META_TOKENS.clear()
        token = _META_TOKENS[rows] = next(_NEXT_TOKEN)
    if len(_META_SEEN) >= 8 and id(meta) not in _META_SEEN:
        _META_SEEN.pop(next(iter(_META_SEEN)))
    _META_SEEN[id(meta)] = (meta, meta._version, token)
    return token


# NOTE: [tensor lr] A group's lr may be a one-element tensor, as for torch's optimizers: torch's LR
# schedulers then update it in place (fill_), so a compiled step() takes each new value without
# recompiling and a CUDA graph replays it.  A float32 lr on the kernels' device is read by the
# kernel itself through a table of addresses (cached with the pointers: an address, unlike a
# value, does not change with the schedule); an lr on the CPU is read on the host at each step, as
# a float is (so a graph keeps the value it was captured with); reference.check_lr refuses others.
def split_lr(hyper: list, dev: torch.device) -> Tuple[list, list]:
    """(hyper with every lr a float, lrs): each parameter's lr tensor where the kernel reads it
    (its row's lr then 0.0, unused), else None.  Each distinct row object is split once (the
    optimizer passes one per group and Lambda)."""
    if not has_tensor_lr(hyper):
        return hyper, [None] * len(hyper)
    done: Dict[int, tuple] = {}
    rows, lrs = [], []
    for h in hyper:
        split = done.get(id(h))
        if split is None:
            lr = h[0]
            read = isinstance(lr, torch.Tensor) and lr.device == dev and lr.dtype == torch.float32
            split = done[id(h)] = ((0.0 if read else float(lr), *h[1:]), lr if read else None)
        rows.append(split[0])
        lrs.append(split[1])
    return rows, lrs
