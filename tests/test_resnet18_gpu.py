"""End-to-end GPU check: a CIFAR-shaped ResNet-18 (``bench.models.resnet18_cifar``, width 64,
11M parameters) trained for 200 steps with every backend, whose loss curves must match the torch
reference's.  Run with ``pytest -m gpu tests/test_resnet18_gpu.py``.

The per-op tests (tests/test_<op>.py, tests/test_cuda_backend.py) compare each kernel with the
reference on one call, and ``test_three_backends_agree_on_a_short_run`` compares parameters after 8
steps of a tiny model.  This file checks what those cannot: that over a real training run, on a real
architecture (strided 3x3 and 1x1 shortcut convs, BatchNorm2d, the fc head), with statistics and
plain iterations interleaved (TCov=10: statistics on steps 0, 10, ..., 190), a kernel backend trains
the model the way the reference does.

Data: a fixed synthetic set, learnable but not trivial: smooth 3x32x32 images (3x8x8 Gaussian noise
upsampled bilinearly) labelled by a fixed random linear teacher on the 3x8x8 noise (argmax over 10
classes), cycled through in a fixed order.  Everything random (data, teacher, the model's
initialisation) is drawn on the CPU from fixed seeds, so every backend starts from the same bits.

``train_curve`` and ``check_curves`` take the device and the sizes as arguments, so the same code runs
on a CPU with tiny settings (a narrow model, a few steps, Triton under ``TRITON_INTERPRET=1``) to
check the code paths and the assertion logic without a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from adafisher_fast import AdaFisher, AdaFisherW, backends
from bench.models import resnet18_cifar

STEPS = 200
TCOV = 10
BATCH = 128
N_BATCHES = 32              # a fixed set of 4096 images, 6.25 passes in 200 steps
CLASSES = 10
# paper at 1e-3 did not learn (CPU run, 2026-11-24: loss 2.39 -> 5.7-8.6 in 10 steps, then chance,
# 2.28); at 3e-4 it did (mean of the last 20 losses 0.21), as the official preset at 3e-4 (0.30)
LR = {"official": 3e-4, "paper": 3e-4}
WEIGHT_DECAY = 5e-4

# --- tolerances of check_curves (see its docstring), calibrated on a CPU on 2026-11-24: the
# torch reference (official preset, AdaFisher, these settings) against itself with every initial
# weight scaled by 1 + 1e-7 * N(0, 1), the size of a kernel's float32 rounding differences.  The
# per-step relative difference stayed <= 0.7% over the first 10 steps, but reached 3.5% by step
# 20 and 6.7% by step 50; the means of the last 20 losses were 0.303 and 0.294 (of the last 40:
# 0.395 and 0.343); the final losses 0.18 and 0.35.  The trajectories decorrelate within ~20
# steps, so only the first steps can be compared one by one, and the tail only as a mean, loosely:
# the per-step noise of the tail (std ~0.1 around 0.3) gives a mean of 20 a ~10% spread.
# The paper preset's tail spreads more: on an H200 (2026-12-04) the torch backend's means of the
# last 20 losses were 0.196 (AdaFisher) and 0.280 (AdaFisherW), the kernel backends' 0.257, and
# 0.189 and 0.193, each of which matched the reference over the first 10 steps; on a CPU the torch
# reference (paper, AdaFisherW) gave 0.175 and 0.222 with and without the 1e-7 perturbation.  So
# the tail allows half the reference's mean, and at least 0.15: a curve that stays near
# ln 10 = 2.30 is 2 outside, a tail twice the reference's (one above 0.15) outside too. ---
EARLY = 10                  # steps compared one by one
EARLY_REL, EARLY_ABS = 0.02, 0.005
TAIL = 20                   # steps whose mean is compared
TAIL_REL, TAIL_ABS = 0.5, 0.15
# --- the reference must learn: mean of the last TAIL losses < DECREASE * mean of the first 5 ---
DECREASE = 0.5


def make_data(n_batches: int, batch: int, classes: int = CLASSES,
              seed: int = 1234) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z (n_batches, batch, 3, 8, 8), y (n_batches, batch)) on the CPU: Gaussian latents labelled
    argmax(z @ W) by a fixed random linear teacher W.  The images are z upsampled bilinearly to
    32x32 (``images``).  Deterministic (a private CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_batches, batch, 3, 8, 8, generator=g)
    teacher = torch.randn(3 * 8 * 8, classes, generator=g)
    y = (z.flatten(2) @ teacher).argmax(2)
    return z, y


def images(z: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(B, 3, 8, 8) latents -> (B, 3, size, size) smooth images."""
    return F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)


@contextlib.contextmanager
def _fp32_convolutions():
    """cuDNN convolutions in true float32 (no TF32, whose 10-bit mantissa would make two runs
    that differ in the last bits of the weights drift apart faster) and with deterministic
    algorithms (so the torch reference itself repeats); the previous settings are restored."""
    cudnn = torch.backends.cudnn
    saved = cudnn.allow_tf32, cudnn.deterministic
    cudnn.allow_tf32, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.allow_tf32, cudnn.deterministic = saved


def train_curve(backend: str, preset: str, opt_cls, *, device, steps: int = STEPS,
                width: int = 64, batch: int = BATCH, n_batches: int = N_BATCHES,
                lr: float = None, tcov: int = TCOV,
                weight_decay: float = WEIGHT_DECAY, size: int = 32, seed: int = 0) -> List[float]:
    """The per-step training loss (the loss of the batch each step trains on, before its update)
    of ``resnet18_cifar(width=width)`` trained ``steps`` steps with ``opt_cls(backend=backend)``.
    The model is initialised on the CPU from ``seed`` and then moved, so every backend and device
    starts from the same weights; the losses stay on the device until the end (no per-step sync)."""
    device = torch.device(device)
    zs, ys = make_data(n_batches, batch)
    zs, ys = zs.to(device), ys.to(device)
    torch.manual_seed(seed)
    model = resnet18_cifar(num_classes=CLASSES, width=width).to(device)
    opt = opt_cls(model, lr=LR[preset] if lr is None else lr, TCov=tcov, weight_decay=weight_decay,
                  preset=preset, backend=backend)
    assert opt.backend == backend, (opt.backend, backend)
    losses = torch.empty(steps, device=device)
    with _fp32_convolutions():
        for t in range(steps):
            i = t % n_batches
            opt.zero_grad()
            loss = F.cross_entropy(model(images(zs[i], size)), ys[i])
            loss.backward()
            opt.step()
            losses[t] = loss.detach()
    out = losses.tolist()
    assert all(v == v and abs(v) != float("inf") for v in out), f"{backend}: non-finite loss {out}"
    return out


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def check_decrease(ref: Sequence[float], tail: int = TAIL, ratio: float = DECREASE) -> None:
    """The reference really learns: mean of the last ``tail`` losses < ``ratio`` x mean of the
    first 5."""
    first, last = _mean(ref[:5]), _mean(ref[-tail:])
    assert last < ratio * first, (
        f"the torch reference does not learn: mean of the first 5 losses {first:.4f}, of the last "
        f"{tail} {last:.4f} (need < {ratio} x first)\ncurve: {[round(v, 4) for v in ref]}")


def check_curves(ref: Sequence[float], got: Sequence[float], name: str = "backend", *,
                 early: int = EARLY, tail: int = TAIL) -> None:
    """``got`` (a kernel backend's loss curve) matches ``ref`` (the torch reference's).

    Why tolerances and not equality: the kernel backends sum the statistics in another order
    (float32 atomics across thread blocks, so even two runs of one backend differ in the last
    bits), and divide slightly differently in the fused step (NOTE in fisher_kernels/fused_step.py).
    cuDNN's convolution backward is not bitwise deterministic either.  These ~1e-7 relative
    differences are amplified by training: the trajectories separate roughly exponentially, and
    after a few hundred steps two runs are only as close as two runs of the same recipe.  So:

    * steps [0, early): compared one by one, |got - ref| <= max(EARLY_REL * ref, EARLY_ABS).  Over
      the first 10 steps a 1e-7 perturbation moved the loss by at most 0.7%; a wrong curvature
      (F off by a factor, statistics of the wrong layer, a missing bias correction) changes every
      update from step 0 on.
    * the last ``tail`` steps: means compared, |mean(got) - mean(ref)| <= max(TAIL_REL * mean(ref),
      TAIL_ABS).  By then two correct runs are as far apart as two runs of the same recipe (see
      the calibration above the constants), so this only catches a backend that trains
      differently: one that does not learn (a flat curve near ln 10 = 2.30 against ~0.3), or
      learns much slower or diverges.
    No single-step check at the end: the last step's loss differed by 2x between two correct runs.
    The per-op tests and ``test_three_backends_agree_on_a_short_run`` are the precise checks.
    """
    assert len(got) == len(ref), (name, len(got), len(ref))
    early = min(early, len(ref))
    tail = min(tail, len(ref))
    bad = [(t, ref[t], got[t]) for t in range(early)
           if abs(got[t] - ref[t]) > max(EARLY_REL * ref[t], EARLY_ABS)]
    assert not bad, (f"{name}: loss differs from the torch reference at {len(bad)} of the first "
                     f"{early} steps, first (step, torch, {name}): {bad[:5]}")
    mr, mg = _mean(ref[-tail:]), _mean(got[-tail:])
    assert abs(mg - mr) <= max(TAIL_REL * mr, TAIL_ABS), (
        f"{name}: mean loss of the last {tail} steps {mg:.4f}, torch reference {mr:.4f}")


# ----------------------------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------------------------
# the reference curves are cached per process: under pytest-xdist with --dist loadgroup (.ci/gpu)
# every test of the group runs on one worker, so each is computed once, not once per worker
_REF: Dict[Tuple[str, str], List[float]] = {}
_ONE_WORKER = pytest.mark.xdist_group("resnet18_gpu")


def _reference_curve(preset: str, opt_cls) -> List[float]:
    """The torch backend's curve, computed once per (preset, optimizer) and shared by the tests."""
    key = (preset, opt_cls.__name__)
    if key not in _REF:
        _REF[key] = train_curve("torch", preset, opt_cls, device="cuda")
    return _REF[key]


@pytest.mark.gpu
@_ONE_WORKER
@pytest.mark.parametrize("opt_cls", [AdaFisher, AdaFisherW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_resnet18_torch_reference_learns(preset, opt_cls):
    check_decrease(_reference_curve(preset, opt_cls))


@pytest.mark.gpu
@_ONE_WORKER
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("opt_cls", [AdaFisher, AdaFisherW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_resnet18_backend_matches_torch_curve(preset, opt_cls, backend):
    mod, why = backends._try_load(backend, torch.device("cuda"))
    if mod is None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    ref = _reference_curve(preset, opt_cls)
    got = train_curve(backend, preset, opt_cls, device="cuda")
    check_curves(ref, got, backend)


def test_check_curves_accepts_noise_and_rejects_wrong_training():
    """CPU check of the assertion logic on synthetic curves (the GPU tests above use it)."""
    ref = [2.4 - 2.1 * t / 199 for t in range(200)]                 # 2.4 -> 0.3
    close = [v * (1.005 if t < EARLY else 1.2) for t, v in enumerate(ref)]
    check_curves(ref, close)
    check_decrease(ref)
    # the H200's widest pair (paper preset, AdaFisherW: tail means 0.280 and 0.189) passes
    check_curves(ref[:-TAIL] + [0.280] * TAIL, ref[:-TAIL] + [0.189] * TAIL)
    for wrong in ([2.3] * 200,                                          # does not learn
                  [v * (1.05 if t < EARLY else 1.0) for t, v in enumerate(ref)],    # step 0 on
                  ref[:-TAIL] + [2 * v for v in ref[-TAIL:]]):          # a tail twice as high
        with pytest.raises(AssertionError):
            check_curves(ref, wrong)
    with pytest.raises(AssertionError):
        check_decrease([2.3] * 200)
