"""Shared test setup.

Kernel tests are parametrised over ``kernel_backends()``: every non-reference backend that can run
here.  On a CPU-only machine Triton kernels run interpreted (TRITON_INTERPRET=1, set before triton is
imported anywhere) and the CUDA backend's sources run under the CUDA emulator (tests/cuda_emu.py).
"""
import contextlib
import importlib.util
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adafisher_fast import backends  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    import fisher_kernels
    import triton_sanitizer
    triton_sanitizer.install([(fisher_kernels, op) for op in backends.OPS],
                             [(sys.modules["fisher_kernels.fused_step"], "_launch")])

# NOTE: [one CPU thread] oneDNN's multi-threaded weight gradient of a channels_last 1x1 Conv2d
# with stride 2 crashes (SIGSEGV in jit_avx512_common_1x1_convolution_bwd_weights; torch 2.11 and
# 2.13, oneDNN 3.12, this AVX-512 host), with no AdaFisher code involved:
#     torch.set_num_threads(2)
#     w = torch.randn(4, 3, 1, 1).to(memory_format=torch.channels_last).requires_grad_()
#     x = torch.randn(3, 3, 10, 10).to(memory_format=torch.channels_last)
#     F.conv2d(x, w, stride=2).sum().backward()     # repeated 20 times: 3 crashes in 3 runs
# The random-model sweep's channels_last models reach it (seed 3433 every time).  With one thread
# it never crashed (0 in 6 runs), and the tests' tiny shapes run as fast (random-model and zoo
# tests: 61.3 s with one thread, 61.5 with two); under pytest -n 2 one thread per worker is also
# what two cores hold.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``pytest -m gpu`` without a CUDA device skips the gpu-marked tests, saying why, instead of
    failing each one with torch's "Found no NVIDIA driver" (on the GPU machine .ci/gpu's summary
    line then shows them as skipped, and its env stage shows the device)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device here (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@contextlib.contextmanager
def deterministic(on: bool, warn_only: bool = False):
    """Within: torch.use_deterministic_algorithms(on, warn_only=warn_only)."""
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(on, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_device(backend: str) -> torch.device:
    """Where a test's model for ``backend`` lives: the CPU for the torch reference, the GPU (if
    any) for the kernel backends, whose ops on a CPU-only machine are interpreted or emulated."""
    return torch.device("cpu") if backend == "torch" else device()


def kernel_backends():
    """Names of the backends other than the torch reference whose kernels run here: Triton
    (interpreted on a CPU) and CUDA (the built extension on a GPU; on a CPU-only machine csrc/
    under the CUDA emulator, NOTE: [CUDA emulator], built on first use by tests/cuda_emu.py)."""
    return [name for name in ("triton", "cuda")
            if emulated(name) or backends._try_load(name, device())[0] is not None]


def emulated(name: str) -> bool:
    return name == "cuda" and not torch.cuda.is_available()


def kernel_module(name: str, monkeypatch=None):
    """The ops module of backend ``name``; for the emulated CUDA backend, ``monkeypatch`` (if
    given) also makes ``backend="cuda"`` resolve to it for CPU models."""
    if not emulated(name):
        return backends._try_load(name, device())[0]
    import cuda_emu
    mod = cuda_emu.backend()
    if monkeypatch is not None:
        load = backends._try_load
        monkeypatch.setattr(backends, "_try_load", lambda n, d: (mod, "") if n == name else load(n, d))
    return mod


def backend_name(ops) -> str:
    """"triton" or "cuda" for an ops module from ``kernel_ops``."""
    return {mod: name for name, mod in backends._MODULES.items()}[ops.__name__]


@pytest.fixture(params=kernel_backends() or ["none"])
def kernel_ops(request, monkeypatch):
    """The ops module of one kernel backend (skips where none can run)."""
    if request.param == "none":
        pytest.skip("no kernel backend can run on this machine")
    return kernel_module(request.param, monkeypatch)


@pytest.fixture
def emu_launches(tmp_path, monkeypatch):
    """The emulated CUDA backend's kernel launches from here on (its launch log,
    ADAFISHER_EMU_LAUNCH_LOG): a callable giving [(mangled kernel symbol, grid x, grid y)]; []
    where nothing was logged (a GPU's launches, the Triton backend's)."""
    log = tmp_path / "launches.log"
    monkeypatch.setenv("ADAFISHER_EMU_LAUNCH_LOG", str(log))

    def launches():             # lines "grid X Y Z block N symbol"
        if not log.exists():
            return []
        return [(f[6], int(f[1]), int(f[2])) for f in map(str.split, log.read_text().splitlines())]
    return launches


def fisher_tensors(fisher) -> list:
    """Every tensor a FisherState holds, its LayerTable's included (not ``_terms``, the float
    columns of the table kept on the host in float64, nor ``generation_t``, the host's count of
    clears: NOTE: [compiled autograd])."""
    return [v for k, v in (*vars(fisher).items(), *fisher.table._asdict().items())
            if isinstance(v, torch.Tensor) and k not in ("_terms", "generation_t")]


COPY_OPS = {"aten::clone", "aten::contiguous"}     # not copy_: the Triton interpreter's own


def tensor_copies(fn) -> list:
    """Names of the dispatcher ops in ``COPY_OPS`` that ``fn()`` runs, from Python or from C++
    (the CUDA binding's ``x.contiguous()`` too, and a ``reshape`` that must copy): how the layout
    tests see that a kernel read a tensor where it lies (NOTE: [memory order] in
    fisher_kernels/host.py)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in COPY_OPS]


# NOTE: [trajectory tolerance] Two backends compute every op to float32 rounding (the op tests, and
# check=True at every step of a trajectory test, hold each op to that), but parallel sums round
# differently, and min-max normalisation followed by the division by F = S'H' + Lambda amplifies a
# last-bit difference in a tiny factor entry.  Lambda=0.1 and lr=1e-3 keep that amplification small,
# so short trajectories agree to rtol 1e-4 (relative to each tensor's scale).  The EMA state and
# H'/S' are held to FISHER_RTOL = 1e-2: min-max of a factor whose entries are close together (H of
# a conv after BatchNorm + ReLU on a small batch; a BatchNorm's sum of xhat^2, N * var / (var + eps)
# in every channel) turns a 1e-7 relative difference into a percent of the normalised range.
# Measured with the emulated CUDA backend (tests/cuda_emu.py): lr=1e-2 and the default Lambda put a
# paper-preset CNN's parameters 7% apart after 8 steps while check=True passed at every op.
TRAJ_RTOL = 1e-4
FISHER_RTOL = 1e-2
ABS_FLOOR = 1e-6   # a conv bias before BatchNorm gets a gradient of pure rounding noise (~1e-9)


def assert_trajectories_close(got, want):
    """(model, optimizer) pairs after the same steps: parameters, per-parameter state and every
    fisher tensor agree within NOTE: [trajectory tolerance]."""
    def close(a, b, what, rtol=TRAJ_RTOL):
        a = a.to(b.device)      # step counts: on the GPU for the kernels, NOTE: [device steps]
        if not b.is_floating_point():
            assert torch.equal(a, b), what
            return
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale + ABS_FLOOR,
                                   msg=lambda m: f"{what}: {m}")

    (mg, og), (mw, ow) = got, want
    for (n, b), a in zip(mw.named_parameters(), mg.parameters()):
        close(a, b, f"parameter {n}")
        for k, v in ow.state[b].items():
            close(og.state[a][k], v, f"state {k} of {n}")
    for k, v in ow.fisher.tensors().items():
        close(og.fisher.tensors()[k], v, f"fisher {k}", rtol=FISHER_RTOL)


class AtenOps(TorchDispatchMode):
    """The aten ops run within, by name (``seen``)."""

    def __enter__(self):
        self.seen = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func).split(".")[1])
        return func(*args, **(kwargs or {}))
