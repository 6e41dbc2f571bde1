"""layer_ema kernels against the torch reference on the LayerTables of real models (both presets),
over several statistics iterations, with layers not called, non-finite statistics and counters."""
import pytest
import torch
import torch.nn as nn

from adafisher_fast import AdaFisher, reference
from adafisher_fast.presets import PRESETS
from conftest import backend_name, device, emulated

pytestmark = [pytest.mark.filterwarnings("ignore:.*released code does not hook"),
              pytest.mark.filterwarnings("ignore:divide by zero")]   # interpreter: 1/count with count 0


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2),
                         nn.Flatten(), nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3, bias=False),
                         nn.Embedding(11, 3), nn.GroupNorm(2, 4), nn.Conv1d(4, 4, 3))


def _states(make_model, preset):
    """(FisherState, EMA rule, the reference's state, the kernel's copy) of a fresh optimizer."""
    torch.manual_seed(0)
    f = AdaFisher(make_model().to(device()), preset=preset, backend="torch").fisher
    # not ones: a factor's first update must not read its state, which a kernel that marked it
    # initialised before all its threads had read the flag would (the reference ignores it)
    f.state.uniform_(0.5, 2.0)
    want = [t.clone() for t in (f.state, f.fac, f.initialized, f.counters)]
    return f, PRESETS[preset].ema_rule(0.8), want, [t.clone() for t in want]


def _thread_orders(kernel_ops, monkeypatch):
    """Yields once, and on the emulated CUDA backend a second time with each block's threads in
    reverse order (a missing barrier shows; NOTE: [CUDA emulator])."""
    yield
    if emulated(backend_name(kernel_ops)):
        monkeypatch.setenv("ADAFISHER_EMU_THREAD_ORDER", "reverse")
        yield


def _step_both(kernel_ops, buf, table, want, got, rule):
    """One layer_ema of the reference and of the kernel; then state, fac (float, to float32
    rounding), initialized and counters (exact) must agree."""
    reference.layer_ema(buf, table, *want, rule)
    kernel_ops.layer_ema(buf, table, *got, rule)
    for w, g in zip(want, got):
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_layer_ema(kernel_ops, preset, monkeypatch):
    for _ in _thread_orders(kernel_ops, monkeypatch):
        f, rule, want, got = _states(_model, preset)
        n_acc = f.table.n_acc
        for it in range(4):
            buf = torch.rand_like(f.buf) * 3
            if it == 1:
                buf[n_acc] = 0                      # first factor's module not called
            if it == 2 and n_acc > 1:
                buf[1] = float("inf")               # a non-finite statistic: layer keeps its state
                buf[n_acc:] = 1.0                   # of a factor with one row (batch 1)
            if it == 3:
                buf[n_acc:] = torch.randint(1, 5, (buf.numel() - n_acc,)).to(buf)
            _step_both(kernel_ops, buf, f.table, want, got, rule)
        assert int(want[3][:, 1].sum()) >= 1        # the non-finite event was counted


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_layer_ema_writes_every_fac_entry(kernel_ops, preset, monkeypatch):
    """fac is derived from the state at every call (reference: ``fac[:-1].copy_``), also for the
    factors that take no update: a module never called, one called before but not now, a layer
    the guard skips.  The kernels write those in a walk of their own (NOTE: [ema block])."""
    for _ in _thread_orders(kernel_ops, monkeypatch):
        f, rule, want, got = _states(_model, preset)
        n_acc = f.table.n_acc
        for it in range(3):
            buf = torch.rand_like(f.buf) * 3
            buf[n_acc] = 0                          # never called: fac stays as derived
            if it == 1:
                buf[n_acc + 1] = 0                  # called before, not now
            if it == 2:
                buf[n_acc - 1] = float("inf")       # the last layer keeps its state
            for fac in (want[1], got[1]):
                fac[:-1] = float("nan")
            _step_both(kernel_ops, buf, f.table, want, got, rule)
            assert not want[1].isnan().any()
        assert want[2].tolist().count(False) == 1 and int(want[3][:, 1].sum()) == 1


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_layer_ema_found_inf(kernel_ops, preset):
    """GradScaler's found_inf, read on the device (NOTE: [GradScaler] in optimizer.py): non-zero
    (1, or 2 from two devices' checks), nothing changes, state, fac, initialized and counters, at
    the first statistics iteration and at a later one; zero, the call is the one without it.
    The reference and the kernel alike."""
    f, rule, want, got = _states(_model, preset)
    for it in range(3):
        buf = torch.rand_like(f.buf) * 3
        for ops, state in ((reference, want), (kernel_ops, got)):
            before = [t.clone() for t in state]
            for flag in (1.0, 2.0):
                ops.layer_ema(buf, f.table, *state, rule, torch.tensor(flag, device=device()))
                assert all(torch.equal(a, b) for a, b in zip(state, before))
        reference.layer_ema(buf, f.table, *want, rule)
        kernel_ops.layer_ema(buf, f.table, *got, rule, torch.zeros((), device=device()))
        for w, g in zip(want, got):
            if w.is_floating_point():
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(g, w)
    assert want[3][:, 0].tolist() == [3] * f.table.n_layers     # three calls took, none skipped
    with pytest.raises(ValueError, match="layer_ema: found_inf must be one float32 element"):
        kernel_ops.layer_ema(buf, f.table, *got, rule, torch.zeros((), dtype=torch.float64,
                                                                   device=device()))


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_layer_ema_small_statistics(kernel_ops, preset):
    """Statistics of 1e-3 and under (the paper preset's state is its first raw statistic): a
    factor's range is then ~1e-3, where min-max's 1e-6 (SPEC 2) is a thousandth of the scale,
    so a kernel's epsilon that differs from the reference's shows at rtol 1e-5 (ranges of ~3,
    as in the other tests, hide it)."""
    f, rule, want, got = _states(_model, preset)
    n_acc = f.table.n_acc
    for it in range(3):
        buf = torch.rand_like(f.buf) * 1e-3
        buf[n_acc:] = torch.randint(1, 5, (buf.numel() - n_acc,)).to(buf)
        _step_both(kernel_ops, buf, f.table, want, got, rule)


def test_layer_ema_factors_in_any_layer_order(kernel_ops):
    """A LayerTable may number its layers in any order: the kernels find a layer's factors through
    the CSR by layer (kernel_host.layer_factors), not by position."""
    f, rule, want, got = _states(_model, "paper")
    perm = torch.randperm(f.table.n_layers, device=f.table.factor_layer.device)
    assert perm.tolist() != sorted(perm.tolist())
    table = f.table._replace(factor_layer=perm[f.table.factor_layer].contiguous())
    for it in range(2):
        buf = torch.rand_like(f.buf) * 3
        if it == 1:
            buf[1] = float("inf")                   # one layer keeps its state: the guard's layer
        _step_both(kernel_ops, buf, table, want, got, rule)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_layer_ema_factors_longer_than_a_block(kernel_ops, preset):
    """Factors of several blocks of the kernels' loops (Triton's 1024 entries, NOTE: [ema block];
    CUDA's 1024 threads), a non-finite entry in a later block of one: raw sums, the guard, both
    min-maxes and the EMA walk every block."""
    f, rule, want, got = _states(
        lambda: nn.Sequential(nn.Linear(2500, 3), nn.ReLU(), nn.Linear(3, 2100)), preset)
    assert max((f.table.factor_start[1:] - f.table.factor_start[:-1]).tolist()) > 2048
    for it in range(3):
        buf = torch.rand_like(f.buf) * 3
        if it == 1:
            buf[2300] = float("inf")                # the first layer keeps its state
        _step_both(kernel_ops, buf, f.table, want, got, rule)
    assert want[3][:, 1].tolist() == [1, 0]


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("preset", ["official", "paper"])
def test_layer_ema_wide_entries(kernel_ops, preset, order, monkeypatch):
    """NOTE: [wide entries] in kernel_host.py: entries with more terms than WIDE_TERMS (the
    released code's norm-layer H[0]/H[1]) are summed by the whole block / program, also where
    they lie among one-term and term-less entries, next to each other, past a block of entries
    (at 1023, 1024, 2047, 2048 and the last of 2100) or of terms (2100 terms), in a factor of
    wide entries only, or with a non-finite term; a synthetic table: its raw statistics against
    the reference's sums.  ``reverse``: the emulated CUDA block's threads in reverse order (a
    missing barrier around the block's list of wide entries shows; NOTE: [CUDA emulator])."""
    from adafisher_fast.kernel_host import WIDE_TERMS
    if order == "reverse":
        if not emulated(backend_name(kernel_ops)):
            pytest.skip("thread order is the CUDA emulator's")
        monkeypatch.setenv("ADAFISHER_EMU_THREAD_ORDER", "reverse")
    g = torch.Generator().manual_seed(3)
    long = [1 + (e % 3 == 0) for e in range(2100)]          # one or two terms, some none
    for e in range(0, 2100, 7):
        long[e] = 0
    for e in (1023, 1024, 2047, 2048, 2099):
        long[e] = WIDE_TERMS + 1 + e % 5
    # entries' term counts, factor by factor; factors 0-1 and 3 are layer 0's, 2 is layer 1's
    counts = [[1, 40, 3, 2100, 33, 34, 1, 0], [2, WIDE_TERMS, WIDE_TERMS + 1], [64, 1],
              long, [WIDE_TERMS + 1 + e % 9 for e in range(40)]]
    n_acc, dst = 600, []
    for e, n in enumerate(c for f in counts for c in f):
        dst += [e] * n
    nt = len(dst)
    order_t = torch.randperm(nt, generator=g)               # the table's terms in any order
    sizes = [len(f) for f in counts]
    starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
    nf = len(sizes)
    seg = torch.repeat_interleave(torch.arange(nf), torch.tensor(sizes))
    term_dst = torch.tensor(dst)[order_t]
    dev = device()
    table = reference.LayerTable.build(
        n_acc, torch.randint(0, n_acc, (nt,), generator=g).to(dev), term_dst.to(dev),
        torch.randint(1, 3, (nt,), generator=g).float().to(dev),
        (torch.rand(nt, generator=g) + 0.5).to(dev),
        torch.randint(0, 3, (nt,), generator=g).float().to(dev), seg[term_dst].to(dev),
        starts, torch.tensor([0, 0, 1, 0, 1], device=dev), 2)
    rule = PRESETS[preset].ema_rule(0.8)
    n_raw = starts[-1]
    want = [torch.ones(n_raw, device=dev), torch.ones(n_raw + 1, device=dev),
            torch.zeros(nf, dtype=torch.bool, device=dev),
            torch.zeros(2, 2, dtype=torch.int64, device=dev)]
    got = [t.clone() for t in want]
    for it in range(3):
        buf = torch.rand(n_acc + nf, generator=g).to(dev) * 3
        buf[n_acc:] = torch.tensor([2.0, 3.0, 5.0, 4.0, 6.0])
        if it == 2:
            buf[table.term_src[term_dst.tolist().index(3)]] = float("inf")   # in entry 3's terms
        _step_both(kernel_ops, buf, table, want, got, rule)
    assert want[3].tolist() == [[2, 1], [3, 0]]


@pytest.mark.gpu
def test_layer_ema_gpu_many_layers(kernel_ops):
    f, rule, want, got = _states(
        lambda: nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(32)], nn.Embedding(50257, 64)),
        "paper")
    for _ in range(3):
        _step_both(kernel_ops, torch.rand_like(f.buf) + 0.5, f.table, want, got, rule)


def test_table_cache_derives_once_per_table(monkeypatch):
    """kernel_host.term_csr / layer_factors against loops over the table, and NOTE: [table cache]:
    a table of other tensor objects over the same storage (what torch.compile hands an op) hits
    the cache without deriving anything; a derivation reads no value on the host (on the meta
    device, where such a read raises: bincount, sizing its output by max(keys), did)."""
    from adafisher_fast import kernel_host
    f = AdaFisher(_model(), preset="paper", backend="torch").fisher
    t = f.table
    ptr, src, pw, coef, q, factor = kernel_host.term_csr(t)
    for e in range(t.n_raw):
        terms = [i for i in range(t.term_dst.numel()) if int(t.term_dst[i]) == e]   # term order
        assert src[ptr[e]:ptr[e + 1]].tolist() == [int(t.term_src[i]) for i in terms]
        assert coef[ptr[e]:ptr[e + 1]].tolist() == [float(t.term_coef[i]) for i in terms]
    order, fstart = kernel_host.layer_factors(t)
    for layer in range(t.n_layers):
        want = [i for i in range(t.factor_layer.numel()) if int(t.factor_layer[i]) == layer]
        assert order[fstart[layer]:fstart[layer + 1]].tolist() == want

    same_storage = t._replace(**{k: v.view_as(v) for k, v in t._asdict().items()
                                 if isinstance(v, torch.Tensor)})
    monkeypatch.setattr(torch, "searchsorted", None)        # any derivation would fail
    assert kernel_host.term_csr(same_storage)[0] is ptr
    assert kernel_host.layer_factors(same_storage)[0] is order
    other = f.table._replace(term_dst=t.term_dst.clone(), factor_layer=t.factor_layer.clone())
    with pytest.raises(TypeError):                          # a table elsewhere is derived anew
        kernel_host.term_csr(other)
    monkeypatch.undo()
    on_meta = t._replace(**{k: v.to("meta") for k, v in t._asdict().items()
                            if isinstance(v, torch.Tensor)})
    assert kernel_host.term_csr(on_meta)[0].shape == (t.n_raw + 1,)
    assert kernel_host.layer_factors(on_meta)[1].shape == (t.n_layers + 1,)


def test_a_dropped_optimizer_leaves_no_cached_tables(kernel_ops):
    """NOTE: [table cache] The cache holds the tensors it derived from an optimizer's LayerTable
    (device memory: ~9 MB for GPT-2); a dropped optimizer's entries go with it, and a state moved
    to another device drops its old table's."""
    import gc

    from adafisher_fast import kernel_host
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(device())
    before = set(kernel_host._TABLES)
    opt = AdaFisher(model, TCov=1, backend=backend_name(kernel_ops))
    model(torch.randn(2, 3, device=device())).sum().backward()
    opt.step()
    assert set(kernel_host._TABLES) - before
    opt.fisher.to(device(), opt.fisher.buf.dtype)        # the old table's entries go
    assert not set(kernel_host._TABLES) - before
    model(torch.randn(2, 3, device=device())).sum().backward()
    opt.step()
    assert set(kernel_host._TABLES) - before
    del opt
    gc.collect()
    assert not set(kernel_host._TABLES) - before


def test_a_launch_while_capturing_keeps_its_derived_tables(kernel_ops, monkeypatch):
    """NOTE: [captured tables] layer_ema's terms by destination and factors by layer come from a
    cache of 32 entries that evicts its oldest; a launch while a CUDA graph is captured keeps the
    ones it was given, whose addresses the graph replays.  (kernel_host.capturing stands for a
    capturing stream.)"""
    from adafisher_fast import kernel_host
    opt = AdaFisher(_model().to(device()), preset="paper", backend="torch")
    f = opt.fisher
    monkeypatch.setattr(kernel_host, "_CAPTURED", {})
    monkeypatch.setattr(kernel_host, "capturing", lambda: True)
    kernel_ops.layer_ema(torch.rand_like(f.buf), f.table, f.state, f.fac, f.initialized,
                         f.counters, PRESETS["paper"].ema_rule(0.8))
    kept = {id(t) for t in kernel_host._CAPTURED.values()}
    assert {id(t) for t in kernel_host.term_csr(f.table)} <= kept
    assert {id(t) for t in kernel_host.layer_factors(f.table)} <= kept
