"""The kernel microbenchmarks under pytest-benchmark: ``pytest bench --benchmark-only``
(add ``--benchmark-json=out.json`` to keep the numbers).  Same cases as ``python -m bench``
(the primary entry point, which also writes GB/s, % of peak, the table and the plots); here each
(op, case, backend) is one benchmark, with bytes and GB/s in ``extra_info``.

Shapes: the GPU ones when CUDA is available, else the smoke ones (``BENCH_SMOKE=1`` forces smoke).
"""
import importlib
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.harness import Harness, LazyCase, available_backends  # noqa: E402

OPS = ("linear_stats", "conv_stats", "norm_stats", "embedding_stats", "layer_ema", "fused_step")
_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_SMOKE = _DEV.type == "cpu" or os.environ.get("BENCH_SMOKE") == "1"
_H = Harness(_DEV, _SMOKE, os.environ.get("BENCH_PYTEST_OUT", "/tmp/adafisher-bench-pytest"),
             verbose=False)
_BACKENDS = dict(available_backends(_H)[0])


def _params():
    out = []
    for op in OPS:
        for c in importlib.import_module(f"bench.bench_{op}").cases(_H):
            label = c.label
            for b in list(_BACKENDS) + (["released", "im2col"] if op == "conv_stats" else []) + \
                    (["adamw"] if op == "fused_step" else []):
                dt = getattr(c, "dtype", "")
                out.append(pytest.param(op, c, b, id=f"{op}-{label}-{dt}-{b}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("op,case,backend", _params())
def test_op(benchmark, op, case, backend):
    c = case.get() if isinstance(case, LazyCase) else case
    if isinstance(c, dict):
        pytest.skip(c["why"])
    base = dict(c.baselines)
    nbytes = c.bytes
    if backend in base:
        fn = base[backend]()
        if isinstance(fn, tuple):
            fn, nbytes = fn
    else:
        fn = c.build(_BACKENDS[backend])

    def call():
        with torch.no_grad():
            fn()
        _H.sync()

    benchmark.pedantic(call, rounds=_H.iters(50, 10, 3), warmup_rounds=2, iterations=1)
    # --benchmark-disable runs each call once, untimed: no stats, no GB/s
    med = benchmark.stats.stats.median if benchmark.stats else None
    benchmark.extra_info.update(op=op, backend=backend, dtype=c.dtype, shape=c.shape, bytes=nbytes,
                                gbps=nbytes / med / 1e9 if med else None, **_H.env)
