"""Mixed precision (SPEC section 3, issue 6): autocast statistics and torch.amp.GradScaler."""
import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW
from conftest import emulated, kernel_backends, kernel_module


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(4 * 25, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_grad_scaler_without_overflow_equals_plain_training(preset):
    """A power-of-two loss scale is exact in float32, so unscaling gradients and statistics inside
    step() must reproduce unscaled training bit for bit."""
    plain, scaled = _model(), _model()
    o1 = AdaFisherW(plain, lr=1e-2, TCov=2, weight_decay=1e-2, preset=preset, backend="torch")
    o2 = AdaFisherW(scaled, lr=1e-2, TCov=2, weight_decay=1e-2, preset=preset, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    for x, y in _batches():
        o1.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        o1.step()
        o2.zero_grad()
        scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
        scaler.step(o2)
        scaler.update()
    assert scaler.get_scale() > 2.0 ** 12            # the scale did change along the way
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(o1.fisher.state, o2.fisher.state)


@pytest.mark.parametrize("init_scale", [2.0 ** 16, 2.0 ** 20])
def test_grad_scaler_on_a_float16_model(init_scale):
    """A float16 model (float16 gradients) under GradScaler's default scale 2^16 and above:
    step() unscales in float32, as torch's fused Adam, so the momenta are those of training
    without a scaler (a float16 copy of the scale is inf, and every gradient became 0)."""
    moms = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=init_scale)):
        model = _model().half()
        opt = AdaFisher(model, lr=1e-2, TCov=1, backend="torch")
        for x, y in _batches(2):
            opt.zero_grad()
            # small, so that the scaled float16 gradients do not overflow at these scales
            loss = nn.functional.cross_entropy(model(x.half()).float(), y) * 1e-2
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        moms.append([opt.state[p]["exp_avg"].float() for p in model.parameters()])
    assert scaler.get_scale() == init_scale             # no step was skipped
    for plain, scaled in zip(*moms):
        torch.testing.assert_close(scaled, plain, rtol=4 * 2.0 ** -10, atol=1e-6)


def test_grad_scaler_overflow_skips_step_and_drops_statistics():
    model = _model()
    opt = AdaFisher(model, lr=1e-2, TCov=1, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
        assert out.dtype == torch.float16
    # a huge loss times the scale overflows the float16 activation gradients
    scaler.scale(nn.functional.cross_entropy(out.float(), y) * 1e36).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 16
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.steps == 0 and not opt.state
    assert opt.fisher.buf.abs().sum() == 0 and opt.fisher.counters.sum() == 0
    assert torch.equal(opt.fisher.state, torch.ones_like(opt.fisher.state))
    opt.zero_grad()                                    # the next iteration trains normally
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    assert opt.steps == 1 and all(d["stat_iters"] == 1 for d in opt.diagnostics().values())
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _NoHostRead(torch.Tensor):
    """A found_inf whose value the host must not read (on a GPU, a sync)."""
    def __bool__(self):
        raise AssertionError("found_inf was read on the host")


def _state(model, opt) -> list:
    return [t.detach().clone() for p in model.parameters()
            for t in (p, opt.state[p]["exp_avg"], opt.state[p]["step"])]


def _on_device_steps(backend, monkeypatch, TCov):
    """(model, optimizer) of ``backend`` with its step counts where its kernels run
    (capturable=True; the emulated CUDA binding told so), as the CUDA kernel backends keep them
    on a GPU."""
    if backend != "torch":
        kernel_module(backend, monkeypatch)
        if emulated(backend):
            monkeypatch.setenv("ADAFISHER_EMU_DEVICE_STEPS", "1")
    model = _model()
    return model, AdaFisher(model, lr=1e-2, TCov=TCov, capturable=True, backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_grad_scaler_skip_on_a_plain_iteration_is_decided_on_the_device(backend, monkeypatch):
    """NOTE: [GradScaler]: with the step counts on the device (capturable=True here, the CUDA
    kernel backends' default on a GPU), the fused step itself skips a plain iteration that
    overflowed: parameters, momenta and step counts stay, found_inf is never read on the host
    (bool() on it raises here), and steps, the TCov phase, advances.  A statistics iteration
    reads it on the host and drops its statistics; steps stays, so the next one gathers."""
    model, opt = _on_device_steps(backend, monkeypatch, TCov=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    (x, y), = _batches(1)

    def step(overflow: bool):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y) * (1e36 if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step(False)                                             # statistics iteration 0
    before, scale = _state(model, opt), scaler.get_scale()
    step(True)                                              # plain iteration 1 overflows
    assert scaler.get_scale() < scale and opt.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, opt)))
    fisher_before = [t.clone() for t in (opt.fisher.state, opt.fisher.counters)]
    step(True)                                              # statistics iteration 2 overflows
    assert opt.steps == 2 and all(torch.equal(a, b) for a, b in
                                  zip(before + fisher_before, _state(model, opt) + [
                                      opt.fisher.state, opt.fisher.counters]))
    step(False)                                             # gathers, and trains
    assert opt.steps == 3 and all(d["stat_iters"] == 2 for d in opt.diagnostics().values())
    assert not any(torch.equal(a, b) for a, b in zip(before[::3], _state(model, opt)[::3]))

    opt.zero_grad()                                         # found_inf's value stays on the device
    nn.functional.cross_entropy(model(x), y).backward()     # (plain iteration 3)
    before = _state(model, opt)
    opt.grad_scale, opt.found_inf = None, torch.ones(()).as_subclass(_NoHostRead)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, opt))) and opt.steps == 4
    with pytest.raises(AssertionError, match="read on the host"):   # statistics iteration 4
        opt.step()
    del opt.grad_scale, opt.found_inf


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_grad_scaler_at_tcov_1_reads_found_inf_only_on_the_device(backend, monkeypatch):
    """NOTE: [GradScaler]: at TCov = 1 every iteration gathers, so a skipped one needs no host
    decision either: layer_ema and fused_step read found_inf themselves.  A skip leaves the
    curvature state (state, fac, initialized, counters), parameters, momenta and step counts as
    they were; the iterations around it train.  found_inf is never read on the host."""
    model, opt = _on_device_steps(backend, monkeypatch, TCov=1)
    f = opt.fisher
    for x, y in _batches(3):
        for flag in (1.0, 0.0):     # the same batch skipped, then taken
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            before = [t.clone() for t in (f.state, f.fac, f.initialized, f.counters)] + (
                _state(model, opt) if opt.state else [])
            opt.grad_scale, opt.found_inf = None, torch.tensor(flag).as_subclass(_NoHostRead)
            opt.step()
            after = [f.state, f.fac, f.initialized, f.counters] + _state(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(before, after)) == (flag == 1.0)
    del opt.grad_scale, opt.found_inf
    assert opt.steps == 6 and all(d["stat_iters"] == 3 for d in opt.diagnostics().values())
    assert all(st["step"].item() == 3 for st in opt.state.values())


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_bf16_autocast_without_scaler_trains(cls):
    model = _model()
    opt = cls(model, lr=1e-3, TCov=1, preset="paper", backend="torch")
    losses = []
    for _ in range(3):
        for x, y in _batches(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert opt.fisher.buf.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for t in (opt.fisher.state, opt.fisher.fac))
    assert sum(losses[-4:]) < sum(losses[:4])
    assert all(d["nonfinite_skips"] == 0 for d in opt.diagnostics().values())


def test_pure_bf16_parameters_train_without_nans():
    model = _model().to(torch.bfloat16)
    opt = AdaFisherW(model, lr=1e-3, TCov=1, weight_decay=1e-2, preset="paper", backend="torch")
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.bfloat16()), y).backward()
        opt.step()
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16     # state in the parameter's dtype


def test_curvature_state_is_float64_when_any_parameter_is():
    """README's dtype rule: the statistics and curvature state are float64 when the model has
    float64 parameters, also in a model that mixes float64 and float32 layers."""
    model = nn.Sequential(nn.Linear(3, 4).double(), nn.Linear(4, 2))
    opt = AdaFisher(model, backend="torch")
    assert opt.fisher.buf.dtype == opt.fisher.state.dtype == torch.float64
    assert AdaFisher(nn.Linear(3, 4), backend="torch").fisher.state.dtype == torch.float32
