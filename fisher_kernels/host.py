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
