"""curvature_report / format_report against values computed here from the SPEC section 2 formulas
(raw statistics from captured layer inputs and output gradients, each preset's EMA and min-max
written out independently of the package)."""
import math

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW, expose_attention
from adafisher_fast.report import curvature_report, format_report

LAM, GAMMA, EPS = 1e-3, 0.8, 1e-6


def minmax(v):
    return (v - v.min()) / (v.max() - v.min() + EPS)


def run(opt_cls, preset, steps=3, weight_norm=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2, bias=False)).double()
    if weight_norm:             # layer 0's weight is then computed, and only its bias has factors
        nn.utils.parametrizations.weight_norm(model[0])
    opt = opt_cls(model, lr=1e-2, Lambda=LAM, gamma=GAMMA, TCov=1, preset=preset,
                  weight_decay=1e-2)
    lin = [model[0], model[2]]
    seen = {}

    def fwd(i):
        def hook(m, inp, out):
            seen[i] = [inp[0].detach().clone(), out]
            out.retain_grad()
        return hook

    for i, m in enumerate(lin):
        m.register_forward_hook(fwd(i))
    state = {}          # layer index -> (H state, S state)
    for _ in range(steps):
        x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for i, m in enumerate(lin):
            xi, out = seen[i]
            h = (xi ** 2).mean(0)
            if m.bias is not None:
                h = torch.cat([h, torch.ones(1, dtype=h.dtype)])
            s = (out.grad ** 2).mean(0)
            if preset == "official":
                prev = state.get(i, (torch.ones_like(h), torch.ones_like(s)))
                state[i] = tuple(p * (GAMMA / 10) + minmax(v) * (GAMMA / 100)
                                 for p, v in zip(prev, (h, s)))
            else:
                state[i] = (h, s) if i not in state else tuple(
                    GAMMA * v + (1 - GAMMA) * p for p, v in zip(state[i], (h, s)))
        opt.step()
    expected = []
    for i, m in enumerate(lin):
        hp, sp = state[i] if preset == "official" else map(minmax, state[i])
        if weight_norm and i == 0:
            f, name = sp * hp[-1] + LAM, "bias"
        else:
            f, name = sp[:, None] * hp[None, :m.in_features] + LAM, "weight"
        expected.append(dict(h=hp, s=sp, f=f, share=((f - LAM) / f).mean(), name=name))
    return opt, expected


@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("opt_cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_report_matches_hand_computed(opt_cls, preset, weight_norm):
    """F is reported over the layer's largest parameter with factors: the weight, or the bias of
    a weight-normed layer (its weight is computed from parameters without factors)."""
    if weight_norm:
        with pytest.warns(UserWarning, match=r"0\.parametrizations\.weight"):
            opt, expected = run(opt_cls, preset, weight_norm=True)
    else:
        opt, expected = run(opt_cls, preset)
    rows = opt.curvature_report()
    assert [r["name"] for r in rows] == ["0", "2"]
    for r, e in zip(rows, expected):
        assert r["kind"].endswith("Linear") and r["preset"] == preset
        assert r["f_param"] == e["name"]
        assert r["stat_iters"] == 3 and r["nonfinite_skips"] == 0
        for k in ("h", "s", "f"):
            for q, fn in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
                assert r[f"{k}_{q}"] == pytest.approx(float(fn(e[k])), rel=1e-12, abs=1e-15), (k, q)
        assert r["curvature_share"] == pytest.approx(float(e["share"]), rel=1e-12, abs=1e-15)
        assert 0 <= r["curvature_share"] < 1
    text = format_report(rows)
    assert "curv.share" in text and preset in text
    assert len(text.splitlines()) == 2 + 1 + len(rows)


def test_report_before_any_statistics_and_plain_types():
    """Fresh optimizer: H' = S' = 1 (no statistics yet), F = 1 + Lambda, share = 1/(1+Lambda);
    every value is a plain Python number (JSON-serialisable)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = AdaFisher(model, Lambda=0.5, preset="paper")
    rows = curvature_report(opt)
    assert len(rows) == 2
    for r in rows:
        assert r["stat_iters"] == 0 and r["nonfinite_skips"] == 0
        assert r["h_min"] == r["h_max"] == 1.0 and r["s_mean"] == 1.0
        assert r["f_min"] == r["f_max"] == pytest.approx(1.5)
        assert r["curvature_share"] == pytest.approx(1 / 1.5)
        assert all(isinstance(v, (str, int, float)) for v in r.values())
        assert r["f_param"] == "weight"


@pytest.mark.parametrize("kdim, f_param", [(None, "weight"), (6, "k_proj_weight")])
def test_report_of_exposed_attention_in_projections(kdim, f_param):
    """An exposed attention's in_proj holds no parameters of its own: its owner's reach it through
    properties, and F is still reported, over the packed weight or the largest of q/k/v's."""
    mha = nn.MultiheadAttention(4, 2, kdim=kdim, vdim=kdim)
    expose_attention(mha)
    rows = {r["name"]: r for r in AdaFisher(mha, Lambda=0.5, preset="paper").curvature_report()}
    r = rows["in_proj"]
    assert r["f_param"] == f_param
    assert r["f_min"] == r["f_max"] == pytest.approx(1.5)
    assert r["curvature_share"] == pytest.approx(1 / 1.5)


def test_report_counts_nonfinite_skips():
    model = nn.Sequential(nn.Linear(2, 2))
    opt = AdaFisher(model, TCov=1, preset="paper")
    x = torch.tensor([[1e30, 1.0]])
    opt.zero_grad()
    (model(x) * 1e30).sum().backward()          # squares overflow float32 -> inf statistics
    opt.step()
    r = curvature_report(opt)[0]
    assert r["nonfinite_skips"] == 1 and r["stat_iters"] == 0
    assert math.isfinite(r["curvature_share"])
