"""conv_stats kernels (no im2col) against the torch reference: Conv1d/2d/3d, stride, dilation,
groups (1, 2, depthwise), every padding_mode, fp32/bf16/fp16 inputs; the transposed-conv layers
that call it on their output gradient."""
import importlib
import math

import pytest
import torch

from adafisher_fast import AdaFisherW, reference
from conftest import AtenOps, backend_name, deterministic, device, emulated, tensor_copies

MODES = ["zeros", "reflect", "replicate", "circular"]
CASES = [
    # spatial, kernel, stride, padding (lo, hi) per dim, dilation, channels, groups
    ((13,), (3,), (1,), [(1, 1)], (1,), 4, 1),
    ((33,), (5,), (2,), [(2, 2)], (2,), 6, 2),
    ((7, 13), (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 4, 1),
    ((7, 13), (3, 2), (2, 1), [(1, 1), (0, 1)], (2, 1), 4, 2),
    ((9, 9), (3, 3), (2, 2), [(2, 2), (2, 2)], (2, 2), 6, 6),      # depthwise
    ((1, 7), (1, 3), (1, 2), [(0, 0), (1, 1)], (1, 1), 3, 1),
    ((5, 6, 7), (3, 3, 3), (1, 2, 1), [(1, 1), (1, 1), (1, 1)], (1, 1, 2), 4, 2),
    # more kernel offsets than one program's (49 > fisher_kernels.conv_stats.MAX_KO = 32)
    ((9, 11), (7, 7), (1, 2), [(3, 3), (3, 3)], (1, 1), 3, 1),
    # 1x1 convs that are not pointwise (NOTE: [pointwise convs]): strided, padded
    ((9, 9), (1, 1), (2, 2), [(0, 0), (0, 0)], (1, 1), 4, 1),
    ((7,), (1,), (1,), [(1, 1)], (1,), 3, 1),
    # more output positions than one program's tile (NOTE: [lattice split])
    ((40, 40), (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 3, 1),
    ((1500,), (3,), (2,), [(1, 1)], (1,), 2, 1),
]
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]


@pytest.mark.parametrize("spatial,kernel,stride,padding,dilation,c,groups", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_conv_stats(kernel_ops, spatial, kernel, stride, padding, dilation, c, groups, mode):
    torch.manual_seed(0)
    x = torch.randn((2, c) + spatial, device=device())
    n = c * torch.Size(kernel).numel()
    want = torch.rand(n, device=device())
    got = want.clone()
    lw = reference.conv_stats(x, want, kernel, stride, padding, dilation, groups, mode)
    lg = kernel_ops.conv_stats(x, got, kernel, stride, padding, dilation, groups, mode)
    assert lg == lw
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("batch", [1, 7])
def test_conv_stats_dtypes(kernel_ops, dtype, rtol, batch):
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 11, 13, device=device()).to(dtype)
    want = torch.zeros(3 * 9, device=device())
    got = want.clone()
    reference.conv_stats(x, want, (3, 3), (2, 2), [(1, 1), (1, 1)], (1, 1), 1, "reflect")
    kernel_ops.conv_stats(x, got, (3, 3), (2, 2), [(1, 1), (1, 1)], (1, 1), 1, "reflect")
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("spatial,kernel,stride,padding,dilation,c,groups",
                         [CASES[3], CASES[4], CASES[6]])
@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_conv_stats_channels_last_not_copied(kernel_ops, spatial, kernel, stride, padding, dilation,
                                             c, groups, mode):
    """A channels_last(_3d) input is reduced over the batch where it lies, the per-channel map
    read through its (*spatial, C) strides: no copy of x (NOTE: [memory order])."""
    torch.manual_seed(6)
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    x = torch.randn((3, c) + spatial, device=device()).to(memory_format=fmt)
    assert not x.is_contiguous()
    want = torch.zeros(c * torch.Size(kernel).numel(), device=device())
    got = want.clone()
    reference.conv_stats(x.contiguous(), want, kernel, stride, padding, dilation, groups, mode)
    copies = tensor_copies(lambda: kernel_ops.conv_stats(x, got, kernel, stride, padding, dilation,
                                                         groups, mode))
    # circular padding copies the small (C, *spatial) map, never x
    assert copies == [] if mode == "zeros" else "aten::clone" not in copies
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("layout", ["every other sample", "cropped", "batch innermost"])
def test_conv_stats_strided_inputs(kernel_ops, layout):
    """Inputs that are not dense in any dim order, or dense with the batch inside: a view of
    every other sample (its rows a view could merge, 2 x C x H x W apart), a spatial crop, and
    a (B, C, H, W) view of a (C, H, W, B) tensor; each gives the reference's sums."""
    torch.manual_seed(8)
    base = torch.randn(10, 4, 9, 11, device=device())
    x = {"every other sample": base[::2],
         "cropped": base[:, :, 1:8, 2:],
         "batch innermost": base.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)}[layout]
    want = torch.rand(36, device=device())
    got = want.clone()
    args = ((3, 3), (1, 2), [(1, 1), (0, 1)], (1, 1), 1, "zeros")
    reference.conv_stats(x.contiguous(), want, *args)
    kernel_ops.conv_stats(x, got, *args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("spatial,groups,dilation", [((13,), 1, (1,)), ((7, 9), 2, (2, 3)),
                                                     ((3, 4, 5), 4, (1, 1, 1))])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("det", [False, True])
def test_conv_stats_pointwise_convs(kernel_ops, spatial, groups, dilation, fmt, det,
                                    monkeypatch, emu_launches):
    """NOTE: [pointwise convs] A 1x1 conv at stride 1 without padding (any dilation, groups or
    padding_mode) takes one launch, the per-channel column sum, no batch map and no lattice, and
    gives the reference's sums; with deterministic algorithms too."""
    launched = []
    if backend_name(kernel_ops) == "triton":
        cs = _triton_conv_module()
        real = cs._lattice_sum_kernel
        monkeypatch.setattr(cs, "_lattice_sum_kernel", type("Spy", (), {
            "__getitem__": lambda self, grid: launched.append("lattice") or real[grid]})())
    torch.manual_seed(9)
    x = torch.randn((70, 4) + spatial, device=device())
    if fmt == "channels_last" and len(spatial) > 1:
        x = x.to(memory_format=torch.channels_last if len(spatial) == 2
                 else torch.channels_last_3d)
    k = (1,) * len(spatial)
    args = (k, k, [(0, 0)] * len(spatial), dilation, groups, "circular")
    want = torch.rand(4, device=device())
    got = want.clone()
    reference.conv_stats(x, want, *args)
    with deterministic(det):
        n = kernel_ops.conv_stats(x, got, *args)
    assert n == math.prod(spatial)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    launched += [name for name, _, _ in emu_launches() if "lattice" in name]
    assert not launched, launched


def test_conv_stats_matches_unfold_definition(kernel_ops):
    """The patch statistic by its definition (explicit unfold, float64) for a strided dilated conv."""
    torch.manual_seed(2)
    x = torch.randn(3, 4, 9, 10, device=device())
    cols = torch.nn.functional.unfold(x.double(), (3, 3), dilation=2, padding=2, stride=2)
    want = cols.square().sum(dim=(0, 2))
    got = torch.zeros(4 * 9, device=device())
    kernel_ops.conv_stats(x, got, (3, 3), (2, 2), [(2, 2), (2, 2)], (2, 2), 2, "zeros")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ResNet-50 conv shapes (batch 32 at 224x224): (C_in, H, kernel, stride, padding)
RESNET50 = [(3, 224, 7, 2, 3), (64, 56, 1, 1, 0), (64, 56, 3, 1, 1), (128, 56, 3, 2, 1),
            (256, 28, 1, 1, 0), (256, 14, 3, 1, 1), (512, 7, 3, 1, 1), (1024, 14, 1, 2, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c,h,k,s,p", RESNET50)
def test_conv_stats_gpu_resnet50(kernel_ops, c, h, k, s, p, dtype):
    x = torch.randn(32, c, h, h, device="cuda").to(dtype)
    args = ((k, k), (s, s), [(p, p), (p, p)], (1, 1), 1, "zeros")
    want = torch.zeros(c * k * k, dtype=torch.float64, device="cuda")
    reference.conv_stats(x.double(), want, *args)
    lp = torch.zeros(c * k * k, device="cuda")
    reference.conv_stats(x, lp, *args)
    got = torch.zeros(c * k * k, device="cuda")
    kernel_ops.conv_stats(x, got, *args)
    err_ref = (lp.double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * err_ref + 1e-6 * want.abs().max().item()


@pytest.mark.gpu
def test_conv_stats_gpu_no_im2col_memory(kernel_ops):
    """Peak memory of conv_stats stays far below the im2col patch matrix (B*L*C*k*k floats)."""
    x = torch.randn(64, 64, 56, 56, device="cuda")
    out = torch.zeros(64 * 9, device="cuda")
    args = ((3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros")
    kernel_ops.conv_stats(x, out, *args)             # warm-up: compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernel_ops.conv_stats(x, out, *args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    im2col = 64 * 56 * 56 * 64 * 9 * 4
    assert extra <= x.numel() * 4 // 8 + (1 << 20), (extra, im2col)   # Q is C*H*W floats


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_transposed_conv_layers_on_kernels(kernel_ops, fmt):
    """The ConvTranspose kind (NOTE: [transposed conv]) calls conv_stats on the output gradient,
    into a slice of its accumulators, and on a narrowed view where output_padding >= stride; its
    weight map is transposed (NOTE: [row transpose] for channels_last): check=True holds every
    statistics call and step to the reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        torch.nn.Tanh(),
        torch.nn.ConvTranspose2d(4, 4, 2, groups=2, dilation=3, output_padding=2),
    ).to(device(), memory_format=fmt)
    opt = AdaFisherW(model, lr=1e-2, preset="paper", backend=backend_name(kernel_ops), check=True,
                     TCov=1)
    x = torch.randn(2, 3, 5, 4, device=device()).to(memory_format=fmt)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert opt.fisher.counters[:, 0].tolist() == [2, 2]


def test_conv_stats_groups_must_divide_the_channels(kernel_ops):
    """groups does not change the sums (C x kernel, laid out as a conv weight), but one that
    cannot divide C is a caller's error: the CUDA binding refused it, now all three do."""
    x, out = torch.ones(2, 6, 5, 5, device=device()), torch.zeros(54, device=device())
    for ops in (reference, kernel_ops):
        with pytest.raises((ValueError, RuntimeError), match="groups 4 must divide"):
            ops.conv_stats(x, out, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 4)
    assert not out.any()


def test_conv_stats_circular_padding_wraps_at_most_once(kernel_ops):
    """Circular padding beyond the input size (torch's pad and conv refuse it): the CUDA binding
    wrapped the index modulo the size and returned sums, where the reference and Triton raised."""
    x, out = torch.ones(1, 1, 3, 3, device=device()), torch.zeros(9, device=device())
    for ops in (reference, kernel_ops):
        with pytest.raises((ValueError, RuntimeError), match="wrap"):
            ops.conv_stats(x, out, (3, 3), (1, 1), [(4, 4), (4, 4)], (2, 2), 1, "circular")
    assert not out.any()
    ops.conv_stats(x, out, (3, 3), (1, 1), [(3, 3), (3, 3)], (2, 2), 1, "circular")  # once: fine
    assert out.all()


@pytest.mark.parametrize("batch", [2, 0])
def test_conv_stats_refuses_an_empty_output(kernel_ops, batch):
    """A kernel larger than the padded input (torch's conv refuses it): the reference returned a
    negative L, Triton 0, CUDA raised; now all three raise, on an empty batch too."""
    x, out = torch.ones(batch, 3, 1, 6, device=device()), torch.zeros(45, device=device())
    for ops in (reference, kernel_ops):
        with pytest.raises((ValueError, RuntimeError), match="empty output along spatial dim 0"):
            ops.conv_stats(x, out, (5, 3), (1, 1), [(0, 0), (1, 1)], (1, 1), 1)
    assert not out.any()


def _triton_conv_module():
    import sys
    import fisher_kernels  # noqa: F401
    return sys.modules["fisher_kernels.conv_stats"]


@pytest.mark.parametrize("det", [False, True])
def test_triton_lattice_grid_and_scratch_bounded_at_volume_sizes(det, monkeypatch):
    """A 3-D volume's conv (1 x 32 x 256^3, 7x7x7): the lattice launch keeps its grid near
    TARGET_PROGRAMS and, under deterministic algorithms, its partial-sum scratch far below the
    patch matrix (it was n_pos / 64 x C x 343 floats: 10.7 GiB; NOTE: [lattice groups]).  Meta
    tensors, launches recorded, nothing runs."""
    cs = _triton_conv_module()
    seen = []

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((tuple(grid), a[1]))
    monkeypatch.setattr(cs, "_lattice_sum_kernel", Rec())
    monkeypatch.setattr(cs, "partial_sums", lambda x, *a, abk: x.new_empty(1, abk[1]))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        x = torch.empty(1, 32, 256, 256, 256, device="meta")
        out = torch.zeros(32 * 343, device="meta")
        cs.conv_stats(x, out, (7, 7, 7), (1, 1, 1), [(3, 3)] * 3, (1, 1, 1), 1)
    finally:
        torch.use_deterministic_algorithms(was)
    (grid, dst), = seen
    assert grid[0] < 2 ** 31 and grid[1] <= 65535
    assert grid[0] * grid[1] <= 4 * cs.TARGET_PROGRAMS
    assert dst.numel() <= (cs.TARGET_PROGRAMS + 1) * out.numel()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_conv_stats_batch_map_in_partial_rows(kernel_ops, mode, fmt, monkeypatch, emu_launches):
    """The batch map Q as the stored sums of several row blocks (a batch of 130 splits on both
    backends; the Triton interpreter made to split it as on a GPU), padded as a batch of maps
    (Triton) or through its coordinates (CUDA), then added up by the lattice kernel: the
    reference's sums in every padding mode and memory format."""
    rows = []
    if backend_name(kernel_ops) == "triton":
        cs = _triton_conv_module()
        monkeypatch.setattr(importlib.import_module("fisher_kernels.linear_stats"), "interpreting",
                            lambda: False)
        real = cs.partial_sums

        def spy(*a, **kw):
            q = real(*a, **kw)
            rows.append(q.shape[0])
            return q
        monkeypatch.setattr(cs, "partial_sums", spy)
    torch.manual_seed(4)
    x = torch.randn(130, 3, 9, 11, device=device()).to(memory_format=fmt)
    args = ((3, 3), (2, 1), [(1, 1), (2, 2)], (1, 2), 1, mode)
    want = torch.rand(27, device=device())
    got = want.clone()
    reference.conv_stats(x, want, *args)
    kernel_ops.conv_stats(x, got, *args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    rows += [y for name, _, y in emu_launches() if "reduce_rows" in name]
    if backend_name(kernel_ops) == "triton" or emulated("cuda"):   # (a GPU logs no launches)
        assert rows and all(r > 1 for r in rows), rows


def test_triton_conv_stats_fills_no_scratch(monkeypatch):
    """The launcher's torch work is one allocation: the batch map's partial sums are stored, not
    added into a zeroed map (a fill launch on every conv call), the lattice adds into ``out``,
    and the views and tile shapes are the memoised plan's (NOTE: [launch plans]).  Kernels
    stubbed (the interpreter runs its own aten ops)."""
    cs = _triton_conv_module()
    ls = importlib.import_module("fisher_kernels.linear_stats")
    kernels = []
    stub = type("Stub", (), {"__getitem__": lambda self, grid: (
        lambda *a, **k: kernels.append(grid))})()
    monkeypatch.setattr(ls, "_column_reduce_kernel", stub)
    monkeypatch.setattr(cs, "_lattice_sum_kernel", stub)
    x, out = torch.randn(4, 3, 9, 11, device=device()), torch.zeros(27, device=device())
    cs.conv_stats(x, out, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1)  # plan made (meta tensors)
    with AtenOps() as ops:
        cs.conv_stats(x, out, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1)
    assert len(kernels) == 4
    assert set(ops.seen) == {"empty"}, ops.seen     # the partial sums' scratch


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_triton_lattice_wide_offsets_match_reference(mode, fmt, monkeypatch):
    """The lattice's int64 map offsets (WIDE, for a channel's map of 2^31 entries or more: NOTE:
    [map offsets]), made to run on small maps, sum as the reference does."""
    cs = _triton_conv_module()
    monkeypatch.setattr(cs, "WIDE_FROM", 0)
    wide, launch = [], cs.launch
    monkeypatch.setattr(cs, "launch", lambda kernel, grid, *args, **kw:
                        wide.append(kw["WIDE"]) or launch(kernel, grid, *args, **kw))
    torch.manual_seed(4)
    for spatial, kernel, stride, padding, dilation, c, groups in CASES:
        x = torch.randn((2, c) + spatial, device=device())
        if len(spatial) == 2:
            x = x.to(memory_format=fmt)
        want = torch.rand(c * torch.Size(kernel).numel(), device=device())
        got = want.clone()
        reference.conv_stats(x, want, kernel, stride, padding, dilation, groups, mode)
        cs.conv_stats(x, got, kernel, stride, padding, dilation, groups, mode)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert len(wide) == len(CASES) and all(wide)


@pytest.mark.parametrize("target", [2, 12])
@pytest.mark.parametrize("det", [False, True])
def test_triton_lattice_groups_match_reference(det, target, monkeypatch):
    """Several l-blocks per program (TARGET_PROGRAMS made tiny) sum as the reference does: 13
    l-blocks of 128 positions in one group (target 2), or in groups of 4, 4, 4 and 1 (12)."""
    cs = _triton_conv_module()
    monkeypatch.setattr(cs, "TARGET_PROGRAMS", target)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 40, 41, device=device())
    want = torch.rand(27, device=device())
    got = want.clone()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        reference.conv_stats(x, want, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1)
        cs.conv_stats(x, got, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1)
    finally:
        torch.use_deterministic_algorithms(was)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_conv_stats_stem_lattice_is_split(kernel_ops, emu_launches):
    """NOTE: [lattice split] in csrc/conv_stats.cu: ResNet-50's stem (3 channels, 7x7 at stride
    2 and padding 3: 147 entries over a 112 x 112 lattice) runs each entry on 4 blocks of 256
    threads, about 12 positions a thread (at 64 positions a thread it ran 147 blocks, 49
    positions a thread one after another); its sums match the reference (the positions walked
    with carried coordinates, NOTE: [lattice walk])."""
    if not emulated("cuda") or backend_name(kernel_ops) != "cuda":
        pytest.skip("the launch log is the emulated CUDA backend's")
    torch.manual_seed(8)
    x = torch.randn(1, 3, 224, 224)
    want = torch.zeros(147, dtype=torch.float64)
    got = torch.zeros(147)
    reference.conv_stats(x.double(), want, (7, 7), (2, 2), [(3, 3), (3, 3)], (1, 1), 1)
    kernel_ops.conv_stats(x, got, (7, 7), (2, 2), [(3, 3), (3, 3)], (1, 1), 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    lattice = [(gx, gy) for name, gx, gy in emu_launches() if "conv_lattice_kernel" in name]
    assert lattice == [(147, 4)], lattice


@pytest.mark.parametrize("det", [False, True])
def test_conv_stats_large_lattice_few_channels(kernel_ops, det, emu_launches):
    """One channel over a large volume: 27 (channel, offset) entries, 13,824 output positions
    each.  The sums are split over several blocks / program groups (the CUDA launcher ran 27
    blocks whatever the lattice size: NOTE: [lattice split]; here it runs 4 per entry, Triton
    216 groups) and still match the reference, with and without deterministic algorithms."""
    torch.manual_seed(5)
    x = torch.randn(1, 1, 24, 24, 24, device=device())
    want = torch.rand(27, device=device())
    got = want.clone()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        reference.conv_stats(x, want, (3, 3, 3), (1, 1, 1), [(1, 1)] * 3, (1, 1, 1), 1)
        kernel_ops.conv_stats(x, got, (3, 3, 3), (1, 1, 1), [(1, 1)] * 3, (1, 1, 1), 1)
    finally:
        torch.use_deterministic_algorithms(was)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    grids = emu_launches()
    if grids:                          # the emulated CUDA backend logs its launches
        lattice = [g for g in grids if g[1] == 27]
        assert lattice and all(g[2] > 1 for g in lattice), grids


def test_conv_stats_plans_follow_every_argument(kernel_ops, monkeypatch):
    """NOTE: [launch plans] One x shape, called again and again with one thing changed each time
    (memory format, a non-dense slice, kernel, stride, padding, padding_mode, dilation, groups,
    the input's dtype, an empty batch), each against the reference: a plan memoised on less than
    all of them is reused where it does not apply and reads the wrong positions.  On Triton also
    the tuning constants: the ordered partial sums (deterministic algorithms) on, which the
    lattice launch's PARTIAL follows where a channel's positions span several programs, then
    TARGET_PROGRAMS made so small that they do not."""
    partial = []
    if backend_name(kernel_ops) == "triton":
        cs = _triton_conv_module()
        real = cs._lattice_sum_kernel
        monkeypatch.setattr(cs, "_lattice_sum_kernel", type("Spy", (), {"__getitem__": (
            lambda self, grid: lambda *a, **kw: partial.append(kw["PARTIAL"]) or real[grid](
                *a, **kw))})())
    torch.manual_seed(12)
    base = torch.randn(3, 4, 12, 14, device=device())    # 168 positions: two l-blocks
    wide = torch.randn(3, 4, 12, 28, device=device())
    calls = [(base, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
             (base.to(memory_format=torch.channels_last),) + ((3, 3), (1, 1), [(1, 1), (1, 1)],
                                                              (1, 1), 1, "zeros"),
             (wide[..., ::2], (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
             (base, (3, 2), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
             (base, (2, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
             (base, (3, 3), (2, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
             (base, (3, 3), (1, 1), [(0, 2), (1, 1)], (1, 1), 1, "zeros"),
             (base, (3, 3), (1, 1), [(0, 2), (1, 1)], (1, 1), 1, "reflect"),
             (base, (3, 3), (1, 1), [(0, 2), (1, 1)], (1, 1), 1, "circular"),
             (base, (3, 3), (1, 1), [(1, 1), (1, 1)], (2, 1), 1, "zeros"),
             (base, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 2, "zeros"),
             (base.to(torch.bfloat16), (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros"),
             (base, (1, 1), (1, 1), [(0, 0), (0, 0)], (1, 1), 1, "zeros"),
             (base.to(memory_format=torch.channels_last),) + ((1, 1), (1, 1), [(0, 0), (0, 0)],
                                                              (1, 1), 1, "zeros"),
             (base[:0], (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1, "zeros")]
    for step in range(3):   # the defaults, deterministic mode, and that with TARGET_PROGRAMS 2
        if step == 2 and backend_name(kernel_ops) == "triton":
            monkeypatch.setattr(cs, "TARGET_PROGRAMS", 2)
        with deterministic(step > 0):
            for x, *args in calls:
                want = torch.rand(4 * math.prod(args[0]), device=device())
                got = want.clone()
                assert kernel_ops.conv_stats(x, got, *args) == reference.conv_stats(x, want,
                                                                                     *args)
                torch.testing.assert_close(got, want, rtol=1e-5,
                                           atol=1e-5 * want.abs().max().item())
            with pytest.raises((ValueError, RuntimeError), match="groups 3"):   # checked each call
                kernel_ops.conv_stats(base, got, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 3)
            with pytest.raises((ValueError, RuntimeError), match="out has 5 entries"):
                kernel_ops.conv_stats(base, got[:5], (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1), 1)
    if backend_name(kernel_ops) == "triton":
        assert len(partial) == 3 * 12, partial
        assert not any(partial[:12]) and any(partial[12:24]) and not any(partial[24:]), partial
