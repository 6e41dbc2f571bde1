"""The statistics launches at the GPU tests' and benchmarks' shapes (ResNet-50's convs at batch 64,
a GPT-2 block's 16 x 1024 tokens, ...) and odd ones, for the checks that drive a backend's launchers
without computing anything: tests/triton_codegen.py records the Triton launches and compiles
them, tests/test_cuda_emu.py checks the CUDA launches in the emulator's dry mode."""
import torch


def gpu_launches(ops):
    """``stats_calls(ops)``, then its float32 calls again under deterministic algorithms, which
    launch the partial-sums kernels instead (NOTE: [ordered partials])."""
    stats_calls(ops)
    torch.use_deterministic_algorithms(True)
    try:
        stats_calls(ops, dtypes=(torch.float32,))
    finally:
        torch.use_deterministic_algorithms(False)


def stats_calls(ops, dev="cpu", dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """Direct launcher calls of a backend's ``ops``: every statistics op in ``dtypes`` over odd
    and large shapes, every conv dimensionality and padding mode, both norm modes."""
    e = dict(device=dev)
    for dt in dtypes:
        for shape, dim in (((16 * 1024, 768), -1), ((16 * 1024, 3072), -1), ((7, 13), -1),
                           ((256, 64, 1024), 1), ((33, 1, 7), 1), ((64, 2048, 49), 1),
                           ((64, 1024, 196), 1)):
            x = torch.empty(shape, dtype=dt, **e)
            for square in (True, False):
                ops.linear_stats(x, torch.zeros(shape[dim], **e), dim, square, 0.5)
        for c, sp, k, st, pad, dil, g, mode in (
                (3, (224, 224), (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 1, "zeros"),
                (64, (56, 56), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, "zeros"),
                (256, (56, 56), (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, "zeros"),
                (512, (28, 28), (3, 3), (2, 2), ((1, 1), (1, 1)), (2, 2), 32, "reflect"),
                (8, (33,), (5,), (2,), ((2, 2),), (1,), 8, "circular"),
                (4, (7, 9, 5), (3, 3, 3), (1, 2, 1), ((1, 1),) * 3, (1, 1, 1), 2, "replicate"),
                (16, (13, 13), (11, 11), (1, 1), ((5, 5), (5, 5)), (1, 1), 1, "zeros")):
            ktot = 1
            for kk in k:
                ktot *= kk
            ops.conv_stats(torch.empty(64, c, *sp, dtype=dt, **e),
                           torch.zeros(c * ktot, **e), k, st, pad, dil, g, mode)
        for r, c, i in ((16 * 1024, 768, 1), (64, 256, 56 * 56), (3, 7, 13)):
            x = torch.empty(r, c, i, dtype=dt, **e)
            # GroupNorm(32) over 16K rows: the sample kernels' largest grid (65536 blocks on x)
            for mode, groups in [("channel", 1), ("sample", 1), ("sample", c if c % 4 else 4)] + \
                    [("sample", 32)] * (c % 32 == 0):
                ops.norm_stats(x, torch.zeros(c, **e), mode, groups, 1e-5)
            ops.norm_stats(x, torch.zeros(c, **e), "sample", 1, 1e-5, center=False)
            ops.norm_stats(x, torch.zeros(c, **e), "channel", 1, 1e-5,
                           mean=torch.zeros(c, **e), var=torch.ones(c, **e))
        # channels_last activations, read where they lie (NOTE: [memory order])
        xcl = torch.empty(8, 64, 28, 28, dtype=dt, **e).to(memory_format=torch.channels_last)
        ops.conv_stats(xcl, torch.zeros(64 * 9, **e), (3, 3), (1, 1), ((1, 1), (1, 1)),
                       (1, 1), 1, "zeros")
        for mode, groups in (("channel", 1), ("sample", 32)):
            ops.norm_stats(xcl.reshape(8, 64, -1), torch.zeros(64, **e), mode, groups,
                           1e-5)
    for idt in (torch.int64, torch.int32):
        ops.embedding_stats(torch.zeros(16, 1024, dtype=idt, **e), torch.zeros(50257, **e))
    # int64 program offsets, A or B near 2^31 (NOTE: [wide offsets]); on meta: only launched
    m = dict(device="meta")
    ops.linear_stats(torch.empty(2, 1, 2 ** 31 + 4096, **m), torch.zeros(1, **m), 1)
    ops.embedding_stats(torch.empty(2 ** 31 + 5, dtype=torch.int64, **m),
                        torch.zeros(8, **m))
