"""Whole-optimizer trajectories: backend="triton" against backend="torch" over 10 steps (TCov=1,
every step gathers statistics), both presets, AdaFisher and AdaFisherW; parameters and every state
tensor (opt.state, opt.fisher's EMA state / fac / initialized / counters) compared within NOTE:
[trajectory tolerance] (conftest.py), with every op of the Triton run held to the reference at
float32 rounding by check=True (CheckedOps).
"""
import copy

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW
from conftest import assert_trajectories_close, device

pytestmark = pytest.mark.filterwarnings("ignore:.*released code does not hook")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Flatten(),
                                  nn.Linear(16, 6), nn.LayerNorm(6), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 4, 3, dilation=2, padding=2, padding_mode="reflect"),
                                  nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(28, 3))

    def forward(self, x):
        return self.body(x)


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 6)
        self.norm = nn.RMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.lin(self.emb(x)))).mean(1)


MODELS = {
    "conv2d_bn_linear_ln": (ConvNet, lambda: torch.randn(4, 3, 5, 5)),
    # weights, activations and gradients in channels_last (NOTE: [row transpose], [memory order])
    "conv2d_channels_last": (lambda: ConvNet().to(memory_format=torch.channels_last),
                             lambda: torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)),
    "conv1d_gn": (Conv1dNet, lambda: torch.randn(4, 3, 7)),
    "embedding_rmsnorm": (EmbedNet, lambda: torch.randint(0, 11, (4, 5))),
}


def _run(model, opt, x, y, steps=10):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_triton_matches_torch(model_name, preset, cls):
    if preset == "official" and not model_name.startswith("conv2d") and cls is AdaFisherW:
        pytest.skip("the released code hooks none of these layers: one optimizer covers F = 1")
    make, data = MODELS[model_name]
    torch.manual_seed(0)
    m0 = make().to(device())
    x, y = data().to(device()), torch.randint(0, 3, (4,), device=device())
    runs = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(m0)
        # check=True: every op of the triton run is also held to the reference at every step
        opt = cls(model, lr=1e-3, Lambda=0.1, weight_decay=1e-2, preset=preset, backend=backend,
                  TCov=1, check=backend == "triton")
        assert opt.backend == backend
        _run(model, opt, x, y)
        runs[backend] = (model, opt)
    assert_trajectories_close(runs["triton"], runs["torch"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_triton_matches_torch_gpu(preset, dtype):
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                       nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.Flatten(),
                       nn.Linear(64 * 16 * 16, 512), nn.LayerNorm(512), nn.Linear(512, 10)).cuda().to(dtype)
    x, y = torch.randn(32, 3, 32, 32, device="cuda", dtype=dtype), torch.randint(0, 10, (32,), device="cuda")
    runs = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(m0)
        opt = AdaFisherW(model, lr=1e-3, Lambda=0.1, preset=preset, backend=backend, TCov=1)
        _run(model, opt, x, y)
        runs[backend] = model
    tol = 1e-4 if dtype == torch.float32 else 4 * 2.0 ** -7
    for a, b in zip(runs["torch"].parameters(), runs["triton"].parameters()):
        scale = a.abs().max().item()
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * scale)


def test_host_arithmetic_matches_triton():
    """fisher_kernels.host's cdiv / next_pow2 (NOTE: [host arithmetic]) agree with triton's own
    helpers, which the launchers no longer call for their cost."""
    triton = pytest.importorskip("triton")
    from fisher_kernels.host import cdiv, next_pow2
    for n in list(range(0, 70)) + [1023, 1024, 1025, 2 ** 31 - 1, 2 ** 31, 2 ** 40 + 3]:
        assert next_pow2(max(n, 1)) == triton.next_power_of_2(max(n, 1)), n
        for d in (1, 2, 7, 16, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d) == (n + d - 1) // d, (n, d)


def _recorded_launches(monkeypatch) -> list:
    """(kernel, grid, args, consts) of every launch that a TCov=1 training run of the test
    model (both presets, every layer kind) and direct calls of every op make (interpreted)."""
    import importlib

    from fisher_kernels import host
    seen = []
    for name in ("linear_stats", "conv_stats", "norm_stats", "embedding_stats", "layer_ema",
                 "fused_step"):
        mod = importlib.import_module(f"fisher_kernels.{name}")

        def record(kernel, grid, *args, **consts):
            seen.append((kernel, grid, args, consts))
            host.launch(kernel, grid, *args, **consts)
        monkeypatch.setattr(mod, "launch", record)
    from test_compile import AllKinds, _batches
    for preset in ("official", "paper"):
        torch.manual_seed(0)
        model = AllKinds()
        opt = AdaFisherW(model, TCov=1, preset=preset, backend="triton")
        for x, y in _batches(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    import fisher_kernels
    x = torch.randn(5, 7, 9)
    fisher_kernels.norm_stats(x, torch.zeros(7), "channel", 1, 1e-5)         # channel moments
    fisher_kernels.norm_stats(x, torch.zeros(7), "sample", 7, 1e-5)
    fisher_kernels.norm_stats(torch.randn(1, 2, 20000), torch.zeros(2), "sample", 1, 1e-5)
    return seen


def test_direct_launch_keys_at_least_what_the_jit_specialises_on(monkeypatch):
    """NOTE: [direct launch]: for the launches a training run makes, and for each of them with an
    argument changed where Triton's JIT specialises (a tensor 4 bytes off its 16-byte alignment,
    an int 1 or a multiple of 16 or past int32, a bool flipped, another dtype), two launches
    with the same ``arg_key`` and constexprs have the same JIT specialisation (so a cached
    compiled kernel is the one the JIT would pick), and the parameter values ``launch`` passes
    the compiled kernel (positional arguments, then the constexprs and defaults in signature
    order) are the JIT binder's, in order.  The JIT's own binder and specialiser run here for
    an sm_90 target (no GPU needed)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fisher_kernels import host
    backend = make_backend(GPUTarget("cuda", 90, 32))
    launches = _recorded_launches(monkeypatch)
    assert {k.fn.__name__ for k, *_ in launches} >= {
        "_column_reduce_kernel", "_lattice_sum_kernel", "_channel_rows_kernel",
        "_row_moments_kernel", "_combine_moments_kernel", "_embedding_stats_kernel",
        "_layer_ema_kernel", "_fused_step_kernel"}
    jit, binders = {}, {}

    def variants(args):
        yield args
        for i, a in enumerate(args):
            swap = []
            if isinstance(a, torch.Tensor) and a.numel() > 1:
                swap = [a.reshape(-1)[1:], a.to(torch.float16 if a.dtype != torch.float16
                                              else torch.float32)]
            elif type(a) is bool:
                swap = [not a]
            elif type(a) is int:
                swap = [1, 16, 17, 2 ** 31, 0]
            for b in swap:
                yield args[:i] + (b,) + args[i + 1:]
    specs: dict = {}
    for kernel, grid, args, consts in launches:
        fn = kernel.fn
        if fn not in jit:
            jit[fn] = JITFunction(fn)
            binders[fn] = create_function_from_signature(jit[fn].signature, jit[fn].params,
                                                         backend)
        options = {k: v for k, v in consts.items() if k not in jit[fn].arg_names}
        for v in variants(args):
            bound, spec, _ = binders[fn](*v, **consts)
            got = v + host.param_tail(jit[fn], len(v), consts)
            assert len(bound) == len(got) and all(
                x is y or (not isinstance(x, torch.Tensor) and x == y)
                for x, y in zip(bound.values(), got)), fn.__name__
            key = (fn, host.arg_key(v), tuple(consts.items()))
            assert specs.setdefault(key, (str(spec), str(options))) == (str(spec), str(options)), (
                fn.__name__, key)


def test_direct_launch_reuses_the_compiled_kernel(monkeypatch):
    """NOTE: [direct launch] with the JIT and its CompiledKernel stood in for: the first launch
    of an argument key goes through the JIT, the next through the compiled kernel it returned
    (grid padded to 3 dims, every parameter positionally); another alignment, int, dtype,
    constexpr or device goes through the JIT again, another float value does not."""
    pytest.importorskip("triton")
    from fisher_kernels import host
    calls = []

    class Param:
        def __init__(self, name, default=None):
            self.name, self.default = name, default

    class Compiled:
        def __getitem__(self, grid):
            return lambda *vals: calls.append(("compiled", grid, vals))

    class FakeJIT:
        params = [Param("x"), Param("n"), Param("s"), Param("BLOCK"), Param("FLAG", False)]

        def __getitem__(self, grid):
            def run(*args, **consts):
                calls.append(("jit", grid, args, consts))
                return Compiled()
            return run
    kernel, device = FakeJIT(), [0]

    class OnGPU(torch.Tensor):          # a CPU tensor that says it is on device[0]
        is_cuda = property(lambda self: True)

        def get_device(self):
            return device[0]
    monkeypatch.setattr(host, "JITFunction", FakeJIT)
    monkeypatch.setattr(host, "DIRECT", True)
    monkeypatch.setattr(host, "_COMPILED", {})
    x = torch.zeros(64).as_subclass(OnGPU)

    def go(*args, **consts):
        host.launch(kernel, (5,), *args, **{"BLOCK": 32, **consts})
        return calls[-1][0]
    assert go(x, 7, 0.5) == "jit"
    assert go(x, 7, 0.25) == "compiled"
    assert calls[-1] == ("compiled", (5, 1, 1), (x, 7, 0.25, 32, False))
    assert go(x[1:], 7, 0.5) == "jit"                   # 4 bytes off alignment
    assert go(x[4:], 7, 0.5) == "compiled"              # 16 bytes off: aligned
    assert go(x, 8, 0.5) == "jit" and go(x, 8, 0.5) == "compiled"
    assert go(x.double(), 7, 0.5) == "jit"
    assert go(x, 7, 0.5, BLOCK=64) == "jit"
    assert go(x, 7, 0.5, FLAG=True) == "jit" and go(x, 7, 0.5, FLAG=True) == "compiled"
    assert calls[-1][2] == (x, 7, 0.5, 32, True)
    device[0] = 1
    assert go(x, 7, 0.5) == "jit"
    device[0] = 0
    cpu = x.as_subclass(torch.Tensor)
    assert go(cpu, 7, 0.5) == "jit" and go(cpu, 7, 0.5) == "jit"     # never on the CPU
    monkeypatch.setattr(host, "DIRECT", False)
    assert go(x, 7, 0.5) == "jit"


def test_launchers_run_on_their_tensors_device(monkeypatch):
    """NOTE: [launch device]: every Triton op runs with its first tensor's CUDA device current, so
    a model on cuda:1 in a process whose current device is cuda:0 launches on cuda:1 (no second
    GPU here or on the GPU machine: torch.cuda's device switch is stood in for)."""
    pytest.importorskip("triton")
    import fisher_kernels
    from fisher_kernels import host
    from adafisher_fast.backends import OPS
    current, switches = [0], []

    class device_guard:                     # stands in for torch.cuda.device
        def __init__(self, dev):
            self.index = torch.device(dev).index

        def __enter__(self):
            switches.append(self.index)
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device_guard)

    class Stub:
        def __init__(self, dev):
            self.device = torch.device(dev)

    probe = host.on_device(lambda first, *args: current[0])
    assert probe(Stub("cuda:1")) == 1 and current[0] == 0
    assert probe([Stub("cuda:2"), Stub("cuda:0")], 5) == 2
    assert probe(Stub("cuda:0")) == 0 and probe(Stub("cpu")) == 0 and probe([]) == 0
    assert switches == [1, 2]                 # no switch when already current, or for CPU
    for name in OPS:
        op = getattr(fisher_kernels, name)
        while op.__code__ is not probe.__code__ and hasattr(op, "__wrapped__"):
            op = op.__wrapped__     # the tests' own wrappers (triton_sanitizer, poison)
        assert op.__code__ is probe.__code__ and op.__wrapped__.__name__ == name, name
