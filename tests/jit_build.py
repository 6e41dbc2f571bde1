"""Where and how the tests build their C++ libraries with torch's JIT extension builder
(``torch.utils.cpp_extension.load``): tests/poison.py's and tests/cuda_emu.py's.

NOTE: [build locks] ``load`` serialises builders through a file ``lock`` in the build folder.
torch 2.11 and 2.13 treat the file's existence as the lock (FileBaton): a builder killed before
it removes it (``pytest -x`` stopping its xdist workers mid-build, a Ctrl-C) leaves every later
run waiting forever, silently.  torch 2.14 holds an OS lock on that file instead and leaves it
in place, which 2.13 then reads as held: one run of the suite on 2.14 hung the next one on 2.13
in the same tree (2026-12-06).  So each torch version builds in a folder of its own, and
``locked`` serialises our builders by an OS lock of our own, which the kernel releases when its
holder dies; holding it, no builder of ours is running, so a ``lock`` file found is stale and is
removed before ``load`` looks for it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_dir(name: str) -> str:
    """build/<name>/torch-<version>: one folder per torch version (NOTE: [build locks])."""
    return os.path.join(ROOT, "build", name, f"torch-{torch.__version__}")


@contextlib.contextmanager
def locked(folder: str):
    """Within: this process is the only one of the tests' builders in ``folder`` (created if
    needed), and torch's own lock file there is gone (NOTE: [build locks])."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tests.flock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)       # released at close, or when the process dies
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "lock"))
        yield
