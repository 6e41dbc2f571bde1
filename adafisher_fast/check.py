"""``CheckedOps``: run the torch reference beside a backend on every op and raise on disagreement.

Enabled by ``AdaFisher(model, ..., check=True)`` or ``ADAFISHER_CHECK=1`` (``backends.resolve``
wraps the chosen backend).  Each call runs the reference (``adafisher_fast.reference``) on clones
of the tensors the op writes, runs the backend on the real ones, and compares every written tensor
(and ``conv_stats``' return value), and that a statistics op changed nothing of the flat
statistics buffer outside its ``out`` slice.  A disagreement raises ``RuntimeError`` naming the backend, the
op, the layer (and its H or S) or the parameter by name (NOTE: [check names] in hooks.py), where
(the ``out`` slice offset in the flat statistics buffer, the parameter index, or the layer-state
tensor and its worst entry) and the max abs/rel error.  It costs a second evaluation of every op: a
debugging switch, not a production mode.

NOTE: [check tolerances] ``|kernel - ref| <= atol + rtol * |ref|`` elementwise with
``atol = rtol * max|ref|`` (so entries much smaller than the largest are judged against the
tensor's scale: parallel sums differ from torch's in summation order).  A plain sum
(``linear_stats`` with square=False: the released code's BatchNorm2d/LayerNorm S) can cancel far
below its terms, and does when a train-mode BatchNorm follows through a conv (its input gradient
sums to zero per channel), so there ``atol = rtol * max sum |x|``, the scale its rounding has.
``norm_stats`` centres: a computed mean is off by some ulp of mean |x|, so xhat = (x - mean) * s
(s = 1 / sqrt(var + eps)) is off by about e = rtol * s * mean |x|, which outgrows xhat itself
where a channel or group is nearly constant (reflect padding of a 1-pixel map: x - mean is
rounding noise, and s = 1 / sqrt(eps) magnifies it).  So each entry's atol there is at least
``rtol * sum (2 |xhat| s mean|x| + rtol (s mean|x|)^2)``, the first-order and the squared error of
its sum of xhat^2, over that entry's elements (running statistics and RMSNorm do not centre).
The rtol:
* float64 results: rtol 1e-9; float32 results from float32 inputs: rtol 1e-4 (sums over up to
  ~1e6 terms in a different order; float32 eps is 1.2e-7);
* float16/bfloat16 inputs (statistics accumulate in float32, so the inputs' own rounding is shared
  by both sides): rtol 1e-3; float16/bfloat16 parameters and momenta (fused_step stores them in the
  parameter dtype, where one rounding flip is one ulp): rtol 2 ulp of that dtype
  (float16 2e-3, bfloat16 1.6e-2).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import reference

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}
_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2 * 2.0 ** -10,
         torch.bfloat16: 2 * 2.0 ** -7}
LOW_PRECISION_INPUT_RTOL = 1e-3


def _rtol(result_dtype: torch.dtype, input_dtype: Optional[torch.dtype] = None) -> float:
    r = _RTOL.get(result_dtype, 1e-4)
    if input_dtype in (torch.float16, torch.bfloat16):
        r = max(r, LOW_PRECISION_INPUT_RTOL)
    return r


def compare(got: torch.Tensor, ref: torch.Tensor, rtol: float,
            magnitude: Union[float, torch.Tensor] = 0.0):
    """(ok, max abs error, max rel error, worst) of ``got`` against ``ref`` (NOTE: [check
    tolerances]); ``magnitude``: that of the terms summed, when it exceeds max |ref| (a number,
    or a tensor shaped like ``ref`` for a magnitude per entry); ``worst``: the flat index of the
    entry farthest out of tolerance (None when ok)."""
    if got.shape != ref.shape:
        return False, float("inf"), float("inf"), None
    if got.dtype == torch.bool or not got.is_floating_point():
        diff = (got.to(torch.int64) - ref.to(torch.int64)).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        return err == 0, err, err, (int(diff.reshape(-1).argmax()) if err else None)
    if got.numel() == 0:
        return True, 0.0, 0.0, None
    g, r = got.double(), ref.double()
    same = (g == r) | (torch.isnan(g) & torch.isnan(r))
    diff = torch.where(same, torch.zeros_like(g), (g - r).abs())
    finite = torch.isfinite(r)
    scale = float(r[finite].abs().max()) if bool(finite.any()) else 0.0
    if isinstance(magnitude, torch.Tensor):
        scale = magnitude.to(r).clamp_min(scale)
    else:
        scale = max(magnitude, scale)
    tol = rtol * scale + rtol * r.abs()
    bad = ~(same | (diff <= tol))
    ok = not bool(bad.any())
    abs_err = float(diff.max())
    rel = torch.where(same, torch.zeros_like(g), diff / r.abs())     # inf where ref is 0
    rel_err = float(rel.max())
    if ok:
        return True, abs_err, rel_err, None
    # farthest out of tolerance; NaN (one side NaN) first
    excess = torch.where(bad, (diff - tol).nan_to_num(float("inf")), -torch.inf)
    return False, abs_err, rel_err, int(excess.reshape(-1).argmax())


def _centring_magnitude(x: torch.Tensor, mode: str, groups: int, eps: float,
                        rtol: float) -> torch.Tensor:
    """Per entry of norm_stats' ``out`` (x: (R, C, I)), sum over its elements of
    2 |xhat| e + rtol e^2 with e = s * mean |x| over the elements sharing its mean and s (NOTE:
    [check tolerances]); float64, on x's device."""
    v = x.detach().double()
    r, c, i = v.shape
    if mode == "channel":
        vg = v.transpose(0, 1).reshape(c, 1, r * i)     # one set per channel
    else:                                               # sizes explicit: -1 fails for 0 rows
        vg = v.reshape(r * groups, 1, c // groups * i)  # one set per (sample, group)
    mu = vg.mean(dim=2, keepdim=True)
    s = torch.rsqrt((vg - mu).square().mean(dim=2, keepdim=True) + eps)
    e = s * vg.abs().mean(dim=2, keepdim=True)
    per = 2 * ((vg - mu) * s).abs() * e + rtol * e.square()
    if mode == "channel":
        return per.reshape(c, -1).sum(dim=1)
    return per.reshape(r, c, i).sum(dim=(0, 2))


def _located(t: torch.Tensor, entry: Optional[int] = None) -> str:
    """" at <the layer or parameter t belongs to>" (NOTE: [check names] in hooks.py), or ""."""
    from .hooks import describe         # (the hooks import the layer registry: at errors only)
    who = describe(t, entry)
    return f" at {who}" if who else ""


class CheckedOps:
    """A backend's ops module wrapped so that each op is checked against the torch reference."""

    def __init__(self, ops: Any, name: str):
        self._ops = ops
        self.name = name

    def __getattr__(self, attr):            # anything else the module exposes
        return getattr(self._ops, attr)

    def __repr__(self) -> str:
        return f"CheckedOps({self.name})"

    # ------------------------------------------------------------------------------------------
    def _check(self, op, got, ref, rtol, where, magnitude=0.0, owner=None):
        """Raises unless ``got`` agrees with ``ref``, naming the layer or parameter of ``owner``
        (default: got) and the worst entry."""
        ok, a, r, worst = compare(got, ref, rtol, magnitude)
        if not ok:
            at = "" if worst is None else f", worst at entry {worst}"
            raise RuntimeError(
                f"adafisher check: backend {self.name!r} op {op} disagrees with the torch "
                f"reference{_located(got if owner is None else owner, worst)} {where}{at}: max "
                f"abs error {a:.3g}, max rel error {r:.3g} (rtol {rtol:.3g}, NOTE: [check "
                f"tolerances] in check.py)")

    @staticmethod
    def _where_out(out: torch.Tensor) -> str:
        return f"(out = buffer slice at offset {out.storage_offset()}, {out.numel()} entries)"

    def _stats(self, op: str, x: torch.Tensor, out: torch.Tensor, *args, magnitude=0.0):
        ref_out = out.detach().clone()
        ref_ret = getattr(reference, op)(x, ref_out, *args)
        # out is a slice of the flat statistics buffer: the rest of it must not change
        base = out._base if out._base is not None and out._base.dim() == 1 \
            and out.is_contiguous() else None
        before = base.detach().clone() if base is not None else None
        ret = getattr(self._ops, op)(x, out, *args)
        if before is not None:
            lo = out.storage_offset() - base.storage_offset()
            hi = lo + out.numel()
            for part in (slice(0, lo), slice(hi, None)):
                # bitwise: a NaN the user's data put there earlier is not a write
                if not torch.equal(before[part].view(_BITS[before.dtype]),
                                   base.detach()[part].view(_BITS[before.dtype])):
                    raise RuntimeError(f"adafisher check: backend {self.name!r} op {op} wrote "
                                       f"outside its slice of the statistics buffer"
                                       f"{_located(out)} {self._where_out(out)}")
        if ret != ref_ret:
            raise RuntimeError(f"adafisher check: backend {self.name!r} op {op} returned {ret!r}, "
                               f"the torch reference {ref_ret!r}{_located(out)} "
                               f"{self._where_out(out)}")
        in_dtype = x.dtype if x.is_floating_point() else None
        self._check(op, out, ref_out, _rtol(out.dtype, in_dtype), self._where_out(out), magnitude)
        return ret

    def linear_stats(self, x, out, dim=-1, square=True, scale=1.0):
        magnitude = 0.0
        if not square:                       # a plain sum: NOTE: [check tolerances]
            mag = torch.zeros_like(out)
            reference.linear_stats(x.abs(), mag, dim, False, abs(scale))
            magnitude = float(mag.max()) if mag.numel() else 0.0
        return self._stats("linear_stats", x, out, dim, square, scale, magnitude=magnitude)

    def conv_stats(self, x, out, kernel_size, stride, padding, dilation, groups,
                   padding_mode="zeros"):
        return self._stats("conv_stats", x, out, kernel_size, stride, padding, dilation, groups,
                           padding_mode)

    def norm_stats(self, x, out, mode, groups, eps, center=True, mean=None, var=None):
        magnitude = 0.0
        if center and mean is None:          # a computed mean: NOTE: [check tolerances]
            magnitude = _centring_magnitude(x, mode, groups, eps,
                                            _rtol(out.dtype, x.dtype)).to(out.device)
        return self._stats("norm_stats", x, out, mode, groups, eps, center, mean, var,
                           magnitude=magnitude)

    def embedding_stats(self, idx, out):
        return self._stats("embedding_stats", idx, out)

    def layer_ema(self, buf, table, state, fac, initialized, counters, rule, found_inf=None):
        ref = [t.clone() for t in (state, fac, initialized, counters)]
        reference.layer_ema(buf, table, *ref, rule, found_inf)
        self._ops.layer_ema(buf, table, state, fac, initialized, counters, rule, found_inf)
        for nm, got, want in zip(("state", "fac", "initialized", "counters"),
                                 (state, fac, initialized, counters), ref):
            self._check("layer_ema", got, want, _rtol(got.dtype) if got.is_floating_point() else 0,
                        f"(tensor {nm} {tuple(got.shape)})")

    def fused_step(self, params, grads, moms, steps, fac, meta, hyper, decoupled, found_inf=None):
        rp = [p.detach().clone() for p in params]
        rm = [m.detach().clone() for m in moms]
        rs = [t.clone() for t in steps]
        reference.fused_step(rp, grads, rm, rs, fac, meta, hyper, decoupled, found_inf)
        self._ops.fused_step(params, grads, moms, steps, fac, meta, hyper, decoupled, found_inf)
        for i, (p, m, t) in enumerate(zip(params, moms, steps)):
            where = f"(parameter {i} of {len(params)}, shape {tuple(p.shape)}, meta row {meta[i].tolist()})"
            self._check("fused_step", p, rp[i], _rtol(p.dtype), where + " parameter")
            self._check("fused_step", m, rm[i], _rtol(m.dtype), where + " momentum", owner=p)
            self._check("fused_step", t, rs[i], 0.0, where + " step count", owner=p)
