"""CheckedOps (check=True / ADAFISHER_CHECK=1): passes on the real kernels, catches a wrong one."""
import re

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW, reference
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


# (which linear_stats call of _model() is wrong, the layer the error must name); the layers'
# inputs and output gradients: 0 Conv2d (4,3,6,6) -> 1 BatchNorm2d (4,4,4,4) -> 4 Linear (4,64)
# -> 5 LayerNorm (4,5) -> 6 Linear (4,5) -> (4,3)
WRONG_CALLS = [(lambda x: tuple(x.shape) == (4, 64), "layer '4' (Linear), H statistics"),
               (lambda x: tuple(x.shape) == (4, 3), "layer '6' (Linear), S statistics"),
               (lambda x: x.dim() == 3 and x.shape[1] == 4, "layer '1' (BatchNorm2d), S statistics")]


@pytest.mark.parametrize("wrong_call", range(len(WRONG_CALLS)))
@pytest.mark.parametrize("compiled", [False, True])
def test_check_catches_wrong_kernel(kernel_ops, monkeypatch, wrong_call, compiled):
    """A statistics op wrong on one layer's calls is named by layer, H or S, op and error (NOTE:
    [check names]); compiled, also where the forward writes a copy of the statistics buffer."""
    name = backend_name(kernel_ops)
    real = kernel_ops.linear_stats
    hits, layer = WRONG_CALLS[wrong_call]

    def wrong(x, out, *args, **kw):
        real(x, out, *args, **kw)
        if hits(x):
            out.add_(1e-3)

    monkeypatch.setattr(kernel_ops, "linear_stats", wrong)
    model = _model()
    opt = AdaFisher(model, preset="paper", backend=name, check=True)
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    x, y = torch.randn(4, 3, 6, 6, device=device()), torch.randint(0, 3, (4,), device=device())
    with pytest.raises(RuntimeError, match=rf"linear_stats disagrees with the torch reference at "
                       rf"{re.escape(layer)} \(out = buffer slice at offset \d+.*max abs error"):
        nn.functional.cross_entropy(run(x), y).backward()


def _wrong_reference(**wrong):
    """The torch reference with ``wrong[op](*args)`` run after its op."""
    class Wrong:
        def __getattr__(self, op):
            return getattr(reference, op)

    for op, spoil in wrong.items():
        def spoiled(*args, op=op, spoil=spoil):
            getattr(reference, op)(*args)
            spoil(*args)
        setattr(Wrong, op, staticmethod(spoiled))
    return Wrong()


@pytest.mark.parametrize("tensor, layer", [("state", "5"), ("initialized", "4"),
                                           ("counters", "1")])
def test_check_names_the_layer_of_a_wrong_layer_ema(tensor, layer):
    """layer_ema wrong in one layer's S factor (its EMA state or its initialized flag) or counts:
    the error names that layer (NOTE: [check names])."""
    model = _model()
    opt = AdaFisher(model, preset="paper", backend="torch", check=True, TCov=1)
    lay = next(lay for lay in opt.fisher.layers if lay.name == layer)

    def spoil(buf, table, state, fac, initialized, counters, *rest):
        if tensor == "state":
            state[lay.s_raw.start + 1] += 1.0
        elif tensor == "initialized":
            initialized[lay.s_factor] = False
        else:
            counters[opt.fisher.layers.index(lay), 1] += 1

    opt._ops._ops._ops = _wrong_reference(layer_ema=spoil)
    kind = {"state": "S factor", "initialized": "S factor", "counters": "counters"}[tensor]
    name = type(model[int(layer)]).__name__
    with pytest.raises(RuntimeError, match=rf"layer_ema disagrees with the torch reference at "
                       rf"layer '{layer}' \({name}\), {kind} \(tensor {tensor} "):
        _train(opt, model, steps=1)


@pytest.mark.parametrize("which", [1, 2])
def test_check_names_the_parameter_of_a_wrong_step(which):
    """fused_step wrong in one parameter (its value, or its momentum): named (NOTE: [check
    names]), as the model names it."""
    model = _model()
    opt = AdaFisher(model, backend="torch", check=True)
    target = model[4].weight

    def spoil(params, grads, moms, *rest):
        i = next(i for i, p in enumerate(params) if p is target)
        (params if which == 1 else moms)[i].add_(1e-3)

    opt._ops._ops._ops = _wrong_reference(fused_step=spoil)
    part = "parameter" if which == 1 else "momentum"
    with pytest.raises(RuntimeError, match=rf"fused_step disagrees with the torch reference at "
                       rf"parameter '4.weight' \(parameter \d+ of \d+, shape \(5, 64\).*\) {part}"):
        _train(opt, model, steps=1)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_check_passes_on_non_finite_data(kernel_ops, preset):
    """An inf in the user's input puts NaN in the statistics buffer: not a kernel's write outside
    its slice (NaN != NaN for torch.equal).  The step then skips the layers it reached."""
    model = _model()
    opt = AdaFisher(model, preset=preset, backend=backend_name(kernel_ops), check=True, TCov=1)
    x, y = torch.randn(4, 3, 6, 6, device=device()), torch.randint(0, 3, (4,), device=device())
    x[0, 0, 0, 0] = float("inf")
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert sum(d["nonfinite_skips"] for d in opt.diagnostics().values()) > 0


def test_check_catches_a_kernel_writing_outside_its_slice(kernel_ops, monkeypatch):
    """A statistics op that also wrote the next entry of the flat buffer passed: only its own
    slice was compared."""
    name = backend_name(kernel_ops)
    real = kernel_ops.linear_stats

    def spills(x, out, *args, **kw):
        real(x, out, *args, **kw)
        out._base[out.storage_offset() - out._base.storage_offset() + out.numel()] += 1.0

    monkeypatch.setattr(kernel_ops, "linear_stats", spills)
    model = _model()
    opt = AdaFisher(model, preset="paper", backend=name, check=True)
    with pytest.raises(RuntimeError, match=r"linear_stats wrote outside its slice.*offset \d+"):
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


def test_check_judges_plain_sums_by_their_terms(kernel_ops):
    """NOTE: [check tolerances]: channel sums of a zero-mean output gradient (a train-mode
    BatchNorm's input gradient, through a 1x1 conv: the released code's BatchNorm S of the layer
    before) are rounding noise on every backend, and agree as such; an error of the terms' scale
    is still caught."""
    torch.manual_seed(0)
    s = torch.randn(4, 8, 56, device=device()) * 1e-3
    s = s - s.mean(dim=(0, 2), keepdim=True)
    checked = CheckedOps(kernel_ops, backend_name(kernel_ops))
    out = torch.zeros(8, device=device())
    checked.linear_stats(s, out, 1, False)
    assert out.abs().max() < 1e-6 * s.abs().sum(dim=(0, 2)).max()     # the sums did cancel
    real = kernel_ops.linear_stats
    wrong = CheckedOps(type("Wrong", (), {"linear_stats": staticmethod(
        lambda x, o, *a: (real(x, o, *a), o.add_(1e-3 * x.abs().sum(dim=(0, 2)).max())))})(), "wrong")
    with pytest.raises(RuntimeError, match="linear_stats") as caught:
        wrong.linear_stats(s, torch.zeros(8, device=device()), 1, False)
    assert " at " not in str(caught.value).split("(out")[0]     # no optimizer's buffer: no layer


def _sequential_norm_stats(x, out, mode, groups, eps, *rest):
    """norm_stats with each mean summed from its last element to its first in float32, as one
    thread of a kernel might: in a nearly constant group, another order than torch's rounds the
    mean differently, and 1 / sqrt(eps) magnifies that."""
    r, c, i = x.shape
    sets = x.transpose(0, 1).reshape(c, -1) if mode == "channel" else x.reshape(r * groups, -1)
    total = torch.zeros(sets.shape[0], device=x.device)
    for j in reversed(range(sets.shape[1])):
        total = total + sets[:, j]
    d = sets - (total / sets.shape[1])[:, None]
    xhat2 = (d * torch.rsqrt(d.square().mean(dim=1, keepdim=True) + eps)).square()
    out += xhat2.sum(dim=1) if mode == "channel" else xhat2.reshape(r, c, i).sum(dim=(0, 2))


@pytest.mark.parametrize("mode", ["sample", "channel"])
def test_check_judges_centred_statistics_by_their_conditioning(kernel_ops, mode):
    """NOTE: [check tolerances]: in a nearly constant group (sample mode: every row's) or channel,
    x - mean is rounding noise that 1 / sqrt(eps) magnifies, so the reference and a kernel may
    disagree there in every digit (a random-model sweep found it: a GroupNorm after a reflect-
    padded 1x1 conv on a 1-pixel map, 0 from the kernels, 7e-10 from the reference).  check
    passes that (the kernels, and a mean summed in another order), and still catches an error of
    1 there (the statistic of a group that is not constant is about its size, 8) and one of 1e-3
    in the well-conditioned entry beside it."""
    torch.manual_seed(0)
    groups = 2 if mode == "sample" else 1
    ref, seq = torch.zeros(2, device=device()), torch.zeros(2, device=device())
    for value in torch.randn(64).tolist():       # one whose centring the two round differently
        x = torch.randn(3, 2, 8, device=device())
        x[:, 0] = value * (1 + 1e-7 * torch.randn(3, 8, device=device()))   # a few ulp apart
        ref.zero_(), seq.zero_()
        reference.norm_stats(x, ref, mode, groups, 1e-5)
        _sequential_norm_stats(x, seq, mode, groups, 1e-5)
        if ref[0] != seq[0]:
            break
    assert ref[0] != seq[0] and max(ref[0], seq[0]) < 1e-5 and ref[1] > 1   # noise; a statistic
    sequential = type("Sequential", (), {"norm_stats": staticmethod(_sequential_norm_stats)})()
    for ops, name in ((kernel_ops, backend_name(kernel_ops)), (sequential, "sequential")):
        checked = CheckedOps(ops, name)
        checked.norm_stats(x, torch.zeros(2, device=device()), mode, groups, 1e-5)
        # noise alone (the sweep's case): no real statistic sets the tolerance's scale
        checked.norm_stats(x[:, :1], torch.zeros(1, device=device()), mode, 1, 1e-5)
    for entry, error in ((0, 1.0), (1, 1e-3 * float(ref[1]))):
        def norm_stats(x, o, *a, entry=entry, error=error):
            kernel_ops.norm_stats(x, o, *a)
            o[entry] += error
        wrong = CheckedOps(type("Wrong", (), {"norm_stats": staticmethod(norm_stats)})(), "wrong")
        with pytest.raises(RuntimeError, match="norm_stats"):
            wrong.norm_stats(x, torch.zeros(2, device=device()), mode, groups, 1e-5)


@pytest.mark.parametrize("empty", [(0, 4, 3), (4, 0, 3)])
def test_check_passes_on_empty_batches(kernel_ops, empty):
    """An empty batch (or empty sequences) through GroupNorm or LayerNorm: check's tolerance for
    their centred statistics reshaped with a -1 that 0 elements leave undecided, and raised in the
    model's forward.  Checked or not, the steps give the same parameters."""
    params = []
    for check in (False, True):
        torch.manual_seed(0)
        norm = nn.GroupNorm(2, 4) if empty[1] else nn.LayerNorm(3)
        model = nn.Sequential(norm, nn.Linear(3, 2)).to(device())
        opt = AdaFisher(model, preset="paper", backend=backend_name(kernel_ops), check=check,
                        TCov=1)
        for x in (torch.randn(empty, device=device()), torch.randn(4, 4, 3, device=device())):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("value, on", [("true", True), ("On", True), ("0", False), ("", False),
                                       ("off", False), ("2", None)])
def test_check_env_var_values(monkeypatch, value, on):
    """ADAFISHER_CHECK takes the usual spellings of on and off; another value is an error that
    names it (ADAFISHER_CHECK=true was silently off)."""
    monkeypatch.setenv("ADAFISHER_CHECK", value)
    if on is None:
        with pytest.raises(ValueError, match=r"ADAFISHER_CHECK='2': expected 1/true/yes/on"):
            AdaFisher(_model(), backend="torch")
        return
    assert isinstance(AdaFisher(_model(), backend="torch")._ops._ops, CheckedOps) == on
