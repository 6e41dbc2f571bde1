"""The CUDA C++ backend (csrc/, adafisher_fast/cuda_backend.py): build and dispatch checks that run
anywhere, and GPU checks (``@pytest.mark.gpu``, run with ``pytest -m gpu tests/test_cuda_backend.py``)
of every op against the torch reference, a three-backend training run and a torch.compile smoke test.
The generic per-op sweeps live in tests/test_<op>.py (the ``kernel_ops`` fixture includes this
backend once it loads on a GPU)."""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW, backends, reference

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


def test_env_var_forces_cuda_on_cpu_raises(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        AdaFisher(nn.Linear(3, 2))


def test_unbuilt_extension_import_error_is_clear():
    try:
        importlib.import_module("adafisher_fast._C")
    except ImportError:
        with pytest.raises(ImportError, match="not built.*pip install --no-build-isolation"):
            importlib.import_module("adafisher_fast.cuda_backend")
    else:
        pytest.skip("the extension is built here")


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


# NOTE: [emulated extension] Run in a fresh process where the extension is not built: the six
# schemas of csrc/bindings.cpp are defined in Python with CPU impls that call the reference, and a
# stub adafisher_fast._C lets cuda_backend.py load; a 7-step run through cuda_backend's adapters
# (term CSR, padding/mode codes, fused_step's dtype split, hyper lists) must equal the torch backend
# exactly.  Checks the schema strings parse and the Python glue, without a GPU.
_EMULATION = r'''
import os, re, sys, types, torch, math
ROOT = sys.argv[1]
src = open(os.path.join(ROOT, 'csrc', 'bindings.cpp')).read()
body = src[src.index('TORCH_LIBRARY(adafisher'):src.index('TORCH_LIBRARY_IMPL')]
schemas = [''.join(re.findall(r'"([^"]*)"', m)) for m in re.findall(r'm\.def\((.*?)\);', body, re.S)]
lib = torch.library.Library("adafisher", "DEF")
for s in schemas: lib.define(s)
from adafisher_fast import reference as R
modes = ["zeros", "reflect", "replicate", "circular"]
def lin(x, out, dim, square, scale): R.linear_stats(x, out, dim, square, scale)
def conv(x, out, k, s, p, d, g, mode): R.conv_stats(x, out, k, s, [(p[2*i], p[2*i+1]) for i in range(len(k))], d, g, modes[mode])
def norm(x, out, mode, groups, eps, center, mean, var): R.norm_stats(x, out, ["channel","sample"][mode], groups, eps, center, mean, var)
def emb(idx, out): R.embedding_stats(idx, out)
def ema(buf, n_acc, ptr, src, pw, coef, q, fac_, fs, fl, nl, state, fac, init, counters, d, w, d1, w1, nr, ns):
    dst = torch.repeat_interleave(torch.arange(ptr.numel()-1), ptr[1:]-ptr[:-1])
    t = R.LayerTable.build(n_acc, src, dst, pw, coef, q, fac_, fs, fl, nl)
    R.layer_ema(buf, t, state, fac, init, counters, R.EmaRule(d, w, d1, w1, nr, ns))
def step(params, grads, moms, steps, fac, meta, lr, beta, wd, lam, dec):
    R.fused_step(params, grads, moms, steps, fac, meta, list(zip(lr, beta, wd, lam)), dec)
for n, f in [("linear_stats", lin), ("conv_stats", conv), ("norm_stats", norm), ("embedding_stats", emb), ("layer_ema", ema), ("fused_step", step)]:
    lib.impl(n, f, "CPU")
import warnings
warnings.simplefilter("ignore")
import adafisher_fast
sys.modules["adafisher_fast._C"] = types.ModuleType("adafisher_fast._C")
adafisher_fast._C = sys.modules["adafisher_fast._C"]
from adafisher_fast import cuda_backend as cb, backends
backends._MODULES["cuda"] = "adafisher_fast.cuda_backend"
cb._kernel_ok = lambda p, g, m, t: p.dtype == torch.float32
import torch.nn as nn
from adafisher_fast import AdaFisher, AdaFisherW
def run(be, cls, preset):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, stride=2, groups=2, padding_mode="circular", padding=1),
                      nn.GroupNorm(4, 8), nn.Flatten(), nn.Linear(8*16, 7), nn.LayerNorm(7))
    opt = cls(m, lr=1e-2, TCov=2, weight_decay=1e-2, preset=preset, backend="torch")
    if be == "cuda": opt._ops = cb; opt._hooks.ops = cb if hasattr(opt._hooks, "ops") else None
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)); y = torch.arange(16) % 7
    for _ in range(7):
        opt.zero_grad(); nn.functional.cross_entropy(m(x), y).backward(); opt.step()
    return m, opt
for cls in (AdaFisher, AdaFisherW):
    for preset in ("official", "paper"):
        m0, o0 = run("torch", cls, preset); m1, o1 = run("cuda", cls, preset)
        for a, b in zip(m0.parameters(), m1.parameters()): torch.testing.assert_close(a, b)
        for at in ("state", "fac", "initialized", "counters"): torch.testing.assert_close(getattr(o0.fisher, at), getattr(o1.fisher, at))
print("emulated adapters OK", len(schemas))
'''


def test_schemas_and_adapters_with_an_emulated_extension():
    try:
        importlib.import_module("adafisher_fast._C")
        pytest.skip("the real extension is built here (the GPU tests cover it)")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-c", _EMULATION, ROOT], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "emulated adapters OK 6" in r.stdout


# ---------------------------------------------------------------------------------------------
# GPU: ops against the reference
# ---------------------------------------------------------------------------------------------
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-5, 1e-4), (torch.float16, 1e-5, 1e-4)]
# statistics accumulate in float32 from low-precision inputs converted exactly, so the same
# tolerance holds for every input dtype (the input rounding is shared with the reference)


def _check_stat(fn_ref, fn_cuda, n_out, acc=torch.float32, rtol=1e-4, atol=1e-5):
    base = torch.rand(n_out, device="cuda", dtype=acc)
    a, b = base.clone(), base.clone()
    ra = fn_ref(a)
    rb = fn_cuda(b)
    torch.testing.assert_close(b, a, rtol=rtol, atol=atol * max(1.0, a.abs().max().item()))
    return ra, rb


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((7, 13), -1), ((33, 4, 13), -1), ((13, 7, 5, 3), 1),
                                       ((4096, 4096), -1), ((2, 33, 1), 1), ((8, 64, 7, 7), 1)])
@pytest.mark.parametrize("square", [True, False])
def test_linear_stats(shape, dim, square, dtype, atol, rtol):
    ops = _cuda_ops()
    x = torch.randn(shape, device="cuda").to(dtype)
    k = shape[dim]
    _check_stat(lambda o: reference.linear_stats(x, o, dim, square, 0.5),
                lambda o: ops.linear_stats(x, o, dim, square, 0.5), k, rtol=rtol, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_linear_stats_noncontiguous_and_float64_buffer(acc):
    ops = _cuda_ops()
    x = torch.randn(33, 13, device="cuda", dtype=acc).t()        # non-contiguous
    _check_stat(lambda o: reference.linear_stats(x, o), lambda o: ops.linear_stats(x, o), 33, acc=acc)


CONV_CASES = [
    # (B, C, spatial, kernel, stride, padding pairs, dilation, groups, mode)
    (2, 3, (13,), (3,), (1,), ((1, 1),), (1,), 1, "zeros"),
    (3, 4, (33,), (5,), (2,), ((2, 2),), (2,), 2, "circular"),
    (2, 3, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, "reflect"),
    (2, 6, (13, 11), (3, 2), (2, 1), ((1, 1), (0, 1)), (1, 2), 3, "replicate"),
    (1, 1, (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, "zeros"),
    # ResNet-50 shapes (batch 8): stem, 3x3 bottleneck, 1x1 strided projection
    (8, 3, (224, 224), (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 1, "zeros"),
    (8, 64, (56, 56), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, "zeros"),
    (8, 256, (56, 56), (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1), 1, "zeros"),
    (8, 512, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, "zeros"),
    (2, 4, (5, 7, 6), (3, 3, 2), (1, 2, 1), ((1, 1), (1, 1), (0, 1)), (1, 1, 2), 2, "zeros"),
    (2, 2, (6, 5, 5), (2, 3, 3), (1, 1, 1), ((1, 1), (1, 1), (1, 1)), (1, 1, 1), 1, "circular"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[1]}x{'x'.join(map(str, c[2]))}-{c[8]}")
def test_conv_stats(case, dtype, atol, rtol):
    ops = _cuda_ops()
    b, c, sp, k, s, p, d, g, mode = case
    x = torch.randn((b, c) + sp, device="cuda").to(dtype)
    n = c * torch.Size(k).numel()
    la, lb = _check_stat(lambda o: reference.conv_stats(x, o, k, s, p, d, g, mode),
                         lambda o: ops.conv_stats(x, o, k, s, p, d, g, mode), n, rtol=rtol, atol=atol)
    assert la == lb


NORM_CASES = [
    ("channel", 1, True, False, (7, 13, 5)), ("channel", 1, True, True, (8, 64, 49)),
    ("channel", 1, True, False, (1, 1, 1)), ("sample", 1, True, False, (33, 768, 1)),
    ("sample", 4, True, False, (3, 32, 13)), ("sample", 1, False, False, (13, 7, 1)),
    ("sample", 1, True, False, (2, 1, 1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_norm_stats(case, dtype, atol, rtol):
    ops = _cuda_ops()
    mode, groups, center, running, shape = case
    x = (torch.randn(shape, device="cuda") * 3 + 1).to(dtype)
    mean = torch.randn(shape[1], device="cuda") if running else None
    var = torch.rand(shape[1], device="cuda") + 0.5 if running else None
    _check_stat(lambda o: reference.norm_stats(x, o, mode, groups, 1e-5, center, mean, var),
                lambda o: ops.norm_stats(x, o, mode, groups, 1e-5, center, mean, var), shape[1],
                rtol=max(rtol, 1e-4), atol=max(atol, 1e-4))


@pytest.mark.gpu
@pytest.mark.parametrize("n,vocab,itype", [(1, 1, torch.int64), (13, 7, torch.int64), (4096 * 33, 50257, torch.int64),
                                           (33, 13, torch.int32)])
def test_embedding_stats(n, vocab, itype):
    ops = _cuda_ops()
    idx = torch.randint(0, vocab, (n,), device="cuda", dtype=itype)
    _check_stat(lambda o: reference.embedding_stats(idx.long(), o), lambda o: ops.embedding_stats(idx, o), vocab,
                rtol=0, atol=0)


def _models():
    torch.manual_seed(0)
    return {
        "mlp": lambda: nn.Sequential(nn.Linear(13, 33), nn.LayerNorm(33), nn.ReLU(), nn.Linear(33, 7)),
        "cnn": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, stride=2, groups=2, padding_mode="circular", padding=1),
                                     nn.GroupNorm(4, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 7)),
    }


def _data(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 13, generator=g) if name == "mlp" else torch.randn(16, 3, 8, 8, generator=g)
    return x.cuda(), torch.randint(0, 7, (16,), generator=g).cuda()


def _train(name, backend, opt_cls, steps=8, preset="official", dtype=torch.float32):
    torch.manual_seed(0)
    model = _models()[name]().cuda().to(dtype)
    opt = opt_cls(model, lr=1e-2, TCov=2, weight_decay=1e-2, preset=preset, backend=backend)
    assert opt.backend == backend
    x, y = _data(name)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        opt.step()
    return model, opt


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("opt_cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_three_backends_agree_on_a_short_run(name, opt_cls, preset):
    _cuda_ops()
    runs = {}
    for be in ("torch", "triton", "cuda"):
        if be == "triton" and backends._try_load("triton", torch.device("cuda"))[0] is None:
            continue
        runs[be] = _train(name, be, opt_cls, preset=preset)
    m0, o0 = runs["torch"]
    for be, (m, o) in runs.items():
        for (n, a), b in zip(m0.named_parameters(), m.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{be}: {n}")
        for attr in ("state", "fac", "initialized", "counters"):
            torch.testing.assert_close(getattr(o.fisher, attr), getattr(o0.fisher, attr), rtol=1e-4, atol=1e-5,
                                       msg=f"{be}: {attr}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("step_device", ["cpu", "cuda"])
def test_fused_step_one_launch_many_tensors(dtype, decoupled, step_device):
    """Odd sizes, one past a chunk, misaligned views (scalar path), a zero-size tensor last."""
    ops = _cuda_ops()
    torch.manual_seed(0)
    sizes = [(1, 1), (7, 13), (33, 5), (4096, 4096), (1, 65537), (13,), (0, 3)]
    n_fac = 5000
    fac = torch.rand(n_fac + 1, device="cuda") + 0.1
    fac[-1] = 1
    meta = []
    for s in sizes:
        rows, cols = (s[0], s[1]) if len(s) == 2 else (1, s[0])
        meta.append([rows, cols, 0, 1, 0, 100, 0, 1, 1, 0] if rows * cols < 4000 else
                    [rows, cols, n_fac, 0, 0, n_fac, 0, 0, 1, 0])
    meta = torch.tensor(meta, device="cuda", dtype=torch.int64)
    hyper = [(1e-2, 0.9, 1e-2, 1e-3)] * len(sizes)

    def lists(offset):
        """(params, grads, moms, steps); offset 1 puts every tensor 2-4 bytes off 16-byte alignment."""
        g = torch.Generator(device="cuda").manual_seed(1)
        out = []
        for _ in range(3):
            ts = []
            for s in sizes:
                k = torch.Size(s).numel()
                store = torch.empty(k + offset, device="cuda", dtype=dtype)
                store[offset:] = torch.randn(k, device="cuda", generator=g).to(dtype)
                ts.append(store[offset:].view(s))
            out.append(ts)
        return out + [[torch.zeros((), device=step_device) for _ in sizes]]

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


@pytest.mark.gpu
def test_fused_step_float64_falls_back_to_reference():
    ops = _cuda_ops()
    p = torch.randn(7, 13, device="cuda", dtype=torch.float64)
    args = lambda: ([p.clone()], [p.clone()], [torch.zeros_like(p)], [torch.zeros((), device="cuda")])  # noqa: E731
    fac = torch.ones(2, device="cuda", dtype=torch.float64)
    meta = torch.tensor([[7, 13, 1, 0, 0, 1, 0, 0, 1, 0]], device="cuda")
    a, b = args(), args()
    reference.fused_step(*a, fac, meta, [(1e-2, 0.9, 0.0, 0.0)], False)
    ops.fused_step(*b, fac, meta, [(1e-2, 0.9, 0.0, 0.0)], False)
    torch.testing.assert_close(b[0][0], a[0][0], rtol=0, atol=0)


@pytest.mark.gpu
def test_bad_inputs_raise_clear_errors():
    _cuda_ops()
    out = torch.zeros(5, device="cuda")
    with pytest.raises(RuntimeError, match="out has 5 entries, expected 3"):
        torch.ops.adafisher.linear_stats(torch.randn(2, 3, device="cuda"), out, -1, True, 1.0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        torch.ops.adafisher.linear_stats(torch.randn(2, 5), out, -1, True, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.adafisher.linear_stats(torch.randn(2, 5, device="cuda"), out.half(), -1, True, 1.0)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        torch.ops.adafisher.embedding_stats(torch.zeros(3, device="cuda"), out)


@pytest.mark.gpu
def test_torch_compile_traces_the_custom_ops():
    ops = _cuda_ops()

    @torch.compile(fullgraph=True)
    def stats(x, out, idx, emb):
        torch.ops.adafisher.linear_stats(x, out, -1, True, 1.0)
        torch.ops.adafisher.embedding_stats(idx, emb)
        return out.sum()

    x = torch.randn(33, 13, device="cuda")
    out, emb = torch.zeros(13, device="cuda"), torch.zeros(7, device="cuda")
    idx = torch.randint(0, 7, (13,), device="cuda")
    stats(x, out, idx, emb)
    ref, ref_emb = torch.zeros(13, device="cuda"), torch.zeros(7, device="cuda")
    reference.linear_stats(x, ref)
    reference.embedding_stats(idx, ref_emb)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(emb, ref_emb)
    del ops


@pytest.mark.gpu
def test_ops_pass_opcheck():
    _cuda_ops()
    x = torch.randn(7, 13, device="cuda")
    torch.library.opcheck(torch.ops.adafisher.linear_stats.default, (x, torch.zeros(13, device="cuda"), -1, True, 1.0))
    torch.library.opcheck(torch.ops.adafisher.conv_stats.default,
                          (torch.randn(2, 3, 7, 7, device="cuda"), torch.zeros(27, device="cuda"), [3, 3], [1, 1],
                           [1, 1, 1, 1], [1, 1], 1, 0))
