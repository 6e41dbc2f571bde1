"""Shared test setup.

Kernel tests are parametrised over ``kernel_backends()``: every non-reference backend that can run
here.  On a CPU-only machine Triton kernels run interpreted (TRITON_INTERPRET=1, set before triton is
imported anywhere); the CUDA extension needs a GPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adafisher_fast import backends  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_backends():
    """[(name, ops module)] of the backends other than the torch reference that can run here."""
    out = []
    for name in ("triton", "cuda"):
        mod, _ = backends._try_load(name, device())
        if mod is not None:
            out.append((name, mod))
    return out


@pytest.fixture(params=[n for n, _ in kernel_backends()] or ["none"])
def kernel_ops(request):
    """The ops module of one kernel backend (skips where none can run)."""
    mods = dict(kernel_backends())
    if request.param not in mods:
        pytest.skip("no kernel backend can run on this machine")
    return mods[request.param]
