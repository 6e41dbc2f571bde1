"""``add_param_group`` after construction (NOTE: [added groups] in optimizer.py): layers unfrozen
for fine-tuning, or a head added to the model, join the optimizer with hooks and factors of their
own, while everything the optimizer already held carries over."""
import io

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW
from conftest import assert_trajectories_close, device, kernel_backends, kernel_module
from oracle import raw_one


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.LayerNorm(6),
                         nn.Linear(6, 3)).to(device())


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 5, generator=g).to(device()),
            torch.randint(0, 3, (8,), generator=g).to(device()))


def _iteration(model, x, y):
    nn.functional.cross_entropy(model(x), y).backward()


def _steps(model, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        _iteration(model, x, y)
        opt.step()


def _frozen_then_trained(cls, preset, backend="torch", steps=3):
    """(model, opt) after ``steps`` steps with layer 0 frozen, then forward and backward of the
    next iteration (statistics gathered, not yet stepped)."""
    model = _net()
    model[0].requires_grad_(False)
    opt = cls(model, lr=1e-2, Lambda=0.1, weight_decay=1e-2, TCov=1, preset=preset,
              backend=backend)
    x, y = _data()
    _steps(model, opt, x, y, steps)
    opt.zero_grad()
    _iteration(model, x, y)
    return model, opt


@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_unfrozen_layer_joins_and_nothing_else_changes(cls, preset):
    model, opt = _frozen_then_trained(cls, preset)
    twin_model, twin = _frozen_then_trained(cls, preset)     # the same run, never told
    ema, raw, diag = opt.ema_state(), opt.raw_stats(), opt.diagnostics()
    assert "0" not in ema

    model[0].requires_grad_(True)
    opt.add_param_group({"params": model[0].parameters(), "lr": 5e-3})
    assert [len(g["params"]) for g in opt.param_groups] == [len(twin.param_groups[0]["params"]), 2]
    assert opt.param_groups[1]["lr"] == 5e-3 and opt.param_groups[1]["beta"] == 0.9
    for name in ema:                    # every old layer keeps its state and this step's statistics
        for a, b in zip(opt.ema_state()[name] + opt.raw_stats()[name], ema[name] + raw[name]):
            assert torch.equal(a, b), name
        assert opt.diagnostics()[name] == diag[name]
    assert opt.diagnostics()["0"] == {"stat_iters": 0, "nonfinite_skips": 0}
    assert [len(m._forward_hooks) for m in model] == [1, 0, 1, 1, 1]    # the old ones removed

    # layer 0 has no gradient in this iteration yet (it was frozen in backward): the old
    # parameters step exactly as in the optimizer that was never told
    opt.step()
    twin.step()
    for (n, a), b in zip(model.named_parameters(), twin_model.parameters()):
        assert torch.equal(a, b), n
    assert opt.steps == twin.steps

    # from the next iteration on, layer 0 gathers statistics and trains
    w0 = model[0].weight.detach().clone()
    x, y = _data()
    opt.zero_grad()
    grads = []

    def keep_output_grad(module, inputs, out):
        out.register_hook(grads.append)
    tap = model[0].register_forward_hook(keep_output_grad)
    _iteration(model, x, y)
    tap.remove()
    want = raw_one(model[0], x.cpu(), grads[0].cpu(), preset)
    for got, w in zip(opt.raw_stats()["0"], want):
        torch.testing.assert_close(got.cpu().double(), w, rtol=1e-5, atol=1e-7)
    opt.step()
    assert opt.diagnostics()["0"]["stat_iters"] == 1
    assert not torch.equal(model[0].weight, w0)


@pytest.mark.parametrize("backend", kernel_backends() or ["none"])
def test_kernel_backends_after_add_param_group(backend, monkeypatch):
    """The kernels' cached tables follow the new layout: the same run on a kernel backend
    matches the torch reference's (NOTE: [trajectory tolerance])."""
    if backend == "none":
        pytest.skip("no kernel backend can run on this machine")
    kernel_module(backend, monkeypatch)
    runs = {}
    for name in ("torch", backend):
        model, opt = _frozen_then_trained(AdaFisherW, "paper", backend=name)
        opt.step()
        model[0].requires_grad_(True)
        opt.add_param_group({"params": list(model[0].parameters())})
        _steps(model, opt, *_data(), 3)
        runs[name] = (model, opt)
    assert_trajectories_close(runs[backend], runs["torch"])


def test_new_head_and_checkpoint_resume():
    """A module added to the model after the optimizer was made joins through add_param_group;
    a checkpoint then resumes bit-identically in an optimizer built the same way."""
    model = _net()
    opt = AdaFisher(model, preset="paper", TCov=2, backend="torch")
    x, y = _data()
    _steps(model, opt, x, y, 3)
    model.append(nn.Linear(3, 3).to(device()))
    opt.add_param_group({"params": model[5].parameters()})
    _steps(model, opt, x, y, 3)
    assert opt.diagnostics()["5"]["stat_iters"] == 1           # steps 4 of 3..5, TCov=2

    checkpoint = io.BytesIO()           # as saved to disk: no tensor shared with the live run
    torch.save(opt.state_dict(), checkpoint)
    clone_model = _net()
    clone_model.append(nn.Linear(3, 3).to(device()))
    clone_model.load_state_dict(model.state_dict())
    clone_model[5].requires_grad_(False)
    clone = AdaFisher(clone_model, preset="paper", TCov=2, backend="torch")
    # the checkpoint's layers and groups: the optimizer must be built the same way
    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    with pytest.raises(ValueError, match="5 hooked layers, this model 4"):
        clone.load_state_dict(saved)
    clone_model[5].requires_grad_(True)
    clone.add_param_group({"params": clone_model[5].parameters()})
    clone.load_state_dict(saved)
    _steps(model, opt, x, y, 2)
    _steps(clone_model, clone, x, y, 2)
    for a, b in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(a, b)


def test_bad_groups_raise_before_any_change():
    model = _net()
    model[0].requires_grad_(False)
    opt = AdaFisher(model, backend="torch")
    before = (len(opt.param_groups), opt.fisher)
    cases = [
        ({"params": [nn.Parameter(torch.ones(2))]}, ValueError,
         r"\['params'\]\[0\] is a tensor of shape \(2,\) that is not a parameter of the model"),
        ({"params": model[0].parameters()}, ValueError, "'0.weight' is frozen"),
        ({"params": [model[2].weight]}, ValueError, "'2.weight' is already in an earlier group"),
        ({"params": [model[2].weight], "Lambda": 1.0}, ValueError, "may only override"),
        ({"params": [], "lr": -1.0}, ValueError, "lr must be >= 0"),
        ([model[2].weight], TypeError, "must be a dict with a 'params' entry"),
    ]
    model.register_parameter("scale", nn.Parameter(torch.ones(2, dtype=torch.complex64)))
    cases.append(({"params": [model.scale]}, TypeError, "'scale' is complex"))   # a new name
    model.add_module("lazy", nn.LazyLinear(3))
    cases.append(({"params": model.lazy.parameters()}, ValueError,
                  "'lazy.weight' belongs to a lazy module"))
    for group, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            opt.add_param_group(group)
        assert (len(opt.param_groups), opt.fisher) == before


def test_new_factor_free_module_is_named(recwarn):
    model = _net()
    opt = AdaFisher(model, preset="paper", backend="torch")
    assert not recwarn.list
    model.append(nn.PReLU())
    opt.add_param_group({"params": model[5].parameters()})
    (w,) = recwarn.list
    assert "no curvature factors for the parameters of 5 (PReLU)" in str(w.message)
    assert w.filename == __file__           # the user's line, not the package's (warn_user)


def test_unfreezing_without_add_param_group_is_named(recwarn):
    """NOTE: [unfrozen] A layer frozen when the optimizer was made and unfrozen later (gradual
    unfreezing) gets gradients the optimizer does not use: the next statistics step names its
    parameters, once, instead of leaving them untrained in silence.  After add_param_group it
    trains, and nothing more is said."""
    model = _net()
    model[0].requires_grad_(False)
    opt = AdaFisher(model, TCov=2, backend="torch")
    x, y = _data()
    _steps(model, opt, x, y, 3)
    assert not [w for w in recwarn if "frozen" in str(w.message)]
    model[0].requires_grad_(True)
    weight = model[0].weight.detach().clone()
    _steps(model, opt, x, y, 1)                     # steps == 3: not a statistics step
    assert not [w for w in recwarn if "frozen" in str(w.message)]
    with pytest.warns(UserWarning, match=r"parameter\(s\) 0.weight, 0.bias were frozen.*add_param_group"):
        _steps(model, opt, x, y, 1)
    assert torch.equal(model[0].weight, weight)
    recwarn.clear()
    _steps(model, opt, x, y, 2)
    assert not [w for w in recwarn if "frozen" in str(w.message)]     # once
    opt.add_param_group({"params": model[0].parameters()})
    _steps(model, opt, x, y, 2)
    assert not torch.equal(model[0].weight, weight)
    assert not [w for w in recwarn if "frozen" in str(w.message)]


@pytest.mark.parametrize("full", [False, True])
def test_a_group_appended_by_hand_trains_as_an_added_group(full):
    """NOTE: [adopted groups] Some training code appends to param_groups directly (with torch's
    optimizers that works): step() raised, naming the parameter.  The new parameters are now
    laid out at the next step(), as add_param_group lays them out: the run equals that one."""
    x, y = _data()
    runs = []
    for by_hand in (False, True):
        model, opt = _frozen_then_trained(AdaFisher, "paper")
        model[0].requires_grad_(True)
        if by_hand:
            opt.param_groups.append({**(opt.defaults if full else {}), "lr": 5e-3,
                                     "params": list(model[0].parameters())})
        else:
            opt.add_param_group({"params": list(model[0].parameters()), "lr": 5e-3})
        opt.step()
        _steps(model, opt, x, y, 2)
        runs.append((model, opt))
    assert runs[1][1].param_groups[1]["beta"] == runs[1][1].defaults["beta"]
    assert_trajectories_close(runs[1], runs[0])
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)


def test_a_group_appended_before_an_iteration_gathers_its_statistics(recwarn):
    """NOTE: [adopted groups] Appended, then zero_grad, forward, backward, step: the group was
    laid out only in step(), after the iteration, so its layer missed that statistics
    iteration (F = 1 + Lambda for a whole TCov period; 3e3 apart after 3 steps) and the step
    named it silent with a wrong cause.  zero_grad() lays it out: the run equals
    add_param_group's, without a warning."""
    x, y = _data()
    runs = []
    for by_hand in (False, True):
        model = _net()
        model[0].requires_grad_(False)
        opt = AdaFisher(model, lr=1e-2, Lambda=0.1, TCov=5, preset="paper", backend="torch")
        model[0].requires_grad_(True)
        group = {"params": list(model[0].parameters()), "lr": 5e-3}
        opt.param_groups.append(group) if by_hand else opt.add_param_group(group)
        _steps(model, opt, x, y, 3)
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        assert torch.equal(a, b)
    assert not [w for w in recwarn if "AdaFisher" in str(w.message)]


def test_a_parameter_appended_twice_is_refused_before_any_change():
    model = _net()
    opt = AdaFisher(model, backend="torch")
    opt.param_groups.append({**opt.defaults, "params": [model[0].weight]})
    x, y = _data()
    _iteration(model, x, y)
    for call in (opt.step, opt.zero_grad):
        with pytest.raises(ValueError, match="param_groups holds parameter '0.weight' twice"):
            call()
    assert opt.steps == 0 and not opt.state


@pytest.mark.parametrize("steps_before", [0, 1])
def test_a_group_removed_by_hand_leaves_the_layout(steps_before):
    """NOTE: [adopted groups] A layer whose group was removed kept its hooks and its place in
    the checkpoint's layout, which then did not load into an optimizer made without it.  Removed
    after a step, its momentum stayed in opt.state, and state_dict() raised a KeyError."""
    model = _net()
    opt = AdaFisher(model, backend="torch", param_groups=[{"params": model[0].parameters()}])
    x, y = _data()
    _steps(model, opt, x, y, steps_before)
    opt.param_groups = opt.param_groups[1:]
    _steps(model, opt, x, y, 1)
    assert "0" not in opt.diagnostics()
    assert not any(p in opt.state for p in model[0].parameters())
    model[0].requires_grad_(False)
    AdaFisher(model, backend="torch").load_state_dict(opt.state_dict())


def test_a_tensor_appended_by_hand_that_is_not_the_models_is_refused_before_any_change():
    model = _net()
    opt = AdaFisher(model, backend="torch")
    opt.param_groups.append({**opt.defaults, "params": [torch.zeros(3, requires_grad=True)]})
    opt.param_groups[-1]["params"][0].grad = torch.ones(3)
    x, y = _data()
    _iteration(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups holds a tensor of shape \(3,\) that is "
                                         r"not a parameter of the model"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.steps == 0


def test_groups_restored_by_assignment_resume_bit_for_bit():
    """NOTE: [adopted groups] Lightning's BackboneFinetuning on resume: the backbone is frozen
    again when the optimizer is made, then the callback assigns the saved groups to
    ``optimizer.param_groups`` (the unfrozen backbone's group included) and the checkpoint
    loads.  load_state_dict refused it (the checkpoint has one layer more); now the groups are
    laid out first, and the run continues as if never stopped."""
    x, y = _data()
    model, opt = _frozen_then_trained(AdaFisher, "paper", steps=2)
    opt.step()
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 5e-3})
    _steps(model, opt, x, y, 2)
    names = {id(p): n for n, p in model.named_parameters()}
    saved_groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _steps(model, opt, x, y, 3)                               # the uninterrupted run

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _net()
    resumed.load_state_dict(ckpt["model"])
    resumed[0].requires_grad_(False)
    ropt = AdaFisher(resumed, lr=1e-2, Lambda=0.1, weight_decay=1e-2, TCov=1, preset="paper",
                     backend="torch")
    params = dict(resumed.named_parameters())
    ropt.param_groups = [{**g, "params": [params[n] for n in ns]}
                         for g, ns in zip(ckpt["opt"]["param_groups"], saved_groups)]
    resumed[0].requires_grad_(True)
    ropt.load_state_dict(ckpt["opt"])
    _steps(resumed, ropt, x, y, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for k, v in opt.fisher.tensors().items():
        assert torch.equal(ropt.fisher.tensors()[k], v), k


class _LightningOptimizer:
    """Lightning's LightningOptimizer, rewritten: its class derives from the optimizer's, it
    exposes the optimizer as a property and reads its other attributes through __getattr__."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Lightning" + type(optimizer).__name__,
                              (type(self), type(optimizer)), {})

    @property
    def optimizer(self):
        return self._optimizer

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_methods_called_through_lightnings_wrapper_run_on_the_optimizer(cls):
    """NOTE: [wrapped optimizers] add_param_group through self.optimizers() (a layer unfrozen in
    a LightningModule) ran with the wrapper as self: it appended a group without a curvature
    layout, and the step raised.  Now every method runs on the wrapped optimizer: the run
    equals one made on the optimizer itself."""
    x, y = _data()
    runs = []
    for wrapped in (False, True):
        model, opt = _frozen_then_trained(cls, "paper")
        handle = _LightningOptimizer(opt) if wrapped else opt
        assert isinstance(handle, cls)
        model[0].requires_grad_(True)
        handle.add_param_group({"params": list(model[0].parameters()), "lr": 5e-3})
        handle.step()
        _steps(model, handle, x, y, 2)
        assert "fisher" not in vars(handle) or not wrapped
        runs.append((model, opt, handle.state_dict(), handle.diagnostics()))
    (m0, o0, sd0, d0), (m1, o1, sd1, d1) = runs
    assert "0" in d1 and d1 == d0 and len(o1.param_groups) == 2
    for a, b in zip(m0.parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(sd1["param_groups"][0]["adafisher"]["state"],
                               sd0["param_groups"][0]["adafisher"]["state"], rtol=0, atol=0)


def test_the_replaced_curvature_state_is_freed():
    """Each add_param_group left the finalizer of the replaced hooks registered, which kept them
    and the whole replaced FisherState (buffers, EMA state, tables; 105 MiB over a gradual
    unfreeze of GPT-2 small) alive until the optimizer went."""
    import gc
    import weakref
    model = _net()
    model[0].requires_grad_(False)
    opt = AdaFisher(model, TCov=1, preset="paper", backend="torch")
    old = weakref.ref(opt.fisher)
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters())})
    gc.collect()
    assert old() is None and opt.fisher is not None


@pytest.mark.parametrize("how", ["head replaced", "part loaded with assign=True"])
def test_parameters_replaced_in_part_of_the_model_are_named(how, recwarn):
    """NOTE: [replaced] A module replaced after the optimizer was made (``model.fc = ...``), or
    part of the model loaded with ``load_state_dict(strict=False, assign=True)``, leaves the
    optimizer stepping nothing there and the new parameters untrained.  Some parameters still
    have gradients, so _check_replaced (all of them gone) does not raise: the next statistics
    step names both sides, once."""
    model = _net()
    opt = AdaFisher(model, TCov=2, backend="torch")
    x, y = _data()
    _steps(model, opt, x, y, 2)
    if how == "head replaced":
        model[4] = nn.Linear(6, 3).to(device())
    else:
        model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()
                               if k.startswith("4.")}, strict=False, assign=True)
    before = model[4].weight.detach().clone()
    _steps(model, opt, x, y, 1)                     # steps == 2: a statistics step
    named = [w for w in recwarn if "no longer the model's" in str(w.message)]
    assert len(named) == 1 and "4.weight, 4.bias that the optimizer trains" in str(named[0].message)
    assert "add_param_group" in str(named[0].message)
    recwarn.clear()
    _steps(model, opt, x, y, 4)
    assert not [w for w in recwarn if "no longer the model's" in str(w.message)]      # once
    assert torch.equal(model[4].weight, before)
    opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"]
                                     if any(p is q for q in model.parameters())]
    opt.add_param_group({"params": model[4].parameters()})
    _steps(model, opt, x, y, 2)
    assert not torch.equal(model[4].weight, before)
    assert not [w for w in recwarn if "no longer the model's" in str(w.message)]


def test_partial_freezing_names_nothing(recwarn):
    model = _net()
    opt = AdaFisher(model, TCov=1, backend="torch")
    x, y = _data()
    _steps(model, opt, x, y, 1)
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    _steps(model, opt, x, y, 2)
    assert not [w for w in recwarn if "no longer the model's" in str(w.message)]


def test_a_group_added_with_a_tensor_lr_keeps_it():
    """add_param_group takes a tensor lr as the constructor does (NOTE: [tensor lr] in
    kernel_host.py): kept, not copied to a float, so a scheduler's fill_ reaches the group."""
    model = _net()
    model[0].requires_grad_(False)
    opt = AdaFisher(model, TCov=1, backend="torch")
    x, y = _data()
    _steps(model, opt, x, y, 1)
    model[0].requires_grad_(True)
    lr = torch.tensor(0.0, device=device())
    opt.add_param_group({"params": model[0].parameters(), "lr": lr})
    assert opt.param_groups[1]["lr"] is lr
    before = model[0].weight.detach().clone()
    _steps(model, opt, x, y, 1)
    assert torch.equal(model[0].weight, before)               # lr 0
    lr.fill_(1e-2)
    _steps(model, opt, x, y, 1)
    assert not torch.equal(model[0].weight, before)


def test_a_bad_tensor_hyper_parameter_assigned_to_a_group_is_refused_at_step():
    """A group's lr may become a tensor after construction (NOTE: [tensor lr] in kernel_host.py),
    but not one the step cannot read, nor a tensor beta or weight_decay: refused at the step,
    naming the group, before anything changes."""
    model = _net()
    opt = AdaFisher(model, TCov=1, backend="torch", param_groups=[
        {"params": model[0].parameters()}, {"params": model[2:].parameters()}])
    x, y = _data()
    _steps(model, opt, x, y, 1)
    before = [p.detach().clone() for p in model.parameters()]
    for key, value, pattern in (
            ("lr", torch.ones(2, device=device()), r"param_groups\[1\]: a tensor lr must be one"),
            ("lr", torch.tensor(1e-3, requires_grad=True), "without grad"),
            ("beta", torch.tensor(0.9), "beta must be .* got a tensor: only lr may be")):
        opt.param_groups[1][key] = value
        with pytest.raises(TypeError, match=pattern):
            _steps(model, opt, x, y, 1)
        opt.param_groups[1].update(lr=1e-3, beta=0.9)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("key, value, exc, pattern", [
    ("lr", float("nan"), TypeError, "lr must be a finite real number, got nan"),
    ("lr", -1e-3, ValueError, "lr must be >= 0"),
    ("lr", "1e-3", TypeError, "lr must be a finite real number, got '1e-3'"),
    ("beta", 1.0, ValueError, r"beta must be in \[0, 1\)"),
    ("beta", float("nan"), TypeError, "beta must be a finite real number"),
    ("weight_decay", float("inf"), TypeError, "weight_decay must be a finite real number"),
    ("weight_decay", -1.0, ValueError, "weight_decay must be >= 0"),
])
def test_a_bad_value_assigned_to_a_group_is_refused_at_step(key, value, exc, pattern):
    """A schedule or a hand edit may change a group's values between steps; one the step cannot
    use (a NaN lr, beta = 1: 1 - beta^t = 0) made NaN parameters or momenta.  It is refused at the
    step, naming the group, before anything changes; the group trains on once it is mended."""
    model = _net()
    opt = AdaFisher(model, TCov=1, backend="torch", param_groups=[
        {"params": model[0].parameters()}, {"params": model[2:].parameters()}])
    x, y = _data()
    _steps(model, opt, x, y, 1)
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    opt.zero_grad()
    _iteration(model, x, y)

    def state():
        f = opt.fisher
        return [*model.parameters(), f.state, f.fac, f.initialized, f.counters,
                *(t for s in opt.state.values() for t in (s["exp_avg"], s["step"]))]
    before = [t.clone() for t in state()]
    with pytest.raises(exc, match=r"param_groups\[1\]: " + pattern):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, state()))
    opt.param_groups[1][key] = good
    opt.step()
    params = list(model.parameters())
    assert all(p.isfinite().all() and not torch.equal(p, b) for p, b in zip(params, before))
