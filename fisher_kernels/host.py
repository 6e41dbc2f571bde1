"""Host-side helpers of the launchers.

NOTE: [host arithmetic] ``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunction
objects (triton 3.6 and 3.9): about 5 us and 3 us per call from Python, against 0.1 us for the
plain integer expression.  A statistics launch computed its tile shape with a dozen of them: on
ResNet-18 (82 statistics hooks, launches stubbed, a 2-core CPU) the hooks' host time fell from 160
to 99 us per hook with these instead.
"""
import functools
import math
import os
from typing import List, Optional

import torch
from triton.runtime.jit import JITFunction


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers a >= 0, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1 when the kernels were
    decorated (at import), which fixed them as interpreted or compiled for the process."""
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# NOTE: [launch device] A Triton kernel launches on the *current* CUDA device and its stream, not on
# its arguments' device.  A model on cuda:1 in a process whose current device is cuda:0 (no
# torch.cuda.set_device, as in many DDP scripts and notebooks) would otherwise get its kernels on
# device 0, reading device-1 memory without ordering against device 1's stream.  Each launcher
# therefore runs under its first tensor's device when that is not the current one (csrc/bindings.cpp
# takes a CUDAGuard for the same reason).
def on_device(fn):
    """Decorator: run ``fn(first, ...)`` with first's CUDA device current (first: a tensor, or a
    list of tensors whose first element decides)."""
    @functools.wraps(fn)
    def launcher(first, *args, **kwargs):
        t = first[0] if isinstance(first, (list, tuple)) and first else first
        dev = getattr(t, "device", None)
        if dev is not None and dev.type == "cuda" and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return launcher


# NOTE: [memory order] A channels_last model's activations and output gradients, (B, C, *spatial)
# stored as (B, *spatial, C), are read where they lie.  A sum over every dim but one, or over the
# batch alone, only needs the dims in memory order, so the launchers view such a tensor as its
# contiguous permutation instead of copying it: a copy was one more read and write of every conv
# input and output gradient on each statistics iteration.  csrc/bindings.cpp does the same.
def memory_order(x: torch.Tensor) -> Optional[List[int]]:
    """x's dims from outermost to innermost in memory when x is dense in that order (a permutation
    of it is contiguous: channels_last and the like), else None."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return order if x.permute(order).is_contiguous() else None


def columns(x: torch.Tensor, dim: int):
    """(t, (A, K, B)), K = x.shape[dim]: t is x, or x's contiguous copy, whose memory is a
    contiguous (A, K, B) whose sums over A and B are x's sums over every other dim.  x itself
    when it is dense in some dim order (NOTE: [memory order]); no view is made (a launcher
    passes only the address, NOTE: [launch plans])."""
    dense, abk = column_layout(x.shape, x.stride(), dim)
    return (x if dense else x.contiguous()), abk


# NOTE: [launch plans] What a launcher derives from its arguments' shapes, strides and scalars
# (views, memory order, tile shapes, grids) is the same on every iteration of a training loop,
# and its torch calls cost microseconds each on the host (a view 2 us on the 2-core CI host):
# the Triton conv launcher spent 21-22 us a call before its first launch.  Such derivations are
# memoised on those values (on meta tensors where torch works them out), so that a call
# computes its key, looks it up and launches: 8 us there, the column sums 5 not 8
# (bench/README.md).  The caches are bounded (LRU): a model fed ever new shapes (variable
# sequence lengths) pays the derivation, ~0.1 ms, once per shape while it stays in the cache.
@functools.lru_cache(maxsize=4096)
def column_layout(shape: torch.Size, strides: tuple, dim: int):
    """(dense, (A, K, B)) of ``columns(x, dim)`` for an x of this shape and these strides (NOTE:
    [launch plans])."""
    x = torch.empty_strided(shape, strides, device="meta")
    dense = x.is_contiguous()
    if not dense:
        order = memory_order(x)
        if order is not None:
            dense, shape, dim = True, [shape[d] for d in order], order.index(dim)
    return dense, (math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]))


# NOTE: [direct launch] ``kernel[grid](*args)`` through Triton's JIT runs its binder on every call:
# it specialises each argument (dtype and 16-byte alignment of a tensor, size and divisibility by
# 16 of an int), builds the cache key from that and the options, and looks the compiled kernel
# up: 7.5-9 us a launch on the 2-core CI host for the column reduction's 20 parameters (binder
# and key alone, triton 3.9; the rest of JITFunction.run and the launch proper come on top),
# where a statistics iteration of ResNet-18 makes ~100 launches.  ``launch`` keeps the
# CompiledKernel that the JIT's first launch of each argument key returned and launches it
# through its own handle (``compiled[grid](*every parameter)``, Triton's API for a compiled
# kernel, the same in 3.6 and 3.9), after 4 us of its own key and lookup there.  That key holds
# at least what the JIT specialises on: every tensor's dtype and alignment, every other
# argument's value (a float's type only, which is all the JIT reads of it), the constexprs and
# options, and the device; so a hit launches the kernel the JIT would have picked
# (tests/test_triton_backend.py checks it against the JIT's own specialiser).  Only for
# JITFunctions on CUDA tensors: not under the interpreter, nor for the stand-ins of tests and
# benchmarks, nor for tests/triton_codegen.py's recorded launches; ADAFISHER_TRITON_DIRECT=0
# turns it off.  Not yet timed on a GPU.
DIRECT = os.environ.get("ADAFISHER_TRITON_DIRECT", "1") != "0"
_COMPILED: dict = {}


def arg_key(args: tuple) -> tuple:
    """What ``launch`` keys a launch's positional arguments by (NOTE: [direct launch])."""
    key = []
    for a in args:
        if type(a) is float:
            key.append(float)
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:                               # ints, bools, None: by value
            key.append(a)
    return tuple(key)


def launch(kernel, grid: tuple, *args, **consts) -> None:
    """``kernel[grid](*args, **consts)``: the constexprs and options by keyword, every other
    parameter positionally (NOTE: [direct launch])."""
    if not DIRECT or type(kernel) is not JITFunction or not args[0].is_cuda:
        kernel[grid](*args, **consts)
        return
    # (the first tensor's device is the current one: NOTE: [launch device])
    key = (kernel, arg_key(args), tuple(consts.items()), args[0].get_device())
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **consts)
        tail = param_tail(kernel, len(args), consts)
        if len(_COMPILED) >= 4096:      # ever new shapes: start over
            _COMPILED.clear()
        _COMPILED[key] = compiled, tail
        return
    compiled, tail = hit
    compiled[grid + (1,) * (3 - len(grid))](*args, *tail)


def param_tail(kernel, n: int, consts: dict) -> tuple:
    """The values of ``kernel``'s parameters after its first n: each from ``consts``, else its
    default (the compiled kernel takes every parameter positionally)."""
    return tuple(consts[p.name] if p.name in consts else p.default for p in kernel.params[n:])
