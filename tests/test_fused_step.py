"""fused_step kernels against the torch reference over several steps: every param-map kind,
fp32/bf16/fp16 parameters, L2 and decoupled weight decay, non-contiguous tensors, a zero-size
parameter last; parameters, momenta and step counts compared."""
import functools
import gc
import importlib
import math
import os
import weakref

import pytest
import torch

from adafisher_fast import kernel_host, reference
from conftest import backend_name, device, emulated, kernel_backends, kernel_module

# (param dtype, rtol): one rounding of the stored parameter / momentum in its own dtype
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 2 * 2.0 ** -7), (torch.float16, 2 * 2.0 ** -10)]


def _triton_step(monkeypatch, **attrs):
    """fisher_kernels.fused_step with module attributes replaced for one test: I32_LIMIT=1 forces
    the 64-bit per-element division path, TARGET_PROGRAMS=1 with MAX_CHUNK_BLOCKS=2 chunks of two
    blocks (NOTE: [chunk size]), empty caches a cold start."""
    fs = importlib.import_module("fisher_kernels.fused_step")
    for name, value in attrs.items():
        monkeypatch.setattr(fs, name, value)
    return fs


def _host_steps(monkeypatch):
    """The Triton backend told that the step counts are not on its device (on a CPU machine they
    always are), so it takes their host path (NOTE: [step host path])."""
    return _triton_step(monkeypatch, _device_steps=lambda steps, dev: False, _TABLES={})


def _problem(dtype):
    """Parameters with map rows like layers.py builds: Linear weight/bias, grouped conv weight (and
    an FSDP2 shard of one that starts inside a group), depthwise conv weight, norm weight (H per
    row), Embedding (H by row, S by column), released-code H'[0] maps, a factor-free parameter and
    a zero-size one."""
    n_fac = 64
    specs = [  # shape, meta row
        ((5, 7), (5, 7, 0, 1, 0, 5, 0, 1, 5, 0, 0)),
        ((5,), (5, 1, 0, 1, 0, 12, 0, 0, 5, 0, 0)),
        ((4, 2, 3, 1), (4, 6, 13, 1, 0, 17, 0, 1, 2, 7, 0)),
        ((5, 3), (5, 3, 0, 1, 0, 10, 0, 1, 3, 3, 2)),       # rows 2, 0 1 2, 0 1 of groups of 3
        ((4, 1, 3, 3), (4, 9, 0, 1, 0, 4, 0, 1, 1, 9, 0)),  # a group a row
        ((13,), (13, 1, 31, 1, 0, 44, 1, 0, 13, 0, 0)),
        ((3, 4), (3, 4, 20, 0, 1, 57, 1, 0, 3, 0, 0)),
        ((6,), (6, 1, 24, 1, 0, 60, 0, 0, 6, 0, 0)),
        ((33, 1), (33, 1, n_fac, 0, 0, n_fac, 0, 0, 33, 0, 0)),
        ((0, 3), (0, 3, n_fac, 0, 0, n_fac, 0, 0, 1, 0, 0)),
    ]
    params = [torch.randn(s, device=device()).to(dtype) for s, _ in specs]
    grads = [torch.randn(s, device=device()).to(dtype) for s, _ in specs]
    moms = [torch.randn(s, device=device()).to(dtype) * 0.1 for s, _ in specs]
    fac = torch.cat([torch.rand(n_fac, device=device()), torch.ones(1, device=device())])
    meta = torch.tensor([m for _, m in specs], dtype=torch.int64)
    hyper = [(1e-2, 0.9, 0.1, 1e-3)] * 8 + [(1e-2, 0.8, 0.0, 0.0), (1e-2, 0.9, 0.1, 1e-3)]
    return params, grads, moms, fac, meta, hyper


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("steps_on", ["device", "host"])
def test_fused_step(kernel_ops, dtype, rtol, decoupled, steps_on, monkeypatch):
    """steps_on: step counts on the parameters' device, which the Triton kernel increments itself
    (NOTE: [step tickets] in fisher_kernels/fused_step.py), or on the host (on a CPU machine the
    Triton backend is told that they are not on its device)."""
    torch.manual_seed(0)
    params, grads, moms, fac, meta, hyper = _problem(dtype)
    where = device() if steps_on == "device" else "cpu"
    if steps_on == "host" and backend_name(kernel_ops) == "triton":
        _host_steps(monkeypatch)
    want = ([p.clone() for p in params], [m.clone() for m in moms],
            [torch.tensor(float(i)) for i in range(len(params))])
    got = ([p.clone() for p in params], [m.clone() for m in moms],
           [torch.tensor(float(i), device=where) for i in range(len(params))])
    for _ in range(3):
        reference.fused_step(want[0], grads, want[1], want[2], fac, meta, hyper, decoupled)
        kernel_ops.fused_step(got[0], grads, got[1], got[2], fac, meta, hyper, decoupled)
        for w, g in zip(want[0] + want[1], got[0] + got[1]):
            scale = w.abs().max().item() if w.numel() else 0.0
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)
        assert [t.item() for t in got[2]] == [t.item() for t in want[2]]
        # the next step starts from the same state on both sides
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            a.copy_(b)


def test_fused_step_mixed_dtypes(kernel_ops):
    """float32, bfloat16 and a float32 parameter with a bfloat16 gradient: one launch (and one
    step ticket, NOTE: [step tickets]) per dtype pair, or the reference; every count advances
    once per step."""
    torch.manual_seed(3)
    specs = [(torch.float32, torch.float32, 2100), (torch.bfloat16, torch.bfloat16, 1500),
             (torch.float32, torch.bfloat16, 700), (torch.float32, torch.float32, 5)]
    params = [torch.randn(n, device=device()).to(pd) for pd, _, n in specs]
    grads = [torch.randn(n, device=device()).to(gd) for _, gd, n in specs]
    meta = torch.tensor([[n, 1, 0, 1, 0, 0, 0, 0, n, 0, 0] for *_, n in specs])
    fac = torch.rand(2100, device=device()) + 0.5
    hyper = [(1e-2, 0.9, 0.1, 1e-3)] * len(specs)
    want = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    got = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    tw = [torch.tensor(0.0) for _ in specs]
    tg = [torch.tensor(0.0, device=device()) for _ in specs]
    for step in (1, 2):
        reference.fused_step(want[0], grads, want[1], tw, fac, meta, hyper, False)
        kernel_ops.fused_step(got[0], grads, got[1], tg, fac, meta, hyper, False)
        assert [t.item() for t in tg] == [float(step)] * len(specs)
        for w, g in zip(want[0] + want[1], got[0] + got[1]):
            rtol = 1e-6 if w.dtype == torch.float32 else 2 * 2.0 ** -7
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())


_KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("gdt", _KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("pdt", _KERNEL_DTYPES, ids=str)
def test_fused_step_grad_dtype_pairs_run_in_the_kernel(kernel_ops, pdt, gdt, monkeypatch):
    """Every (param dtype, grad dtype) pair of the kernels' dtypes (a bfloat16 model with float32
    gradients) runs in the kernel, as the reference computes it: the CUDA backend sent a gradient
    of another dtype to the reference.  A (7, 11) weight has 16-byte vectors of every width and a
    tail; a view one element in has the scalar path; two steps."""
    torch.manual_seed(11)
    base = [torch.randn(7, 11, device=device()), torch.randn(41, device=device())]
    params = [base[0].to(pdt), base[1].to(pdt)[1:]]
    grads = [torch.randn(7, 11, device=device()).to(gdt), torch.randn(41, device=device()).to(gdt)[1:]]
    meta = torch.tensor([[7, 11, 0, 1, 0, 7, 0, 1, 7, 0, 0], [40, 1, 18, 0, 0, 18, 0, 0, 40, 0, 0]])
    fac = torch.rand(19, device=device()) + 0.5
    fac[18] = 1.0
    hyper = [(1e-2, 0.9, 0.1, 1e-3)] * 2
    want = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    got = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    tw, tg = [torch.tensor(0.0) for _ in params], [torch.tensor(0.0) for _ in params]
    for _ in range(2):
        reference.fused_step(want[0], grads, want[1], tw, fac, meta, hyper, True)
    monkeypatch.setattr(reference, "fused_step", lambda *a: pytest.fail("reference fallback"))
    for _ in range(2):
        kernel_ops.fused_step(got[0], grads, got[1], tg, fac, meta, hyper, True)
    assert [t.item() for t in tg] == [2.0, 2.0]
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2 * 2.0 ** -7, torch.float16: 2 * 2.0 ** -10}[pdt]
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        assert g.dtype == pdt
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())


def test_fused_step_bad_shape_changes_nothing(kernel_ops):
    """A momentum whose shape is not its parameter's raises, naming the parameter, before any
    parameter (the float64 one the reference updates included) or step count changes."""
    params = [torch.randn(4, 3, device=device(), dtype=torch.float64),
              torch.randn(5, device=device()), torch.randn(2, 3, device=device())]
    grads = [torch.randn_like(p) for p in params]
    moms = [torch.zeros_like(p) for p in params[:2]] + [torch.zeros(3, 2, device=device())]
    steps = [torch.tensor(0.0) for _ in params]
    before = [p.clone() for p in params]
    meta = torch.tensor([[4, 3, 0, 1, 0, 4, 0, 1, 4, 0, 0], [5, 1, 0, 1, 0, 5, 0, 0, 5, 0, 0],
                         [2, 3, 0, 1, 0, 2, 0, 1, 2, 0, 0]])
    for ops in (reference, kernel_ops):
        with pytest.raises((ValueError, RuntimeError), match="parameter 2 has"):
            ops.fused_step(params, grads, moms, steps, torch.rand(8, device=device()), meta,
                           [(0.1, 0.9, 0.0, 1e-3)] * 3, False)
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        assert [t.item() for t in steps] == [0.0, 0.0, 0.0]


_GOOD_ROW = [4, 3, 0, 1, 0, 4, 0, 1, 4, 0, 0]        # a (4, 3) weight: S by row, H by column


@pytest.mark.parametrize("column,value", [
    ("cols", 2),        # 4 x 2 is not the parameter's 12 elements
    ("s_off", 5),       # S index 5 + 3 reaches fac[8] of 8 entries
    ("h_c", 2),         # H index 4 + 2 * 2 too
    ("h_gs", 1),        # with h_gr 1 (below), H index 4 + 2 + 3 * 1 reaches fac[9]
    ("s_r", -1),        # a negative stride
    ("s_r", 2 ** 62),   # S index 3 * 2^62, which wraps int64 below fac's size
    ("h_c", 2 ** 62),   # H index 4 + 2 * 2^62, which wraps int64 to a negative one
    ("h_ph", 4),        # row 0's place in a group of 4 rows
])
def test_fused_step_bad_meta_row_changes_nothing(kernel_ops, column, value):
    """The kernels trust the meta rows (NOTE: [param map]): each op checks that a row covers its
    parameter and indexes only fac, and names the row, before anything changes.  s_off 4 reaches
    fac[7], the last entry, and is accepted."""
    params = [torch.randn(5, device=device()), torch.randn(4, 3, device=device())]
    before = [p.clone() for p in params]
    row = list(_GOOD_ROW)
    row[reference.META_COLS.index(column)] = value
    if column == "h_gs":
        row[reference.META_COLS.index("h_gr")] = 1
    good_edge = list(_GOOD_ROW)
    good_edge[reference.META_COLS.index("s_off")] = 4
    for ops in (reference, kernel_ops):
        steps = [torch.tensor(0.0) for _ in params]
        moms = [torch.zeros_like(p) for p in params]
        for r, fails in ((row, True), (good_edge, False)):
            meta = torch.tensor([[5, 1, 0, 1, 0, 5, 0, 0, 5, 0, 0], r])
            call = functools.partial(ops.fused_step, params, [torch.ones_like(p) for p in params],
                                     moms, steps, torch.rand(8, device=device()) + 1, meta,
                                     [(0.1, 0.9, 0.0, 1e-3)] * 2, False)
            if fails:
                with pytest.raises(ValueError, match=r"fused_step: meta row 1 .*parameter 1 \(12 "):
                    call()
                assert all(torch.equal(a, b) for a, b in zip(params, before)), ops
                assert [t.item() for t in steps] == [0.0, 0.0], ops
            else:
                call()
                assert not torch.equal(params[1], before[1]), ops
        for p, b in zip(params, before):
            p.copy_(b)


def test_fused_step_bumps_version_counters(kernel_ops):
    """NOTE: [version counters]: a backward through a graph that saved the parameter before the
    step raises, as after torch's optimizers.  The kernels wrote through pointers without
    telling autograd, so such a backward read the new values silently (the Triton backend)."""
    meta = torch.tensor([[4, 3, 0, 1, 0, 4, 0, 1, 4, 0, 0]])
    for ops in (reference, kernel_ops):
        w = torch.randn(4, 3, device=device(), requires_grad=True)
        loss = (torch.randn(2, 3, device=device(), requires_grad=True) @ w.t()).square().sum()
        m, step = torch.zeros(4, 3, device=device()), torch.tensor(0.0)
        before = w._version
        with torch.no_grad():
            ops.fused_step([w], [torch.randn(4, 3, device=device())], [m], [step],
                           torch.rand(8, device=device()), meta, [(0.1, 0.9, 0.0, 1e-3)], False)
        assert w._version > before, ops
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_fused_step_lists_of_different_lengths(kernel_ops):
    """The reference zipped the lists and left the parameters past the shortest one unchanged;
    the CUDA backend raised IndexError.  All three name the lists now."""
    params = [torch.randn(3, device=device()) for _ in range(2)]
    before = [p.clone() for p in params]
    meta = torch.tensor([[3, 1, 0, 0, 0, 3, 0, 0, 3, 0, 0]] * 2)
    for ops in (reference, kernel_ops):
        with pytest.raises(ValueError, match="must have the same length"):
            ops.fused_step(params, [torch.ones_like(p) for p in params],
                           [torch.zeros_like(p) for p in params], [torch.tensor(0.0)],
                           torch.ones(1, device=device()), meta, [(0.1, 0.9, 0.0, 1e-3)] * 2,
                           False)
        assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_fused_step_noncontiguous(kernel_ops):
    torch.manual_seed(1)
    p = torch.randn(6, 5, device=device()).t()               # (5, 6), non-contiguous
    g = torch.randn(6, 5, device=device()).t()
    m = torch.zeros(6, 5, device=device()).t()
    fac = torch.rand(12, device=device())
    meta = torch.tensor([[5, 6, 0, 1, 0, 5, 0, 1, 5, 0, 0]])
    pw, mw, tw = p.clone(), m.clone(), [torch.tensor(0.0)]
    reference.fused_step([pw], [g], [mw], tw, fac, meta, [(0.1, 0.9, 0.0, 1e-3)], False)
    tg = [torch.tensor(0.0)]
    kernel_ops.fused_step([p], [g], [m], tg, fac, meta, [(0.1, 0.9, 0.0, 1e-3)], False)
    torch.testing.assert_close(p, pw)
    torch.testing.assert_close(m, mw)
    assert tg[0].item() == 1.0


@pytest.mark.parametrize("layout", ["p transposed, g and m not", "every other column",
                                    "m alone transposed"])
def test_fused_step_other_layouts_run_in_the_kernel_through_copies(kernel_ops, layout, monkeypatch):
    """A layout the kernels cannot walk in place is stepped through contiguous copies (README,
    channels_last): the CUDA backend sent it to the per-parameter torch reference instead (and,
    once through copies, dropped the update of a momentum whose parameter was contiguous)."""
    torch.manual_seed(2)
    if layout == "p transposed, g and m not":
        p = torch.randn(6, 5, device=device()).t()
        g, m = torch.randn(5, 6, device=device()), torch.randn(5, 6, device=device())
    elif layout == "m alone transposed":        # a channels_last checkpoint's momentum, loaded
        p, g = torch.randn(5, 6, device=device()), torch.randn(5, 6, device=device())
        m = torch.randn(6, 5, device=device()).t()
    else:
        p, g, m = (torch.randn(5, 12, device=device())[:, ::2] for _ in range(3))
    fac = torch.rand(12, device=device())
    meta = torch.tensor([[5, 6, 0, 1, 0, 5, 0, 1, 5, 0, 0]])
    pw, mw = p.clone(), m.clone()
    hyper = [(0.1, 0.9, 0.0, 1e-3)]
    reference.fused_step([pw], [g], [mw], [torch.tensor(0.0)], fac, meta, hyper, False)
    monkeypatch.setattr(reference, "fused_step", lambda *a: pytest.fail("reference fallback"))
    kernel_ops.fused_step([p], [g], [m], [torch.tensor(0.0)], fac, meta, hyper, False)
    torch.testing.assert_close(p, pw)
    torch.testing.assert_close(m, mw)


@pytest.mark.parametrize("case", ["only_empty", "empty_own_dtype"])
@pytest.mark.parametrize("steps_on", ["device", "host"])
def test_fused_step_empty_group(kernel_ops, case, steps_on, monkeypatch):
    """A (param dtype, grad dtype) pair whose parameters are all zero-size (a lone (0, 3) float32
    parameter; a float32 model with one empty bfloat16 parameter) changes nothing, and its step
    counts advance as the reference's, on the device or on the host (the Triton kernel's host
    path; no launch and no table upload for the empty pair)."""
    torch.manual_seed(5)
    if case == "only_empty":
        params = [torch.zeros(0, 3, device=device())]
        meta = torch.tensor([[0, 3, 7, 0, 0, 7, 0, 0, 1, 0, 0]])
    else:
        params = [torch.randn(4, 3, device=device()), torch.zeros(0, 3, device=device(),
                                                                  dtype=torch.bfloat16)]
        meta = torch.tensor([[4, 3, 0, 1, 0, 4, 0, 1, 4, 0, 0], [0, 3, 7, 0, 0, 7, 0, 0, 1, 0, 0]])
    grads = [torch.randn_like(p) for p in params]
    fac = torch.rand(8, device=device()) + 0.5
    hyper = [(0.1, 0.9, 0.01, 1e-3)] * len(params)
    uploads = []
    if backend_name(kernel_ops) == "triton":
        upload = importlib.import_module("fisher_kernels.fused_step")._upload
        _triton_step(monkeypatch, _TABLES={},
                     _upload=lambda t, dev: uploads.append(tuple(t.shape)) or upload(t, dev))
        if steps_on == "host":
            _host_steps(monkeypatch)
    where = device() if steps_on == "device" else "cpu"
    want = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    got = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    tw = [torch.tensor(float(k)) for k in range(len(params))]
    tg = [torch.tensor(float(k), device=where) for k in range(len(params))]
    for _ in range(2):
        reference.fused_step(want[0], grads, want[1], tw, fac, meta, hyper, False)
        kernel_ops.fused_step(got[0], grads, got[1], tg, fac, meta, hyper, False)
        assert [t.item() for t in tg] == [t.item() for t in tw]
        for w, g in zip(want[0] + want[1], got[0] + got[1]):
            scale = w.abs().max().item() if w.numel() else 0.0
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * scale)
    assert [t.item() for t in tg] == [2.0 + k for k in range(len(params))]
    if case == "only_empty":
        assert uploads == []


def _bias_correction_cases():
    """(beta, t) with x = t ln beta log-spaced from -1e-4 to -40, and just either side of every
    rounding boundary (k + 1/2) ln 2 of the Triton kernel's x = n ln 2 + r (n = 0 to -57, where
    |r| is largest: the Taylor terms matter most, and 2^n e^r's share of 1 - beta^t the most)."""
    ln2 = math.log(2)
    xs = [-(10.0 ** e) for e in torch.linspace(-4, math.log10(40), 120).tolist()]
    xs += [-(k + 0.5) * ln2 + d for k in range(58) for d in (-1e-4, 1e-4)]
    ts = (1, 7, 1000, 999_999)          # float32 step counts, exact
    return [(math.exp(x / ts[i % 4]), ts[i % 4]) for i, x in enumerate(xs)]


@pytest.mark.parametrize("steps_on", ["device", "host"])
def test_fused_step_bias_correction(kernel_ops, steps_on, monkeypatch):
    """m / (1 - beta^t) for beta near 1 against a float64 oracle, to 3e-7 relative: with p = 0,
    lr = 1, no weight decay and F = 1, the new p is -m_hat exactly, m the new momentum the kernel
    stored.  1 - beta^t rounded from a float32 beta^t would lose 6e-8 / (1 - beta^t): 1.3e-5 at
    beta = 0.999, t = 1.  NOTE: [bias correction] in fisher_kernels/fused_step.py measured 1.6e-7
    for 1 - beta^t; m * (1 / bc) rounds twice more (measured here: at most 1.8e-7 interpreted,
    1.3e-7 emulated CUDA).  A term of the Taylor series or of ln 2's split off by 1e-7 fails."""
    torch.manual_seed(6)
    cases = _bias_correction_cases()
    n = 3
    params = [torch.zeros(n, device=device()) for _ in cases]
    grads = [torch.randn(n, device=device()) for _ in cases]
    moms = [torch.randn(n, device=device()) * 0.1 for _ in cases]
    fac = torch.ones(1, device=device())
    meta = torch.tensor([[n, 1, 0, 0, 0, 0, 0, 0, n, 0, 0]] * len(cases))       # F = 1 * 1 + 0
    hyper = [(1.0, beta, 0.0, 0.0) for beta, _ in cases]
    if steps_on == "host" and backend_name(kernel_ops) == "triton":
        _host_steps(monkeypatch)
    where = device() if steps_on == "device" else "cpu"
    steps = [torch.tensor(t - 1.0, device=where) for _, t in cases]
    kernel_ops.fused_step(params, grads, moms, steps, fac, meta, hyper, False)
    for (beta, t), p, m, st in zip(cases, params, moms, steps):
        assert st.item() == t
        m_hat = m.double() / (1.0 - beta ** t)
        torch.testing.assert_close(-p.double(), m_hat, rtol=3e-7, atol=0.0,
                                   msg=lambda e: f"beta={beta}, t={t}: {e}")


def test_fused_step_strided_fac(kernel_ops):
    """A fac that is a strided view (every other entry of a buffer) is read where its entries are,
    as the reference reads it: the update equals the reference's."""
    torch.manual_seed(7)
    base = torch.rand(28, device=device()) + 0.5
    fac = base[::2]
    meta = torch.tensor([[5, 8, 0, 1, 0, 5, 0, 1, 5, 0, 0]])       # S'[row] * H'[col], a Linear's
    p, g = torch.randn(5, 8, device=device()), torch.randn(5, 8, device=device())
    hyper = [(0.1, 0.9, 0.0, 1e-3)]
    pw, mw, tw = p.clone(), torch.zeros_like(p), [torch.tensor(0.0)]
    reference.fused_step([pw], [g], [mw], tw, fac, meta, hyper, False)
    pg, mg, tg = p.clone(), torch.zeros_like(p), [torch.tensor(0.0, device=device())]
    kernel_ops.fused_step([pg], [g], [mg], tg, fac, meta, hyper, False)
    torch.testing.assert_close(pg, pw, rtol=1e-6, atol=1e-6 * pw.abs().max().item())
    torch.testing.assert_close(mg, mw, rtol=1e-6, atol=1e-6 * mw.abs().max().item())
    assert tg[0].item() == 1.0

def _layouts_problem():
    """(p, g, m) triples in the layouts of NOTE: [row transpose] with meta rows like layers.py's:
    channels_last Conv2d weights (one block; several blocks with grouped-conv H), a
    channels_last_3d Conv3d weight, a factor-free channels_last weight, and a channels_last weight
    whose gradient is contiguous."""
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    specs = [  # shape, meta row, memory format of p and m, of g
        ((5, 3, 3, 3), (5, 27, 0, 1, 0, 5, 0, 1, 5, 0, 0), cl, cl),
        ((40, 6, 3, 3), (40, 54, 32, 1, 0, 72, 0, 1, 20, 54, 0), cl, cl),  # 2 groups, 2160 elements
        ((4, 3, 2, 2, 3), (4, 36, 180, 1, 0, 184, 0, 1, 4, 0, 0), cl3, cl3),
        ((6, 4, 2, 2), (96, 1, 220, 0, 0, 220, 0, 0, 96, 0, 0), cl, cl),   # factor-free
        ((3, 2, 2, 2), (3, 8, 0, 1, 0, 5, 0, 1, 3, 0, 0), cl, torch.contiguous_format),
    ]
    fac = torch.cat([torch.rand(220, device=device()) + 0.1, torch.ones(1, device=device())])
    meta = torch.tensor([m for _, m, _, _ in specs], dtype=torch.int64)
    params = [torch.randn(s, device=device()).to(memory_format=f) for s, _, f, _ in specs]
    grads = [torch.randn(s, device=device()).to(memory_format=f) for s, *_, f in specs]
    moms = [torch.randn_like(p) * 0.1 for p in params]      # preserve_format, as the optimizer's
    return params, grads, moms, fac, meta


def test_meta_token_remembers_each_optimizers_rows(monkeypatch):
    """Two optimizers stepping in turn (a GAN's generator and discriminator) pass their own meta
    tensors: each is read once, not at every step; a tensor changed in place is read again."""
    reads = []

    class Counting(dict):
        def get(self, key, default=None):
            reads.append(key)
            return super().get(key, default)

    monkeypatch.setattr(kernel_host, "_META_SEEN", {})
    monkeypatch.setattr(kernel_host, "_META_TOKENS", Counting())
    a, b = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    tokens = [kernel_host.meta_token(m) for m in (a, b) * 5]
    assert len(reads) == 2 and tokens == tokens[:2] * 5 and tokens[0] != tokens[1]
    a[0, 0] = 3
    a[0, 1] = 4
    assert kernel_host.meta_token(a) == tokens[1] and len(reads) == 3


def test_row_transpose():
    """kernel_host.row_transpose against the layouts it is defined by (NOTE: [row transpose])."""
    params, grads, moms, _, meta = _layouts_problem()
    rows = meta.tolist()
    assert [kernel_host.row_transpose(r, *t) for r, *t in zip(rows, params, grads, moms)] == \
        [3, 6, 3, 1, 0]
    tr, g = kernel_host.layout(4, params[4], grads[4], moms[4], meta, kernel_host.meta_token(meta))
    assert tr == 2 and g.stride() == params[4].stride() and torch.equal(g, grads[4])
    w = torch.randn(4, 3, 3, 3)
    assert kernel_host.row_transpose(rows[0], w, w, w) == 1
    t = torch.randn(3, 3, 3, 4).permute(3, 2, 1, 0)       # dense but not channels_last: copied
    assert kernel_host.row_transpose((4, 27, 0, 1, 0, 4, 0, 1, 4, 0, 0), t, t, t) == 0
    e = torch.randn(4, 6, 3, 3)[:, ::2]                    # not dense: copied even factor-free
    assert kernel_host.row_transpose((36, 1, 9, 0, 0, 9, 0, 0, 36, 0, 0), e, e, e) == 0


@pytest.mark.parametrize("row", [
    (5, 7, 0, 1, 0, 5, 0, 1, 5, 0, 0),         # Linear: S by row, H by column
    (4, 6, 13, 1, 0, 17, 0, 1, 2, 7, 0),       # grouped conv: H per group of 2 rows
    (4, 9, 0, 1, 0, 4, 0, 1, 1, 9, 0),         # depthwise conv: a group a row
    (6, 10, 0, 1, 0, 12, 0, 1, 2, 10, 0),      # transposed conv (layers.cross_matrix_map)
    (3, 4, 20, 0, 1, 57, 1, 0, 3, 0, 0),       # Embedding: H by row, S by column
    (5, 3, 0, 1, 0, 10, 0, 1, 2, 3, 0),        # a shard ending inside a group: 2 does not divide 5
    (5, 3, 0, 1, 0, 10, 0, 1, 3, 3, 2),        # a shard starting at row 2 of a group of 3
    (6, 3, 0, 1, 0, 10, 0, 1, 3, 3, 1),        # one from row 1, as many rows as 2 groups
    (2, 3, 0, 1, 0, 10, 0, 1, 3, 3, 0),        # a shard of fewer rows than a group
    (4, 1, 69, 0, 0, 69, 0, 0, 4, 0, 0),       # factor-free
    (0, 3, 0, 1, 0, 5, 0, 1, 1, 0, 0)])        # zero-size
@pytest.mark.parametrize("fac_step", [1, 2])
def test_fisher_diag_reads_the_param_map(row, fac_step):
    """reference.fisher_diag (strided views of fac) against NOTE: [param map]'s two indices read
    element by element, on a fac that is a slice of a larger buffer (a nonzero storage offset);
    every other entry of one (fac_step 2) takes the index path (reference.map_indices) for all."""
    k = fac_step
    fac = (torch.rand(80 * k, dtype=torch.float64) + 0.5)[5 * k:75 * k:k]
    rows, cols, s_off, s_r, s_c, h_off, h_r, h_c, h_gr, h_gs, h_ph = row
    want = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            want[r, c] = (fac[s_off + r * s_r + c * s_c]
                          * fac[h_off + r * h_r + c * h_c + ((r + h_ph) // h_gr) * h_gs] + 1e-3)
    torch.testing.assert_close(reference.fisher_diag(fac, row, 1e-3), want, rtol=0, atol=0)


@pytest.mark.parametrize("wide", [False, True])
def test_fused_step_memory_layouts(kernel_ops, wide, monkeypatch):
    """channels_last parameters (NOTE: [row transpose]) are updated by the kernel in place: two
    steps equal the reference's on contiguous copies, with neither the reference nor a contiguous
    copy of p/g/m involved, and p/m keep their layouts; a gradient whose strides differ from its
    parameter's is read through a copy in the parameter's layout.  wide=True: the Triton
    kernel's 64-bit division path (as in test_fused_step_blocks_across_rows) transposes too."""
    if wide:
        if backend_name(kernel_ops) != "triton":
            pytest.skip("the 64-bit division switch is the Triton kernel's")
        _triton_step(monkeypatch, I32_LIMIT=1)
    torch.manual_seed(4)
    params, grads, moms, fac, meta = _layouts_problem()
    hyper = [(1e-2, 0.9, 0.1, 1e-3)] * len(params)
    want = ([p.contiguous() for p in params], [m.contiguous() for m in moms],
            [torch.tensor(0.0) for _ in params])
    for _ in range(2):
        reference.fused_step(want[0], [g.contiguous() for g in grads], want[1], want[2], fac, meta,
                             hyper, False)

    copies = []
    real_contiguous = torch.Tensor.contiguous

    def contiguous(t, *a, **k):
        if not t.is_contiguous(*a, **k):
            copies.append(tuple(t.shape))
        return real_contiguous(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    monkeypatch.setattr(reference, "fused_step", None)     # the kernel must take every parameter
    steps = [torch.tensor(0.0, device=device()) for _ in params]
    got = [p.clone() for p in params], [m.clone() for m in moms]    # clone keeps the layout
    for _ in range(2):
        kernel_ops.fused_step(got[0], grads, got[1], steps, fac, meta, hyper, False)
    assert copies == []
    for w, g, p in zip(want[0] + want[1], got[0] + got[1], params + moms):
        assert g.stride() == p.stride()
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * w.abs().max().item())
    assert [t.item() for t in steps] == [2.0] * len(params)


@pytest.mark.parametrize("wide,chunked", [(False, False), (True, False), (False, True),
                                          (True, True)])
@pytest.mark.parametrize("dtype,rtol", DTYPES[:2])
def test_fused_step_blocks_across_rows(kernel_ops, wide, chunked, dtype, rtol, monkeypatch):
    """Parameters of several kernel blocks whose rows and groups straddle block boundaries, so
    each block starts mid-row and mid-group (NOTE: [row division] in fisher_kernels/fused_step.py;
    Triton's blocks are 1024 float32 or 2048 bfloat16 elements); wide=True forces the Triton
    kernel's 64-bit per-element division path, chunked=True its programs to step two blocks each
    (NOTE: [chunk size]): a chunk of two full blocks, then one of a ragged block that starts
    mid-row and mid-group."""
    if wide or chunked:
        if backend_name(kernel_ops) != "triton":
            pytest.skip("the 64-bit division and chunk size switches are the Triton kernel's")
        _triton_step(monkeypatch, **({"I32_LIMIT": 1} if wide else {}),
                     **({"TARGET_PROGRAMS": 1, "MAX_CHUNK_BLOCKS": 2} if chunked else {}))
    torch.manual_seed(2)
    specs = [((300, 7), (300, 7, 0, 1, 0, 300, 0, 1, 30, 7, 0)),      # grouped-conv H: 10 groups
             ((290, 7), (290, 7, 0, 1, 0, 300, 0, 1, 30, 7, 17)),     # a shard from row 17 of one
             ((3, 1000), (3, 1000, 370, 1, 0, 373, 0, 1, 3, 0, 0)),    # rows longer than a block
             ((250, 9), (250, 9, 1373, 0, 1, 1382, 1, 0, 250, 0, 0)),  # Embedding: H by row
             ((400, 9), (400, 9, 1632, 1, 0, 2032, 0, 1, 1, 9, 0))]    # depthwise: a group a row
    fac = torch.rand(5632, device=device()) + 0.1
    meta = torch.tensor([m for _, m in specs], dtype=torch.int64)
    params = [torch.randn(s, device=device()).to(dtype) for s, _ in specs]
    grads = [torch.randn(s, device=device()).to(dtype) for s, _ in specs]
    hyper = [(1e-2, 0.9, 0.1, 1e-3)] * len(specs)
    want = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    got = [p.clone() for p in params], [torch.zeros_like(p) for p in params]
    reference.fused_step(*want[:1], grads, want[1], [torch.tensor(0.0) for _ in specs], fac, meta,
                         hyper, False)
    kernel_ops.fused_step(*got[:1], grads, got[1], [torch.tensor(0.0) for _ in specs], fac, meta,
                          hyper, False)
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_fused_step_gpu_1e8(kernel_ops, dtype, rtol):
    """A 1e8-element parameter set: a 4096x4096 Linear, many small tensors, one odd-sized one;
    step counts on the GPU, which ~10^5 programs per launch read before the last one increments
    them (NOTE: [step tickets]): after 20 steps every count is 20."""
    torch.manual_seed(0)
    shapes = [(4096, 4096)] * 5 + [(4097,)] * 64 + [(1000, 17137)] + [(0,)]
    n_fac = 4096 * 2 + 2
    rows = []
    for s in shapes:
        r, c = (s[0], s[1]) if len(s) == 2 else (s[0], 1)
        if s == (4096, 4096):
            rows.append((r, c, 0, 1, 0, 4096, 0, 1, r, 0, 0))
        else:
            rows.append((r * c, 1, n_fac, 0, 0, n_fac, 0, 0, max(r * c, 1), 0, 0))
    params = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    grads = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    moms = [torch.zeros(s, device="cuda").to(dtype) for s in shapes]
    fac = torch.cat([torch.rand(n_fac, device="cuda"), torch.ones(1, device="cuda")])
    meta = torch.tensor(rows, dtype=torch.int64)
    hyper = [(1e-3, 0.9, 0.01, 1e-3)] * len(shapes)
    pw, mw = [p.clone() for p in params], [m.clone() for m in moms]
    tw, tg = [torch.tensor(0.0) for _ in shapes], [torch.tensor(0.0, device="cuda") for _ in shapes]
    reference.fused_step(pw, grads, mw, tw, fac, meta, hyper, True)
    kernel_ops.fused_step(params, grads, moms, tg, fac, meta, hyper, True)
    for a, b in zip(params + moms, pw + mw):
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)
    for _ in range(19):
        kernel_ops.fused_step(params, grads, moms, tg, fac, meta, hyper, True)
    assert torch.stack(tg).tolist() == [20.0] * len(shapes)


@pytest.mark.gpu
def test_fused_step_two_streams(kernel_ops):
    """Two optimizers' steps running at once on two streams (step counts on the GPU): each launch
    takes tickets on its own counter (NOTE: [step tickets], NOTE: [step tables] in
    csrc/bindings.cpp), so after 30 steps every count is 30 and each side equals its own run on one
    stream.  With one counter per device the launches took each other's tickets."""
    torch.manual_seed(0)
    n_fac, shape = 2, (256, 65536)          # 1024 chunks / 16384 programs per launch: they overlap
    meta = torch.tensor([(shape[0] * shape[1], 1, n_fac, 0, 0, n_fac, 0, 0, shape[0] * shape[1], 0,
                          0)],
                        dtype=torch.int64)
    fac = torch.cat([torch.rand(n_fac, device="cuda"), torch.ones(1, device="cuda")])
    hyper = [(1e-3, 0.9, 0.0, 1e-3)]
    sides = [([torch.randn(shape, device="cuda")], [torch.randn(shape, device="cuda")],
              [torch.zeros(shape, device="cuda")], [torch.tensor(0.0, device="cuda")]) for _ in range(2)]
    alone = [tuple([t.clone() for t in lst] for lst in side) for side in sides]
    for p, g, m, t in alone:
        for _ in range(30):
            kernel_ops.fused_step(p, g, m, t, fac, meta, hyper, False)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(30):
        for s, (p, g, m, t) in zip(streams, sides):
            with torch.cuda.stream(s):
                kernel_ops.fused_step(p, g, m, t, fac, meta, hyper, False)
    torch.cuda.synchronize()
    for side, want in zip(sides, alone):
        assert side[3][0].item() == 30.0
        for a, b in zip(side[0] + side[2], want[0] + want[2]):
            assert torch.equal(a, b)


def test_triton_launch_while_capturing_keeps_its_tables(monkeypatch):
    """NOTE: [captured tables] A CUDA graph replays the addresses of the tables its fused_step
    launch was captured with, and the caches holding them evict their oldest entries: eight steps
    of another parameter set under an LR schedule (a hyper-parameter table each) freed a captured
    launch's pointer, step-address, ticket and hyper-parameter tables.  A launch while capturing
    keeps every table it was given.  (kernel_host.capturing stands for a capturing stream.)"""
    pytest.importorskip("triton")
    fs = importlib.import_module("fisher_kernels.fused_step")
    given = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: given.append(
                [weakref.ref(a) for a in args if isinstance(a, torch.Tensor)])

    _triton_step(monkeypatch, _fused_step_kernel=Recorder(), _TABLES={}, _CHUNKS={}, _HYPER={})
    monkeypatch.setattr(kernel_host, "_CAPTURED", {})
    fac = torch.ones(1)

    def param_set(n):          # one factor-free parameter (F = 1 + Lambda) and its meta rows
        return ([torch.randn(n)], [torch.randn(n)], [torch.zeros(n)], [torch.zeros(())]), \
            torch.tensor([[n, 1, 0, 0, 0, 0, 0, 0, n, 0, 0]])

    (captured, meta), (other, other_meta) = param_set(3000), param_set(500)
    hyper = [(torch.tensor(1e-3), 0.9, 0.0, 1e-3)]        # its lr-address table too
    fs.fused_step(*captured, fac, meta, hyper, True)       # eager warm-up
    monkeypatch.setattr(kernel_host, "capturing", lambda: True)
    fs.fused_step(*captured, fac, meta, hyper, True)       # the capture
    monkeypatch.setattr(kernel_host, "capturing", lambda: False)
    tables = given[-1]
    for k in range(2 * fs._MAX_TABLES):     # an LR schedule and zero_grad()'s new gradients
        other[1][0] = torch.randn(500)
        fs.fused_step(*other, fac, other_meta, [(1e-3 * (k + 1), 0.9, 0.0, 1e-3)], True)
    for cache in (fs._TABLES, fs._CHUNKS, fs._HYPER):     # whatever the churn left: gone too
        cache.clear()
    gc.collect()
    assert len(tables) == 10 and all(ref() is not None for ref in tables)


def test_both_steps_size_their_chunks_alike():
    """The Triton and CUDA steps split a launch into the same chunks (NOTE: [chunk size] in
    fisher_kernels/fused_step.py, [step chunks] in csrc/fused_step.cu): csrc's constants, read
    from launchers.h, are the Triton step's."""
    pytest.importorskip("triton")
    import re
    from pathlib import Path
    fs = importlib.import_module("fisher_kernels.fused_step")
    text = (Path(__file__).parents[1] / "csrc" / "launchers.h").read_text()

    def const(pattern):
        return int(re.search(pattern + r"\s+(\d+)", text)[1])

    assert const(r"#define AF_STEP_TARGET_PROGRAMS") == fs.TARGET_PROGRAMS
    assert const(r"kStepMaxChunkBlocks =") == fs.MAX_CHUNK_BLOCKS
    assert const(r"kStepBlockBytes =") == fs.BLOCK_BYTES == 32 * fs.NUM_WARPS * 16


def test_kernels_meta_columns_are_the_references():
    """csrc names a meta row's columns (launchers.h's MetaCol) in the order of the reference's
    META_COLS (NOTE: [param map]), then T: a column added on one side only fails here.  The
    Triton step loads them by position, in this order."""
    import re
    from pathlib import Path
    assert reference.META_COLS == ("rows", "cols", "s_off", "s_r", "s_c", "h_off", "h_r", "h_c",
                                   "h_gr", "h_gs", "h_ph")
    text = (Path(__file__).parents[1] / "csrc" / "launchers.h").read_text()
    body = re.sub(r"//[^\n]*", "", re.search(r"enum MetaCol : int \{(.*?)\};", text, re.S)[1])
    names = [e.split()[0] for e in body.split(",") if e.strip()]
    n = len(reference.META_COLS)
    assert [x[1:].lower() for x in names[:n]] == [c.replace("_", "") for c in reference.META_COLS]
    assert names[n:] == ["kMapCols", "kT", "kMetaCols"] and "kT = kMapCols" in body


@pytest.mark.parametrize("steps_on,chunk_blocks", [("device", 1), ("host", 1), ("device", 2)])
def test_triton_fused_step_tables(monkeypatch, steps_on, chunk_blocks):
    """The host side of Triton's one launch (NOTE: [pointer tables]): the tables given to the
    launch cover every element of every parameter once, in chunks of one block, or of two when
    the launch has 2 * TARGET_PROGRAMS blocks or more (NOTE: [chunk size]), with its pointers,
    meta row, hyper-parameters and step count (the addresses of device steps, the incremented
    values of host steps); they are cached, an LR change uploads only the hyper-parameter table, and new
    gradient tensors or changed meta rows rebuild the pointer tables (NOTE: [step host path])."""
    pytest.importorskip("triton")
    fs = importlib.import_module("fisher_kernels.fused_step")
    launches, uploads = [], []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, args, kw))

    upload = fs._upload
    _triton_step(monkeypatch, _fused_step_kernel=Recorder(), _TABLES={}, _CHUNKS={}, _HYPER={},
                 _upload=lambda t, dev: uploads.append(tuple(t.shape)) or upload(t, dev))
    if steps_on == "host":
        _host_steps(monkeypatch)
    if chunk_blocks > 1:                        # 5 blocks: 5 per target program, at most 2
        _triton_step(monkeypatch, TARGET_PROGRAMS=1, MAX_CHUNK_BLOCKS=2)
    block = fs.block_size(torch.float32)        # 16 bytes a thread: 1024 (NOTE: [chunk size])
    store = torch.randn(2 * block + 10)
    params = [torch.randn(5, 7), store[: 2 * block + 9], torch.randn(1), torch.randn(0)]
    n1 = 2 * block + 9
    meta = torch.tensor([[5, 7, 0, 1, 0, 5, 0, 1, 5, 0, 0], [n1, 1, 0, 0, 0, 0, 0, 0, n1, 0, 0],
                         [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0]])
    moms = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(float(k)) for k in (0, 4, 9, 2)]
    fac = torch.rand(16)
    hyper = [(1e-3, 0.9, 0.0, 1e-3), (2e-3, 0.8, 1e-2, 1e-3), (1e-3, 0.95, 0.0, 0.0),
             (1e-3, 0.9, 0.0, 1e-3)]

    def step(grads, hyper):
        launches.clear()
        uploads.clear()
        fs.fused_step(params, grads, moms, steps, fac, meta, hyper, True)
        assert len(launches) == 1
        (grid,), args, kw = launches[0]
        return grid, args, kw

    grads = [torch.randn_like(p) for p in params]
    grid, args, kw = step(grads, hyper)
    (chunk_param, chunk_start, chunk, ptrs, numels, mrows, hyp, _, step_table, n_steps, ticket,
     fac_arg, found_inf) = args
    assert fac_arg is fac and not kw["LR_PTRS"] and found_inf is None and not kw["FOUND_INF"]
    assert chunk == chunk_blocks * block
    starts = {}
    for b in range(grid):
        starts.setdefault(int(chunk_param[b]), []).append(int(chunk_start[b]))
    assert sorted(starts) == [0, 1, 2]                                # the empty one has no chunk
    for i, p in enumerate(params[:3]):
        assert sorted(starts[i]) == list(range(0, p.numel(), chunk))
        assert ptrs[i].tolist() == [p.data_ptr(), grads[i].data_ptr(), moms[i].data_ptr()]
        assert int(numels[i]) == p.numel()
        assert mrows[i, :fs.COL["magics"]].tolist() == meta[i].tolist() + [1]
        _assert_divides(mrows[i], cols=1, T=11, h_gr=8)
        lr, beta, wd, lam = hyper[i]
        want = torch.tensor([lr, beta, 1 - beta, wd, lam, math.log(beta)])
        torch.testing.assert_close(hyp[i], want)
    assert n_steps == 4 and ticket.tolist() == [0] and kw["DEVICE_STEPS"] == (steps_on == "device")
    if steps_on == "device":       # addresses, the kernel increments (the empty one's too)
        assert step_table.tolist() == [t.data_ptr() for t in steps]
        assert [t.item() for t in steps] == [0.0, 4.0, 9.0, 2.0]
    else:                          # incremented here, the values uploaded
        assert step_table.tolist() == [1.0, 5.0, 10.0]
        assert [t.item() for t in steps] == [1.0, 5.0, 10.0, 3.0]
    assert kw["DECOUPLED"] and not kw["WIDE"] and kw["ALIGNED"]
    tables = [(grid,), (grid,), (3, 3), (3,), (3, fs.N_META), (3, 6)]
    assert sorted(uploads) == sorted(tables + [(4,) if steps_on == "device" else (3,)])

    _, args, _ = step(grads, hyper)                                   # same tensors: no upload
    assert uploads == ([] if steps_on == "device" else [(3,)]) and args[6] is hyp
    halved = [(lr / 2, *rest) for lr, *rest in hyper]                 # an LR schedule
    _, args, _ = step(grads, halved)
    assert (3, 6) in uploads and (3, 3) not in uploads and args[3] is ptrs
    torch.testing.assert_close(args[6][:, 0], hyp[:, 0] / 2)
    _, args, _ = step([g.clone() for g in grads], hyper)              # new gradient tensors:
    assert (3, 3) in uploads and args[3] is not ptrs and args[6] is hyp   # new pointers only
    assert args[0] is chunk_param and args[1] is chunk_start and args[10] is not ticket

    lr_t = torch.tensor(3e-3)                               # NOTE: [tensor lr]: its address
    _, args, kw = step(grads, [(lr_t, *hyper[0][1:])] + hyper[1:])
    assert kw["LR_PTRS"] and args[7].tolist() == [lr_t.data_ptr(), 0, 0]
    assert args[6][0, 0] == 0 and args[6][1, 0] == hyper[1][0]    # its row's lr is unused
    lr_t.fill_(1e-3)                                        # a scheduler's update: nothing new
    _, again, _ = step(grads, [(lr_t, *hyper[0][1:])] + hyper[1:])
    assert again[7] is args[7] and again[6] is args[6] and again[3] is args[3]
    assert uploads == ([] if steps_on == "device" else [(3,)])

    params[1] = store[1: 2 * block + 10]                 # a 4-byte offset: no 16-byte loads
    moms[1] = torch.zeros_like(params[1])
    grads = [torch.randn_like(p) for p in params]
    _, _, kw = step(grads, hyper)
    assert not kw["ALIGNED"]
    meta[0, 5] = 6                                          # meta rows changed in place
    _, args, _ = step(grads, hyper)
    assert uploads.count((3, fs.N_META)) == 1
    assert args[5][0, :fs.COL["magics"]].tolist() == meta[0].tolist() + [1]


def _quotient_edges(d: int) -> set:
    """Dividends 0 <= n < 2^31 where n // d steps (k d - 1, k d) for the first and the last
    quotients, where a magic multiplier's error is largest, and 2^31 - 1."""
    top = 2 ** 31 - 1
    ks = {1, 2, 3, top // d - 1, top // d}
    return {n for k in ks for n in (k * d - 1, k * d) if 0 <= n <= top} | {0, top}


def _assert_divides(row, **cols):
    """The (m, s) pairs after a Triton meta row's T (columns 12-17, NOTE: [magic division]) divide
    by the row's cols, T and h_gr (at the columns named) as integer division does."""
    for k, at in enumerate(cols.values()):
        d, m, s = max(int(row[at]), 1), int(row[12 + 2 * k]), int(row[13 + 2 * k])
        assert all((n * m) >> s == n // d for n in _quotient_edges(d)), (d, m, s)


def test_magic_division():
    """NOTE: [magic division]: n // d is (n * m) >> s with a 32-bit m for every dividend below
    2^31, checked at the quotient steps and on random dividends, for every divisor up to 4096,
    powers of two and their neighbours, and the largest divisor the kernel takes (I32_LIMIT - 1)."""
    pytest.importorskip("triton")
    fs = importlib.import_module("fisher_kernels.fused_step")
    gen = torch.Generator().manual_seed(0)
    divisors = set(range(1, 4097)) | {2 ** e + k for e in range(12, 31) for k in (-1, 0, 1)}
    divisors |= {641, 6700417, 3 * 2 ** 29 - 1, fs.I32_LIMIT - 1}
    for d in sorted(divisors):
        m, s = fs.magic(d)
        assert 0 < m < 2 ** 32
        rand = torch.randint(0, 2 ** 31, (8,), generator=gen).tolist()
        for n in _quotient_edges(d) | set(rand):
            assert (n * m) >> s == n // d, (n, d)


def test_magic_division_in_the_kernel(monkeypatch):
    """The kernel's side of NOTE: [magic division] (``_div``) on int32 dividends up to 2^31 - 1,
    run by Triton (the interpreter on the CPU)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    fs = importlib.import_module("fisher_kernels.fused_step")
    monkeypatch.setitem(globals(), "_kernel_div", fs._div)     # a kernel sees its module's names

    @triton.jit
    def divide(n_ptr, out_ptr, m, s, N: tl.constexpr):
        j = tl.arange(0, N)
        tl.store(out_ptr + j, _kernel_div(tl.load(n_ptr + j), m, s))  # noqa: F821

    for d in (1, 3, 1000, 2 ** 24 + 1, fs.I32_LIMIT - 1):
        n = sorted(_quotient_edges(d))
        n = torch.tensor(n + [n[-1]] * (16 - len(n)), dtype=torch.int32, device=device())
        out = torch.empty_like(n)
        divide[(1,)](n, out, *fs.magic(d), N=16)
        assert out.tolist() == [k // d for k in n.tolist()], d


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_step_no_decay_term_without_weight_decay(kernel_ops, decoupled):
    """weight_decay = 0 adds no decay term: an inf parameter element keeps a finite momentum and
    stays inf, as in the reference (0 * inf would be NaN; NOTE: [no decay term])."""
    p = torch.tensor([float("inf"), 1.0, -float("inf"), 2.0], device=device())
    g = torch.tensor([0.5, 0.5, 0.0, 1.0], device=device())
    meta = torch.tensor([[4, 1, 0, 0, 0, 0, 0, 0, 4, 0, 0]])
    fac = torch.ones(1, device=device())
    out = {}
    for name, ops in (("ref", reference), ("kernel", kernel_ops)):
        pp, mm = p.clone(), torch.zeros(4, device=device())
        ops.fused_step([pp], [g.clone()], [mm], [torch.zeros(())], fac, meta, [(1e-2, 0.9, 0.0, 1e-3)],
                       decoupled)
        out[name] = (pp, mm)
    assert not out["kernel"][1].isnan().any() and not out["kernel"][0].isnan().any()
    torch.testing.assert_close(out["kernel"][0], out["ref"][0])
    torch.testing.assert_close(out["kernel"][1], out["ref"][1])


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_fused_step_tensor_lr(kernel_ops, dtype, rtol):
    """A tensor lr (NOTE: [tensor lr] in kernel_host.py) updated in place between steps, as an LR
    scheduler does: every step uses its value then, as a float lr of that value would; a float32
    lr on the kernels' device is read by the kernel (a cached table holds its address), a float64
    one of shape (1,) on the CPU by value; the other parameters keep float lrs."""
    torch.manual_seed(0)
    params, grads, moms, fac, meta, _ = _problem(dtype)
    read, by_value = torch.zeros((), device=device()), torch.zeros(1, dtype=torch.float64)
    want = ([p.clone() for p in params], [m.clone() for m in moms])
    got = ([p.clone() for p in params], [m.clone() for m in moms])
    steps = ([torch.zeros(()) for _ in params], [torch.zeros((), device=device()) for _ in params])
    for lr_a, lr_b in ((1 / 64, 3 / 256), (0.0, 1 / 32), (5 / 128, 1 / 8)):   # float32-exact
        read.fill_(lr_a)
        by_value.fill_(lr_b)
        lrs = [lr_a] * 3 + [lr_b] * 2 + [1e-2] * 5
        reference.fused_step(want[0], grads, want[1], steps[0], fac, meta,
                             [(lr, 0.9, 0.1, 1e-3) for lr in lrs], False)
        kernel_ops.fused_step(got[0], grads, got[1], steps[1], fac, meta,
                              [(read, 0.9, 0.1, 1e-3)] * 3 + [(by_value, 0.9, 0.1, 1e-3)] * 2
                              + [(1e-2, 0.9, 0.1, 1e-3)] * 5, False)
        for w, g in zip(want[0] + want[1], got[0] + got[1]):
            scale = w.abs().max().item() if w.numel() else 0.0
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            a.copy_(b)


@pytest.mark.parametrize("lr,exc,pattern", [
    (torch.zeros(2), TypeError, r"parameter 0: a tensor lr must be one floating-point element"),
    (torch.zeros((), dtype=torch.int64), TypeError, "one floating-point element"),
    (torch.zeros((), requires_grad=True), TypeError, "requiring grad"),
])
def test_fused_step_bad_tensor_lr_changes_nothing(kernel_ops, lr, exc, pattern):
    p, g = torch.ones(3, device=device()), torch.ones(3, device=device())
    meta = torch.tensor([[3, 1, 0, 0, 0, 0, 0, 0, 3, 0, 0]])
    for ops in (reference, kernel_ops):
        m, t = torch.zeros(3, device=device()), torch.zeros(())
        with pytest.raises(exc, match=pattern):
            ops.fused_step([p], [g], [m], [t], torch.ones(1, device=device()), meta,
                           [(lr, 0.9, 0.0, 1e-3)], False)
        assert p.tolist() == [1.0] * 3 and m.tolist() == [0.0] * 3 and t.item() == 0


def _device_steps_for(ops, monkeypatch) -> None:
    """The emulated CUDA binding takes CPU step counts for the host's unless told (NOTE: [CUDA
    emulator])."""
    if ops is not reference and backend_name(ops) == "cuda" and emulated("cuda"):
        monkeypatch.setenv("ADAFISHER_EMU_DEVICE_STEPS", "1")


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_fused_step_found_inf(kernel_ops, dtype, rtol, monkeypatch):
    """GradScaler's found_inf, read on the device (NOTE: [GradScaler] in optimizer.py): non-zero
    (1, or 2 from two devices' checks), nothing changes, parameters, momenta and step counts (a
    dtype whose only parameter is zero-size too, which launches nothing); zero, the step is the
    one without found_inf.  The reference and the kernel alike."""
    _device_steps_for(kernel_ops, monkeypatch)
    torch.manual_seed(0)
    params, grads, moms, fac, meta, hyper = _problem(dtype)
    params.append(torch.zeros(0, 2, device=device()))                # only zero-size float32
    grads.append(torch.zeros(0, 2, device=device()))
    moms.append(torch.zeros(0, 2, device=device()))
    meta = torch.cat([meta, meta[-1:]])
    hyper = hyper + hyper[-1:]
    for ops in (reference, kernel_ops):
        state = ([p.clone() for p in params], [m.clone() for m in moms],
                 [torch.tensor(float(i), device=device()) for i in range(len(params))])
        before = [t.clone() for ts in state for t in ts]
        for flag in (1.0, 2.0):
            ops.fused_step(state[0], grads, state[1], state[2], fac, meta, hyper, False,
                           torch.tensor(flag, device=device()))
            assert all(torch.equal(a, b) for a, b in zip([t for ts in state for t in ts], before))
        want = tuple([t.clone() for t in ts] for ts in state)
        reference.fused_step(want[0], grads, want[1], want[2], fac, meta, hyper, False)
        ops.fused_step(state[0], grads, state[1], state[2], fac, meta, hyper, False,
                       torch.zeros((), device=device()))
        for w, g in zip(want[0] + want[1], state[0] + state[1]):
            scale = w.abs().max().item() if w.numel() else 0.0
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)
        assert [t.item() for t in state[2]] == [t.item() for t in want[2]]
        assert [t.item() for t in state[2]] == [i + 1.0 for i in range(len(params))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fused_step_device_steps_whatever_order_blocks_finish(kernel_ops, seed, monkeypatch):
    """Step counts on the device: the last block to finish increments them, after every block has
    read them (the ticket: NOTE: [step chunks] in csrc/fused_step.cu).  Emulated CUDA blocks run
    in shuffled orders here (ADAFISHER_EMU_BLOCK_ORDER; by default the emulator runs them in
    reverse, so block 0 is always last), over a parameter of four chunks: a kernel that let a
    fixed block increment them gave the blocks after it the next step's bias correction."""
    _device_steps_for(kernel_ops, monkeypatch)
    monkeypatch.setenv("ADAFISHER_EMU_BLOCK_ORDER", f"shuffle:{seed}")
    torch.manual_seed(seed)
    n, n_fac = 3 * 16384 + 5, 4
    shapes = [(n,), (7,)]
    meta = torch.tensor([(k, 1, n_fac, 0, 0, n_fac, 0, 0, k, 0, 0) for (k,) in shapes])
    fac = torch.cat([torch.rand(n_fac, device=device()), torch.ones(1, device=device())])
    hyper = [(1e-2, 0.9, 0.1, 1e-3)] * len(shapes)
    got = ([torch.randn(s, device=device()) for s in shapes],
           [torch.zeros(s, device=device()) for s in shapes],
           [torch.zeros((), device=device()) for _ in shapes])
    want = tuple([t.clone() for t in ts] for ts in got)
    for step in range(1, 4):
        grads = [torch.randn(s, device=device()) for s in shapes]
        reference.fused_step(want[0], grads, want[1], want[2], fac, meta, hyper, False)
        kernel_ops.fused_step(got[0], grads, got[1], got[2], fac, meta, hyper, False)
        assert [t.item() for t in got[2]] == [float(step)] * len(shapes)
        for w, g in zip(want[0] + want[1], got[0] + got[1]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def test_fused_step_found_inf_refused_where_it_cannot_be_read_on_the_device(kernel_ops,
                                                                            monkeypatch):
    """found_inf skips on the device, so the step counts must be there: step counts elsewhere, a
    found_inf that is not one float32 element, are refused before anything changes."""
    torch.manual_seed(0)
    params, grads, moms, fac, meta, hyper = _problem(torch.float32)
    steps = [torch.zeros((), device=device()) for _ in params]
    before = [t.clone() for t in params + moms + steps]
    flag = torch.zeros((), device=device())
    for ops in (reference, kernel_ops):
        with pytest.raises(ValueError, match="found_inf must be one float32 element"):
            ops.fused_step(params, grads, moms, steps, fac, meta, hyper, False, flag.double())
        with pytest.raises(ValueError, match="found_inf is on meta and the step count of "
                                             "parameter 0 on"):
            ops.fused_step(params, grads, moms, steps, fac, meta, hyper, False,
                           torch.zeros((), device="meta"))
    if backend_name(kernel_ops) == "triton":     # step counts the kernel would not increment
        _host_steps(monkeypatch)
        with pytest.raises(ValueError, match="found_inf needs the step counts as float32"):
            kernel_ops.fused_step(params, grads, moms, steps, fac, meta, hyper, False, flag)
    elif emulated("cuda"):                       # the emulated binding: CPU step counts
        with pytest.raises(RuntimeError, match="found_inf needs the step counts on the device"):
            kernel_ops.fused_step(params, grads, moms, steps, fac, meta, hyper, False, flag)
    assert all(torch.equal(a, b) for a, b in zip(params + moms + steps, before))


def _truncated_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """x to float32, then to bfloat16 rounded toward zero: the Triton interpreter's conversion
    (README, Tests: the GPU rounds to nearest)."""
    return (x.float().view(torch.int32) & -(1 << 16)).view(torch.float32).bfloat16()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("ops", ["reference", *kernel_backends()])
def test_fused_step_16bit_rounds_once(ops, dtype, decoupled):
    """The dtype rule (README): 16-bit parameters keep 16-bit p and m, and the arithmetic between
    is float32, rounded to 16 bits once, at the store: the bits of a float64 oracle from the same
    16-bit inputs rounded once.  The inputs keep every operation well conditioned (the terms of
    each sum of one sign, lr * update under a tenth of p) and beta = 7/8 makes the momentum's
    products exact, so float32 rounding cannot move a result across a 16-bit rounding boundary
    but in a double-rounding tie (none with this seed on the CPU; 3 of 12,000 allowed for a
    GPU's float32 order of operations).  Arithmetic in the 16-bit dtype (a third of the
    operations rounding to 16 bits) misses 85 to 2,200 of them.  Checked on the torch reference
    too, the kernels' oracle, which their other tests hold them to at 16-bit tolerances."""
    name, ops = ops, reference if ops == "reference" else kernel_module(ops)
    torch.manual_seed(11)
    rows, cols, lr, beta, wd, lam = 120, 100, 0.01, 0.875, 0.1, 1e-3
    fac = torch.rand(rows + cols, device=device()) * 0.4 + 0.7
    meta = torch.tensor([[rows, cols, 0, 1, 0, rows, 0, 1, rows, 0, 0]])      # a Linear's map
    sign = torch.randint(0, 2, (rows, cols), device=device()) * 2.0 - 1
    p = (sign * (1 + torch.rand(rows, cols, device=device()))).to(dtype)
    m = (sign * torch.rand(rows, cols, device=device()) * 0.3).to(dtype)
    g = (sign * torch.rand(rows, cols, device=device())).to(dtype)
    p64, m64, g64, f64 = p.double(), m.double(), g.double(), fac.double()
    m_want = beta * m64 + (1 - beta) * (g64 if decoupled else g64 + wd * p64)
    upd = m_want / (1 - beta) / (f64[:rows, None] * f64[rows:][None, :] + lam)
    p_want = p64 - lr * (upd + wd * p64 if decoupled else upd)
    ops.fused_step([p], [g], [m], [torch.zeros((), device=device())], fac, meta,
                   [(lr, beta, wd, lam)], decoupled)
    interpreted = name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    for got, want in ((p, p_want), (m, m_want)):
        want16 = (_truncated_bfloat16(want) if interpreted and dtype == torch.bfloat16
                  else want.to(dtype))
        differ = int((got != want16).sum())
        assert differ <= 3, f"{differ} of {got.numel()} elements differ"
        assert bool(((got.double() - want16.double()).abs()
                     <= torch.finfo(dtype).eps * want16.double().abs()).all())
