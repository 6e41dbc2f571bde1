"""Torch reference of every AdaFisher operation: the specification that kernels are tested against.

Each function here has a Triton twin in ``fisher_kernels/<op>.py`` and a CUDA twin in
``csrc/<op>.cu`` with the same signature and semantics.  The reference never bends to match a kernel.

Operations (SPEC section 4):

* ``linear_stats``    per-feature sums (of squares) of a tensor, any leading/trailing dims
* ``conv_stats``      conv patch sums of squares WITHOUT im2col (Conv1d/2d/3d, any stride/dilation/
                      groups/padding/padding_mode)
* ``norm_stats``      sums of xhat^2 of normalisation layers (xhat recomputed from the input)
* ``embedding_stats`` token frequencies
* ``layer_ema``       all layers at once: finalise raw H/S, non-finite guard, EMA, min-max
* ``fused_step``      all parameters at once: momentum, bias correction, weight decay, damped
                      division by F = S'[row] * H'[col] + Lambda computed per element

All statistics ops ADD into ``out`` (a view of the model's flat raw-statistics buffer, float32, or
float64 for float64 models) so that micro-batches and repeated module calls accumulate.
"""
from __future__ import annotations

import itertools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# NOTE: [min-max epsilon] The released code and the paper both normalise with
# (v - min) / (max - min + 1e-6); the epsilon is part of the numerics (it is why the DDP gradient
# scale matters, SPEC section 6), so it is a fixed constant, not a knob.
MINMAX_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# argument checks the three backends share (the CUDA binding makes the same ones in C++)
# ----------------------------------------------------------------------------------------------
def check_dim(op: str, x: torch.Tensor, dim: int) -> None:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim {dim} out of range for {x.dim()}-d x")


def check_groups(op: str, channels: int, groups: int) -> None:
    if groups < 1 or channels % groups:
        raise ValueError(f"{op}: groups {groups} must divide the channel count {channels}")


def check_running(op: str, mean: Optional[torch.Tensor], var: Optional[torch.Tensor],
                  channels: int) -> None:
    """Given running statistics have one entry per channel each: a kernel reads ``channels`` of
    each, past the end of a shorter one."""
    if mean is not None and (var is None or mean.numel() != channels or var.numel() != channels):
        got = "no var" if var is None else f"{mean.numel()} and {var.numel()}"
        raise ValueError(f"{op}: mean and var need one entry per channel, {channels}; got {got}")


def check_out(op: str, out: torch.Tensor, n: int) -> None:
    """``out`` must have the ``n`` entries the op adds into: it is a view of the flat statistics
    buffer, so a kernel given a shorter one writes into the next factor's accumulators (a layer
    kind whose FactorSpec.acc_size disagrees with what its h_stats/s_stats add)."""
    if out.numel() != n:
        raise ValueError(f"{op}: out has {out.numel()} entries, expected {n} (a layer kind's "
                         f"FactorSpec.acc_size must match what its h_stats/s_stats add)")


def check_lr(lr: torch.Tensor, device: torch.device, where: str) -> None:
    """A tensor lr (NOTE: [tensor lr]): one floating element without grad, float32 on ``device``
    (the kernels read it there when they run) or any floating dtype on the CPU (its value is read
    on the host at each step, as a float's)."""
    if lr.numel() != 1 or not lr.is_floating_point() or lr.requires_grad:
        raise TypeError(f"{where}: a tensor lr must be one floating-point element without grad, "
                        f"got {lr.dtype} of shape {tuple(lr.shape)}"
                        f"{' requiring grad' if lr.requires_grad else ''}")
    if not (lr.is_cpu or (lr.device == device and lr.dtype == torch.float32)):
        raise ValueError(f"{where}: a tensor lr must be float32 on the parameters' device "
                         f"({device}), where the step reads it, or on the CPU, got {lr.dtype} "
                         f"on {lr.device}")


def check_found_inf(op: str, found_inf: Optional[torch.Tensor], tensors: Sequence[torch.Tensor],
                    what: str) -> None:
    """GradScaler's found_inf, read where the op runs (NOTE: [GradScaler] in optimizer.py): one
    float32 element on the device of every tensor the skip leaves unchanged (``what``, formatted
    with a tensor's index, names one in the error)."""
    if found_inf is None:
        return
    if found_inf.numel() != 1 or found_inf.dtype != torch.float32:
        raise ValueError(f"{op}: found_inf must be one float32 element, got {found_inf.dtype} of "
                         f"shape {tuple(found_inf.shape)}")
    away = next((i for i, t in enumerate(tensors) if t.device != found_inf.device), None)
    if away is not None:
        raise ValueError(f"{op}: found_inf is on {found_inf.device} and {what.format(away)} on "
                         f"{tensors[away].device}: a skip decided on the device needs them on one "
                         f"device (NOTE: [GradScaler])")


def check_ema_found_inf(found_inf: Optional[torch.Tensor], state: torch.Tensor, fac: torch.Tensor,
                        initialized: torch.Tensor, counters: torch.Tensor) -> None:
    """``check_found_inf`` for layer_ema (every backend's): beside its four state tensors."""
    check_found_inf("layer_ema", found_inf, (state, fac, initialized, counters),
                    "the state tensor {}")


def _undo_where_found_inf(found_inf: torch.Tensor, tensors: Sequence[torch.Tensor],
                          before: Sequence[torch.Tensor]) -> None:
    """Every tensor back to ``before`` where found_inf is non-zero, decided on the device."""
    skip = found_inf.reshape(()) != 0
    for t, old in zip(tensors, before):
        t.copy_(torch.where(skip, old, t))


def has_tensor_lr(hyper: list) -> bool:
    """Whether some row of ``hyper`` has a tensor lr; each distinct row object read once (the
    optimizer passes one per group and Lambda, so this is a C-level pass and a few reads)."""
    return any(isinstance(h[0], torch.Tensor) for h in dict(zip(map(id, hyper), hyper)).values())


def check_step_lists(params: list, grads: list, moms: list, steps: list, meta: torch.Tensor,
                     hyper: list, found_inf: Optional[torch.Tensor] = None) -> None:
    n = len(params)
    if not (len(grads) == len(moms) == len(steps) == len(hyper) == n) or meta.shape[0] != n:
        raise ValueError("fused_step: params, grads, moms, steps, meta and hyper must have the "
                         "same length")
    if meta.dim() != 2 or meta.shape[1] != len(META_COLS):
        raise ValueError(f"fused_step: meta must be [P, {len(META_COLS)}] (NOTE: [param map]), "
                         f"got {tuple(meta.shape)}")
    check_found_inf("fused_step", found_inf, steps, "the step count of parameter {}")
    if not has_tensor_lr(hyper):
        return
    checked = set()                 # each tensor once: the groups' rows share theirs
    for i, h in enumerate(hyper):
        if isinstance(h[0], torch.Tensor) and id(h[0]) not in checked:
            check_lr(h[0], params[i].device, f"fused_step: parameter {i}")
            checked.add(id(h[0]))


def check_meta(meta: torch.Tensor, params: Sequence[torch.Tensor], fac_numel: int) -> None:
    """Raise ValueError unless every meta row (NOTE: [param map]) maps its parameter into fac:
    rows * cols = numel, cols >= 1, 0 <= h_ph < h_gr, offsets and strides >= 0 (so the extreme
    indices are the last element's) and every index below fac_numel, in Python integers (int64
    products of absurd strides would wrap below it).  The kernels trust the rows: a wrong one
    read past fac, or divided by zero.  (The optimizer's rows are checked when they are made,
    state._check_map; this guards the ops called directly.)"""
    for i, (row, p) in enumerate(zip(meta.to("cpu", torch.int64).tolist(), params)):
        rows, cols, s_off, s_r, s_c, h_off, h_r, h_c, h_gr, h_gs, h_ph = row
        r, c = rows - 1, cols - 1
        if (rows * cols == p.numel() and cols >= 1 and 0 <= h_ph < h_gr and min(row[2:10]) >= 0
                and (rows == 0 or max(s_off + r * s_r + c * s_c, h_off + r * h_r + c * h_c
                                      + (r + h_ph) // h_gr * h_gs) < fac_numel)):
            continue
        raise ValueError(
            f"fused_step: meta row {i} {row} does not map parameter {i} ({p.numel()} elements) "
            f"into fac ({fac_numel} entries): expected rows * cols = numel, cols >= 1, "
            f"0 <= h_ph < h_gr, offsets and strides >= 0 and every S and H index below "
            f"fac.numel() (NOTE: [param map], columns {', '.join(META_COLS)})")


# ----------------------------------------------------------------------------------------------
# statistics ops
# ----------------------------------------------------------------------------------------------
def linear_stats(x: torch.Tensor, out: torch.Tensor, dim: int = -1, square: bool = True,
                 scale: float = 1.0) -> None:
    """``out[k] += scale * sum_{all indices but dim} f(x[..., k, ...])``, f = square or identity.

    x: any shape, float16/bfloat16/float32/float64; ``dim`` is the feature axis, ``out`` has
    ``x.shape[dim]`` entries and the buffer dtype (accumulation happens in ``out.dtype``).
    Used for Linear H and S (SPEC 2, dim=-1), conv/BatchNorm output-gradient S (dim=1) and the
    released code's BatchNorm2d/LayerNorm batch sums (square=False).
    """
    check_dim("linear_stats", x, dim)
    dim = dim % x.dim()
    k = x.shape[dim]
    check_out("linear_stats", out, k)
    x3 = x.reshape(math.prod(x.shape[:dim]), k, math.prod(x.shape[dim + 1:]))
    v = x3.to(out.dtype)
    if square:
        v = v * v
    out.add_(v.sum(dim=(0, 2)), alpha=scale)


def conv_out_size(size: int, k: int, stride: int, dilation: int, pad_lo: int, pad_hi: int) -> int:
    """Number of output positions of one spatial dim of a convolution."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def conv_sizes(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
               padding: Sequence[Tuple[int, int]], dilation: Sequence[int]) -> List[int]:
    """conv_stats' output positions per spatial dim of x (B, C, *spatial).  None may be empty:
    torch's conv refuses a kernel larger than the padded input, and so does every backend."""
    sizes = [conv_out_size(x.shape[2 + i], kernel_size[i], stride[i], dilation[i], *padding[i])
             for i in range(len(kernel_size))]
    for d, n in enumerate(sizes):
        if n < 1:
            raise ValueError(f"conv_stats: empty output along spatial dim {d} (input size "
                             f"{x.shape[2 + d]}, padding {tuple(padding[d])}, kernel "
                             f"{kernel_size[d]}, dilation {dilation[d]})")
    return sizes


def conv_stats(x: torch.Tensor, out: torch.Tensor, kernel_size: Sequence[int],
               stride: Sequence[int], padding: Sequence[Tuple[int, int]],
               dilation: Sequence[int], groups: int, padding_mode: str = "zeros") -> int:
    """Conv patch statistics without im2col (SPEC 4.2).

    x: (B, C, *spatial) with d = len(kernel_size) spatial dims; padding: one (lo, hi) pair per
    spatial dim; padding_mode in {"zeros", "reflect", "replicate", "circular"}.
    ``out`` ((groups * D,), D = C/groups * prod(kernel_size), laid out (group, channel, *kernel)
    like a conv weight) gets ``out[g, j] += sum_{b, l} P[b, g, l, j]^2`` where P are the patches
    of the padded input over the output lattice (strided, dilated).  Returns L, the number of
    output positions per sample.

    Algorithm: Q = sum_b x^2 (C x spatial, one read of x); padding commutes with the square and the
    batch sum (it only copies or zeroes positions), so Q is padded instead of x; each kernel offset
    then sums Q over its output lattice, a strided slice.  Nothing of the patch matrix's size exists.
    """
    check_groups("conv_stats", x.shape[1], groups)
    nd = len(kernel_size)
    check_out("conv_stats", out, x.shape[1] * math.prod(kernel_size))
    q = x.to(out.dtype).square().sum(0)                         # (C, *spatial)
    flat_pad = [p for lo_hi in reversed(padding) for p in lo_hi]
    if any(flat_pad):
        if padding_mode == "zeros":
            q = F.pad(q, flat_pad)
        else:
            q = F.pad(q.unsqueeze(0), flat_pad, mode=padding_mode).squeeze(0)
    sizes = conv_sizes(x, kernel_size, stride, padding, dilation)
    cols = []
    for offs in itertools.product(*[range(k) for k in kernel_size]):
        idx = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                    for o, d, s, n in zip(offs, dilation, stride, sizes))
        cols.append(q[(slice(None),) + idx].sum(dim=tuple(range(1, nd + 1))))
    out.add_(torch.stack(cols, dim=1).reshape(-1))             # (C, K) == (g, C/g * K)
    return math.prod(sizes)


def norm_stats(x: torch.Tensor, out: torch.Tensor, mode: str, groups: int, eps: float,
               center: bool = True, mean: Optional[torch.Tensor] = None,
               var: Optional[torch.Tensor] = None) -> None:
    """Sums of squared normalised activations, Proposition 3.1 of the paper (SPEC 2, preset paper).

    x: (R, C, I) view of the layer input.  ``out[c] += sum_{r, i} xhat[r, c, i]^2`` where
    * mode="channel" (BatchNorm): xhat = (x - mean_c) / sqrt(var_c + eps), mean/var over (r, i)
      (biased variance, as the layer normalises), or the given running ``mean``/``var``;
    * mode="sample" (LayerNorm R x N x 1, GroupNorm B x C x I, RMSNorm with center=False): per
      (r, group of C/groups channels) statistics over (channel in group, i).
    Arithmetic in ``out.dtype``.
    """
    check_out("norm_stats", out, x.shape[1])
    v = x.to(out.dtype)
    r, c, i = v.shape
    if mode == "channel":
        check_running("norm_stats", mean, var, c)
        if mean is None:
            mean = v.mean(dim=(0, 2))
            var = (v - mean[None, :, None]).square().mean(dim=(0, 2))
        xhat = (v - mean.to(v.dtype)[None, :, None]) * torch.rsqrt(var.to(v.dtype) + eps)[None, :, None]
    elif mode == "sample":
        check_groups("norm_stats", c, groups)
        vg = v.reshape(r, groups, (c // groups) * i)
        mu = vg.mean(dim=2, keepdim=True) if center else torch.zeros_like(vg[..., :1])
        ms = (vg - mu).square().mean(dim=2, keepdim=True)
        xhat = ((vg - mu) * torch.rsqrt(ms + eps)).reshape(r, c, i)
    else:
        raise ValueError(f"norm_stats: mode must be 'channel' or 'sample', got {mode!r}")
    out.add_(xhat.square().sum(dim=(0, 2)))


def embedding_stats(idx: torch.Tensor, out: torch.Tensor) -> None:
    """Token frequencies: ``out[v] += number of tokens equal to v`` for 0 <= v < len(out).
    idx: int32/int64 tensor, any shape.  Tokens out of that range are not counted: an
    Embedding subclass may send them elsewhere (Idefics' decoupled embedding adds a table).
    (index_add_ of 0/1 weights, not bincount or a boolean mask: both read a size from the
    device.)"""
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"embedding_stats: idx must be int32 or int64, got {idx.dtype}")
    flat, n = idx.reshape(-1), out.numel()
    ok = (flat >= 0) & (flat < n)
    if n:
        out.index_add_(0, torch.where(ok, flat, 0), ok.to(out.dtype))


# ----------------------------------------------------------------------------------------------
# step ops
# ----------------------------------------------------------------------------------------------
class LayerTable(NamedTuple):
    """Everything ``layer_ema`` needs to know about the model's layers (built once, on device).

    The flat raw buffer ``buf`` holds ``n_acc`` accumulator entries followed by one row count per
    factor (a factor is the H or the S vector of one layer).  A factor's raw statistic is
    ``raw[dst] += buf[src] ** pow * coef / count[factor] ** q`` summed over its terms (one term per
    accumulator entry, plus constant terms with pow = 0 for bias entries): that one rule covers every
    layer kind of both presets, including the released code's square-of-sum statistics.
    """
    n_acc: int
    term_src: torch.Tensor      # int64 [T] index into buf
    term_dst: torch.Tensor      # int64 [T] index into raw/state
    term_pow: torch.Tensor      # [T] 0, 1 or 2
    term_coef: torch.Tensor     # [T]
    term_q: torch.Tensor        # [T] power of the row count dividing the term
    term_factor: torch.Tensor   # int64 [T] factor whose count divides the term
    factor_start: torch.Tensor  # int64 [n_factors + 1] offsets of factors in raw/state
    factor_layer: torch.Tensor  # int64 [n_factors]
    n_layers: int
    seg: torch.Tensor           # int64 [n_raw] factor of each raw/state entry
    n_raw: int                  # entries of raw/state (static, so no op reads a size back)

    @classmethod
    def build(cls, n_acc, term_src, term_dst, term_pow, term_coef, term_q, term_factor,
              factor_start, factor_layer, n_layers) -> "LayerTable":
        """The table with ``seg`` and ``n_raw`` derived once, on the host (no op ever syncs);
        ``factor_start`` is a host list or CPU tensor, the table lives on term_src's device."""
        fs = torch.as_tensor(factor_start, dtype=torch.int64)
        seg = torch.repeat_interleave(torch.arange(fs.numel() - 1), fs.diff())
        dev = term_src.device
        return cls(n_acc, term_src, term_dst, term_pow, term_coef, term_q, term_factor,
                   fs.to(dev), factor_layer, n_layers, seg.to(dev), int(fs[-1]))


class EmaRule(NamedTuple):
    """A preset's EMA as data (SPEC 2): ``state <- prior * decay + v * weight`` where prior is
    the state, or ones at a factor's first statistics iteration (then decay_first/weight_first),
    v is min-max(raw) when ``normalise_raw`` else raw, and H'/S' = min-max(state) when
    ``normalise_state`` else state."""
    decay: float
    weight: float
    decay_first: float
    weight_first: float
    normalise_raw: bool
    normalise_state: bool


def _segment_minmax(v: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Per-segment (v - min) / (max - min + 1e-6) with +inf -> 1, -inf -> 0 first (SPEC 2)."""
    v = torch.where(v == math.inf, torch.ones_like(v), torch.where(v == -math.inf, torch.zeros_like(v), v))
    lo = torch.full((n,), math.inf, dtype=v.dtype, device=v.device).scatter_reduce(0, seg, v, "amin")
    hi = torch.full((n,), -math.inf, dtype=v.dtype, device=v.device).scatter_reduce(0, seg, v, "amax")
    return (v - lo[seg]) / (hi[seg] - lo[seg] + MINMAX_EPS)


def _any_by(mask: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """[n] bool: out[i] = any(mask[index == i]).  Reduced as uint8: CUDA's scatter_reduce has
    no bool kernel."""
    out = torch.zeros(n, dtype=torch.uint8, device=mask.device)
    return out.scatter_reduce(0, index, mask.to(torch.uint8), "amax").bool()


def layer_raw(buf: torch.Tensor, table: LayerTable) -> torch.Tensor:
    """Raw H/S of every factor from the accumulators (flat, factor after factor)."""
    counts = buf[table.n_acc:]
    vals = buf[table.term_src].pow(table.term_pow) * table.term_coef \
        / counts[table.term_factor].pow(table.term_q)
    return torch.zeros(table.n_raw, dtype=buf.dtype, device=buf.device).index_add_(0, table.term_dst, vals)


def layer_ema(buf: torch.Tensor, table: LayerTable, state: torch.Tensor, fac: torch.Tensor,
              initialized: torch.Tensor, counters: torch.Tensor, rule: EmaRule,
              found_inf: Optional[torch.Tensor] = None) -> None:
    """One statistics iteration for every layer at once (SPEC 2 and 3), updating in place:

    * ``state`` [n_raw]: the EMA of H and S of all layers (buffer dtype);
    * ``fac`` [n_raw + 1]: the H'/S' that ``fused_step`` reads, with a constant 1 in the last slot
      (factor-free parameters point there); factors without statistics yet read as ones;
    * ``initialized`` [n_factors] bool;
    * ``counters`` [n_layers, 2] int64: statistics iterations that updated the layer, and
      non-finite events (iterations the layer skipped).

    A factor with a zero row count (its module was not called) is left as it is.  A layer any of
    whose counted factors is not finite keeps all of its state and gets one skip counted.
    found_inf: None, or GradScaler's one float32 element on the state's device: where it is
    non-zero nothing changes, decided on the device (NOTE: [GradScaler] in optimizer.py).
    """
    check_ema_found_inf(found_inf, state, fac, initialized, counters)
    out = (state, fac, initialized, counters)
    before = None if found_inf is None else [t.clone() for t in out]
    nf, seg = table.factor_layer.numel(), table.seg
    raw = layer_raw(buf, table)
    has = buf[table.n_acc:] > 0
    bad_factor = has & _any_by(~torch.isfinite(raw), seg, nf)
    bad_layer = _any_by(bad_factor, table.factor_layer, table.n_layers)
    upd = has & ~bad_layer[table.factor_layer]
    took = _any_by(upd, table.factor_layer, table.n_layers)
    counters.add_(torch.stack([took, bad_layer], dim=1).to(counters.dtype))
    v = _segment_minmax(raw, seg, nf) if rule.normalise_raw else raw
    init_e = initialized[seg]
    # full_like keeps the coefficients in the state dtype (python scalars would go through the
    # default dtype, float32, and break float64 parity)
    decay = torch.where(init_e, torch.full_like(state, rule.decay), torch.full_like(state, rule.decay_first))
    weight = torch.where(init_e, torch.full_like(state, rule.weight), torch.full_like(state, rule.weight_first))
    prior = torch.where(init_e, state, torch.ones_like(state))
    new = prior * decay + v * weight
    state.copy_(torch.where(upd[seg], new, state))
    initialized.logical_or_(upd)
    normed = _segment_minmax(state, seg, nf) if rule.normalise_state else state
    fac[:-1].copy_(torch.where(initialized[seg], normed, torch.ones_like(normed)))
    if before is not None:
        _undo_where_found_inf(found_inf, out, before)


# NOTE: [param map] Column layout of the int64 ``meta`` rows that ``fused_step`` reads, one row per
# parameter viewed as a (rows x cols) matrix: element (r, c) uses
#   F = fac[s_off + r*s_r + c*s_c] * fac[h_off + r*h_r + c*h_c + ((r + h_ph) // h_gr) * h_gs]
#       + Lambda
# which covers Linear/Conv (S by row, H by column, grouped conv H per group), norm layers
# (one H entry per row, or H[0]/H[1] for the released code), Embedding (H by row, S by column)
# and factor-free parameters (both indices at the constant-1 slot).  A layer kind gives s_off and
# h_off from the start of its layer's S and H; a layer's H and S lie next to each other, H first,
# and F is a product, so either side may index the other factor: a transposed conv's weight takes
# H per row on the S side and S per group on the H side, the one with a group term
# (layers.cross_matrix_map).  state.py checks that every index stays in the layer's H and S.  A
# layer kind's map (layers.ParamMap) has the first ten columns.  h_ph, row 0's place in its group
# of h_gr rows, is 0 but for an FSDP2 shard that starts inside a group (state.shard_meta).
META_COLS = ("rows", "cols", "s_off", "s_r", "s_c", "h_off", "h_r", "h_c", "h_gr", "h_gs", "h_ph")


def map_indices(meta: Sequence[int], r: torch.Tensor, c: torch.Tensor):
    """(S index, H index) into ``fac`` of elements (r, c) (broadcast) of the parameter with this
    ``meta`` row (NOTE: [param map])."""
    _, _, s_off, s_r, s_c, h_off, h_r, h_c, h_gr, h_gs, h_ph = (int(v) for v in meta)
    return (s_off + r * s_r + c * s_c,
            h_off + r * h_r + c * h_c
            + torch.div(r + h_ph, max(h_gr, 1), rounding_mode="floor") * h_gs)


def fisher_diag(fac: torch.Tensor, meta: Sequence[int], lam: float) -> torch.Tensor:
    """F of one parameter as a (rows, cols) tensor, from its ``meta`` row (NOTE: [param map]).

    ``fac`` is 1-D.  Both indices are affine in (group, row in group, column), so S and H are
    read through strided views of ``fac``: no index tensors the parameter's size, which made
    this the torch backend's costliest step (indices remain for what views cannot express: a
    shard that starts or ends inside a conv group)."""
    rows, cols, s_off, s_r, s_c, h_off, h_r, h_c, h_gr, h_gs, h_ph = (int(v) for v in meta)
    if min(s_r, s_c, h_r, h_c, h_gs) >= 0 and rows % h_gr == 0 and h_ph == 0 and fac.stride(0) == 1:
        shape, base = (rows // h_gr, h_gr, cols), fac.storage_offset()
        s = fac.as_strided(shape, (h_gr * s_r, s_r, s_c), base + s_off)
        h = fac.as_strided(shape, (h_gr * h_r + h_gs, h_r, h_c), base + h_off)
        return (s * h + lam).reshape(rows, cols)
    s_idx, h_idx = map_indices(meta, torch.arange(rows, device=fac.device)[:, None],
                               torch.arange(cols, device=fac.device)[None, :])
    return fac[s_idx] * fac[h_idx] + lam


def check_step_shapes(params: List[torch.Tensor], grads: List[torch.Tensor],
                      moms: List[torch.Tensor], indices: Optional[Sequence[int]] = None) -> None:
    """Raise ValueError naming the first parameter (of ``indices``, default all) whose gradient
    or momentum does not have its shape."""
    for i in range(len(params)) if indices is None else indices:
        p, g, m = params[i], grads[i], moms[i]
        if p.shape != g.shape or p.shape != m.shape:
            raise ValueError(f"fused_step: parameter {i} has shape {tuple(p.shape)}, its gradient "
                             f"{tuple(g.shape)} and momentum {tuple(m.shape)}")


def fused_step(params: List[torch.Tensor], grads: List[torch.Tensor], moms: List[torch.Tensor],
               steps: List[torch.Tensor], fac: torch.Tensor, meta: torch.Tensor,
               hyper: List[Tuple[float, float, float, float]], decoupled: bool,
               found_inf: Optional[torch.Tensor] = None) -> None:
    """The AdaFisher / AdaFisherW update of every parameter (SPEC 1), in place.

    params/grads/moms: same shapes, params float32/bfloat16/float16/float64 (m in the param dtype,
    arithmetic in float32, or float64 for float64 params); steps: 0-dim float32 tensors, incremented
    here (on the CPU, or on the parameter's device when capturable); fac: H'/S' from ``layer_ema``;
    meta: int64 [P, len(META_COLS)] CPU tensor (NOTE: [param map]);
    hyper: per parameter (lr, beta, weight_decay, Lambda) where Lambda is 0 for the released code's
    factor-free parameters (F = 1); lr a float or a one-element tensor (``check_lr``), whose value
    when the update runs is used (NOTE: [tensor lr]); found_inf: None, or GradScaler's one
    float32 element on the step counts' device: where it is non-zero nothing changes (parameters,
    momenta, step counts), decided on the device (NOTE: [GradScaler] in optimizer.py).  Per
    element:
        g = grad (+ wd * p unless decoupled);  m = beta * m + (1 - beta) * g
        p -= lr * (m / (1 - beta^t) / F (+ wd * p if decoupled))
    """
    check_step_lists(params, grads, moms, steps, meta, hyper, found_inf)
    check_step_shapes(params, grads, moms)
    check_meta(meta, params, fac.numel())
    for p, g, m, t, row, (lr, beta, wd, lam) in zip(params, grads, moms, steps, meta.tolist(), hyper):
        before = None if found_inf is None else (p.clone(), m.clone(), t.clone())
        t += 1
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        # p and m are updated in place, through a float32 copy where they are bfloat16/float16
        pw, mw, gw = (p if p.dtype == work else p.to(work), m if m.dtype == work else m.to(work),
                      g.to(work))
        if wd != 0 and not decoupled:
            gw = gw + wd * pw
        mw.mul_(beta).add_(gw * (1 - beta))
        # a 0-dim tensor on the step's device: no host read of t (capturable, NOTE: [capturable])
        bc = 1 - torch.pow(beta, t.to(torch.float64))
        upd = (mw / bc).div_(fisher_diag(fac.to(work), row, lam).view(p.shape))
        if decoupled and wd != 0:
            upd.add_(wd * pw)
        pw.sub_(upd.mul_(lr.reshape(()) if isinstance(lr, torch.Tensor) else lr))
        for dst, src in ((m, mw), (p, pw)):
            if src is not dst:
                dst.copy_(src)
        if before is not None:
            _undo_where_found_inf(found_inf, (p, m, t), before)
