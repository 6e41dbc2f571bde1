"""A user's layer kind (README, "Adding a layer kind"): the README's example, run as written.

Its module, Hugging Face's ``Conv1D`` (transformers is not a dependency), is a Linear layer with the
weight stored transposed.  So a model of Conv1D layers must train exactly as the same model of
nn.Linear layers, with every weight transposed: the oracle is the built-in Linear kind, on the
same data, and the comparison fails if the example maps any weight element to the wrong entry of F.
"""
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW, layers
from conftest import backend_name, device

README = Path(__file__).resolve().parents[1] / "README.md"


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: y = x @ weight + bias, weight (nx, nf), bias (nf)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.reshape(*x.shape[:-1], self.nf)


@pytest.fixture
def readme_kind(monkeypatch):
    """Runs the README's example against the stand-in Conv1D, in a registry copy that the test
    throws away; returns the kind class it defines."""
    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))
    fake = types.ModuleType("transformers.pytorch_utils")
    fake.Conv1D = Conv1D
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", fake)
    text = README.read_text()
    code = re.search(r"<!-- layer-kind-example[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    return scope["Conv1DKind"]


def _models(dtype, dev="cpu"):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dev, dtype)
    conv = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7)).to(dev, dtype)
    with torch.no_grad():
        for a, b in ((lin[0], conv[0]), (lin[2], conv[2])):
            b.weight.copy_(a.weight.t())
            b.bias.copy_(a.bias)
    return lin, conv


def _train(model, opt, steps, dtype):
    g = torch.Generator().manual_seed(1)
    dev = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(4, 6, 5, generator=g, dtype=dtype).to(dev)   # leading dims, as in a GPT
        y = torch.randn(4, 6, 3, generator=g, dtype=dtype).to(dev)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def test_without_a_kind_conv1d_is_named_as_factor_free():
    _, conv = _models(torch.float64)
    with pytest.warns(UserWarning, match=r"parameters of 0 \(Conv1D\), 2 \(Conv1D\)"):
        AdaFisher(conv)


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_readme_kind_trains_conv1d_as_the_transposed_linear(readme_kind, preset, cls):
    lin, conv = _models(torch.float64)
    opts = []
    for model in (lin, conv):
        with warnings.catch_warnings():
            warnings.simplefilter("error")            # no factor-free warning: both are hooked
            opts.append(cls(model, lr=1e-2, weight_decay=1e-2, preset=preset, backend="torch"))
        _train(model, opts[-1], 5, torch.float64)
    for a, b in ((lin[0], conv[0]), (lin[2], conv[2])):
        assert not torch.equal(b.weight, torch.zeros_like(b.weight))
        torch.testing.assert_close(b.weight, a.weight.t(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.bias, a.bias, rtol=1e-12, atol=1e-14)
    for name in ("state", "fac"):                  # the EMA factors and H'/S' themselves, too
        torch.testing.assert_close(getattr(opts[1].fisher, name), getattr(opts[0].fisher, name),
                                   rtol=1e-12, atol=1e-14)


def test_readme_kind_runs_on_the_kernel_backends(readme_kind, kernel_ops):
    """check=True compares every statistics call and step of the kernel backend with the torch
    reference (issue 3 item 6), so the new kind needs no kernel of its own."""
    _, conv = _models(torch.float32, device())
    opt = AdaFisherW(conv, lr=1e-2, preset="paper", backend=backend_name(kernel_ops), check=True)
    _train(conv, opt, 3, torch.float32)
    assert opt.fisher.state.abs().sum() > 0


@pytest.mark.parametrize("bad,match", [
    # the README's weight map, one column too many: 5 x 8 is not the weight's 35 elements
    (lambda nx, nf: layers.matrix_map(nx, nf + 1, transposed=True),
     r"'0' maps 'weight' as \(5 x 8\) with h_gr=5: expected rows \* cols = 35"),
    # the S side pointed one entry past the layer's S, into the next layer's factors
    (lambda nx, nf: (nx, nf, 1, 0, 1, 0, 1, 0, nx, 0),
     r"'0' maps 'weight' to factor entries 0..13 of its layer's H and S, which hold 6 \+ 7"),
    # H read from S's start with the wrong H size: -7 is one entry before H[0]
    (lambda nx, nf: layers.cross_matrix_map(nx, nf, nx + 2),
     r"'0' maps 'weight' to factor entries -1\.\.13 of its layer's H and S"),
])
def test_a_map_outside_its_layer_is_an_error(readme_kind, monkeypatch, bad, match):
    """A layer kind's parameter map must cover the parameter and index only its own layer's H and
    S (NOTE: [param map]): otherwise the update would read other layers' factors, or read past the
    factor buffer in a kernel.  The README kind with one map broken is refused at construction,
    naming the kind, the layer and the parameter."""
    good = readme_kind.param_maps

    def param_maps(self, m, preset):
        maps = good(self, m, preset)
        maps["weight"] = bad(*m.weight.shape)
        return maps

    monkeypatch.setattr(readme_kind, "param_maps", param_maps)
    _, conv = _models(torch.float64)
    with pytest.raises(ValueError, match="Conv1DKind.param_maps of " + match):
        AdaFisher(conv, preset="paper")
    monkeypatch.setattr(readme_kind, "param_maps", good)
    AdaFisher(conv, preset="paper")          # the README's map passes the same check
