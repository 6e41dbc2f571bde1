"""The CUDA C++ backend (csrc/, adafisher_fast/cuda_backend.py): build and dispatch checks, then
every op against the torch reference, a three-backend training run, torch.compile and opcheck.

The op tests run the real extension on a GPU and, on a CPU-only machine, the same csrc/ sources
compiled for the CPU under the CUDA emulator (NOTE: [CUDA emulator], tests/cuda_emu.py); shapes too
large to emulate are ``gpu``-marked params (``pytest -m "gpu or not gpu"`` on a GPU runs all).
The generic per-op sweeps live in tests/test_<op>.py (the ``kernel_ops`` fixture includes this
backend, emulated or real)."""
import importlib.util
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW, backends, reference
from conftest import assert_trajectories_close, kernel_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()


def _cuda_ops():
    mod, why = backends._try_load("cuda", torch.device("cuda"))
    if mod is None:
        pytest.skip(f"CUDA backend unavailable: {why}")
    return mod


# ---------------------------------------------------------------------------------------------
# dispatch (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_forcing_cuda_on_cpu_raises_clearly(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run.*CUDA tensors"):
        AdaFisher(nn.Linear(3, 2), backend="cuda")


def test_auto_on_cpu_picks_torch(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    opt = AdaFisher(nn.Linear(3, 2), backend="auto")
    assert opt.backend == "torch"
    assert "backend='torch'" in repr(opt)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_env_var_forces_cuda_on_cpu_raises(monkeypatch):
    """ADAFISHER_BACKEND overrides backend=, and its errors say so; empty, it is unset."""
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=r"ADAFISHER_BACKEND='cuda' \(which overrides "
                                           r"backend='torch'\): backend='cuda' cannot run"):
        AdaFisher(nn.Linear(3, 2), backend="torch")
    monkeypatch.setenv(backends.ENV_VAR, "Torch")
    with pytest.raises(ValueError, match=r"ADAFISHER_BACKEND='Torch' .*got 'Torch'"):
        AdaFisher(nn.Linear(3, 2))
    monkeypatch.setenv(backends.ENV_VAR, "")
    assert AdaFisher(nn.Linear(3, 2), backend="torch").backend == "torch"


def test_unbuilt_extension_import_error_is_clear():
    # found, not imported: on a CPU machine the emulated backend has registered the same op
    # namespace already, and a second TORCH_LIBRARY(adafisher) aborts the process
    if importlib.util.find_spec("adafisher_fast._C") is not None:
        pytest.skip("the extension is built here")
    with pytest.raises(ImportError, match="not built.*pip install --no-build-isolation"):
        importlib.import_module("adafisher_fast.cuda_backend")


def test_setup_skips_cuda_extension_without_nvcc_or_when_asked():
    """setup.py's cuda_extensions() skips with a message (CPU installs keep working)."""
    def run(env):
        r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout
    assert "ADAFISHER_NO_CUDA=1, skipping the CUDA extension" in run(dict(os.environ, ADAFISHER_NO_CUDA="1"))
    if torch.version.cuda is None:
        env = {k: v for k, v in os.environ.items() if k != "ADAFISHER_NO_CUDA"}
        assert "CPU-only build; skipping the CUDA extension" in run(env)


def test_setup_installs_the_package_and_its_kernels_but_not_the_benchmarks(monkeypatch):
    """setup.py's packages: every package under adafisher_fast/ and fisher_kernels/, and not the
    benchmark suite, whose top-level name ``bench`` would sit beside the user's own packages."""
    import runpy
    import setuptools
    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.setenv("ADAFISHER_NO_CUDA", "1")
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    want = {os.path.relpath(d, ROOT).replace(os.sep, ".")
            for top in ("adafisher_fast", "fisher_kernels")
            for d, _, files in os.walk(os.path.join(ROOT, top)) if "__init__.py" in files}
    assert sorted(got["packages"]) == sorted(want) and "adafisher_fast" in want


# ---------------------------------------------------------------------------------------------
# ops against the reference: on a GPU the built extension, elsewhere csrc/ under the CUDA emulator
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda():
    """The CUDA backend's ops module, the device its tensors live on, and whether it is emulated:
    with a GPU the built extension, else csrc/ compiled for the CPU (NOTE: [CUDA emulator], built by
    tests/cuda_emu.py).  Shapes too large to emulate quickly are params marked ``gpu``."""
    if HAS_CUDA:
        return SimpleNamespace(ops=_cuda_ops(), dev=torch.device("cuda"), emulated=False)
    return SimpleNamespace(ops=kernel_module("cuda"), dev=torch.device("cpu"), emulated=True)


def gpu_only(*values):
    return pytest.param(*values, marks=pytest.mark.gpu)


DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-5, 1e-4), (torch.float16, 1e-5, 1e-4)]
# statistics accumulate in float32 from low-precision inputs converted exactly, so the same
# tolerance holds for every input dtype (the input rounding is shared with the reference)


def _check_stat(dev, fn_ref, fn_cuda, n_out, acc=torch.float32, rtol=1e-4, atol=1e-5):
    base = torch.rand(n_out, device=dev, dtype=acc)
    a, b = base.clone(), base.clone()
    ra = fn_ref(a)
    rb = fn_cuda(b)
    torch.testing.assert_close(b, a, rtol=rtol, atol=atol * max(1.0, a.abs().max().item()))
    return ra, rb


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((7, 13), -1), ((33, 4, 13), -1), ((13, 7, 5, 3), 1),
                                       gpu_only((4096, 4096), -1), ((2, 33, 1), 1), ((8, 64, 7, 7), 1)])
@pytest.mark.parametrize("square", [True, False])
def test_linear_stats(cuda, shape, dim, square, dtype, atol, rtol):
    ops = cuda.ops
    x = torch.randn(shape, device=cuda.dev).to(dtype)
    k = shape[dim]
    _check_stat(cuda.dev, lambda o: reference.linear_stats(x, o, dim, square, 0.5),
                lambda o: ops.linear_stats(x, o, dim, square, 0.5), k, rtol=rtol, atol=atol)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_linear_stats_noncontiguous_and_float64_buffer(cuda, acc):
    ops = cuda.ops
    x = torch.randn(33, 13, device=cuda.dev, dtype=acc).t()        # non-contiguous
    _check_stat(cuda.dev, lambda o: reference.linear_stats(x, o), lambda o: ops.linear_stats(x, o), 33,
                acc=acc)


CONV_CASES = [
    # (B, C, spatial, kernel, stride, padding pairs, dilation, groups, mode)
    (2, 3, (13,), (3,), (1,), ((1, 1),), (1,), 1, "zeros"),
    (3, 4, (33,), (5,), (2,), ((2, 2),), (2,), 2, "circular"),
    (2, 3, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, "reflect"),
    (2, 6, (13, 11), (3, 2), (2, 1), ((1, 1), (0, 1)), (1, 2), 3, "replicate"),
    (1, 1, (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, "zeros"),
    # ResNet-50 shapes (batch 8): stem, 3x3 bottleneck, 1x1 strided projection
    gpu_only((8, 3, (224, 224), (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 1, "zeros")),
    gpu_only((8, 64, (56, 56), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, "zeros")),
    gpu_only((8, 256, (56, 56), (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1), 1, "zeros")),
    gpu_only((8, 512, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, "zeros")),
    (2, 4, (5, 7, 6), (3, 3, 2), (1, 2, 1), ((1, 1), (1, 1), (0, 1)), (1, 1, 2), 2, "zeros"),
    (2, 2, (6, 5, 5), (2, 3, 3), (1, 1, 1), ((1, 1), (1, 1), (1, 1)), (1, 1, 1), 1, "circular"),
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[1]}x{'x'.join(map(str, c[2]))}-{c[8]}")
def test_conv_stats(cuda, case, dtype, atol, rtol):
    ops = cuda.ops
    b, c, sp, k, s, p, d, g, mode = case
    x = torch.randn((b, c) + sp, device=cuda.dev).to(dtype)
    n = c * torch.Size(k).numel()
    la, lb = _check_stat(cuda.dev, lambda o: reference.conv_stats(x, o, k, s, p, d, g, mode),
                         lambda o: ops.conv_stats(x, o, k, s, p, d, g, mode), n, rtol=rtol, atol=atol)
    assert la == lb


NORM_CASES = [
    ("channel", 1, True, False, (7, 13, 5)), ("channel", 1, True, True, (8, 64, 49)),
    ("channel", 1, True, False, (1, 1, 1)), ("sample", 1, True, False, (33, 768, 1)),
    ("sample", 4, True, False, (3, 32, 13)), ("sample", 1, False, False, (13, 7, 1)),
    ("sample", 1, True, False, (2, 1, 1)),
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_norm_stats(cuda, case, dtype, atol, rtol):
    ops = cuda.ops
    mode, groups, center, running, shape = case
    x = (torch.randn(shape, device=cuda.dev) * 3 + 1).to(dtype)
    mean = torch.randn(shape[1], device=cuda.dev) if running else None
    var = torch.rand(shape[1], device=cuda.dev) + 0.5 if running else None
    _check_stat(cuda.dev, lambda o: reference.norm_stats(x, o, mode, groups, 1e-5, center, mean, var),
                lambda o: ops.norm_stats(x, o, mode, groups, 1e-5, center, mean, var), shape[1],
                rtol=max(rtol, 1e-4), atol=max(atol, 1e-4))


@pytest.mark.parametrize("n,vocab,itype", [(1, 1, torch.int64), (13, 7, torch.int64),
                                           gpu_only(4096 * 33, 50257, torch.int64), (33, 13, torch.int32)])
def test_embedding_stats(cuda, n, vocab, itype):
    ops = cuda.ops
    idx = torch.randint(0, vocab, (n,), device=cuda.dev, dtype=itype)
    _check_stat(cuda.dev, lambda o: reference.embedding_stats(idx.long(), o),
                lambda o: ops.embedding_stats(idx, o), vocab, rtol=0, atol=0)


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, groups=2, padding_mode="circular", padding=1),
                         nn.GroupNorm(4, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 7))


def _models():
    torch.manual_seed(0)
    return {
        "mlp": lambda: nn.Sequential(nn.Linear(13, 33), nn.LayerNorm(33), nn.ReLU(), nn.Linear(33, 7)),
        "cnn": _cnn,
        # weights, activations and gradients in channels_last (NOTE: [row transpose], [memory order])
        "cnn_channels_last": lambda: _cnn().to(memory_format=torch.channels_last),
    }


def _data(name, dev):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 13, generator=g) if name == "mlp" else torch.randn(16, 3, 8, 8, generator=g)
    if name == "cnn_channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.to(dev), torch.randint(0, 7, (16,), generator=g).to(dev)


def _train(name, dev, backend, opt_cls, steps=8, preset="official", dtype=torch.float32):
    """lr and Lambda of NOTE: [trajectory tolerance]; every op of a kernel run checked (check=True)."""
    torch.manual_seed(0)
    model = _models()[name]().to(dev, dtype)
    opt = opt_cls(model, lr=1e-3, Lambda=0.1, TCov=2, weight_decay=1e-2, preset=preset, backend=backend,
                  check=backend != "torch")
    assert opt.backend == backend
    x, y = _data(name, dev)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_channels_last"])
@pytest.mark.parametrize("opt_cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_three_backends_agree_on_a_short_run(cuda, name, opt_cls, preset, monkeypatch):
    """On a GPU torch, Triton and CUDA; emulated, torch and CUDA (test_triton_backend.py compares
    interpreted Triton with torch)."""
    if cuda.emulated:
        kernel_module("cuda", monkeypatch)         # backend="cuda" resolves to the emulated ops
    runs = {}
    for be in ("torch", "triton", "cuda"):
        if be == "triton" and (cuda.emulated or backends._try_load("triton", cuda.dev)[0] is None):
            continue
        runs[be] = _train(name, cuda.dev, be, opt_cls, preset=preset)
    assert "cuda" in runs
    for be in runs:
        assert_trajectories_close(runs[be], runs["torch"])


def _one_param_step(dev, n, seed):
    """(params, grads, moms, steps) of one factor-free parameter of n elements, steps on dev, and
    its meta rows (on the host, as step() passes them): both indices at fac[0] = 1, so
    F = 1 + Lambda (NOTE: [param map])."""
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, generator=g).to(dev)], [torch.randn(n, generator=g).to(dev)],
            [torch.zeros(n, device=dev)], [torch.zeros((), device=dev)]), \
        torch.tensor([[n, 1, 0, 0, 0, 0, 0, 0, n, 0, 0]])


def test_fused_step_table_used_while_capturing_is_kept(cuda, monkeypatch):
    """NOTE: [captured tables] A CUDA graph replays the address of the table its fused_step
    launch was captured with, and the binding's table cache keeps 8: eight steps of another
    optimizer under an LR schedule (a table each) freed a captured step's table, which its
    replays then read.  A table used while capturing is kept for good, and one the capture would
    have to upload is refused.  Emulated: ADAFISHER_EMU_CAPTURING stands for a capturing stream
    (a real capture: test_fused_step_graph_replays_after_table_churn)."""
    if not cuda.emulated:
        pytest.skip("the emulator's stand-in for capture; on a GPU the test below captures")
    monkeypatch.setenv("ADAFISHER_EMU_DEVICE_STEPS", "1")
    fac, hyper = torch.ones(1), [(1e-3, 0.9, 0.0, 1e-3)]
    (captured, meta), (other, other_meta) = (_one_param_step(cuda.dev, 3000, 0),
                                             _one_param_step(cuda.dev, 500, 1))
    cuda.ops.fused_step(*captured, fac, meta, hyper, True)                        # warm-up
    monkeypatch.setenv("ADAFISHER_EMU_CAPTURING", "1")
    cuda.ops.fused_step(*captured, fac, meta, hyper, True)                        # the capture
    before = [t.clone() for t in other[0] + other[2]]
    with pytest.raises(RuntimeError, match="would be uploaded inside this CUDA-graph capture"):
        cuda.ops.fused_step(*other, fac, other_meta, hyper, True)
    assert all(torch.equal(a, b) for a, b in zip(before, other[0] + other[2]))   # nothing ran
    monkeypatch.delenv("ADAFISHER_EMU_CAPTURING")
    for k in range(9):                                      # an LR schedule: 9 new tables
        cuda.ops.fused_step(*other, fac, other_meta, [(1e-3 * (k + 1), 0.9, 0.0, 1e-3)], True)
    monkeypatch.setenv("ADAFISHER_EMU_CAPTURING", "1")
    cuda.ops.fused_step(*captured, fac, meta, hyper, True)                        # still there


@pytest.mark.gpu
def test_fused_step_graph_replays_after_table_churn(cuda):
    """NOTE: [captured tables] on a GPU: a graph captured around one fused_step launch, replayed
    after nine eager steps of another parameter set under an LR schedule (nine new tables, one
    more than the cache keeps), updates as the reference does."""
    if cuda.emulated:
        pytest.skip("needs a GPU")
    fac, hyper = torch.ones(1, device=cuda.dev), [(1e-3, 0.9, 0.0, 1e-3)]
    (captured, meta), (other, other_meta) = (_one_param_step(cuda.dev, 3000, 0),
                                             _one_param_step(cuda.dev, 500, 1))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda.ops.fused_step(*captured, fac, meta, hyper, True)          # warm-up: the table
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda.ops.fused_step(*captured, fac, meta, hyper, True)
    for k in range(9):
        cuda.ops.fused_step(*other, fac, other_meta, [(1e-3 * (k + 1), 0.9, 0.0, 1e-3)], True)
    torch.cuda.synchronize()
    want = [[t.clone() for t in lst] for lst in captured]
    reference.fused_step(*want, fac, meta, hyper, True)
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip(captured, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("step_on", ["host", "device"])
def test_fused_step_one_launch_many_tensors(cuda, dtype, decoupled, step_on, monkeypatch):
    """Odd sizes, several chunks, one past a chunk, misaligned views (scalar path), a zero-size
    tensor last; steps on the host (the binding counts) or on the device (the last block counts)."""
    ops = cuda.ops
    torch.manual_seed(0)
    big = (129, 1031) if cuda.emulated else (4096, 4096)   # chunks of several blocks (NOTE: [step chunks])
    sizes = [(1, 1), (7, 13), (33, 5), big, (1, 65537), (13,), (0, 3)]
    step_dev = cuda.dev if step_on == "device" else torch.device("cpu")
    if cuda.emulated and step_on == "device":                     # CPU tensors either way
        monkeypatch.setenv("ADAFISHER_EMU_DEVICE_STEPS", "1")
    n_fac = 5000
    fac = torch.rand(n_fac + 1, device=cuda.dev) + 0.1
    fac[-1] = 1
    meta = []
    for s in sizes:
        rows, cols = (s[0], s[1]) if len(s) == 2 else (1, s[0])
        meta.append([rows, cols, 0, 1, 0, 100, 0, 1, 1, 0, 0] if rows * cols < 4000 else
                    [rows, cols, n_fac, 0, 0, n_fac, 0, 0, 1, 0, 0])
    meta = torch.tensor(meta, device=cuda.dev, dtype=torch.int64)
    hyper = [(1e-2, 0.9, 1e-2, 1e-3)] * len(sizes)

    def lists(offset):
        """(params, grads, moms, steps); offset 1 puts every tensor 2-4 bytes off 16-byte alignment."""
        g = torch.Generator(device=cuda.dev).manual_seed(1)
        out = []
        for _ in range(3):
            ts = []
            for s in sizes:
                k = torch.Size(s).numel()
                store = torch.empty(k + offset, device=cuda.dev, dtype=dtype)
                store[offset:] = torch.randn(k, device=cuda.dev, generator=g).to(dtype)
                ts.append(store[offset:].view(s))
            out.append(ts)
        return out + [[torch.zeros((), device=step_dev) for _ in sizes]]

    for offset in (0, 1):
        a, b = lists(offset), lists(offset)
        for _ in range(3):
            reference.fused_step(*a, fac, meta, hyper, decoupled)
            ops.fused_step(*b, fac, meta, hyper, decoupled)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        for la, lb in zip(a, b):
            for x, y in zip(la, lb):
                torch.testing.assert_close(y, x, **tol)
        assert all(float(t) == 3 for t in b[3])


def test_fused_step_float64_falls_back_to_reference(cuda):
    ops = cuda.ops
    p = torch.randn(7, 13, device=cuda.dev, dtype=torch.float64)
    def args():
        return [p.clone()], [p.clone()], [torch.zeros_like(p)], [torch.zeros((), device=cuda.dev)]
    fac = torch.ones(2, device=cuda.dev, dtype=torch.float64)
    meta = torch.tensor([[7, 13, 1, 0, 0, 1, 0, 0, 1, 0, 0]], device=cuda.dev)
    a, b = args(), args()
    reference.fused_step(*a, fac, meta, [(1e-2, 0.9, 0.0, 0.0)], False)
    ops.fused_step(*b, fac, meta, [(1e-2, 0.9, 0.0, 0.0)], False)
    torch.testing.assert_close(b[0][0], a[0][0], rtol=0, atol=0)


def test_fused_step_all_kernel_ok_never_admits_what_one_parameter_check_refuses(cuda):
    """``_all_kernel_ok``, the C-level check of a whole model (NOTE: [step host path]), says yes
    for a model in one kernel dtype pair (a bfloat16 model with float32 gradients too) and no
    whenever ``_kernel_ok`` refuses any one parameter (a float64 param or grad, another momentum
    dtype, a float64 or 2-element step count)."""
    mod, dev = cuda.ops, cuda.dev
    def lists(n=3, dtype=torch.float32):
        ps = [torch.zeros(4, dtype=dtype, device=dev) for _ in range(n)]
        return ps, [p.clone() for p in ps], [p.clone() for p in ps], \
            [torch.zeros((), device=dev) for _ in range(n)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert mod._all_kernel_ok(*lists(dtype=dtype))
        l = lists(dtype=dtype)
        l[1][:] = [g.float() for g in l[1]]
        assert mod._all_kernel_ok(*l)
    bad = {"float64 param": lambda l: l[0].__setitem__(1, l[0][1].double()),
           "float64 grad": lambda l: l[1].__setitem__(2, l[1][2].double()),
           "fp16 momentum": lambda l: l[2].__setitem__(0, l[2][0].half()),
           "float64 step": lambda l: l[3].__setitem__(1, l[3][1].double()),
           "2-element step": lambda l: l[3].__setitem__(2, torch.zeros(2, device=dev))}
    for what, spoil in bad.items():
        l = lists()
        spoil(l)
        assert not all(map(mod._kernel_ok, *l)), what
        assert not mod._all_kernel_ok(*l), what


def test_bad_inputs_raise_clear_errors(cuda):
    out = torch.zeros(5, device=cuda.dev)
    with pytest.raises(RuntimeError, match="out has 5 entries, expected 3"):
        torch.ops.adafisher.linear_stats(torch.randn(2, 3, device=cuda.dev), out, -1, True, 1.0)
    if not cuda.emulated:       # emulated, every tensor is a CPU tensor
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            torch.ops.adafisher.linear_stats(torch.randn(2, 5), out, -1, True, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.adafisher.linear_stats(torch.randn(2, 5, device=cuda.dev), out.half(), -1, True, 1.0)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        torch.ops.adafisher.embedding_stats(torch.zeros(3, device=cuda.dev), out)


def test_torch_compile_traces_the_custom_ops(cuda):
    """fullgraph=True: the ops trace through their fake implementations (inductor on a GPU;
    emulated, aot_eager, which needs no C++ compile of the graph)."""
    @torch.compile(fullgraph=True, backend="aot_eager" if cuda.emulated else "inductor")
    def stats(x, out, idx, emb):
        torch.ops.adafisher.linear_stats(x, out, -1, True, 1.0)
        torch.ops.adafisher.embedding_stats(idx, emb)
        return out.sum()

    x = torch.randn(33, 13, device=cuda.dev)
    out, emb = torch.zeros(13, device=cuda.dev), torch.zeros(7, device=cuda.dev)
    idx = torch.randint(0, 7, (13,), device=cuda.dev)
    stats(x, out, idx, emb)
    ref, ref_emb = torch.zeros(13, device=cuda.dev), torch.zeros(7, device=cuda.dev)
    reference.linear_stats(x, ref)
    reference.embedding_stats(idx, ref_emb)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(emb, ref_emb)


def test_ops_pass_opcheck(cuda):
    x = torch.randn(7, 13, device=cuda.dev)
    torch.library.opcheck(torch.ops.adafisher.linear_stats.default,
                          (x, torch.zeros(13, device=cuda.dev), -1, True, 1.0))
    torch.library.opcheck(torch.ops.adafisher.conv_stats.default,
                          (torch.randn(2, 3, 7, 7, device=cuda.dev), torch.zeros(27, device=cuda.dev), [3, 3],
                           [1, 1], [1, 1, 1, 1], [1, 1], 1, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((5, 96, 1), 2), ((3, 18000, 1), 1), ((4, 21, 1), 1),
                                          ((2, 16, 5, 5), 2), ((2, 12, 3, 3), 2)])
def test_cuda_row_words_do_not_change_the_bits(cuda, shape, groups, dtype):
    """NOTE: [row words] in csrc/norm_stats.cu: a sample row read 16 bytes at a time (it starts
    16-byte aligned) and the same row one element at a time (shifted by one element) sum the
    same entries per thread in the same order: equal bits, on warp rows, chunked block rows and
    rows of odd length, and the reference's sums.  (I = 1, LayerNorm's layout: the xhat pass
    then sums rows, in an order that does not depend on the alignment either, NOTE: [row tiles];
    its planes for I > 1 do.)  4-D shapes: a channels_last GroupNorm input, whose xhat pass
    also sums rows; its words stay in a run of C/groups channels where C/groups and C are
    multiples of the word (16 channels, 2 groups), element by element where not (12)."""
    torch.manual_seed(8)
    n = math.prod(shape)
    values = torch.randn(n, device=cuda.dev).to(dtype) * 3 + 2
    outs = []
    for at in (0, 1):                                           # aligned, shifted by one entry
        mem = torch.zeros(n + 8, dtype=dtype, device=cuda.dev)[at:at + n]
        if len(shape) == 4:                                     # channels_last (B, C, H, W)
            b, c, hh, ww = shape
            mem.copy_(values.view(shape).permute(0, 2, 3, 1).reshape(-1))
            x = mem.view(b, hh, ww, c).permute(0, 3, 1, 2).reshape(b, c, hh * ww)
            assert x.stride() == (c * hh * ww, 1, c)
        else:
            mem.copy_(values)
            x = mem.view(shape)
        out = torch.zeros(shape[1], device=cuda.dev)
        cuda.ops.norm_stats(x, out, "sample", groups, 1e-5)
        want = torch.zeros(shape[1], device=cuda.dev)
        reference.norm_stats(values.view(shape).reshape(x.shape), want, "sample", groups, 1e-5)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
