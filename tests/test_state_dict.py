"""state_dict round trip (SPEC section 5): 30 steps == 15 + save/load into a new model + 15."""
import io
import warnings

import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, AdaFisherW
from conftest import backend_device, kernel_backends, kernel_module


def _model(width=6, dev="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 16, width), nn.LayerNorm(width), nn.Linear(width, 3)).to(dev)


def _batches(dev="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 2, 4, 4, generator=g).to(dev),
             torch.randint(0, 3, (5,), generator=g).to(dev)) for _ in range(30)]


def _run(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_resume_is_bit_identical(cls, preset):
    kw = dict(lr=3e-3, TCov=4, weight_decay=1e-2, preset=preset, backend="torch")
    batches = _batches()
    m1 = _model()
    o1 = cls(m1, **kw)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 7, 0.5)
    _run(m1, o1, batches, s1)

    m2 = _model()
    o2 = cls(m2, **kw)
    s2 = torch.optim.lr_scheduler.StepLR(o2, 7, 0.5)
    _run(m2, o2, batches[:15], s2)
    blob = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()}, blob)
    blob.seek(0)
    ck = torch.load(blob, weights_only=False)
    m3 = _model()
    m3.load_state_dict(ck["model"])
    o3 = cls(m3, **{**kw, "TCov": 1})          # hyperparameters come from the checkpoint
    s3 = torch.optim.lr_scheduler.StepLR(o3, 7, 0.5)
    o3.load_state_dict(ck["opt"])
    s3.load_state_dict(ck["sched"])
    assert o3.TCov == 4 and o3.steps == 15
    _run(m3, o3, batches[15:], s3)

    for (n, a), b in zip(m1.state_dict().items(), m3.state_dict().values()):
        assert torch.equal(a, b), n
    for k, v in o1.fisher.tensors().items():
        assert torch.equal(v, o3.fisher.tensors()[k]), k
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(o1.state[p1]["exp_avg"], o3.state[p3]["exp_avg"])
        assert torch.equal(o1.state[p1]["step"], o3.state[p3]["step"])


def _trained(cls, lr, backend, batches, ck=None):
    """(model, opt, checkpoint after the first half) of a StepLR run over ``batches``; from
    ``ck`` when given, into an optimizer made with a float lr."""
    m = _model(dev=batches[0][0].device)
    o = cls(m, lr=3e-3 if ck else lr, TCov=2, weight_decay=1e-2, backend=backend)
    s = torch.optim.lr_scheduler.StepLR(o, 2, 0.5)
    if ck:
        m.load_state_dict(ck["model"])
        o.load_state_dict(ck["opt"])
        s.load_state_dict(ck["sched"])
    half = len(batches) // 2
    _run(m, o, batches[:half], s)
    blob = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": o.state_dict(), "sched": s.state_dict()}, blob)
    _run(m, o, batches[half:], s)
    blob.seek(0)
    return m, o, torch.load(blob, weights_only=True)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_tensor_lr_follows_the_schedule_and_resumes(cls, backend, monkeypatch):
    """A tensor lr (NOTE: [tensor lr] in kernel_host.py), which StepLR halves in place, trains
    exactly as a float lr does; a checkpoint carries it into an optimizer made with a float lr,
    whose group then holds the tensor (as torch's optimizers' do) and resumes bit-identically."""
    if backend != "torch":
        kernel_module(backend, monkeypatch)      # on a CPU: the emulated CUDA backend
    batches = _batches(backend_device(backend))[:8]
    m1, o1, _ = _trained(cls, 3e-3, backend, batches)
    lr = torch.tensor(3e-3)
    m2, o2, ck = _trained(cls, lr, backend, batches)
    assert o1.param_groups[0]["lr"] == 3e-3 / 16                   # four halvings
    assert o2.param_groups[0]["lr"] is lr and lr.item() == torch.tensor(3e-3 / 16).item()
    m3, o3, _ = _trained(cls, None, backend, batches[4:], ck)
    assert isinstance(o3.param_groups[0]["lr"], torch.Tensor)
    for m in (m2, m3):
        for (n, a), b in zip(m1.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), n


def _same_run(a, b):
    (m1, o1), (m2, o2) = a, b
    for (n, x), y in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(x, y), n
    for k, v in o1.fisher.tensors().items():
        assert torch.equal(v, o2.fisher.tensors()[k]), k
    assert o1.steps == o2.steps


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_distributed_checkpoint_state_dicts_resume_bit_identically(preset, tmp_path):
    """NOTE: [checkpoint layout] torch.distributed.checkpoint's get/set_optimizer_state_dict
    (FSDP2's checkpoints) keep only "state" and "param_groups": the curvature state was dropped
    and the checkpoint refused.  Saved with dcp.save and loaded into a fresh optimizer, whose
    state DCP first makes with an lr-0 step, training goes on exactly."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    kw = dict(lr=3e-3, TCov=4, preset=preset, backend="torch")
    batches = _batches()
    m1 = _model()
    o1 = AdaFisherW(m1, **kw)
    _run(m1, o1, batches[:10])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # no process group: DCP says it runs on one
        dcp.save({"model": m1.state_dict(), "optim": get_optimizer_state_dict(m1, o1)},
                 checkpoint_id=str(tmp_path))
    m2 = _model()
    o2 = AdaFisherW(m2, **{**kw, "TCov": 1})
    ck = {"model": m2.state_dict(), "optim": get_optimizer_state_dict(m2, o2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # no process group: DCP says it runs on one
        dcp.load(ck, checkpoint_id=str(tmp_path))
    m2.load_state_dict(ck["model"])
    set_optimizer_state_dict(m2, o2, ck["optim"])
    assert o2.TCov == 4 and o2.steps == 10
    _run(m1, o1, batches[10:])
    _run(m2, o2, batches[10:])
    _same_run((m1, o1), (m2, o2))


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_distributed_checkpoints_state_making_step_changes_nothing(tensor_lr):
    """NOTE: [DCP state step] DCP makes a fresh optimizer's state with a step at lr 0 and zero
    gradients: it advanced the step count, so the first TCov - 1 iterations gathered nothing.
    (A tensor lr it sets to a CPU tensor 0, NOTE: [tensor lr], and puts back after.)"""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    batches = _batches()[:6]
    runs = []
    for via_dcp in (False, True):
        m = _model()
        lr = torch.tensor(1e-3) if tensor_lr else 1e-3
        o = AdaFisher(m, lr=lr, TCov=4, preset="paper", backend="torch")
        if via_dcp:
            get_optimizer_state_dict(m, o)
            assert o.param_groups[0]["lr"] is lr
            assert o.steps == 0 and all(torch.equal(o.state[p]["exp_avg"], torch.zeros_like(p))
                                        for p in m.parameters())
        _run(m, o, batches)
        runs.append((m, o))
    _same_run(*runs)


def test_checkpoints_with_a_top_level_curvature_entry_load():
    """NOTE: [checkpoint layout] Checkpoints written before the curvature state moved into the
    first param group load as they did."""
    m1 = _model()
    o1 = AdaFisher(m1, TCov=2, backend="torch")
    _run(m1, o1, _batches()[:3])
    sd = o1.state_dict()
    assert "adafisher" not in sd and "adafisher" in sd["param_groups"][0]
    old = {**sd, "param_groups": [dict(g) for g in sd["param_groups"]]}
    old["adafisher"] = old["param_groups"][0].pop("adafisher")
    o2 = AdaFisher(_model(), TCov=1, backend="torch")
    o2.load_state_dict(old)
    assert o2.TCov == 2 and o2.steps == 3 and "adafisher" not in o2.param_groups[0]


def test_checkpoint_of_another_model_names_the_layer():
    o_small = AdaFisher(_model(width=6), backend="torch")
    o_big = AdaFisher(_model(width=8), backend="torch")
    with pytest.raises(ValueError, match=r"layer '4'.*Linear"):
        o_big.load_state_dict(o_small.state_dict())


class _Scaled(nn.Module):
    """A bare parameter (no layer kind, F = 1 + Lambda) scaling a Linear's output (broadcast)."""

    def __init__(self, n):
        super().__init__()
        self.scale, self.lin = nn.Parameter(torch.ones(n)), nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize("preset,make,x,name", [
    ("official", lambda n: nn.Sequential(nn.Embedding(7 + n, 4), nn.Linear(4, 2)),  # factor-free
     torch.randint(0, 7, (2, 3)), "0.weight"),                                        # vocabulary
    ("paper", _Scaled, torch.randn(2, 4), "scale"),
    ("paper", lambda n: nn.Sequential(nn.Conv2d(4, 4, (3, 3) if n == 0 else (1, 9)),  # same H, S
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
     torch.randn(2, 4, 9, 9), "0.weight")])
def test_checkpoint_with_another_parameter_shape_names_it(preset, make, x, name):
    """A parameter of another shape whose layer fingerprint matches (or that has no factors) is
    refused at load, naming it, with nothing loaded: it loaded, and the next step failed after
    the EMA had moved."""
    def run(n):
        torch.manual_seed(0)
        model = make(n + 1 if make is _Scaled else n)
        opt = AdaFisher(model, TCov=1, preset=preset, backend="torch")
        model(x).sum().backward()
        opt.step()
        return opt

    first, second = run(0), run(1)
    before = second.state_dict()
    with pytest.raises(ValueError, match=rf"momentum of parameter '{name}' has shape"):
        second.load_state_dict(first.state_dict())
    after = second.state_dict()
    assert after["param_groups"][0]["adafisher"]["steps"] == before["param_groups"][0]["adafisher"]["steps"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k]["exp_avg"], v["exp_avg"])


def test_checkpoint_grouped_otherwise_gets_torchs_group_error():
    """A run that added a group (add_param_group) resumed by an optimizer with one group: torch's
    group-count error, not a momentum-shape error that reads as another model's checkpoint."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    opt = AdaFisher(model, TCov=1, backend="torch")
    model[0].requires_grad_(True)
    opt.add_param_group({"params": model[0].parameters()})
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        AdaFisher(model, TCov=1, backend="torch").load_state_dict(opt.state_dict())


def test_checkpoint_of_a_model_with_fewer_layers_names_the_counts():
    """The model adds a hooked layer at the end: the first layers match, and the refusal names
    the two counts before anything loads (else the flat statistics' sizes clashed after the
    momentum had loaded)."""
    small = _model()
    big = nn.Sequential(*_model(), nn.LayerNorm(3))
    o_small, o_big = AdaFisher(small, backend="torch"), AdaFisher(big, backend="torch")
    before = {k: v.clone() for k, v in o_big.fisher.tensors().items()}
    with pytest.raises(ValueError, match="the checkpoint has 5 hooked layers, this model 6"):
        o_big.load_state_dict(o_small.state_dict())
    assert not o_big.state
    assert all(torch.equal(v, before[k]) for k, v in o_big.fisher.tensors().items())


def test_checkpoint_restores_lambda_gamma_and_tcov():
    """The curvature settings are the checkpoint's, whatever the loading optimizer was built
    with: its EMA and H'/S' were made with them."""
    m = _model()
    saved = AdaFisher(m, Lambda=0.5, gamma=0.7, TCov=3, backend="torch").state_dict()
    opt = AdaFisher(m, backend="torch")
    opt.load_state_dict(saved)
    assert (opt.Lambda, opt.gamma, opt.TCov) == (0.5, 0.7, 3)


def test_checkpoint_of_another_preset_or_optimizer():
    m = _model()
    with pytest.raises(ValueError, match="preset"):
        AdaFisher(m, preset="paper", backend="torch").load_state_dict(
            AdaFisher(m, backend="torch").state_dict())
    adam = torch.optim.Adam(m.parameters())
    with pytest.raises(ValueError, match="not an AdaFisher checkpoint"):
        AdaFisher(m, backend="torch").load_state_dict(adam.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backends_keep_steps_on_the_device(backend):
    """NOTE: [device steps]: a GPU kernel backend keeps step counts on the parameters' device
    (capturable or not), the torch reference on the CPU; a checkpoint of either loads into the
    other with its counts moved, and training from it goes on."""
    from conftest import kernel_backends
    if backend not in kernel_backends():
        pytest.skip(f"backend {backend} cannot run here")
    model = _model().cuda()
    x, y = torch.randn(5, 2, 4, 4, device="cuda"), torch.randint(0, 3, (5,), device="cuda")
    opts = {name: AdaFisher(model, TCov=1, backend=name) for name in (backend, "torch")}
    for name, opt in opts.items():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        want = "cuda" if name != "torch" else "cpu"
        assert {st["step"].device.type for st in opt.state.values()} == {want}, name
    oa, ob = opts[backend], opts["torch"]
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    ob.load_state_dict(torch.load(buf))
    assert {st["step"].device.type for st in ob.state.values()} == {"cpu"}
    assert all(st["step"].item() == 1.0 for st in ob.state.values())
    oa.load_state_dict(ob.state_dict())
    assert {st["step"].device.type for st in oa.state.values()} == {"cuda"}
    for opt in (oa, ob):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert all(st["step"].item() == 2.0 for st in opt.state.values())
