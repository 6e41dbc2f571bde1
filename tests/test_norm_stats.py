"""norm_stats kernels against the torch reference: BatchNorm (batch and running statistics),
LayerNorm, GroupNorm, RMSNorm (center=False); fp32/bf16/fp16 inputs."""
import importlib

import pytest
import torch

from adafisher_fast import reference
from conftest import AtenOps, backend_name, device, emulated, tensor_copies

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)]


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 1), (3, 6, 33), (13, 2, 7)])
@pytest.mark.parametrize("mode,groups,center", [("channel", 1, True), ("sample", 1, True),
                                                ("sample", 2, True), ("sample", 1, False)])
def test_norm_stats(kernel_ops, shape, mode, groups, center, dtype, rtol):
    if shape[1] % groups:
        pytest.skip("groups must divide channels")
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device()) * 3 + 1).to(dtype)
    want = torch.rand(shape[1], device=device())
    got = want.clone()
    reference.norm_stats(x, want, mode, groups, 1e-5, center)
    kernel_ops.norm_stats(x, got, mode, groups, 1e-5, center)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_stats_running(kernel_ops, dtype):
    torch.manual_seed(1)
    x = torch.randn(5, 7, 13, device=device()).to(dtype)
    mean, var = torch.randn(7, device=device()), torch.rand(7, device=device()) + 0.1
    want = torch.zeros(7, device=device())
    got = want.clone()
    reference.norm_stats(x, want, "channel", 1, 1e-3, True, mean, var)
    kernel_ops.norm_stats(x, got, "channel", 1, 1e-3, True, mean, var)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_stats_overflowing_variance(kernel_ops, dtype):
    """Channels whose squared deviations overflow float32 (the layer's rsqrt(inf) = 0 makes its
    xhat 0 there: the reference's sum is 0) with a finite mean, beside a channel whose values
    are inf (NaN, as the reference): the closed form N var / (var + eps) gave inf / inf = NaN,
    so the kernels' non-finite guard skipped a layer the reference updated."""
    torch.manual_seed(2)
    x = torch.randn(40, 3, 25, device=device())
    x[:, 0] *= 1e19
    x[0, 2, 0] = float("inf")
    x = x.to(dtype)
    want = torch.zeros(3, device=device())
    got = want.clone()
    reference.norm_stats(x, want, "channel", 1, 1e-5, True)
    kernel_ops.norm_stats(x, got, "channel", 1, 1e-5, True)
    assert want[0] == 0 and want[2].isnan()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want[1].item(), equal_nan=True)


@pytest.mark.parametrize("mode,groups,center,running,c", [
    ("channel", 1, True, False, 6), ("channel", 1, True, True, 6),       # BatchNorm2d
    ("sample", 1, True, False, 6), ("sample", 3, True, False, 6),        # GroupNorm
    ("sample", 6, False, False, 6),
    # C a multiple of a 16-byte word of float32 (4), runs of C/groups channels one (loaded a
    # word at a time in csrc) or not (an element at a time: a word would cross into the next run)
    ("sample", 2, True, False, 8), ("sample", 4, True, False, 8)])
def test_norm_stats_channels_last_not_copied(kernel_ops, mode, groups, center, running, c):
    """A BatchNorm2d or GroupNorm input in channels_last, viewed (B, C, H*W) as their layer kinds
    do, gives the statistics without a copy (NOTE: [memory order] in fisher_kernels/host.py)."""
    torch.manual_seed(5)
    x = (torch.randn(3, c, 5, 4, device=device()) * 2 + 1).to(memory_format=torch.channels_last)
    x3 = x.reshape(3, c, -1)
    assert not x3.is_contiguous() and x3.data_ptr() == x.data_ptr()
    mv = (torch.randn(c, device=device()), torch.rand(c, device=device()) + 0.1) if running else (None, None)
    want = torch.zeros(c, device=device())
    got = want.clone()
    reference.norm_stats(x3.contiguous(), want, mode, groups, 1e-5, center, *mv)
    assert tensor_copies(lambda: kernel_ops.norm_stats(x3, got, mode, groups, 1e-5, center, *mv)) == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_norm_stats_bad_mode(kernel_ops):
    with pytest.raises(ValueError, match="mode"):
        kernel_ops.norm_stats(torch.ones(2, 3, 1, device=device()), torch.zeros(3, device=device()),
                              "row", 1, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,mode,groups", [((64, 256, 3136), "channel", 1),
                                               ((4096, 4096, 1), "sample", 1),
                                               ((32, 512, 1025), "sample", 32),
                                               ((1, 256, 32 ** 3), "sample", 8)])   # 64 chunks a row
def test_norm_stats_gpu_large(kernel_ops, shape, mode, groups, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    want = torch.zeros(shape[1], dtype=torch.float64, device="cuda")
    reference.norm_stats(x.double(), want, mode, groups, 1e-5)
    lp = torch.zeros(shape[1], device="cuda")
    reference.norm_stats(x, lp, mode, groups, 1e-5)
    got = torch.zeros(shape[1], device="cuda")
    kernel_ops.norm_stats(x, got, mode, groups, 1e-5)
    err_ref = (lp.double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * err_ref + 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("running", [False, True])
def test_triton_channel_mode_reads_x_at_most_twice(running, monkeypatch):
    """NOTE: [norm passes] With batch statistics the sum of xhat^2 per channel is N var /
    (var + eps): two passes over x (mean, variance), not three; with running statistics one.
    The result is still the reference's."""
    pytest.importorskip("triton")
    ns = importlib.import_module("fisher_kernels.norm_stats")
    ls = importlib.import_module("fisher_kernels.linear_stats")
    passes = []
    run = ls._run               # every column reduction of the launchers
    monkeypatch.setattr(ls, "_run", lambda x3, *a: passes.append(x3.shape) or run(x3, *a))
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, device=device()) * 2 + 1
    mean, var = (torch.randn(5, device=device()), torch.rand(5, device=device()) + 0.5) if running \
        else (None, None)
    got, want = torch.zeros(5, device=device()), torch.zeros(5, device=device())
    ns.norm_stats(x, got, "channel", 1, 1e-5, True, mean, var)
    reference.norm_stats(x, want, "channel", 1, 1e-5, True, mean, var)
    assert len(passes) == (1 if running else 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_triton_channel_mode_does_no_torch_arithmetic(monkeypatch):
    """NOTE: [channel launches]: batch statistics cost the Triton launcher two allocations and its
    four kernels (stubbed here: the interpreter runs its own aten ops), not a dozen small torch
    ops on the C entries between the passes, each one a launch and host time on a GPU, nor a
    fill."""
    pytest.importorskip("triton")
    ns = importlib.import_module("fisher_kernels.norm_stats")
    ls = importlib.import_module("fisher_kernels.linear_stats")
    kernels = []
    stub = type("Stub", (), {"__getitem__": lambda self, grid: (
        lambda *a, **k: kernels.append(a[0].shape))})()
    monkeypatch.setattr(ls, "_column_reduce_kernel", stub)
    monkeypatch.setattr(ns, "_channel_rows_kernel", stub)
    x, out = torch.randn(3, 5, 7, device=device()), torch.zeros(5, device=device())
    ns.norm_stats(x, out, "channel", 1, 1e-5)       # x's column layout memoised (meta tensors)
    with AtenOps() as ops:
        ns.norm_stats(x, out, "channel", 1, 1e-5)
    assert len(kernels) == 8
    assert ops.seen == ["empty", "empty"], ops.seen     # no views either (NOTE: [launch plans])


@pytest.mark.parametrize("finish", [False, True])
def test_triton_channel_rows_kernel_adds_every_row(finish):
    """NOTE: [channel launches]: _channel_rows_kernel over more rows and channels than one tile
    (R = 37 rows in tiles of 16, C = 200 in blocks of 32, the launcher's width), against
    float64: the mean written over p's first row in place, or out += N var / (var + eps) with
    var from the rows, 0 where var is inf around a finite mean (channel 3) and NaN where the
    mean is inf (channel 5)."""
    pytest.importorskip("triton")
    ns = importlib.import_module("fisher_kernels.norm_stats")
    torch.manual_seed(0)
    r, c, n, eps = 37, 200, 1000, 1e-2
    p = torch.rand(r, c, device=device()) * 50
    mu = torch.randn(c, device=device())
    p[5, 3] = p[5, 5] = mu[5] = float("inf")
    out = torch.rand(c, device=device())
    t = p.double().sum(0) / n
    if finish:
        want = out.double() + n * t / (t + eps)
        want[3] = out[3]
        ns._channel_rows_kernel[(7,)](p, mu, out, c, r, n, eps, FINISH=True, BLOCK_R=16,
                                      BLOCK_C=32)
        got = out
    else:
        want = t
        ns._channel_rows_kernel[(7,)](p, p, out, c, r, n, eps, FINISH=False, BLOCK_R=16,
                                      BLOCK_C=32)
        got = p[0]
    assert got[5].isnan() == finish and got[3].isinf() != finish
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0, equal_nan=True)


def test_norm_stats_groups_must_divide_the_channels(kernel_ops):
    """Triton read past its per-(row, group) scratch (garbage, an illegal read on a GPU) where
    the reference and CUDA refused groups that do not divide C; now all three refuse."""
    x, out = torch.ones(2, 6, 5, device=device()), torch.zeros(6, device=device())
    for ops in (reference, kernel_ops):
        with pytest.raises((ValueError, RuntimeError), match="groups 4 must divide"):
            ops.norm_stats(x, out, "sample", 4, 1e-5)
    assert not out.any()


@pytest.mark.parametrize("short", ["mean", "var"])
def test_norm_stats_running_statistics_must_have_a_channels_entries(kernel_ops, short):
    """Triton read a short running mean/var past its end (a garbage statistic for the last
    channel) where the reference and CUDA refused it; now all three refuse."""
    x, out = torch.ones(2, 4, 5, device=device()), torch.zeros(4, device=device())
    stats = {k: torch.ones(3 if k == short else 4, device=device()) for k in ("mean", "var")}
    for ops in (reference, kernel_ops):
        with pytest.raises((ValueError, RuntimeError), match=r"mean.*var need .*4"):
            ops.norm_stats(x, out, "channel", 1, 1e-5, True, stats["mean"], stats["var"])
    assert not out.any()


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_norm_stats_long_rows_are_split_into_chunks(kernel_ops, center, layout, emu_launches,
                                                   monkeypatch):
    """GroupNorm rows of 3.3 chunks (NOTE: [moment chunks] in fisher_kernels/norm_stats.py): one
    program / block per chunk, the chunks' moments joined per row, and the reference's sums (x
    with a large mean, which a joined variance that dropped the chunks' mean differences would
    miss).  The launches are checked: Triton's grid, the emulated CUDA backend's launch log (not
    on a GPU)."""
    ns = importlib.import_module("fisher_kernels.norm_stats")
    grids, kernel = [], ns._row_moments_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(ns, "_row_moments_kernel", Recorder())
    torch.manual_seed(6)
    x = (torch.randn(2, 6, 30, 600, device=device()) * 2          # means that differ by channel
         + torch.arange(6., device=device()).view(6, 1, 1) * 3     # and by row: every chunk's
         + torch.linspace(-9, 9, 30, device=device()).view(30, 1))  # differs in either layout
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x3 = x.reshape(2, 6, -1)                  # 2 groups: rows of 3 * 18000 entries
    n = 3 * 30 * 600
    chunks = -(-n // ns.CHUNK)
    assert chunks == 4
    want = torch.rand(6, device=device())
    got = want.clone()
    reference.norm_stats(x3, want, "sample", 2, 1e-5, center)
    kernel_ops.norm_stats(x3, got, "sample", 2, 1e-5, center)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if kernel_ops.__name__.startswith("fisher_kernels"):
        assert grids == [(2 * 2 * chunks,)]
    elif emulated("cuda"):                   # a GPU's launches are not logged
        launched = emu_launches()
        blocks = [gx for name, gx, _ in launched if "sample_coeffs" in name]
        assert blocks == [2 * 2 * chunks] and any("sample_combine" in g[0] for g in launched)


@pytest.mark.parametrize("length,chunks", [(270000, 33), (10000, 2)])
def test_norm_stats_rows_of_more_chunks_than_a_warp(kernel_ops, emu_launches, length, chunks):
    """A sample row of 33 chunks (NOTE: [moment chunks]): the CUDA combine takes a warp a row,
    lane 0 joining chunks 0 and 32; and one of 2 (the fewest that are joined).  The chunks' means differ (a ramp along the row), so a chunk
    dropped or counted twice moves the mean and the variance.  Against the float64 reference.
    (Triton's combine takes a row's chunks as one vector: a 15 s interpreted run that adds
    nothing to the long-rows test above.)"""
    if backend_name(kernel_ops) != "cuda":
        pytest.skip("the CUDA combine's warp")
    torch.manual_seed(9)
    x = torch.randn(1, 2, length, device=device()) + torch.linspace(-20, 20, length, device=device())
    want = torch.zeros(2, dtype=torch.float64, device=device())
    got = torch.zeros(2, device=device())
    reference.norm_stats(x.double(), want, "sample", 1, 1e-5, True)
    kernel_ops.norm_stats(x, got, "sample", 1, 1e-5, True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    if emulated("cuda"):
        launched = [gx for name, gx, _ in emu_launches() if "sample_c" in name]
        assert launched == [chunks, 1], launched      # a block a chunk; one warp joins them


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape,groups,warp", [((23, 2, 1024), 1, True),    # 2048: a warp a row
                                               ((11, 4, 1024), 2, True),    # (23, 22 rows: part blocks)
                                               ((3, 2049, 1), 1, False),    # 2049: a block a row
                                               ((2, 3, 700), 1, False)])
def test_norm_stats_short_rows_take_a_warp(kernel_ops, shape, groups, warp, center, emu_launches):
    """NOTE: [row warps] in csrc/norm_stats.cu: sample rows of at most 2048 entries are summed by
    a warp each, longer ones by a block, both to the reference's sums (x with a large mean); the
    emulated CUDA backend's launch log says which kernel ran."""
    torch.manual_seed(7)
    x = torch.randn(shape, device=device()) * 2 + 5
    want = torch.rand(shape[1], device=device())
    got = want.clone()
    reference.norm_stats(x, want, "sample", groups, 1e-5, center)
    kernel_ops.norm_stats(x, got, "sample", groups, 1e-5, center)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if emulated("cuda") and not kernel_ops.__name__.startswith("fisher_kernels"):
        coeffs = [("warp" if "sample_coeffs_warp_kernel" in name else "block", gx)
                  for name, gx, _ in emu_launches() if "sample_coeffs" in name]   # (mangled)
        rows = shape[0] * groups
        assert coeffs == ([("warp", -(-rows // 8))] if warp else [("block", rows)]), coeffs

