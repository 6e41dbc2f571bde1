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

import torch

from .harness import Case, Harness, run_cases
from .optsetup import OptSetup, model_sets, n_params

OP = "fused_step"
# p, g, m (12 B/param) + AdamW's m, v (8) + slack for the torch reference's per-tensor temporaries
BYTES_PER_PARAM_NEEDED = 20
SLACK_BYTES = 6 * 2 ** 30


def run(h: Harness) -> None:
    for label, factory in model_sets(h.smoke):
        n = n_params(factory)
        free = h.free_memory_bytes()
        need = n * BYTES_PER_PARAM_NEEDED + SLACK_BYTES
        if free is not None and need > free:
            h.add(kind="op", op=OP, case=label, backend="*", shape=[n], dtype="float32",
                  status="skipped", note=f"needs ~{need / 2 ** 30:.1f} GiB, "
                                         f"{free / 2 ** 30:.1f} GiB free")
            continue
        with h.guard(kind="op", op=OP, case=label, backend="setup", shape=[n]):
            s = OptSetup(factory, h.device)

            def build(ops, s=s):
                return lambda: ops.fused_step(s.params, s.grads, s.moms, s.steps, s.opt.fisher.fac,
                                              s.meta, s.hyper, False)

            def adamw(s=s):
                kw = {"fused": True} if h.cuda else {"foreach": True}
                opt = torch.optim.AdamW(s.params, lr=1e-4, weight_decay=1e-4, **kw)
                return opt.step, 7 * s.numel * s.elsize

            case = Case(f"{label} ({s.numel / 1e6:.1f}M, {len(s.params)} tensors)", [s.numel],
                        str(s.params[0].dtype).replace("torch.", ""), 5 * s.numel * s.elsize,
                        build, baselines=[("adamw", adamw)], n_tensors=len(s.params))
            run_cases(h, OP, [case], ratio_to="adamw")
            del s, case
            if h.cuda:
                torch.cuda.empty_cache()
