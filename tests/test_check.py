"""CheckedOps (check=True / ADAFISHER_CHECK=1): passes on the real kernels, catches a wrong one."""
import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW
from adafisher_fast.check import CheckedOps, compare
from conftest import backend_name, device


def _train(opt, model, steps=2):
    torch.manual_seed(3)
    x, y = torch.randn(4, 3, 6, 6, device=device()), torch.randint(0, 3, (4,), device=device())
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(device())


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_check_passes_on_kernels(kernel_ops, preset):
    name = backend_name(kernel_ops)
    model = _model()
    opt = AdaFisherW(model, lr=1e-2, preset=preset, backend=name, check=True, TCov=1)
    assert isinstance(opt._ops._ops, CheckedOps)
    _train(opt, model)


def test_check_catches_wrong_kernel(kernel_ops, monkeypatch):
    name = backend_name(kernel_ops)
    real = kernel_ops.linear_stats

    def wrong(x, out, *args, **kw):
        real(x, out, *args, **kw)
        out.add_(1e-3)

    monkeypatch.setattr(kernel_ops, "linear_stats", wrong)
    model = _model()
    opt = AdaFisher(model, preset="paper", backend=name, check=True)
    with pytest.raises(RuntimeError, match=r"linear_stats.*offset \d+.*max abs error"):
        _train(opt, model, steps=1)


def test_check_env_var_and_fused_step(monkeypatch):
    """ADAFISHER_CHECK=1 wraps even the torch backend; a wrong fused_step names its parameter."""
    monkeypatch.setenv("ADAFISHER_CHECK", "1")
    model = _model()
    opt = AdaFisher(model, backend="torch")
    assert isinstance(opt._ops._ops, CheckedOps)
    from adafisher_fast import reference
    real = reference.fused_step

    class Wrong:
        def __getattr__(self, a):
            return getattr(reference, a)

        @staticmethod
        def fused_step(params, *args):
            real(params, *args)
            params[0].add_(1e-3)

    opt._ops._ops._ops = Wrong()
    with pytest.raises(RuntimeError, match=r"fused_step.*parameter 0"):
        _train(opt, model, steps=1)


def test_compare_tolerances():
    ref = torch.tensor([1.0, 1e-3, 0.0])
    assert compare(ref * (1 + 1e-6), ref, 1e-4)[0]
    assert not compare(ref + 1e-3, ref, 1e-4)[0]
    assert compare(torch.tensor([float("nan")]), torch.tensor([float("nan")]), 1e-4)[0]
