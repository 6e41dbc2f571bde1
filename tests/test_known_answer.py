"""Known answers of the update rule (SPEC 1-2) with the curvature held fixed, float64, 10 steps:

* preset="official" with H' = S' = 0 (statistics never gathered): F = Lambda on every hooked layer,
  so AdaFisher IS bias-corrected momentum with step lr / Lambda;
* preset="paper" with H' = S' = 1 (statistics never gathered, the factors' initial value): F = 1 +
  Lambda everywhere, so it is bias-corrected momentum with step lr / (1 + Lambda).

Weight decay: L2 added to the gradient (AdaFisher) or decoupled (AdaFisherW).  The expected loop is
written here, in the order of the SPEC formulas, and must match bit for bit.
"""
import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW

LR, BETA, LAM, WD, STEPS = 0.05, 0.9, 0.25, 0.1, 10


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64),
             torch.randn(8, 3, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def expected(F, decoupled, wd):
    """Bias-corrected momentum with F fixed: the loop of SPEC section 1."""
    model = make_model()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    for t, (x, y) in enumerate(batches(), start=1):
        grads = torch.autograd.grad(loss_fn(model, x, y), params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                if wd and not decoupled:
                    g = g + wd * p
                m[i] = BETA * m[i] + (1 - BETA) * g
                m_hat = m[i] / (1 - BETA ** t)
                upd = m_hat / F
                if decoupled and wd:
                    upd = upd + wd * p
                p.copy_(p - LR * upd)
    return params


def actual(opt_cls, preset, fac_value, wd):
    model = make_model()
    opt = opt_cls(model, lr=LR, beta=BETA, Lambda=LAM, TCov=1, preset=preset, weight_decay=wd)
    with torch.no_grad():
        opt.fisher.fac[:-1].fill_(fac_value)       # last slot: the constant 1 of factor-free params
    for x, y in batches():
        opt._hooks.collecting = False               # hold the curvature state: no statistics
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        assert opt.fisher.fac[:-1].eq(fac_value).all()
    assert opt.fisher.counters.sum() == 0
    return list(model.parameters())


@pytest.mark.parametrize("wd", [0.0, WD])
@pytest.mark.parametrize("opt_cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset,fac_value,F", [("official", 0.0, LAM), ("paper", 1.0, 1.0 + LAM)])
def test_fixed_curvature_is_momentum(opt_cls, preset, fac_value, F, wd):
    got = actual(opt_cls, preset, fac_value, wd)
    want = expected(F, opt_cls.decoupled, wd)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_known_answer_is_not_vacuous():
    """The two presets' fixed-curvature trajectories differ (step lr/Lambda vs lr/(1+Lambda)), and
    both moved the parameters."""
    start = list(make_model().parameters())
    a = actual(AdaFisher, "official", 0.0, 0.0)
    b = actual(AdaFisher, "paper", 1.0, 0.0)
    assert all(not torch.equal(p, q) for p, q in zip(a, start))
    assert all(not torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("preset,F", [("official", lambda lam: 1.0), ("paper", lambda lam: 1.0 + lam)])
@pytest.mark.parametrize("decoupled", [False, True])
def test_factor_free_parameters_step_with_their_presets_F(preset, F, decoupled):
    """SPEC section 2: a parameter no layer owns (a bare nn.Parameter, a PReLU's) steps with F = 1
    under preset="official", F = 1 + Lambda under preset="paper": bias-corrected momentum over F,
    plus weight decay, for three steps from a known gradient."""
    lr, beta, lam, wd = 0.1, 0.9, 0.5, 0.01
    scale = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    act = nn.PReLU(3).double()
    model = nn.Module()
    model.scale, model.act = scale, act
    cls = AdaFisherW if decoupled else AdaFisher
    opt = cls(model, lr=lr, beta=beta, Lambda=lam, weight_decay=wd, preset=preset, backend="torch")
    x = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    want = [p.detach().clone() for p in (scale, act.weight)]
    moms = [torch.zeros_like(w) for w in want]
    for t in range(1, 4):
        opt.zero_grad()
        model.act(x * model.scale).square().sum().backward()
        for i, p in enumerate((scale, act.weight)):
            g = p.grad.detach().clone()
            if not decoupled:
                g = g + wd * want[i]
            moms[i] = beta * moms[i] + (1 - beta) * g
            update = moms[i] / (1 - beta ** t) / F(lam)
            want[i] = want[i] - lr * (update + (wd * want[i] if decoupled else 0))
        opt.step()
        for w, p in zip(want, (scale, act.weight)):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
