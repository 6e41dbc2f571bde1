"""torch.use_deterministic_algorithms(True) and the kernel backends (NOTE: [ordered partials] in
fisher_kernels/linear_stats.py): every statistics op gives the same bits whatever order its
programs or blocks run in, and a training run repeats bit for bit.

On a CPU the order is shuffled where it runs one program at a time: the Triton interpreter (with
the GPU's split of the rows forced, which the interpreter would not pick on its own) and the CUDA
emulator (ADAFISHER_EMU_BLOCK_ORDER, NOTE: [CUDA emulator]).  On a GPU the hardware's own
scheduling varies it: the gpu test repeats a training run."""
import importlib
import itertools
import random

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisherW, reference
from conftest import (assert_trajectories_close, deterministic, emulated, kernel_backends,
                      kernel_module)


def _split_reductions(ops, dtype=torch.float32, wide_rows=200):
    """(name, out size, call(out)) for each way the statistics ops split a reduction over
    programs: rows (I == 1), planes (I > 1), the conv's batch map Q and output lattice, and
    norm_stats in both modes; every shape large enough to split on both backends.  The channel
    statistics' (wide_rows, 5, 300): 40 rows split Triton's, whose order cannot change the result
    (NOTE: [channel launches]), in a fifth of the interpreter's time; CUDA's need 200."""
    g = torch.Generator().manual_seed(3)
    rows, planes, img, wide = (torch.randn(*shape, generator=g).to(dtype) for shape in
                               ((1000, 7), (40, 5, 300), (130, 3, 20, 20), (wide_rows, 5, 300)))
    return [("linear_stats rows", 7, lambda o: ops.linear_stats(rows, o, -1, True, 1.0)),
            ("linear_stats planes", 5, lambda o: ops.linear_stats(planes, o, 1, False, 0.5)),
            ("conv_stats", 27, lambda o: ops.conv_stats(img, o, (3, 3), (1, 1), [(1, 1), (1, 1)],
                                                        (1, 1), 1, "zeros")),
            # sum xhat^2 = N var / (var + eps) (NOTE: [norm passes]) carries var's last bits
            # only where eps is not small against var (at 1e-5, none), and var's reduction of
            # the small planes ended the same in some orders: more rows, more partial sums
            ("norm_stats channel", 5, lambda o: ops.norm_stats(wide, o, "channel", 1, 1e3)),
            ("norm_stats sample", 5, lambda o: ops.norm_stats(planes, o, "sample", 5, 1e-5))]


def _shuffle_triton_programs(monkeypatch):
    """A function seed -> None that makes the Triton interpreter run each launch's programs in a
    random order drawn from seed, with the GPU's split plan forced."""
    from triton.runtime import interpreter
    ls = importlib.import_module("fisher_kernels.linear_stats")  # the package exports the function
    monkeypatch.setattr(ls, "interpreting", lambda: False)
    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    order, rng = {}, random.Random()

    def grid_dim(x, y, z):
        ids = list(itertools.product(range(x), range(y), range(z)))
        order.clear()
        order.update(zip(ids, rng.sample(ids, len(ids))))
        set_dim(x, y, z)

    monkeypatch.setattr(builder, "set_grid_dim", grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_idx(*order[(x, y, z)]))
    return rng.seed


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_program_order_does_not_change_deterministic_results(name, monkeypatch):
    """Three program orders give the same bits under deterministic algorithms, equal to the
    float64 reference to float32 rounding, and three different results without (which shows that
    every case splits and that the orders reorder its atomic partial sums).  Except where a
    backend has none: CUDA's conv_stats at this size (its batch map's row blocks store their sums
    for the lattice kernel to add up, and that kernel gives each (channel, offset) entry one
    block; Triton's splits the output positions over programs: NOTE: [lattice split]), and
    Triton's channel statistics (both passes store their programs' sums for _channel_rows_kernel:
    NOTE: [channel launches])."""
    if name == "triton" and "triton" not in kernel_backends():
        pytest.skip("needs triton")
    if name == "triton" and torch.cuda.is_available() or name == "cuda" and not emulated("cuda"):
        pytest.skip("on a GPU the order cannot be chosen: test_deterministic_training_repeats")
    ops = kernel_module(name)
    if name == "triton":
        reorder = _shuffle_triton_programs(monkeypatch)
    else:
        def reorder(seed):
            monkeypatch.setenv("ADAFISHER_EMU_BLOCK_ORDER", f"shuffle:{seed}")
    wide_rows = 200 if name == "cuda" else 40
    want = {}
    for case, n, call in _split_reductions(reference, torch.float64, wide_rows):
        want[case] = torch.zeros(n, dtype=torch.float64)
        call(want[case])
        want[case] = want[case].float()
    differ, order_free = set(), {"cuda": {"conv_stats"}, "triton": {"norm_stats channel"}}[name]
    for det in (True, False):
        with deterministic(det):
            for case, n, call in _split_reductions(ops, wide_rows=wide_rows):
                results = []
                for seed in (1, 2, 3):
                    reorder(seed)
                    out = torch.zeros(n)
                    call(out)
                    results.append(out)
                same = all(torch.equal(results[0], r) for r in results[1:])
                assert same or not (det or case in order_free), \
                    f"{case}: program order changed the result"
                torch.testing.assert_close(results[0], want[case], rtol=1e-5, atol=1e-5)
                if not same:
                    differ.add(case)
    cases = {case for case, _, _ in _split_reductions(ops)}
    assert differ == cases - order_free, \
        f"{cases - differ}: program order did not matter without determinism"


@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_deterministic_mode_trains_like_default(name, monkeypatch):
    """A 3-step run of every layer kind under deterministic algorithms equals the default run,
    finite: no op of the hooks or the step refuses the flag, and nothing reads the NaN that torch
    then fills fresh torch.empty memory with."""
    if name != "torch" and name not in kernel_backends():
        pytest.skip(f"backend {name} not available here")
    if name != "torch":
        kernel_module(name, monkeypatch)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")    # else cuBLAS refuses the flag
    from test_cuda_emu import _Net
    g = torch.Generator().manual_seed(1)
    tokens, img = torch.randint(0, 11, (16, 6), generator=g), torch.randn(16, 3, 8, 8, generator=g)
    y = torch.randn(16, 5, generator=g)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = []
    for det in (True, False):
        with deterministic(det):
            torch.manual_seed(0)
            model = _Net().to(dev)
            opt = AdaFisherW(model, lr=1e-3, Lambda=0.1, TCov=1, weight_decay=1e-2, backend=name)
            for _ in range(3):
                opt.zero_grad()
                (model(tokens.to(dev), img.to(dev)) - y.to(dev)).square().mean().backward()
                opt.step()
        runs.append((model, opt))
    for t in list(runs[0][0].parameters()) + list(runs[0][1].fisher.tensors().values()):
        assert torch.isfinite(t.float()).all()
    assert_trajectories_close(*runs)            # NOTE: [trajectory tolerance]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_deterministic_training_repeats(name, preset, monkeypatch):
    """Two 5-step runs of a conv + norm + linear model at a batch size whose reductions split
    give bitwise the same parameters and curvature state under deterministic algorithms."""
    if name != "torch" and name not in kernel_backends():
        pytest.skip(f"backend {name} not available here")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")    # else cuBLAS refuses the flag
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 3, 32, 32, generator=g).cuda()
    y = torch.randn(512, 10, generator=g).cuda()
    runs = []
    with deterministic(True):
        for _ in range(2):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32),
                                  nn.Flatten(), nn.Linear(32 * 16 * 16, 64), nn.LayerNorm(64),
                                  nn.Linear(64, 10)).cuda()
            opt = AdaFisherW(model, TCov=1, preset=preset, backend=name)
            for _ in range(5):
                opt.zero_grad()
                # not cross_entropy: CUDA's nll_loss refuses deterministic mode
                (model(x) - y).square().mean().backward()
                opt.step()
            runs.append([p.detach().clone() for p in model.parameters()]
                        + [t.clone() for t in opt.fisher.tensors().values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
