"""Layer kinds beyond torch.nn: the built-in entry for Hugging Face's ``Conv1D``, found by name, and
a user's own kind (README, "Adding a layer kind"), the README's example run as written.

The oracles are built-in kinds on equivalent models.  ``Conv1D`` is a Linear layer with its weight
stored transposed, so a model of Conv1D layers must train exactly as the same model of nn.Linear
layers with every weight transposed.  timm's ``LayerScale`` multiplies channel c by gamma[c], so it
must train as a bias-free nn.Linear whose weight is diag(gamma) and whose off-diagonal gradient is
masked to zero: F on the diagonal of a Linear is S'[c] H'[c] + Lambda, over the same H and S.
Either comparison fails if a map sends any element to the wrong entry of F.
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


def _conv1d_class(module: str):
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

    Conv1D.__module__, Conv1D.__qualname__ = module, "Conv1D"
    return Conv1D


Conv1D = _conv1d_class("transformers.pytorch_utils")      # what the built-in kind matches by name
OtherConv1D = _conv1d_class("mylib.layers")               # the same under another name


def _conv1d_models(dtype, dev="cpu", cls=Conv1D):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dev, dtype)
    conv = nn.Sequential(cls(7, 5), nn.Tanh(), cls(3, 7)).to(dev, dtype)
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


def _train_both(oracle, model, cls, dtype, tol, **kw):
    """Trains the oracle model and the model under test, each with its own ``cls(**kw)``, on the
    same data; neither may warn (every layer is hooked).  Their EMA factors and H'/S' must agree;
    returns the optimizers."""
    opts = []
    for m in (oracle, model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opts.append(cls(m, lr=1e-2, backend="torch", **kw))
        _train(m, opts[-1], 5, dtype)
    for name in ("state", "fac"):
        torch.testing.assert_close(getattr(opts[1].fisher, name), getattr(opts[0].fisher, name),
                                   rtol=tol, atol=tol / 100)
    return opts


# ----------------------------------------------------------------------------------------------
# the built-in Conv1D kind
# ----------------------------------------------------------------------------------------------
def test_conv1d_is_found_by_its_exact_name():
    _, conv = _conv1d_models(torch.float64)
    assert type(layers.kind_of(conv[0])) is layers.HFConv1DKind
    _, other = _conv1d_models(torch.float64, cls=OtherConv1D)
    assert layers.kind_of(other[0]) is None
    with pytest.warns(UserWarning, match=r"parameters of 0 \(Conv1D\), 2 \(Conv1D\)"):
        AdaFisher(other)


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_conv1d_trains_as_the_transposed_linear(preset, cls):
    lin, conv = _conv1d_models(torch.float64)
    before = conv[0].weight.detach().clone()
    _train_both(lin, conv, cls, torch.float64, 1e-12, weight_decay=1e-2, preset=preset)
    assert not torch.equal(conv[0].weight, before)
    for a, b in ((lin[0], conv[0]), (lin[2], conv[2])):
        torch.testing.assert_close(b.weight, a.weight.t(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.bias, a.bias, rtol=1e-12, atol=1e-14)


def test_hf_kinds_run_on_the_kernel_backends(kernel_ops):
    """check=True compares every statistics call and step of the kernel backend with the torch
    reference (issue 3 item 6): a kind needs no kernel of its own.  GPT-2's Conv1D and LLaMA's
    RMSNorm (below)."""
    _, conv = _conv1d_models(torch.float32)
    model = nn.Sequential(conv[0], LlamaRMSNorm(7), conv[2]).to(device())
    opt = AdaFisherW(model, lr=1e-2, preset="paper", backend=backend_name(kernel_ops), check=True,
                     TCov=1)
    _train(model, opt, 3, torch.float32)
    assert opt.fisher.counters[:, 0].tolist() == [3, 3, 3]


@pytest.mark.parametrize("pname,bad,match", [
    # the weight map, one column too many: 5 x 8 is not the weight's 35 elements
    ("weight", lambda nx, nf: layers.matrix_map(nx, nf + 1, transposed=True),
     r"'0' maps 'weight' as \(5 x 8\) with h_gr=5: expected rows \* cols = 35"),
    # the S side pointed one entry past the layer's S, into the next layer's factors
    ("weight", lambda nx, nf: (nx, nf, 1, 0, 1, 0, 1, 0, nx, 0),
     r"'0' maps 'weight' to factor entries 0..13 of its layer's H and S, which hold 6 \+ 7"),
    # H read from S's start with the wrong H size: -7 is one entry before H[0]
    ("weight", lambda nx, nf: layers.cross_matrix_map(nx, nf, nx + 2),
     r"'0' maps 'weight' to factor entries -1\.\.13 of its layer's H and S"),
    # S read backwards: in the layer's S, but the ops bound indices by a row's last element's
    ("weight", lambda nx, nf: (nx, nf, nf - 1, 0, -1, 0, 1, 0, nx, 0),
     r"'0' maps 'weight' with s_c=-1: expected strides >= 0"),
    # the bias as one row of nf columns, its S one entry on: one-row maps are checked too
    ("bias", lambda nx, nf: (1, nf, 1, 0, 1, 0, 0, 0, 1, 0),
     r"'0' maps 'bias' to factor entries 0..13 of its layer's H and S, which hold 6 \+ 7"),
])
def test_a_map_outside_its_layer_is_an_error(monkeypatch, pname, bad, match):
    """A layer kind's parameter map must cover the parameter and index only its own layer's H and
    S (NOTE: [param map]): otherwise the update would read other layers' factors, or read past the
    factor buffer in a kernel.  The Conv1D kind with one map broken is refused at construction,
    naming the kind, the layer and the parameter."""
    good = layers.HFConv1DKind.param_maps

    def param_maps(self, m, preset):
        maps = good(self, m, preset)
        maps[pname] = bad(*m.weight.shape)
        return maps

    monkeypatch.setattr(layers.HFConv1DKind, "param_maps", param_maps)
    _, conv = _conv1d_models(torch.float64)
    with pytest.raises(ValueError, match="HFConv1DKind.param_maps of " + match):
        AdaFisher(conv, preset="paper")
    monkeypatch.setattr(layers.HFConv1DKind, "param_maps", good)
    AdaFisher(conv, preset="paper")          # the real map passes the same check


# ----------------------------------------------------------------------------------------------
# the README's example
# ----------------------------------------------------------------------------------------------
class LayerScale(nn.Module):
    """timm.layers.LayerScale: y = x * gamma (in place if ``inplace``), gamma (dim,)."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DiagLinear(nn.Linear):
    """The oracle's LayerScale: a bias-free Linear(n, n) kept diagonal by masking its gradient."""

    def __init__(self, gamma):
        super().__init__(gamma.numel(), gamma.numel(), bias=False, dtype=gamma.dtype)
        with torch.no_grad():
            self.weight.copy_(torch.diag(gamma))
        eye = torch.eye(gamma.numel(), dtype=gamma.dtype)
        self.weight.register_hook(lambda g: g * eye)


@pytest.fixture
def readme_kind(monkeypatch):
    """Runs the README's example against the stand-in LayerScale, in a registry copy that the test
    throws away; returns the kind class it defines."""
    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))
    fake = types.ModuleType("timm.layers")
    fake.LayerScale = LayerScale
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    monkeypatch.setitem(sys.modules, "timm.layers", fake)
    text = README.read_text()
    code = re.search(r"<!-- layer-kind-example[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    return scope["LayerScaleKind"]


def _scale_models(dtype, dev="cpu", inplace=False):
    torch.manual_seed(0)
    ls = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), LayerScale(6, 0.5, inplace), nn.Linear(6, 3))
    with torch.no_grad():
        ls[2].gamma.copy_(torch.rand(6) + 0.5)
    ls = ls.to(dev, dtype)
    diag = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), DiagLinear(ls[2].gamma.detach().cpu()),
                         nn.Linear(6, 3)).to(dev, dtype)
    for i in (0, 3):
        diag[i].load_state_dict(ls[i].state_dict())
    return ls, diag


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_readme_kind_trains_layerscale_as_a_diagonal_linear(readme_kind, cls):
    ls, diag = _scale_models(torch.float64)
    before = ls[2].gamma.detach().clone()
    opts = _train_both(diag, ls, cls, torch.float64, 1e-12, weight_decay=1e-2, preset="paper",
                       TCov=2)
    assert torch.count_nonzero(diag[2].weight - torch.diag(torch.diagonal(diag[2].weight))) == 0
    assert not torch.equal(ls[2].gamma, before)
    torch.testing.assert_close(ls[2].gamma, torch.diagonal(diag[2].weight), rtol=1e-12, atol=1e-14)
    for a, b in ((diag[0], ls[0]), (diag[3], ls[3])):
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-12, atol=1e-14)
    assert opts[1].fisher.counters[:, 0].tolist() == [3, 3, 3]


def test_readme_kind_is_paper_only_and_refuses_an_inplace_layerscale(readme_kind):
    ls, _ = _scale_models(torch.float64)
    with pytest.warns(UserWarning, match=r"The released code does not hook 2 \(LayerScale\)"):
        AdaFisher(ls)
    ls, _ = _scale_models(torch.float64, inplace=True)
    opt = AdaFisher(ls, preset="paper", TCov=1)
    with pytest.raises(ValueError, match=r"LayerScale\(inplace=True\): its input is gone"):
        _train(ls, opt, 1, torch.float64)


def test_readme_kind_runs_on_the_kernel_backends(readme_kind, kernel_ops):
    ls, _ = _scale_models(torch.float32, device())
    opt = AdaFisherW(ls, lr=1e-2, preset="paper", backend=backend_name(kernel_ops), check=True)
    _train(ls, opt, 3, torch.float32)
    assert opt.fisher.counters[:, 0].tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------------------------
# Hugging Face's RMSNorm classes
# ----------------------------------------------------------------------------------------------
class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, as it is written (float32 arithmetic, eps in variance_epsilon)."""
    __module__ = "transformers.models.llama.modeling_llama"

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """transformers' GemmaRMSNorm: scales by 1 + weight, eps in eps."""
    __module__ = "transformers.models.gemma.modeling_gemma"

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


def _unlisted(cls, module, name):
    """``cls``'s forward in a class of another transformers module, one _HF_RMSNORMS does not
    list (not a subclass, which the listed name would match): found by the name pattern, read
    after the probe of its forward."""
    def __init__(self, dim, eps=1e-6):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.zeros(dim) if cls is GemmaRMSNorm else torch.ones(dim))
        self.eps = self.variance_epsilon = eps
    return type(name, (nn.Module,), {"__init__": __init__, "forward": cls.forward,
                                     "__module__": f"transformers.models.{module}.modeling_{module}",
                                     "__qualname__": name})


Qwen3_5RMSNorm = _unlisted(LlamaRMSNorm, "qwen3_5", "Qwen3_5RMSNorm")
Gemma4RMSNorm = _unlisted(GemmaRMSNorm, "gemma4", "Gemma4RMSNorm")


class ScaleFirstRMSNorm(nn.Module):
    """transformers' MuseSparkTextInputScaledRMSNorm: scales the input by 1 + weight, then
    normalises; at its initial weight (zeros) it computes what GemmaRMSNorm does."""
    __module__ = "transformers.models.muse_spark.modeling_muse_spark"

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x * (1.0 + self.weight)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)


@pytest.mark.parametrize("hf_cls", [LlamaRMSNorm, GemmaRMSNorm, Qwen3_5RMSNorm, Gemma4RMSNorm])
def test_hf_rmsnorm_trains_as_nn_rmsnorm(hf_cls):
    """Each HF class trains as nn.RMSNorm with the same eps (Gemma's weight + 1 = nn's weight, the
    same gradient; no weight decay, which would tell them apart).  float32, as the HF classes
    compute in float32 whatever the input."""
    eps = 1e-2                          # large enough that a wrong eps shows
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6, eps=eps), nn.Linear(6, 3))
    hf = nn.Sequential(nn.Linear(5, 6), hf_cls(6, eps=eps), nn.Linear(6, 3))
    gemma = hf_cls.forward is GemmaRMSNorm.forward
    hf.load_state_dict({k: v - (k == "1.weight") * gemma for k, v in ref.state_dict().items()})
    # 1e-4: transformers 5.17's Gemma classes round (1 + w) apart from nn's w by 1.3e-5 of an
    # entry of the state (2026-12-04); eps 1e-6 for 1e-2 moves 27 of its 34 entries past 1e-4
    _train_both(ref, hf, AdaFisher, torch.float32, 1e-4, preset="paper", TCov=1)
    off = 1.0 if gemma else 0.0
    assert not torch.equal(ref[1].weight, torch.ones(6))
    # rtol 1e-4, as the state's: the weights grow to |w| ~ 45 in 5 steps here, so (1 + w)'s
    # rounding is amplified; on an AVX-512 Xeon (2026-12-05) Gemma's w = 9.5 ended 1.9e-5 apart
    # (a wrong eps, 1e-6 or 2e-2 for 1e-2, moves the weights by over 700x)
    torch.testing.assert_close(hf[1].weight + off, ref[1].weight, rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match=r"The released code does not hook 1 \(" + hf_cls.__name__):
        AdaFisher(hf)


class Gemma3nRMSNorm(nn.Module):
    """transformers' Gemma3nRMSNorm: with_scale=False (Gemma 3n's v_norm) has no weight."""
    __module__ = "transformers.models.gemma3n.modeling_gemma3n"

    def __init__(self, dim, eps=1e-6, with_scale=True):
        super().__init__()
        self.eps, self.with_scale = eps, with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float() if self.with_scale else out).type_as(x)


def test_an_hf_rmsnorm_of_another_form_is_left_factor_free_and_named():
    """A class the name pattern matches whose forward is not weight * xhat (nor (1 + weight) *
    xhat) is not read as one: the probe, run with a probe weight (at its initial zeros this one
    computes Gemma's form), leaves it factor-free, and the construction warning names it."""
    model = nn.Sequential(nn.Linear(5, 6), ScaleFirstRMSNorm(6), nn.Linear(6, 3))
    with pytest.warns(UserWarning, match=r"1 \(ScaleFirstRMSNorm\)"):
        opt = AdaFisher(model, preset="paper", TCov=1)
    assert [lay.name for lay in opt.fisher.layers] == ["0", "2"]
    assert torch.equal(model[1].weight, torch.zeros(6))        # the probe left it alone


class _First(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def _pair_class(name):
    """An unlisted class (``_unlisted``) whose forward returns (LlamaRMSNorm's, its input), as
    residual-returning norms do."""
    def forward(self, x):
        return LlamaRMSNorm.forward(self, x), x
    cls = _unlisted(LlamaRMSNorm, "pairs", name)
    cls.forward = forward
    return cls


def test_an_hf_rmsnorm_returning_a_tuple_is_probed_at_its_first_output():
    """The probe reads a tuple's first output, and so do the hooks (its second is its input): it
    trains as nn.RMSNorm.  Its S was never gathered, silently: the output-gradient hook went on
    tensor outputs only."""
    eps = 1e-2
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6, eps=eps), nn.Linear(6, 3))
    hf = nn.Sequential(nn.Linear(5, 6), _First(_pair_class("PairsRMSNorm")(6, eps=eps)),
                       nn.Linear(6, 3))
    hf.load_state_dict({k.replace("1.weight", "1.layer.weight"): v
                        for k, v in ref.state_dict().items()})
    _train_both(ref, hf, AdaFisher, torch.float32, 1e-5, preset="paper", TCov=1)
    torch.testing.assert_close(hf[1].layer.weight, ref[1].weight, rtol=1e-5, atol=1e-6)


def test_an_hf_rmsnorm_the_probe_cannot_call_is_left_factor_free_and_named():
    """A class the name pattern matches whose forward needs another argument cannot be probed:
    it is not read (its form is unknown), and the construction warning names it."""
    cls = _unlisted(LlamaRMSNorm, "args", "ArgsRMSNorm")
    cls.forward = lambda self, x, position_ids: LlamaRMSNorm.forward(self, x)
    model = nn.Sequential(nn.Linear(5, 6), cls(6), nn.Linear(6, 3))
    with pytest.warns(UserWarning, match=r"1 \(ArgsRMSNorm\)"):
        opt = AdaFisher(model, preset="paper", TCov=1)
    assert [lay.name for lay in opt.fisher.layers] == ["0", "2"]


def test_hf_rmsnorms_on_meta_or_subclassed_are_read():
    """The probe calls the class's forward on a CPU probe weight, whatever the module's own is
    (on meta: the large-model initialisation; a DTensor: FSDP2), and a subclass of a listed class
    (FSDP2's FSDP<Name>) is listed: both were left factor-free."""
    wrapped = type("FSDPLlamaRMSNorm", (LlamaRMSNorm,), {})
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(5, 6), Qwen3_5RMSNorm(6), nn.Linear(6, 6), wrapped(6),
                              nn.Linear(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = AdaFisher(model, preset="paper")
    assert [lay.name for lay in opt.fisher.layers] == ["0", "1", "2", "3", "4"]


class _TimmRmsNorm(nn.Module):
    """timm's RmsNorm (timm.layers.norm), rewritten: nn.RMSNorm's attributes and form."""
    __module__, __qualname__ = "timm.layers.norm", "RmsNorm"

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return nn.functional.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def test_timm_rmsnorm_trains_as_nn_rmsnorm():
    """timm's RmsNorm is not an nn.RMSNorm subclass: it was factor-free under preset="paper".
    Matched by name, it trains exactly as nn.RMSNorm does."""
    torch.manual_seed(0)
    timm_like = nn.Sequential(nn.Linear(5, 6), _TimmRmsNorm(6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        timm_like[1].weight.uniform_(0.5, 1.5)
    torch_rms = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6, eps=1e-6), nn.Linear(6, 3)).double()
    torch_rms.load_state_dict(timm_like.state_dict())
    runs = []
    for model in (timm_like, torch_rms):
        opt = AdaFisher(model, TCov=1, preset="paper")
        assert [lay.name for lay in opt.fisher.layers] == ["0", "1", "2"]
        _train(model, opt, 3, torch.float64)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _TimmRmsNorm2d(nn.Module):
    """timm's RmsNorm2d (timm.layers.norm), rewritten: RMS over dim 1 of (B, C, H, W)."""
    __module__, __qualname__ = "timm.layers.norm", "RmsNorm2d"

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.normalized_shape, self.eps = (c,), eps
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return x * self.weight.reshape(1, -1, 1, 1)


class _TimmRmsNormAct2d(_TimmRmsNorm2d):
    """timm's RmsNormAct2d (timm.layers.norm_act): RmsNorm2d, then an activation submodule."""
    __module__, __qualname__ = "timm.layers.norm_act", "RmsNormAct2d"

    def __init__(self, c, eps=1e-6):
        super().__init__(c, eps)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(super().forward(x))


class _DimOneRMSNorm(nn.Module):
    """The oracle: nn.RMSNorm applied to dim 1 moved last, then ``act``."""

    def __init__(self, c, eps, act):
        super().__init__()
        self.norm, self.act = nn.RMSNorm(c, eps=eps), act

    def forward(self, x):
        return self.act(self.norm(x.movedim(1, -1)).movedim(-1, 1))


@pytest.mark.parametrize("cls, act", [(_TimmRmsNorm2d, nn.Identity), (_TimmRmsNormAct2d, nn.GELU)])
def test_timm_rmsnorm2d_trains_as_nn_rmsnorm_over_channels(cls, act):
    """timm's RmsNorm2d (and its subclass RmsNormAct2d) normalises the channels of an NCHW map:
    it was factor-free.  It trains as nn.RMSNorm applied to the map with channels moved last,
    also when the map's width equals its channels (C = W = 4), where reading the trailing dim
    would normalise the wrong one."""
    g = torch.Generator().manual_seed(0)
    runs = []
    for norm in (cls(4), _DimOneRMSNorm(4, 1e-6, act())):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.Conv2d(4, 2, 1)).double()
        with torch.no_grad():
            next(norm.parameters()).uniform_(0.5, 1.5, generator=g.manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", "AdaFisher: hooked layers with submodules")
            opt = AdaFisher(model, TCov=1, preset="paper", lr=1e-2)
        assert len(opt.fisher.layers) == 3
        data = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(2, 3, 5, 4, generator=data, dtype=torch.float64)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):     # a timm version's own formula rounds 4e-12 apart (2026-12-04)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_probes_run_under_a_float64_default_dtype():
    """The construction probes (an unlisted HF RMSNorm's form, a LayerNorm subclass's layout)
    made their inputs in the default dtype and compared them with float32 results: under
    torch.set_default_dtype(torch.float64), as shared/golden/README.md runs, construction
    raised 'Float did not match Double'."""
    from test_model_zoo import LayerNorm2d
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), LayerNorm2d(4), nn.Flatten(2),
                              Qwen3_5RMSNorm(4), nn.Linear(4, 2))
        opt = AdaFisher(model, preset="paper", TCov=1)
    finally:
        torch.set_default_dtype(old)
    assert [lay.name for lay in opt.fisher.layers] == ["0", "1", "3", "4"]
    assert model[1].__dict__[layers._LAYOUT] == 1


def test_a_listed_classs_subclass_with_its_own_forward_is_probed():
    """A subclass of a listed class that overrides forward (scaling before normalising) is not
    read as the listed class: the probe leaves it factor-free and the warning names it."""
    class InputScaled(LlamaRMSNorm):
        def forward(self, x):
            y = x * self.weight
            return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = nn.Sequential(nn.Linear(5, 6), InputScaled(6), nn.Linear(6, 3))
    with pytest.warns(UserWarning, match=r"1 \(InputScaled\)"):
        opt = AdaFisher(model, preset="paper")
    assert [lay.name for lay in opt.fisher.layers] == ["0", "2"]


def test_a_weightless_hf_rmsnorm_is_no_layer():
    model = nn.Sequential(nn.Linear(5, 6), Gemma3nRMSNorm(6, with_scale=False),
                          Gemma3nRMSNorm(6), nn.Linear(6, 3))
    opt = AdaFisher(model, preset="paper", TCov=1)
    assert [lay.name for lay in opt.fisher.layers] == ["0", "2", "3"]
    _train(model, opt, 1, torch.float32)
    assert opt.fisher.counters[:, 0].tolist() == [1, 1, 1]


def test_a_kind_registered_by_a_name_that_a_module_exports(monkeypatch, readme_kind):
    """register_layer("timm.layers.LayerScale"), the path users import from, finds the class
    that timm.layers exports (defined in timm.layers.layer_scale): it trains as registered by
    type does.  The name is resolved once the module is imported, not before."""
    monkeypatch.setattr(layers, "_REGISTRY", {k: v for k, v in layers._REGISTRY.items()
                                              if k is not LayerScale})
    assert layers.kind_of(LayerScale(3, 0.5)) is None
    layers.register_layer("timm.layers.LayerScale")(readme_kind)
    assert isinstance(layers.kind_of(LayerScale(3, 0.5)), readme_kind)
    monkeypatch.delitem(sys.modules, "timm.layers")
    assert layers.kind_of(LayerScale(3, 0.5)) is None
    ls, diag = _scale_models(torch.float64)
    monkeypatch.setitem(sys.modules, "timm.layers", types.SimpleNamespace(LayerScale=LayerScale))
    _train_both(diag, ls, AdaFisher, torch.float64, 1e-12, preset="paper", TCov=1)
    torch.testing.assert_close(ls[2].gamma, torch.diagonal(diag[2].weight), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("types_, kind, pattern", [
    ((), "kind", "needs at least one module type"),
    (("LayerScale",), "kind", r"'LayerScale' is neither an nn.Module subclass nor a "
                              r"'module.QualName' string"),
    ((nn.Linear(2, 2),), "kind", "is neither an nn.Module subclass"),
    ((nn.Linear,), object, "decorates a LayerKind subclass"),
])
def test_register_layer_refuses_what_can_never_match(monkeypatch, types_, kind, pattern):
    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))
    before = dict(layers._REGISTRY)
    with pytest.raises(TypeError, match=pattern):
        layers.register_layer(*types_)(layers.LinearKind if kind == "kind" else kind)
    assert layers._REGISTRY == before


# ----------------------------------------------------------------------------------------------
# mistakes in a user's kind are named, never left to corrupt other layers' statistics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side, bad, match", [
    # the bias entry forgotten in H's size: its constant term writes raw[in], which is S[0]
    ("h", lambda i, o: layers.FactorSpec(i, i, layers.mean_terms(i) + [layers.const_term(i, 1.0)]),
     r"H term \(0, 5, 0, 1\.0, 0\) reads accumulator 0 / writes raw entry 5, but H has 5 "
     r"accumulators and 5 raw entries"),
    # one term too many: it reads acc[in], the first accumulator of the layer's S
    ("h", lambda i, o: layers.FactorSpec(i, i + 1, layers.mean_terms(i + 1)),
     r"H term \(5, 5, 1, 1\.0, 1\) reads accumulator 5"),
    ("s", lambda i, o: layers.FactorSpec(o, o, layers.mean_terms(o, dst0=1), 2),
     r"S term \(6, 7, 1, 1\.0, 1\) reads accumulator 6 / writes raw entry 7"),
    # powers the kernels do not compute (Triton's layer_ema squared acc**3 and cubed count**4)
    ("s", lambda i, o: layers.FactorSpec(o, o, [(j, j, 3, 1.0, 1) for j in range(o)], 2),
     r"S term \(0, 0, 3, 1\.0, 1\) has pow=3, q=1; terms take pow 0, 1 or 2 and q 0, 1, 2 or 3"),
    ("h", lambda i, o: layers.FactorSpec(i, i, [(j, j, 1, 1.0, 4) for j in range(i)]),
     r"H term \(0, 0, 1, 1\.0, 4\) has pow=1, q=4"),
])
def test_a_factor_term_outside_its_factor_is_an_error(monkeypatch, side, bad, match):
    """A FactorSpec term must read the factor's own accumulators and write its own raw entries:
    otherwise layer_ema silently mixes another factor's statistics into this one (or writes into
    the next layer's), and a kernel reads past the buffer for the last layer."""
    good = layers.HFConv1DKind.factors

    def factors(self, m, preset):
        h, s = good(self, m, preset)
        i, o = m.weight.shape
        return (bad(i, o), s) if side == "h" else (h, bad(i, o))

    monkeypatch.setattr(layers.HFConv1DKind, "factors", factors)
    _, conv = _conv1d_models(torch.float64)
    with pytest.raises(ValueError, match=r"HFConv1DKind\.factors of '0' \(Conv1D\): " + match):
        AdaFisher(conv, preset="paper")


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("method", ["h_stats", "s_stats"])
def test_a_kind_that_returns_no_row_count_is_named(monkeypatch, method, negative):
    """No count (a forgotten `return`), or a negative one, which left the factor as it was while
    diagnostics() counted a statistics iteration."""
    good = getattr(layers.HFConv1DKind, method)

    def wrong(self, m, t, acc, preset, ops):
        rows = good(self, m, t, acc, preset, ops)
        if negative:
            return -rows                            # no `return` otherwise

    monkeypatch.setattr(layers.HFConv1DKind, method, wrong)
    _, conv = _conv1d_models(torch.float64)
    opt = AdaFisher(conv, preset="paper")
    error, match = ((ValueError, r"returned -\d+ rows: a count is >= 0") if negative else
                    (TypeError, "returned None: it must return the number of rows it added"))
    with pytest.raises(error, match=rf"HFConv1DKind\.{method} of '\d' {match}"):
        _train(conv, opt, 1, torch.float64)


@pytest.mark.parametrize("returned, shown", [
    (lambda h, s: None, "None"),
    (lambda h, s: h, "FactorSpec"),                  # one factor
    (lambda h, s: tuple((f.acc_size, f.size, f.terms) for f in (h, s)), r"\(\("),   # tuples
])
def test_factors_that_are_not_two_factor_specs_are_named(monkeypatch, returned, shown):
    good = layers.HFConv1DKind.factors
    monkeypatch.setattr(layers.HFConv1DKind, "factors",
                        lambda self, m, preset: returned(*good(self, m, preset)))
    _, conv = _conv1d_models(torch.float64)
    with pytest.raises(TypeError, match=rf"HFConv1DKind\.factors of '0' \(Conv1D\) returned "
                                        rf"{shown}.*: it must return \(H, S\), two FactorSpecs"):
        AdaFisher(conv, preset="paper")


@pytest.mark.parametrize("method", ["factors", "param_maps", "h_stats", "s_stats"])
def test_a_method_a_kind_leaves_undefined_is_named(method):
    with pytest.raises(NotImplementedError, match=rf"layer kind LayerKind does not define "
                                                  rf"{method}; a LayerKind defines"):
        getattr(layers.LayerKind(), method)(*([None] * (2 if method in ("factors", "param_maps")
                                                       else 5)))


def test_a_map_of_a_parameter_the_module_lacks_is_an_error(monkeypatch):
    """A misspelt parameter name in param_maps left that parameter factor-free, with a warning
    telling the user to register a layer kind."""
    good = layers.HFConv1DKind.param_maps
    monkeypatch.setattr(layers.HFConv1DKind, "param_maps", lambda self, m, preset: {
        ("wieght" if k == "weight" else k): v for k, v in good(self, m, preset).items()})
    _, conv = _conv1d_models(torch.float64)
    with pytest.raises(ValueError, match=r"HFConv1DKind\.param_maps of '0' \(Conv1D\) maps "
                                         r"\['wieght'\], which Conv1D does not have"):
        AdaFisher(conv, preset="paper")


def _refuses_a_short_accumulator(ops, op):
    x = torch.randn(3, 5, 4, device=device())
    buf = torch.zeros(20, device=device())
    call = {"linear_stats": lambda out: ops.linear_stats(x, out, dim=1),
            "norm_stats": lambda out: ops.norm_stats(x, out, "sample", 1, 1e-5, True),
            "conv_stats": lambda out: ops.conv_stats(x, out, (3,), (1,), [(1, 1)], (1,), 1)}[op]
    n = 15 if op == "conv_stats" else 5
    with pytest.raises((ValueError, RuntimeError), match=f"out has {n - 1} entries, expected (.* = )?{n}"):
        call(buf[:n - 1])
    assert not buf.any()
    call(buf[:n])
    assert buf[:n].any() and not buf[n:].any()


@pytest.mark.parametrize("op", ["linear_stats", "norm_stats", "conv_stats"])
def test_stats_ops_refuse_an_accumulator_of_the_wrong_size(op):
    """The accumulator is a view of the flat buffer: a kernel given one entry too few (a kind's
    acc_size one short) wrote the last feature into the next factor's accumulators (Triton), and
    the reference raised torch's broadcasting error."""
    from adafisher_fast import reference
    _refuses_a_short_accumulator(reference, op)


@pytest.mark.parametrize("op", ["linear_stats", "norm_stats", "conv_stats"])
def test_kernel_stats_ops_refuse_an_accumulator_of_the_wrong_size(kernel_ops, op):
    _refuses_a_short_accumulator(kernel_ops, op)


def test_a_parameter_its_kind_leaves_unmapped_is_named_as_such(monkeypatch):
    """A kind may leave a parameter factor-free on purpose (a scale); the construction warning
    said such a module needed a layer kind, which it has."""
    good = layers.HFConv1DKind.param_maps
    monkeypatch.setattr(layers.HFConv1DKind, "param_maps", lambda self, m, preset: {
        k: v for k, v in good(self, m, preset).items() if k != "bias"})
    _, conv = _conv1d_models(torch.float64)
    with pytest.warns(UserWarning) as rec:
        opt = AdaFisher(conv, preset="paper")
    msg = " ".join(str(w.message) for w in rec)
    assert "no curvature factors for the parameters of 0 (Conv1D), 2 (Conv1D)" in msg
    assert "The layer kinds of 0 (Conv1D), 2 (Conv1D) map no factors to them" in msg
    assert "need a layer kind" not in msg
    assert [lay.name for lay in opt.fisher.layers] == ["0", "2"]


def test_a_registered_name_that_matches_nothing_is_named(monkeypatch):
    """register_layer("pkg.mod.Cls") with a misspelt class name matched nothing, silently: the
    module then took its parent type's kind (a Linear subclass that changes its input, read
    as a plain Linear).  The package's own names are not checked (a library version may lack
    a class they name)."""
    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))
    monkeypatch.setattr(layers, "_UNMATCHED_WARNED", set())
    mod = types.ModuleType("mylib.layers_x")
    mod.HalfLinear = type("HalfLinear", (nn.Linear,), {})
    monkeypatch.setitem(sys.modules, "mylib.layers_x", mod)
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", types.ModuleType("t"))
    layers.register_layer("mylib.layers_x.HalfLinaer")(type("HalfKind", (layers.LinearKind,), {}))
    model = nn.Sequential(mod.HalfLinear(3, 2))
    with pytest.warns(UserWarning, match=r"register_layer\('mylib.layers_x.HalfLinaer'\) "
                                         r"\(HalfKind\) matches nothing: mylib.layers_x is "
                                         r"imported and has no 'HalfLinaer'") as rec:
        AdaFisher(model)
    assert len(rec) == 1                    # not Conv1D, which the fake transformers lacks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaFisher(model)                    # once per name


@pytest.mark.parametrize("create_graph", [False, True])
def test_a_kinds_statistics_run_without_grad(monkeypatch, create_graph):
    """A kind's h_stats and s_stats run with grad mode off, even in a forward under grad mode and
    a backward that builds a graph (create_graph=True turns it on in the gradient hooks), so that
    a kind computing with its module's parameters records nothing into the statistics buffer's
    history; grad mode is back on after each hook."""
    seen = []

    def recording(method):
        good = getattr(layers.HFConv1DKind, method)

        def stats(self, m, t, acc, preset, ops):
            seen.append((method, torch.is_grad_enabled()))
            acc.add_(m.weight.sum() * 0)        # a parameter's value: history if grad were on
            return good(self, m, t, acc, preset, ops)
        return stats

    for method in ("h_stats", "s_stats"):
        monkeypatch.setattr(layers.HFConv1DKind, method, recording(method))
    _, conv = _conv1d_models(torch.float64)
    opt = AdaFisher(conv, preset="paper")
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    assert torch.is_grad_enabled()
    grad, = torch.autograd.grad(out.square().sum(), x, create_graph=create_graph)
    if create_graph:
        assert grad.requires_grad               # the hooks left the double-backward graph alone
    assert {m for m, _ in seen} == {"h_stats"}  # autograd.grad(loss, x): S waits for .grad
    out = conv(x)
    out.square().sum().backward(create_graph=create_graph)
    assert {m for m, _ in seen} == {"h_stats", "s_stats"}
    assert not any(on for _, on in seen), seen
    assert not opt.fisher.buf.requires_grad and opt.fisher.buf.grad_fn is None
