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
