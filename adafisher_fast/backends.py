"""The one place that picks the backend (SPEC section 4).

``backend="auto"`` picks, for the model's device: CUDA tensors -> the CUDA C++ extension if it was
built, else Triton, else the torch reference; CPU tensors -> torch.  ``"torch" | "triton" | "cuda"``
force one and raise if it cannot run.  The environment variable ``ADAFISHER_BACKEND`` overrides the
constructor argument.  A backend is a module exposing the six ops of ``reference.py`` with the same
signatures.

``check=True`` (or ``ADAFISHER_CHECK=1``) wraps the chosen backend so that the torch reference runs
beside it on copies of every input and a disagreement raises (``check.py``).

The chosen ops are wrapped once more so that torch.compile sees each op as a custom op
(``custom_ops.py``, NOTE: [compiled ops]).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional, Tuple

import torch

from . import reference
from .custom_ops import STATS_OPS, CompileAwareOps

BACKENDS = ("auto", "torch", "triton", "cuda")
OPS = ("linear_stats", "conv_stats", "norm_stats", "embedding_stats", "layer_ema", "fused_step")
ENV_VAR = "ADAFISHER_BACKEND"
CHECK_VAR = "ADAFISHER_CHECK"
# module implementing each GPU backend (filled by fisher_kernels/ and csrc/ + its loader)
_MODULES = {"triton": "fisher_kernels", "cuda": "adafisher_fast.cuda_backend"}


def _try_load(name: str, device: torch.device) -> Tuple[Optional[ModuleType], str]:
    """(ops module, "") if backend ``name`` can run on ``device``, else (None, why not)."""
    if name == "torch":
        return reference, ""
    interpret = name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        return None, f"it needs CUDA tensors and the model is on {device.type}" + (
            " (Triton kernels run on the CPU only with TRITON_INTERPRET=1)" if name == "triton" else "")
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as e:
        return None, f"{_MODULES[name]} cannot be imported ({e})"
    missing = [op for op in OPS if not callable(getattr(mod, op, None))]
    if missing:
        return None, f"{_MODULES[name]} does not implement {', '.join(missing)}"
    return mod, ""


def _env_flag(var: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (any case), unset or empty
    for off; anything else is an error, not silently off."""
    v = os.environ.get(var, "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{var}={os.environ[var]!r}: expected 1/true/yes/on or 0/false/no/off")


def resolve(backend: str, device: torch.device, check: bool = False) -> Tuple[str, object]:
    """(name, ops) of the backend to use for a model on ``device``; ADAFISHER_BACKEND, when set
    and not empty, overrides ``backend``."""
    env = os.environ.get(ENV_VAR) or None
    try:
        name, mod = _pick(env or backend, device)
    except (ValueError, RuntimeError) as e:
        if env is None:
            raise
        raise type(e)(f"{ENV_VAR}={env!r} (which overrides backend={backend!r}): {e}") from None
    if check or _env_flag(CHECK_VAR):
        from .check import CheckedOps
        make, ns, traced = (lambda: CheckedOps(mod, name)), f"adafisher_{name}_checked", ()
    else:
        make, ns, traced = (lambda: mod), f"adafisher_{name}", STATS_OPS if name == "torch" else ()
    return name, CompileAwareOps(make(), ns, make, traced)


def _pick(backend: str, device: torch.device) -> Tuple[str, ModuleType]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        mod, why = _try_load(backend, device)
        if mod is None:
            raise RuntimeError(f"backend={backend!r} cannot run: {why}")
        return backend, mod
    for name in (("cuda", "triton") if device.type == "cuda" else ()) + ("torch",):
        mod, _ = _try_load(name, device)
        if mod is not None:
            return name, mod
    raise AssertionError("unreachable: the torch backend always loads")
