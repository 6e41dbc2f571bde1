"""Microbenchmark of ``fused_step`` (SPEC 4.4, second launch): momentum, bias correction, weight
decay and the damped division with F computed per element, over every parameter of a model.

Parameter sets: ResNet-18 CIFAR (11M), GPT-2 small (124M), a GPT-2-shaped 1.1B model, fp32, with
the tables a real AdaFisher optimizer builds (official preset; L2 weight decay).  A set that does
not fit in the free GPU memory is reported as a ``skipped`` row.  Baseline: torch's
AdamW(fused=True) (foreach on CPU) ``step()`` on the same parameters; the ``ratio`` column is
time / AdamW time (SPEC 8 target: at most 0.8; the bytes ratio is 20/28 = 0.71).

Bytes model (``es`` = parameter element size, N = parameter elements):

| op                  | bytes counted                                    |
|---------------------|--------------------------------------------------|
| fused_step          | read g, m, p + write m, p: 5 * N * es (20 B/param in fp32) |
| adamw (baseline)    | read g, m, v, p + write m, v, p: 7 * N * es (28 B/param)   |
"""
from __future__ import annotations

from typing import Optional

import torch

from adafisher_fast import reference

from .harness import Harness, LazyCase, run_cases
from .optsetup import OptSetup, model_sets, n_params

OP = "fused_step"
# p, g, m (12 B/param) + AdamW's m, v (8) + slack for the torch reference's per-tensor temporaries
BYTES_PER_PARAM_NEEDED = 20
SLACK_BYTES = 6 * 2 ** 30
CPU_MAX_PARAMS = 2e7    # --full-cpu runs (shared CI hosts) stop at ResNet-18


def cases(h: Harness):
    out = []
    for label, factory in model_sets(h.smoke):
        n = n_params(factory)
        need = n * BYTES_PER_PARAM_NEEDED + SLACK_BYTES

        def setup(factory=factory, label=label, need=need, n=n):
            free = h.free_memory_bytes()
            if free is None and n > CPU_MAX_PARAMS:
                return dict(label=label, shape=[n], why=f"CPU run: sets above {CPU_MAX_PARAMS:.0e} "
                                                        f"parameters are left to the GPU run")
            if free is not None and need > free:
                return dict(label=label, shape=[n], why=f"needs ~{need / 2 ** 30:.1f} GiB, "
                                                        f"{free / 2 ** 30:.1f} GiB free")
            s = OptSetup(factory, h.device)

            def build(ops):
                # the step counts where the optimizer keeps them for this backend: on the CPU for
                # the reference, on the parameters' device for the kernels (NOTE: [device steps])
                steps = s.steps if ops is reference else [t.to(s.params[0].device) for t in s.steps]
                return lambda: ops.fused_step(s.params, s.grads, s.moms, steps, s.opt.fisher.fac,
                                              s.meta, s.hyper, False)

            def adamw():
                kw = {"fused": True} if h.cuda else {"foreach": True}
                opt = torch.optim.AdamW(s.params, lr=1e-4, weight_decay=1e-4, **kw)
                return opt.step, 7 * s.numel * s.elsize

            return dict(label=f"{label} ({s.numel / 1e6:.1f}M, {len(s.params)} tensors)",
                        shape=[s.numel], dtype=str(s.params[0].dtype)[6:],
                        bytes=5 * s.numel * s.elsize, build=build, baselines=[("adamw", adamw)],
                        extra=dict(n_tensors=len(s.params), chunk=_chunk(s)), keep=s)
        out.append(LazyCase(label, setup))
    return out


def _chunk(s: OptSetup) -> Optional[int]:
    """Elements a program or block of the kernel steps (both backends size them alike: NOTE:
    [chunk size] in fisher_kernels/fused_step.py); None without Triton."""
    try:
        from fisher_kernels.fused_step import chunk_size
    except ImportError:
        return None
    return chunk_size([p.numel() for p in s.params], s.params[0].dtype)


def run(h: Harness) -> None:
    for c in cases(h):
        run_cases(h, OP, [c], ratio_to="adamw")
        c.release()
        if h.cuda:
            torch.cuda.empty_cache()
