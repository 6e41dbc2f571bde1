"""Bad input gets a clear error naming the argument (SPEC section 7)."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW
from conftest import fisher_tensors


def _m():
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(beta=1.0), ValueError, "beta"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(Lambda=0.0), ValueError, "Lambda"),
    (dict(Lambda=-1.0), ValueError, "Lambda"),
    (dict(TCov=0), ValueError, "TCov"),
    (dict(TCov=2.5), ValueError, "TCov"),
    (dict(TCov=True), ValueError, "TCov"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(lr=float("nan")), TypeError, "lr"),
    (dict(preset="adam"), ValueError, "preset"),
    (dict(backend="jax"), ValueError, "backend"),
    (dict(param_groups=[{"params": [], "Lambda": 1.0}]), ValueError, "param_groups"),
    (dict(param_groups="x"), TypeError, "param_groups"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), TypeError, "lr: a tensor lr must be one floating-point"),
    (dict(lr=torch.tensor(1)), TypeError, "lr: a tensor lr must be one floating-point element"),
    (dict(lr=torch.tensor(-1.0)), ValueError, "lr must be >= 0"),
    (dict(lr=torch.tensor(float("inf"))), TypeError, "lr must be a finite real number"),
    (dict(beta=torch.tensor(0.9)), TypeError, "beta must be .* got a tensor: only lr may be"),
    (dict(check="yes"), TypeError, "check must be a bool"),
    (dict(capturable=1), TypeError, "capturable must be a bool"),
    (dict(dist=1), TypeError, "dist must be a bool"),
    (dict(process_group=object()), ValueError, "process_group need an initialised"),
])
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_bad_hyperparameters(cls, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(_m(), **kw)


@pytest.mark.parametrize("bad, exc, pattern", [
    (float("nan"), TypeError, "lr must be a finite real number"),
    (-1e-3, ValueError, "lr must be >= 0")])
def test_a_cpu_tensor_lr_made_invalid_by_a_schedule_is_refused_at_the_step(bad, exc, pattern):
    """A tensor lr on the CPU, which the step reads on the host, is checked at every step as a
    float lr is: a scheduler's (or a hand's) fill_ with NaN or a negative value is refused, naming
    the group, before anything changes; a good value then steps."""
    torch.manual_seed(0)
    model = _m()
    lr = torch.tensor(1e-2)
    opt = AdaFisher(model, lr=lr, TCov=1, backend="torch")

    def backward():
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    backward()
    opt.step()
    backward()
    lr.fill_(bad)
    before = [p.clone() for p in model.parameters()] + [t.clone() for t in fisher_tensors(opt.fisher)]
    with pytest.raises(exc, match=r"param_groups\[0\]: " + pattern):
        opt.step()
    after = [p.clone() for p in model.parameters()] + [t.clone() for t in fisher_tensors(opt.fisher)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt.steps == 1
    lr.fill_(1e-2)
    opt.step()
    assert opt.steps == 2
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name, bad, exc", [
    ("Lambda", 0.0, ValueError), ("Lambda", float("nan"), TypeError), ("gamma", 1.5, ValueError),
    ("TCov", 0, ValueError), ("TCov", 2.5, ValueError)])
def test_settings_changed_after_construction_are_checked(name, bad, exc):
    """Lambda, gamma and TCov are checked when set by hand (Lambda = 0 under the paper preset
    made non-finite parameters, TCov = 0 a ZeroDivisionError in step) and when a checkpoint
    brings them, before it loads anything; a good value takes effect."""
    model = _m()
    opt = AdaFisher(model, preset="paper", TCov=1, backend="torch")

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
        opt.step()
    step()
    good = getattr(opt, name)
    with pytest.raises(exc, match=name):
        setattr(opt, name, bad)
    assert getattr(opt, name) == good
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["adafisher"][name] = bad
    step()                                  # the checkpoint's curvature state is now another
    before = [t.clone() for t in fisher_tensors(opt.fisher)]
    with pytest.raises(exc, match="state_dict: " + name):
        opt.load_state_dict(sd)
    assert getattr(opt, name) == good
    assert all(torch.equal(a, b) for a, b in zip(before, fisher_tensors(opt.fisher)))
    setattr(opt, name, {"Lambda": 1e-2, "gamma": 0.5, "TCov": 3}[name])
    assert repr(opt).count(f"{name}={getattr(opt, name)}") == 1
    assert opt._hooks.collecting == (opt.steps % opt.TCov == 0)    # 2 steps: off at TCov 3

def test_parameter_iterable_instead_of_module():
    with pytest.raises(TypeError, match="model must be an nn.Module.*parameter iterable"):
        AdaFisher(_m().parameters())


@pytest.mark.parametrize("jit", ["script", "trace"])
def test_torchscript_model_is_refused(jit):
    """A TorchScript model's forward calls no Python hooks: no layer could gather statistics,
    so AdaFisher would silently be momentum SGD; it says so and what to do instead."""
    m = _m()
    sm = torch.jit.script(m) if jit == "script" else torch.jit.trace(m, torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"model is a TorchScript module.*make the optimizer on "
                                        r"the eager model"):
        AdaFisher(sm)


def test_module_without_parameters_is_refused_frozen_ones_are_not():
    """torch's optimizers refuse an empty parameter list; a module with none (an activation, a
    container left empty) is a wrong argument, named so.  A frozen model is kept: its parameters
    may be unfrozen later (NOTE: [unfrozen])."""
    for empty in (nn.ReLU(), nn.Sequential(), nn.ModuleList([nn.Identity()])):
        with pytest.raises(ValueError, match=f"model: this {type(empty).__name__} holds no parameters"):
            AdaFisher(empty)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert AdaFisher(frozen).param_groups[0]["params"] == []


def test_parameter_in_two_groups_or_foreign():
    m = _m()
    with pytest.raises(ValueError, match=r"param_groups\[1\].*'0.weight'.*earlier group"):
        AdaFisher(m, param_groups=[{"params": [m[0].weight]}, {"params": [m[0].weight]}])
    with pytest.raises(ValueError, match=r"param_groups\[0\].*not a parameter of the model"):
        AdaFisher(m, param_groups=[{"params": [nn.Parameter(torch.ones(2))]}])


def test_group_items_that_are_not_parameters_are_named():
    m = _m()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] is an nn.Module"):
        AdaFisher(m, param_groups=[{"params": m[0]}])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is Linear"):
        AdaFisher(m, param_groups=[{"params": [m[0].weight, m[0]]}])


def test_frozen_parameters_in_groups_are_left_out_as_torch_skips_them():
    """The usual no-decay grouping over model.named_parameters() lists frozen parameters too:
    torch's optimizers hold them and skip them while they have no gradient; AdaFisher leaves them
    out (SPEC 7) and names them if they are unfrozen later (NOTE: [unfrozen])."""
    m = _m()
    m[0].requires_grad_(False)
    opt = AdaFisher(m, backend="torch", param_groups=[
        {"params": [m[0].weight, m[-1].weight], "weight_decay": 0.1},
        {"params": [m[0].bias], "weight_decay": 0.0}])
    trained = [[id(p) for p in g["params"]] for g in opt.param_groups]
    assert trained[:2] == [[id(m[-1].weight)], []]
    assert {i for g in trained for i in g} == {id(p) for p in m.parameters() if p.requires_grad}


def test_named_parameter_groups_as_torch_takes_them():
    """(name, parameter) pairs, as torch's optimizers take them (torch >= 2.6): the group keeps
    "param_names", and so does the last group of unlisted parameters (torch wants names in all
    groups or none)."""
    m = _m()
    opt = AdaFisher(m, backend="torch", param_groups=[{"params": m[0].named_parameters()}])
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    rest = [n for n, p in m.named_parameters() if not n.startswith("0.")]
    assert opt.param_groups[1]["param_names"] == rest
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(m[0].weight), id(m[0].bias)]
    m[0].requires_grad_(False)           # a named group left empty stays a named group
    opt = AdaFisher(m, backend="torch", param_groups=[{"params": m[0].named_parameters()},
                                                      {"params": m[1].named_parameters()}])
    assert [g["param_names"] for g in opt.param_groups] == [[], ["weight", "bias"]]


def test_parameter_twice_in_a_group_or_given_as_a_set():
    m = _m()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: parameter '0.weight' is twice in this group"):
        AdaFisher(m, param_groups=[{"params": [m[0].weight, m[0].weight]}])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] is a set"):
        AdaFisher(m, param_groups=[{"params": {m[0].weight, m[0].bias}}])


def test_numpy_scalars_and_scheduler_group_keys_are_accepted():
    """NumPy's scalars are real numbers (stored as floats, which a weights_only checkpoint
    loads); a group may carry the "initial_lr" that LR schedulers resume from, and a "name"."""
    np = pytest.importorskip("numpy")
    m = _m()
    opt = AdaFisher(m, lr=np.float32(0.5), TCov=np.int64(3), backend="torch",
                    param_groups=[{"params": [m[0].weight], "lr": np.float64(0.25),
                                   "initial_lr": 0.25, "name": "first"}])
    assert [type(g["lr"]) for g in opt.param_groups] == [float, float] and opt.TCov == 3
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.5]
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    assert (opt.param_groups[0]["initial_lr"], opt.param_groups[0]["name"]) == (0.25, "first")


def test_complex_parameters():
    m = _m()
    m.register_parameter("z", nn.Parameter(torch.ones(2, dtype=torch.complex64)))
    with pytest.raises(TypeError, match="'z' is complex"):
        AdaFisher(m)


def test_lazy_module_must_run_before_the_optimizer_is_made():
    """An uninitialised parameter has no shape to lay its factors out by: a clear error at
    construction, not a shape mismatch in the first step(); after one forward it trains."""
    m = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0\.weight' belongs to a lazy module.*forward pass"):
        AdaFisher(m)
    x = torch.randn(3, 5)
    m(x)
    opt = AdaFisher(m, TCov=1)
    w0 = m[0].weight.detach().clone()
    m(x).square().sum().backward()
    opt.step()
    assert torch.isfinite(m[0].weight).all() and not torch.equal(m[0].weight, w0)
    assert "0" in opt.ema_state()


def test_closure_must_be_callable():
    opt = AdaFisher(_m())
    with pytest.raises(TypeError, match="closure"):
        opt.step(closure=3)


def test_sparse_gradient():
    m = nn.Sequential(nn.Linear(3, 3), nn.Embedding(5, 3, sparse=True))
    opt = AdaFisher(m, preset="paper")
    m[0](torch.randn(2, 3)).sum().backward()
    m[1](torch.tensor([1, 2])).sum().backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="'1.weight' has a sparse gradient"):
        opt.step()
    # nothing half-updated: parameters, EMA state and counters untouched
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert torch.equal(opt.fisher.state, torch.ones_like(opt.fisher.state))
    assert opt.fisher.counters.sum() == 0


def test_dist_without_process_group():
    with pytest.raises(ValueError, match="dist=True"):
        AdaFisher(_m(), dist=True)


def test_forced_backend_that_cannot_run():
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        AdaFisher(_m(), backend="cuda")


def test_param_groups_frozen_and_gradless_parameters():
    m = _m()
    m[1].bias.requires_grad_(False)
    opt = AdaFisher(m, lr=0.1, param_groups=[{"params": [m[0].weight], "lr": 0.0}])
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]       # frozen bias left out
    w0, b1 = m[0].weight.detach().clone(), m[1].bias.detach().clone()
    m(torch.randn(2, 3)).sum().backward()
    m[0].bias.grad = None                                               # no gradient: skipped
    opt.step()
    assert torch.equal(m[0].weight, w0) and torch.equal(m[1].bias, b1)
    assert m[0].bias not in opt.state and m[1].weight in opt.state


def test_model_on_devices_the_state_cannot_follow():
    """NOTE: [following the model]: the state follows a model moved to one device (tested on the
    GPU: test_hooks.py); what it cannot follow is an error that says so, before anything changes.
    On a CPU machine the meta device stands in for a second device: a module moved there runs on
    new parameters while the optimizer's stay on the CPU (named as not the model's any more), and
    a parameter swapped for a meta one makes a spread model."""
    m = _m()
    opt = AdaFisher(m, backend="torch", TCov=1)
    with pytest.raises(RuntimeError, match=r"parameter\(s\) 0.weight, 0.bias, 1.weight, 1.bias "
                                           r"are not the ones the optimizer was made with"):
        m.to("meta")(torch.randn(2, 3, device="meta"))
    m = _m()
    opt = AdaFisher(m, backend="torch", TCov=1)
    m(torch.randn(2, 3)).sum().backward()
    stray = nn.Parameter(torch.zeros(2, device="meta"))
    stray.grad = torch.zeros_like(stray)
    opt.fisher.meta[id(stray)] = opt.fisher.meta[id(opt.param_groups[0]["params"][-1])]
    opt.param_groups[0]["params"][-1] = stray
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match=r"parameter\(s\) \? are not the ones the optimizer "
                                           r"was made with"):
        opt.step()
    assert opt.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_many_replaced_parameters_are_listed_as_five_and_others():
    """The error that names parameters which are not the optimizer's any more (as in the test
    above) lists the first five of them and says that there are others."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    opt = AdaFisher(m, backend="torch", TCov=1)     # kept alive: its hooks raise
    with pytest.raises(RuntimeError, match=r"parameter\(s\) 0.weight, 0.bias, 1.weight, 1.bias, "
                                           r"2.weight and others are not the ones"):
        m.to("meta")(torch.randn(2, 3, device="meta"))


def _data_parallel_replica(model: nn.Module) -> nn.Module:
    """What torch.nn.parallel.replicate makes of ``model`` for a second GPU (broadcast copies of
    the parameters as plain tensors on replicas sharing the hooks), here on the CPU."""
    rep = model._replicate_for_data_parallel()
    for name, child in model._modules.items():
        c = child._replicate_for_data_parallel()
        for k, p in child._parameters.items():
            setattr(c, k, p * 1)
        rep._modules[name] = c
    return rep


def test_data_parallel_over_several_gpus_is_refused_by_name(monkeypatch):
    """NOTE: [DataParallel] nn.DataParallel's replicas (one per GPU, in threads) reached the hooks
    with activations on other GPUs and failed with "layer '0' ran on cuda:1", after gathering the
    first replica's.  A wrapper over several devices is refused at construction, and a replica's
    first statistics call (Hugging Face's Trainer wraps after the optimizer is made) names
    DataParallel and what to use, before adding anything.  One device, or none, works as ever."""
    m = _m()
    opt = AdaFisher(m, backend="torch", TCov=1)
    with pytest.raises(RuntimeError, match=r"layer '0' ran as an nn.DataParallel replica: .*use "
                                           r"DistributedDataParallel"):
        _data_parallel_replica(m)(torch.randn(2, 3))
    assert not opt.fisher.buf.any() and not any(opt.fisher.pending)
    dp = nn.DataParallel(_m())                  # no GPU: it calls the module itself
    opt = AdaFisher(dp, backend="torch", TCov=1)
    dp(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert opt.steps == 1 and all(opt.state[p] for p in dp.parameters())
    # unwrapped as DDP's and torch.compile's wrappers are: the plain model's layer names, so its
    # checkpoints load into an optimizer on the plain model (it refused 'module.0' for '0')
    assert list(opt.raw_stats()) == ["0", "1"]
    AdaFisher(dp.module, backend="torch").load_state_dict(opt.state_dict())
    monkeypatch.setattr(dp, "device_ids", [0, 1])
    with pytest.raises(NotImplementedError, match=r"model: nn.DataParallel over devices \[0, 1\]"):
        AdaFisher(dp)


def test_fisher_state_moves_every_tensor():
    """FisherState.to (NOTE: [following the model]) leaves no tensor behind, nor a floating one
    in another dtype."""
    opt = AdaFisher(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                  nn.Linear(16, 2)), backend="torch")
    opt.fisher.to(torch.device("meta"), torch.float64)
    tensors = fisher_tensors(opt.fisher)
    assert len(tensors) >= 15 and all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())


def test_optimizer_copy_or_pickle_says_to_use_state_dict():
    opt = AdaFisher(_m())
    for copy_it in (copy.deepcopy, copy.copy, lambda o: torch.save(o, io.BytesIO())):
        with pytest.raises(TypeError, match="cannot be copied or pickled.*state_dict"):
            copy_it(opt)
