"""tests/poison.py (NOTE: [poisoned allocations]): inside a poisoned scope new CPU memory is 0xFF
bytes, and every op of every kernel backend that runs here runs in one."""
import os

import pytest
import torch

import poison
from adafisher_fast.backends import OPS
from conftest import emulated, kernel_backends, kernel_module

pytestmark = pytest.mark.skipif(not poison.available(), reason="no C++ compiler to build poison.cpp")


def _scratch():
    return (torch.empty(5), torch.empty(3, dtype=torch.bfloat16), torch.empty(2, dtype=torch.float64),
            torch.empty(4, dtype=torch.int64), torch.ones(1).new_empty(6, dtype=torch.int32))


def test_a_poisoned_scope_fills_new_memory_and_ends():
    *floats, i64, i32 = poison.poisoned(_scratch)()
    assert all(t.isnan().all() for t in floats) and i64.eq(-1).all() and i32.eq(-1).all()
    nested = poison.poisoned(lambda: (poison.poisoned(torch.empty)(3), torch.empty(3)))()
    assert all(t.isnan().all() for t in nested), "the inner scope's end ended the outer one"
    *floats, i64, i32 = _scratch()
    assert not (all(t.isnan().all() for t in floats) and i64.eq(-1).all() and i32.eq(-1).all())


@pytest.mark.parametrize("backend", kernel_backends())
def test_every_kernel_op_runs_poisoned(backend):
    """Where kernels are interpreted or emulated (on a GPU the ops use device memory)."""
    if not (emulated(backend) or backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the kernels use device memory here, not poisoned CPU memory")
    mod = kernel_module(backend)
    run = poison.poisoned(len).__code__
    for name in OPS:
        op, layers = getattr(mod, name), []
        while op is not None:
            layers.append(op.__code__)
            op = getattr(op, "__wrapped__", None)
        assert run in layers, f"{backend}.{name} runs unpoisoned"
