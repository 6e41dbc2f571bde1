"""linear_stats kernels against the torch reference (odd shapes, every dim, fp32/bf16/fp16)."""
import importlib
import math

import pytest
import torch

from adafisher_fast import reference
from conftest import backend_name, deterministic, device, emulated, tensor_copies

# (dtype, rtol): low-precision inputs are upcast before squaring on both sides, so only the
# float32 summation order differs (NOTE: [check tolerances] in adafisher_fast/check.py)
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((7, 13), -1), ((3, 5, 33), -1), ((11, 40), -1),
                                       ((2, 7, 5, 3), 1), ((13, 7), 0), ((4, 129, 3), 1)])
@pytest.mark.parametrize("square,scale", [(True, 1.0), (False, 0.25)])
def test_linear_stats(kernel_ops, shape, dim, dtype, rtol, square, scale):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device()).to(dtype)
    k = x.shape[dim]
    base = torch.rand(k + 3, device=device())
    want, got = base.clone(), base.clone()
    reference.linear_stats(x, want[1:1 + k], dim, square, scale)
    kernel_ops.linear_stats(x, got[1:1 + k], dim, square, scale)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((1000, 36), -1), ((1000, 33), -1), ((64, 3, 49), 1)])
def test_linear_stats_threads_take_several_words(kernel_ops, shape, dim, dtype):
    """NOTE: [words in flight] in csrc/reduce.cuh: on the CUDA backend's grid a thread here takes
    5 to 8 words, a batch of four and a part batch: rows of 36 float32 (16-byte words) or of 33
    (single elements), split over 16 row slices; 64 planes of 49 over two blocks a channel, whose
    thread's next word is 512 on, 10 plane rows and 22 entries further (the carried coordinates
    wrap across a row).  Against the float64 sums."""
    torch.manual_seed(4)
    x = (torch.randn(shape, device=device()) + 0.5).to(dtype)
    k = x.shape[dim]
    want = torch.zeros(k, dtype=torch.float64, device=device())
    reference.linear_stats(x.double(), want, dim)
    got = torch.zeros(k, device=device())
    kernel_ops.linear_stats(x, got, dim)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


class _Recorder:
    """A stand-in Triton kernel: each launch ``kernel[grid](*args, **kw)`` appends
    ``pick(args, kw)`` to ``seen`` and runs nothing."""

    def __init__(self, seen: list, pick):
        self.seen, self.pick = seen, pick

    def __getitem__(self, grid):
        return lambda *args, **kw: self.seen.append(self.pick(args, kw))


def test_triton_wide_offsets_from_2_31(monkeypatch):
    """NOTE: [wide offsets]: a column reduction with A or B near 2^31 widens its program offsets
    to int64 (pid * BLOCK_B and pid * rows wrapped to negative offsets inside the mask), and only
    such a launch does; the embedding count the same for its tokens."""
    pytest.importorskip("triton")
    ls = importlib.import_module("fisher_kernels.linear_stats")
    es = importlib.import_module("fisher_kernels.embedding_stats")
    seen = []
    monkeypatch.setattr(ls, "_column_reduce_kernel", _Recorder(seen, lambda args, kw: kw["WIDE"]))
    monkeypatch.setattr(es, "_embedding_stats_kernel", _Recorder(seen, lambda args, kw: kw["WIDE"]))
    one = torch.empty(1)
    for a, b in ((2, 1000), (2, 2 ** 31 - 5000), (2, 2 ** 31 - 4000), (2 ** 31 + 7, 1)):
        ls._launch(one.expand(a, 3, b), torch.zeros(3), True, 1.0)
    for n in (1000, 2 ** 31 + 5):
        es.embedding_stats(torch.empty(n, dtype=torch.int64, device="meta"),
                           torch.zeros(8, device="meta"))
    assert seen == [False, False, True, True, False, True]


@pytest.mark.parametrize("affine", ["plain", "channel", "sample"])
def test_triton_wide_offsets_sum_as_the_reference(monkeypatch, affine):
    """The int64 path itself (every launch forced wide), interpreted, against the reference: the
    plain column sums, BatchNorm's centred pass (AFFINE 3) and GroupNorm's (AFFINE 2)."""
    pytest.importorskip("triton")
    import fisher_kernels
    ls = importlib.import_module("fisher_kernels.linear_stats")
    monkeypatch.setattr(ls, "WIDE_FROM", 0)
    torch.manual_seed(0)
    x = torch.randn(5, 6, 33)
    want, got = torch.zeros(6), torch.zeros(6)
    if affine == "plain":
        reference.linear_stats(x, want, 1)
        fisher_kernels.linear_stats(x, got, 1)
    else:
        mode, groups = ("channel", 1) if affine == "channel" else ("sample", 3)
        reference.norm_stats(x, want, mode, groups, 1e-5)
        fisher_kernels.norm_stats(x, got, mode, groups, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,row_bytes,dim,kernel,vb", [((300,), 1024, -1, "reduce_rows", 16),
                                                         ((300,), 40, -1, "reduce_rows", 8),
                                                         ((70, 12), 160, 2, "reduce_planes", 16),
                                                         ((70, 12), 40, 2, "reduce_planes", 8)])
def test_linear_stats_aligned_and_shifted(kernel_ops, lead, row_bytes, dim, kernel, vb, dtype, deterministic,
                                          emu_launches):
    """The same x, once aligned and once 1 element off.  On the CUDA backend the aligned one takes
    the column reduction's vector loads, 16 bytes per thread where its rows (I == 1) or plane rows
    (I > 1) allow, else 8 (the kernels' VB; the emulator's launch log names each instance), the
    shifted one the element loads.  Both match the reference (summed over dim 1); rows give the
    same bits both ways under deterministic algorithms, the same sums in the same order."""
    torch.manual_seed(0)
    shape = lead + (row_bytes // torch.empty((), dtype=dtype).element_size(),)
    x = torch.randn(shape, device=device()).to(dtype)
    room = torch.empty(x.numel() + 1, dtype=dtype, device=device())
    room[1:] = x.flatten()
    shifted = room[1:].view(shape)
    assert x.data_ptr() % 16 == 0 and shifted.data_ptr() % 8 != 0
    k = shape[1 if dim == 2 else -1]
    stat_dim = 1 if dim == 2 else -1
    outs = []
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for t in (x, shifted):
            want, got = torch.zeros(k, device=device()), torch.zeros(k, device=device())
            reference.linear_stats(t, want, stat_dim, True, 0.5)
            kernel_ops.linear_stats(t, got, stat_dim, True, 0.5)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            outs.append(got)
    finally:
        torch.use_deterministic_algorithms(was)
    if backend_name(kernel_ops) == "cuda":
        if kernel == "reduce_rows" and deterministic:     # (else blocks add atomically, any order)
            assert torch.equal(outs[0], outs[1])
        names = [name for name, _, _ in emu_launches()]
        if names:                       # the emulated CUDA backend logs its launches
            ran = [n for n in names if kernel in n]
            # mangled: ..._kernelI<T><A>Li16E<map>... for VB = 16 (bytes per load), ...Li4E...
            # for one float32 element
            one = x.element_size()
            assert len(ran) == 2 and f"Li{vb}E" in ran[0] and f"Li{one}E" in ran[1], names


def test_linear_stats_noncontiguous_and_empty(kernel_ops):
    x = torch.randn(9, 6, device=device()).t()          # non-contiguous
    want, got = torch.zeros(6, device=device()), torch.zeros(6, device=device())
    reference.linear_stats(x, want, 0)
    kernel_ops.linear_stats(x, got, 0)
    torch.testing.assert_close(got, want)
    e = torch.zeros(0, 5, device=device())
    out = torch.ones(5, device=device())
    kernel_ops.linear_stats(e, out)
    assert torch.equal(out, torch.ones(5, device=device()))


@pytest.mark.parametrize("fmt,dim", [(torch.channels_last, 1), (torch.channels_last, 3),
                                     (torch.channels_last_3d, 1)])
def test_linear_stats_channels_last_not_copied(kernel_ops, fmt, dim):
    """A channels_last tensor (a conv's output gradient, a BatchNorm input) is reduced where it
    lies, without a copy (NOTE: [memory order] in fisher_kernels/host.py)."""
    torch.manual_seed(4)
    shape = (3, 5, 4, 6) if fmt == torch.channels_last else (3, 5, 2, 4, 3)
    x = torch.randn(shape, device=device()).to(memory_format=fmt)
    want = torch.zeros(shape[dim], device=device())
    got = want.clone()
    reference.linear_stats(x.contiguous(), want, dim)
    assert tensor_copies(lambda: kernel_ops.linear_stats(x, got, dim)) == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_linear_stats_float64_matches_exactly(kernel_ops):
    x = torch.randn(7, 5, dtype=torch.float64, device=device())
    want = torch.zeros(5, dtype=torch.float64, device=device())
    got = want.clone()
    reference.linear_stats(x, want)
    kernel_ops.linear_stats(x, got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim", [((256, 4096), -1), ((16, 256, 4097), -1),
                                       ((64, 256, 56, 56), 1), ((8192, 1025), -1)])
def test_linear_stats_gpu_large(kernel_ops, shape, dim, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    k = x.shape[dim]
    want = torch.zeros(k, dtype=torch.float64, device="cuda")
    reference.linear_stats(x.double(), want, dim)
    got = torch.zeros(k, device="cuda")
    kernel_ops.linear_stats(x, got, dim)
    lp = torch.zeros(k, device="cuda")
    reference.linear_stats(x, lp, dim)
    err_ref = (lp.double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * err_ref + 1e-6 * want.abs().max().item()


def test_triton_linear_stats_grid_fits_the_gpus_limits(monkeypatch):
    """The (K, B) blocks share grid axis 0 (limit 2^31 - 1): with B on axis 1 (limit 65535) a
    BatchNorm3d's channel statistics of a 256^3 volume (B = 2^24) could not launch."""
    pytest.importorskip("triton")
    ls = importlib.import_module("fisher_kernels.linear_stats")
    monkeypatch.setattr(ls, "interpreting", lambda: False)
    for a, k, b in [(2, 32, 256 ** 3), (64, 3, 512 ** 3), (16384, 3072, 1), (1, 802816, 1)]:
        ls._tiles.cache_clear()
        block_a, block_k, block_b, rows, grid = ls.tiles(a, k, b)
        assert grid[0] < 2 ** 31 and grid[1] <= 65535, (a, k, b, grid)
        assert grid[0] * block_k * block_b >= k * b and grid[1] * rows >= a


def test_triton_plane_length_is_passed_with_its_power_of_two_factor(monkeypatch):
    """NOTE: [plane alignment]: B reaches the kernel as B_Q * B_DIV (B_DIV the power of two up to
    16 that divides B), except from 2^31 on, where the int32 product would overflow."""
    pytest.importorskip("triton")
    ls = importlib.import_module("fisher_kernels.linear_stats")
    seen = []
    monkeypatch.setattr(ls, "_column_reduce_kernel",
                        _Recorder(seen, lambda args, kw: (args[6], kw["B_DIV"])))
    for b in (1, 196, 49, 3136, 2 ** 31 + 16):
        ls._launch(torch.empty(1).expand(2, 3, b), torch.zeros(3), True, 1.0)
    assert seen == [(1, 1), (49, 4), (49, 1), (196, 16), (2 ** 31 + 16, 1)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape,dim", [((4100, 3), -1), ((1100, 5, 3), 1), ((42, 3, 300), 1)])
def test_triton_linear_stats_split_rows(monkeypatch, shape, dim, deterministic):
    """The GPU's split of the rows over several programs whose partial sums meet through atomic
    adds (NOTE: [atomic partial sums] in fisher_kernels/linear_stats.py), or in a fixed order
    (NOTE: [ordered partials]), which the interpreter would not pick on its own, and a last
    program with a partial tile of rows; the last shape has three B blocks on grid axis 0."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    pytest.importorskip("triton")
    ls = importlib.import_module("fisher_kernels.linear_stats")
    monkeypatch.setattr(ls, "interpreting", lambda: False)
    a = math.prod(shape[:dim % len(shape)])
    k = shape[dim]
    block_a, _, _, rows, grid = ls.tiles(a, k, math.prod(shape[dim % len(shape) + 1:]))
    assert grid[1] > 1 and a % rows                     # several programs, the last one partial
    torch.manual_seed(0)
    x = torch.randn(shape, device=device())
    want, got = torch.zeros(k, device=device()), torch.zeros(k, device=device())
    reference.linear_stats(x, want, dim)
    ls.linear_stats(x, got, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_linear_stats_dim_out_of_range(kernel_ops):
    """The reference wrapped dim=5 of a 2-d x around (dim 1) and summed; the kernels refuse."""
    x, out = torch.ones(3, 4, device=device()), torch.zeros(4, device=device())
    for ops in (reference, kernel_ops):
        with pytest.raises((ValueError, RuntimeError), match="dim 5 out of range for 2-d x"):
            ops.linear_stats(x, out, dim=5)
    assert not out.any()


@pytest.mark.parametrize("det", [False, True])
def test_rows_are_split_for_the_widest_load(kernel_ops, det, emu_launches):
    """NOTE: [row tiles] in csrc/launchers.h: the CUDA column reduction of rows (I == 1) splits
    the rows over blockIdx.y for about 2048 blocks, as far as slices of 64 rows allow, counting a
    block's columns at its widest load (32 threads x 16 bytes: 128 float32).  Counted at 32 columns,
    2048 x 4096 float32 ran on 16 row slices, 512 blocks, not 32.  Aligned and shifted rows split
    alike (their deterministic sums are equal bitwise), each deterministic run with 32 x 4096
    partial sums, more than the old buffer's 2048 x 32 + K (the emulated ASan run checks it)."""
    if not emulated("cuda"):
        pytest.skip("the launch log is the CUDA emulator's")
    if backend_name(kernel_ops) != "cuda":
        pytest.skip("the CUDA backend's split")
    a, k = 2048, 4096
    torch.manual_seed(3)
    x = torch.randn(a, k)
    room = torch.empty(a * k + 1)
    room[1:] = x.flatten()
    outs = []
    with deterministic(det):
        for t in (x, room[1:].view(a, k)):                          # 16-byte aligned, shifted
            got = torch.zeros(k)
            kernel_ops.linear_stats(t, got, -1, True, 1.0)
            outs.append(got)
    want = torch.zeros(k, dtype=torch.float64)
    reference.linear_stats(x.double(), want, -1, True, 1.0)
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=0)
    grids = [(gx, gy) for name, gx, gy in emu_launches() if "reduce_rows_kernel" in name]
    assert grids == [(k // 128, 32), (k // 32, 32)], grids       # 64 rows a slice: 32 slices
    if det:
        assert torch.equal(outs[0], outs[1])
