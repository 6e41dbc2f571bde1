"""Every backend's six ops as torch custom ops, ``torch.ops.adafisher_<backend>.<op>``, with fake
implementations, so that a compiled model or a compiled ``step()`` calls them without graph breaks.

NOTE: [compiled ops] Eager code calls a backend's Python launchers directly: a custom op costs a
dispatcher round trip per call, which the hooks would pay on every layer.  While torch.compile
traces (``torch.compiler.is_compiling()``, a constant to dynamo) the same calls go through the
custom ops instead: dynamo cannot trace a Triton launcher or the CUDA binding's host-side table
building, and it need not trace an opaque op whose fake implementation says "writes its mutable
arguments in place, returns nothing".  The torch backend's statistics ops are plain tensor code, so
dynamo traces them (inductor fuses them into the model's kernels); its ``layer_ema`` and
``fused_step`` read their tables on the host and go through custom ops like every other backend's.
Non-tensor arguments are flattened to schema types here (padding pairs, LayerTable, EmaRule,
hyper-parameter tuples, with tensor lrs in a list of their own) and rebuilt inside the op.

NOTE: [op dispatch] The ops are defined with ``torch.library.Library`` and one Python kernel for
every device (``define_op``), not with ``torch.library.custom_op``: that one wraps the kernel in
Python autograd and version-bump kernels of its own, and a call of an op that returns at once
took 18.7 us against 4.7 (torch 2.13, 2-core CI host; 23.9 against 9.9 on torch 2.11).  A
compiled model calls two such ops per hooked layer on a statistics iteration (its H in the
forward graph, its S from the backward), and a compiled ``step()`` two more.  What custom_op
added is not needed here: the ops return nothing, so autograd's fallback has no output to
attach a gradient to; it still bumps the version counters of the arguments the schema marks as
written, and refuses an in-place write to a leaf that requires grad, as for any in-place op.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .reference import EmaRule, LayerTable, conv_sizes

STATS_OPS = ("linear_stats", "conv_stats", "norm_stats", "embedding_stats")
_REGISTERED: Dict[str, Any] = {}
_LIBRARIES: Dict[str, torch.library.Library] = {}      # an op lives as long as its Library


def define_op(qualname: str, mutates_args: Sequence[str], fn: Callable,
              fake: Callable = lambda *args, **kwargs: None) -> None:
    """``ns::name`` with the schema of ``fn``'s annotations, ``fn`` its kernel on every device
    and ``fake`` its fake implementation (NOTE: [op dispatch])."""
    ns, name = qualname.split("::")
    lib = _LIBRARIES.get(ns)
    if lib is None:
        lib = _LIBRARIES[ns] = torch.library.Library(ns, "FRAGMENT")
    lib.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
    lib.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=lib)


def _register(ns: str, ops: Any) -> Any:
    """Define ``ns::<op>`` for the six ops, each calling ``ops.<op>`` (looked up at call time)."""
    def linear_stats(x: Tensor, out: Tensor, dim: int, square: bool, scale: float) -> None:
        ops.linear_stats(x, out, dim, square, scale)

    def conv_stats(x: Tensor, out: Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], dilation: List[int], groups: int, padding_mode: str) -> None:
        pairs = [(padding[2 * i], padding[2 * i + 1]) for i in range(len(kernel_size))]
        ops.conv_stats(x, out, kernel_size, stride, pairs, dilation, groups, padding_mode)

    def norm_stats(x: Tensor, out: Tensor, norm_mode: str, groups: int, eps: float, center: bool,
                   mean: Optional[Tensor], var: Optional[Tensor]) -> None:
        # not "mode": torch's fake-tensor dispatch passes a keyword of that name
        ops.norm_stats(x, out, norm_mode, groups, eps, center, mean, var)

    def embedding_stats(idx: Tensor, out: Tensor) -> None:
        ops.embedding_stats(idx, out)

    def layer_ema(buf: Tensor, table: List[Tensor], sizes: List[int], state: Tensor, fac: Tensor,
                  initialized: Tensor, counters: Tensor, coefs: List[float],
                  normalise: List[bool], found_inf: Optional[Tensor]) -> None:
        n_acc, n_layers, n_raw = sizes
        tab = LayerTable(n_acc, *table[:8], n_layers, table[8], n_raw)
        ops.layer_ema(buf, tab, state, fac, initialized, counters, EmaRule(*coefs, *normalise),
                      found_inf)

    def fused_step(params: List[Tensor], grads: List[Tensor], moms: List[Tensor],
                   steps: List[Tensor], fac: Tensor, meta: Tensor, hyper: List[float],
                   lrs: List[Optional[Tensor]], decoupled: bool,
                   found_inf: Optional[Tensor]) -> None:
        rows = [(hyper[4 * i] if lr is None else lr, *hyper[4 * i + 1:4 * i + 4])
                for i, lr in enumerate(lrs)]
        ops.fused_step(params, grads, moms, steps, fac, meta, rows, decoupled, found_inf)

    for name, mutates, fn in (
            ("linear_stats", ("out",), linear_stats), ("conv_stats", ("out",), conv_stats),
            ("norm_stats", ("out",), norm_stats), ("embedding_stats", ("out",), embedding_stats),
            ("layer_ema", ("state", "fac", "initialized", "counters"), layer_ema),
            ("fused_step", ("params", "moms", "steps"), fused_step)):
        define_op(f"{ns}::{name}", mutates, fn)
    return getattr(torch.ops, ns)


class CompileAwareOps:
    """A backend's ops as the hooks and ``step()`` call them (NOTE: [compiled ops]): straight to
    ``ops`` in eager mode, through the custom ops ``torch.ops.<ns>`` while torch.compile traces.
    Those are registered once per process, calling ``make_ops()`` (built then, so no optimizer's
    own ``ops`` object is shared with the others).  ``traced`` names the ops that dynamo traces
    itself (the torch backend's statistics)."""

    def __init__(self, ops: Any, ns: str, make_ops, traced=()):
        self._ops, self._traced = ops, frozenset(traced)
        if ns not in _REGISTERED:
            _REGISTERED[ns] = _register(ns, make_ops())
        self._lib = _REGISTERED[ns]

    def __getattr__(self, attr):            # anything else the wrapped ops expose
        return getattr(self._ops, attr)

    def __repr__(self) -> str:
        return f"CompileAwareOps({self._ops!r})"

    def _eager(self, op: str) -> bool:
        return op in self._traced or not torch.compiler.is_compiling()

    def linear_stats(self, x, out, dim=-1, square=True, scale=1):
        # scale's default an int: under torch.compile(dynamic=True) dynamo makes a float default
        # a graph input, read back with .item(), which a checkpointed region's subgraph could
        # not use (the compile failed) and which cost every dynamic compile a second trace
        if self._eager("linear_stats"):
            return self._ops.linear_stats(x, out, dim, square, scale)
        if scale == 1.0:
            self._lib.linear_stats(x, out, dim, square, 1.0)
            return
        # a scale may come from a dynamic shape (official BatchNorm's 1 / (H W)^2): as the op's
        # float argument it would specialise the graph to it, one recompile per image size
        part = torch.zeros_like(out)
        self._lib.linear_stats(x, part, dim, square, 1.0)
        out.add_(part * scale)

    def conv_stats(self, x, out, kernel_size, stride, padding, dilation, groups,
                   padding_mode="zeros"):
        if self._eager("conv_stats"):
            return self._ops.conv_stats(x, out, kernel_size, stride, padding, dilation, groups,
                                        padding_mode)
        self._lib.conv_stats(x, out, list(kernel_size), list(stride),
                             [p for lo_hi in padding for p in lo_hi], list(dilation), groups,
                             padding_mode)
        return math.prod(conv_sizes(x, kernel_size, stride, padding, dilation))

    def norm_stats(self, x, out, mode, groups, eps, center=True, mean=None, var=None):
        if self._eager("norm_stats"):
            return self._ops.norm_stats(x, out, mode, groups, eps, center, mean, var)
        self._lib.norm_stats(x, out, mode, groups, float(eps), center, mean, var)

    def embedding_stats(self, idx, out):
        if self._eager("embedding_stats"):
            return self._ops.embedding_stats(idx, out)
        self._lib.embedding_stats(idx, out)

    def layer_ema(self, buf, table, state, fac, initialized, counters, rule, found_inf=None):
        if self._eager("layer_ema"):
            return self._ops.layer_ema(buf, table, state, fac, initialized, counters, rule,
                                       found_inf)
        self._lib.layer_ema(buf, list(table[1:9]) + [table.seg],
                            [table.n_acc, table.n_layers, table.n_raw], state, fac, initialized,
                            counters, [float(c) for c in rule[:4]], [bool(b) for b in rule[4:]],
                            found_inf)

    def fused_step(self, params, grads, moms, steps, fac, meta, hyper, decoupled, found_inf=None):
        if self._eager("fused_step"):
            return self._ops.fused_step(params, grads, moms, steps, fac, meta, hyper, decoupled,
                                        found_inf)
        # a tensor lr stays a tensor, a graph input: a new value needs no recompile (NOTE:
        # [tensor lr] in kernel_host.py)
        lrs = [lr if isinstance(lr, Tensor) else None for lr, *_ in hyper]
        self._lib.fused_step(params, grads, moms, steps, fac, meta,
                             [0.0 if isinstance(v, Tensor) else float(v) for row in hyper
                              for v in row], lrs, decoupled, found_inf)
