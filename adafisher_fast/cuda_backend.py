"""The CUDA C++ backend: the six ops of ``reference.py`` with the same Python signatures, running the
kernels of ``csrc/<op>.cu`` through the torch custom ops ``torch.ops.adafisher.*`` that
``csrc/bindings.cpp`` registers (compiled into ``adafisher_fast._C`` by setup.py).

Build (on a machine with a CUDA torch and nvcc; no network needed)::

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

Importing this module raises ImportError with that hint when the extension is not built, which the
dispatcher (backends.py) turns into "backend 'cuda' cannot run" / falls back under ``auto``.

Fake implementations of every op are registered here so that the ops trace under torch.compile
(they mutate their ``out``/state arguments in place and return nothing).

Documented fallbacks to the torch reference (the kernels do not cover them):
* ``fused_step`` parameters or gradients in float64, or momenta whose dtype differs from the
  parameter's (float64 models keep the reference's float64 arithmetic exactly).  A gradient in
  another kernel dtype (a bfloat16 parameter's float32 gradient) runs in the kernel: one launch
  per (param dtype, grad dtype) pair, as in the Triton backend.  Non-contiguous
  layouts other than rows stored transposed (channels_last conv weights) are stepped through
  contiguous copies, as in the Triton backend.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import List, Optional, Sequence, Tuple

import torch

from . import kernel_host, reference
from .reference import EmaRule, LayerTable

try:
    from . import _C  # noqa: F401  (registers torch.ops.adafisher.*)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "adafisher_fast._C (the CUDA C++ extension) is not built: build it on a machine with a "
        "CUDA-enabled torch and nvcc with `pip install --no-build-isolation -e .` or "
        f"`python setup.py build_ext --inplace` (csrc/README.md). ({e})") from e

_ops = torch.ops.adafisher
_PAD_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}
_NORM_MODES = {"channel": 0, "sample": 1}


# ---------------------------------------------------------------------------------------------
# fake implementations (torch.compile): in-place ops with no outputs
# ---------------------------------------------------------------------------------------------
def _register_fakes() -> None:
    def nothing(*args, **kwargs):
        return None
    for name in ("linear_stats", "conv_stats", "norm_stats", "embedding_stats", "layer_ema", "fused_step"):
        try:
            torch.library.register_fake(f"adafisher::{name}")(nothing)
        except RuntimeError:      # already registered (module reloaded)
            pass


_register_fakes()


# ---------------------------------------------------------------------------------------------
# statistics ops
# ---------------------------------------------------------------------------------------------
def linear_stats(x: torch.Tensor, out: torch.Tensor, dim: int = -1, square: bool = True,
                 scale: float = 1.0) -> None:
    """reference.linear_stats on the GPU (csrc/linear_stats.cu)."""
    _ops.linear_stats(x, out, int(dim), bool(square), float(scale))


def conv_stats(x: torch.Tensor, out: torch.Tensor, kernel_size: Sequence[int],
               stride: Sequence[int], padding: Sequence[Tuple[int, int]],
               dilation: Sequence[int], groups: int, padding_mode: str = "zeros") -> int:
    """reference.conv_stats on the GPU (csrc/conv_stats.cu); returns L, the output positions."""
    args, n_pos = _conv_args(x.shape, tuple(kernel_size), tuple(stride),
                             tuple(map(tuple, padding)), tuple(dilation), groups, padding_mode)
    _ops.conv_stats(x, out, *args)
    return n_pos


@functools.lru_cache(maxsize=1024)
def _conv_args(shape: torch.Size, kernel_size: tuple, stride: tuple, padding: tuple,
               dilation: tuple, groups: int, padding_mode: str):
    """(the op's arguments after x and out, output positions) of a conv_stats call, memoised
    (NOTE: [launch plans] in fisher_kernels/host.py; the binding makes its own checks)."""
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"conv_stats: padding_mode must be one of {tuple(_PAD_MODES)}, got {padding_mode!r}")
    flat = [int(p) for lo_hi in padding for p in lo_hi]
    args = ([int(k) for k in kernel_size], [int(s) for s in stride], flat,
            [int(d) for d in dilation], int(groups), _PAD_MODES[padding_mode])
    if len(shape) != len(kernel_size) + 2:      # the binding names it
        return args, 0
    x = torch.empty(shape, device="meta")
    return args, math.prod(reference.conv_sizes(x, kernel_size, stride, padding, dilation))


def norm_stats(x: torch.Tensor, out: torch.Tensor, mode: str, groups: int, eps: float,
               center: bool = True, mean=None, var=None) -> None:
    """reference.norm_stats on the GPU (csrc/norm_stats.cu)."""
    if mode not in _NORM_MODES:
        raise ValueError(f"norm_stats: mode must be 'channel' or 'sample', got {mode!r}")
    if mean is not None:
        mean, var = mean.to(out.dtype), var.to(out.dtype)
    _ops.norm_stats(x, out, _NORM_MODES[mode], int(groups), float(eps), bool(center), mean, var)


def embedding_stats(idx: torch.Tensor, out: torch.Tensor) -> None:
    """reference.embedding_stats on the GPU (csrc/embedding_stats.cu)."""
    _ops.embedding_stats(idx, out)


# ---------------------------------------------------------------------------------------------
# step ops
# ---------------------------------------------------------------------------------------------
def layer_ema(buf: torch.Tensor, table: LayerTable, state: torch.Tensor, fac: torch.Tensor,
              initialized: torch.Tensor, counters: torch.Tensor, rule: EmaRule,
              found_inf: Optional[torch.Tensor] = None) -> None:
    """reference.layer_ema on the GPU in one launch (csrc/layer_ema.cu)."""
    reference.check_ema_found_inf(found_inf, state, fac, initialized, counters)
    ptr, src, pw, coef, q, factor = kernel_host.term_csr(table)
    _ops.layer_ema(buf, int(table.n_acc), ptr, src, pw, coef, q, factor,
                   table.factor_start, *kernel_host.layer_factors(table), state, fac,
                   initialized, counters, float(rule.decay), float(rule.weight),
                   float(rule.decay_first), float(rule.weight_first), bool(rule.normalise_raw),
                   bool(rule.normalise_state), found_inf)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_ok(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the kernel takes this parameter (the binding checks devices and raises)."""
    return (p.dtype in _KERNEL_DTYPES and g.dtype in _KERNEL_DTYPES and m.dtype == p.dtype
            and t.dtype == torch.float32 and t.numel() == 1 and (t.is_cpu or t.device == p.device))


_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")


def _all_kernel_ok(params: list, grads: list, moms: list, steps: list) -> bool:
    """Whether ``_kernel_ok`` holds for every parameter of a model in one dtype pair (checked in
    C-level passes, NOTE: [step host path] in fisher_kernels/fused_step.py); False means "ask
    each", not "none"."""
    dt, gt = set(map(_DTYPE, params)), set(map(_DTYPE, grads))
    return (len(dt) == len(gt) == 1 and dt | gt <= set(_KERNEL_DTYPES)
            and set(map(_DTYPE, moms)) == dt and set(map(_DTYPE, steps)) == {torch.float32}
            and set(map(torch.Tensor.numel, steps)) == {1}
            and set(map(_DEVICE, steps)) <= {torch.device("cpu"), params[0].device})


def fused_step(params: List[torch.Tensor], grads: List[torch.Tensor], moms: List[torch.Tensor],
               steps: List[torch.Tensor], fac: torch.Tensor, meta: torch.Tensor,
               hyper: List[Tuple[float, float, float, float]], decoupled: bool,
               found_inf: Optional[torch.Tensor] = None) -> None:
    """reference.fused_step on the GPU: one launch per (param dtype, grad dtype) pair over all
    parameters (csrc/fused_step.cu); float64 (or otherwise unsupported) parameters go through the
    reference."""
    reference.check_step_lists(params, grads, moms, steps, meta, hyper, found_inf)
    n = len(params)
    if n == 0:
        return
    if _all_kernel_ok(params, grads, moms, steps):
        idx, rest = range(n), []
    else:
        ok = list(map(_kernel_ok, params, grads, moms, steps))
        idx, rest = [i for i in range(n) if ok[i]], [i for i in range(n) if not ok[i]]
    pk, gk, mk, _, back = kernel_host.operands(idx, params, grads, moms, meta,
                                               kernel_host.meta_token(meta))
    if rest:
        reference.check_step_shapes(params, grads, moms)     # before the reference updates any
        reference.check_meta(meta, params, fac.numel())
        reference.fused_step([params[i] for i in rest], [grads[i] for i in rest], [moms[i] for i in rest],
                             [steps[i] for i in rest], fac, meta[rest], [hyper[i] for i in rest], decoupled,
                             found_inf)
        if not idx:
            return
        steps, hyper, meta = [steps[i] for i in idx], [hyper[i] for i in idx], meta[idx]
    hyper, lrs = kernel_host.split_lr(hyper, pk[0].device)       # NOTE: [tensor lr]
    lr, beta, wd, lam = (list(map(float, col)) for col in zip(*hyper))
    _ops.fused_step(pk, gk, mk, steps, fac, meta, lr, beta, wd, lam, bool(decoupled), lrs, found_inf)
    kernel_host.copy_back(back)
    kernel_host.mark_written(pk)              # NOTE: [version counters]
