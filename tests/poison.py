"""Poisoned scratch for the kernel backends' tests (NOTE: [poisoned allocations] in poison.cpp).

An op's scratch (the conv batch map's partial-sum rows, the channel statistics' partials,
layer_ema's raw and min/max vectors: torch.empty in the Triton launchers, at::empty in the CUDA
bindings) holds whatever the device's memory held.  A kernel that reads an entry no program or
block wrote reads garbage on a GPU; on the CPU it would often read a fresh page's zeros and
pass.  ``poisoned(op)`` runs op with every CPU allocation filled with 0xFF bytes -- NaN in the
float types, -1 in the integers -- so such a read shows as NaN in the op's results.  conftest
wraps the Triton backend's ops (with the interpreter sanitizer) and tests/cuda_emu.py the
emulated CUDA backend's.
"""
import ctypes
import functools
import os
import shutil

import jit_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = jit_build.build_dir("poison")
_lib = {}


def switch():
    """af_poison(on): on != 0 opens a poisoned scope, 0 closes one (built on first use)."""
    if "fn" not in _lib:
        from torch.utils.cpp_extension import load
        with jit_build.locked(BUILD):
            load(name="adafisher_poison", sources=[os.path.join(ROOT, "tests", "poison.cpp")],
                 extra_cflags=["-O1"], build_directory=BUILD, is_python_module=False)
        _lib["fn"] = ctypes.CDLL(os.path.join(BUILD, "adafisher_poison.so")).af_poison
    return _lib["fn"]


def available() -> bool:
    """Whether poison.cpp can be built here (a C++ compiler, as torch's extension builder finds
    it); without one the ops run unpoisoned and test_poison.py says so by skipping."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def poisoned(op):
    """op, with the CPU memory allocated while it runs filled with 0xFF bytes (op itself where
    poison.cpp cannot be built)."""
    if not available():
        return op

    @functools.wraps(op)
    def run(*args, **kwargs):
        on = switch()
        on(1)
        try:
            return op(*args, **kwargs)
        finally:
            on(0)

    return run
