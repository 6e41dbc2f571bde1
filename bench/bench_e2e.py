"""End-to-end iteration benchmark: forward + backward + ``step()`` (+ ``zero_grad``), SPEC section 8.

Workloads (GPU mode; smoke runs use tiny versions of the same models):
* ResNet-18 CIFAR shape, batch 256 x 3 x 32 x 32, 10 classes, cross-entropy;
* 4-layer GPT, d=512, T=256, batch 16, vocab 8192, next-token cross-entropy;
each in fp32 and under bf16 autocast.

Optimizers: SGD(momentum=0.9, foreach=True), AdamW(fused=True) (foreach on CPU), and AdaFisher /
AdaFisherW on every backend that loads, at TCov=1 and TCov=100.

Per configuration: ``warmup`` iterations (these include the statistics iterations of TCov=100 at
steps 0 and 100 only if the run is that long: the median is what TCov=100 costs on its 99 other
iterations), then ``iters`` timed iterations, each timed whole and its ``step()`` alone (CUDA events
around both, one sync at the end).  Columns: ``time_ms`` = median iteration, ``step_ms`` = median
``step()``, ``peak_mem_mib`` = torch.cuda.max_memory_allocated over warm-up and timed iterations
(model, activations, gradients, optimizer state), ``ratio`` = time / AdamW time of the same
workload and dtype (the headline), ``step_ratio`` = step_ms / AdamW step_ms.  Anchor figures of
the released code (SPEC 8, H100, fp32) are added to the matching rows as ``anchor_*``.
"""
from __future__ import annotations

import gc
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import models
from .harness import Harness, available_backends, summarize

OP = "e2e"

# SPEC section 8: the released code on an H100, fp32, torch 2.11.
# (workload, optimizer key) -> {metric: value}; optimizer key as in ``_optimizers``' labels
# with the backend left out: the released AdaFisher is compared with every backend's row.
ANCHORS = {
    ("resnet18", "sgd"): {"time_ms": 14.6, "step_ms": 0.20, "peak_mem_mib": 1351},
    ("resnet18", "adamw"): {"time_ms": 15.4, "step_ms": 0.14, "peak_mem_mib": 1394},
    ("resnet18", "AdaFisher TCov=100"): {"time_ms": 24.8, "step_ms": 3.61, "peak_mem_mib": 1352},
    ("resnet18", "AdaFisher TCov=1"): {"time_ms": 70.5, "step_ms": 4.44, "peak_mem_mib": 2591},
    ("gpt4", "adamw"): {"time_ms": 14.2},
    ("gpt4", "AdaFisherW TCov=100"): {"time_ms": 18.8},
    ("gpt4", "AdaFisher TCov=1"): {"time_ms": 40.4},
}
# SPEC section 8 targets: iteration ratio to AdamW(fused) at TCov=1 / TCov=100
E2E_BUDGET_S = 2.5      # NOTE: [e2e budget]
# smoke runs time these under bf16 autocast (the code path), the rest in fp32 only (seconds)
SMOKE_AMP = ("adamw", "AdaFisher TCov=1")
TARGETS = {("resnet18", 1): 1.06, ("resnet18", 100): 1.0, ("gpt4", 1): 1.03, ("gpt4", 100): 1.0}


def workloads(h: Harness):
    """[(name, model factory, batch factory)]."""
    dev = h.device
    if h.smoke:
        r18 = (lambda: models.resnet18_cifar(width=4), 2, 8)
        gpt = dict(vocab=64, d=32, n_layer=2, n_head=2, block_size=16, batch=2)
    else:
        r18 = (models.resnet18_cifar, 256, 32)
        gpt = dict(vocab=8192, d=512, n_layer=4, n_head=8, block_size=256, batch=16)
    mk_r18, b, hw = r18

    def r18_batch():
        return (torch.randn(b, 3, hw, hw, device=dev), torch.randint(0, 10, (b,), device=dev))

    g = dict(gpt)
    gb = g.pop("batch")

    def gpt_batch():
        idx = torch.randint(0, g["vocab"], (gb, g["block_size"] + 1), device=dev)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    return [("resnet18", mk_r18, r18_batch, f"b{b} 3x{hw}x{hw}"),
            ("gpt4", lambda: models.GPT(**g), gpt_batch,
             f"b{gb} T{g['block_size']} d{g['d']} L{g['n_layer']} V{g['vocab']}")]


def _optimizers(h: Harness):
    """[(label, anchor key, backend, factory(model) -> optimizer)]."""
    from adafisher_fast import AdaFisher, AdaFisherW
    # AdamW first: every later row of the workload gets its ratio to it
    out = [("adamw", "adamw", "torch",
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01,
                                        **({"fused": True} if h.cuda else {"foreach": True}))),
           ("sgd", "sgd", "torch",
            lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True))]
    ok, missing = available_backends(h)
    for name, why in missing:
        h.add(kind="e2e", op=OP, case="*", backend=name, status="skipped", note=why)
    for name, _ in ok:
        for cls in (AdaFisher, AdaFisherW):
            for tcov in (1, 100):
                def make(m, cls=cls, tcov=tcov, name=name):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return cls(m, lr=1e-3, TCov=tcov, weight_decay=5e-4, backend=name)
                label = f"{cls.__name__} TCov={tcov}"
                out.append((label, label, name, make))
    return out


def _loss(name, model, batch):
    x, y = batch
    out = model(x)
    if name == "gpt4":
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out.float(), y)


def _time_config(h, wname, mk_model, mk_batch, make_opt, amp):
    torch.manual_seed(0)
    model = mk_model().to(h.device)
    opt = make_opt(model)
    batches = [mk_batch() for _ in range(2)]
    ctx = (lambda: torch.autocast(h.device.type, dtype=torch.bfloat16)) if amp else nullcontext

    def fwd_bwd(i):
        with ctx():
            loss = _loss(wname, model, batches[i % 2])
        loss.backward()

    warmup = 1 if h.smoke else 10
    iters = h.iters(100, 5, 2)
    h.reset_peak_memory()
    for i in range(warmup):
        if i == warmup // 2:            # the second half of warm-up estimates an iteration's time
            h.sync()
            t0 = time.perf_counter()
        fwd_bwd(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
    h.sync()
    per_iter = (time.perf_counter() - t0) / (warmup - warmup // 2)
    if not h.smoke:
        # NOTE: [e2e budget] ~E2E_BUDGET_S of timed iterations per configuration (20 to 100):
        # 56 configurations must fit, with the kernel benchmarks, in one 10-minute GPU command
        iters = max(20, min(iters, int(E2E_BUDGET_S / max(per_iter, 1e-6))))
    it_ms, st_ms = [], []
    if h.cuda:
        ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]
        for i in range(iters):
            ev[i][0].record()
            fwd_bwd(i)
            ev[i][1].record()
            opt.step()
            ev[i][2].record()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(h.device)
        it_ms = [a.elapsed_time(c) for a, b, c in ev]
        st_ms = [b.elapsed_time(c) for a, b, c in ev]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fwd_bwd(i)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            it_ms.append((t2 - t0) * 1e3)
            st_ms.append((t2 - t1) * 1e3)
    peak = h.peak_memory_mib()
    n = sum(p.numel() for p in model.parameters())
    del model, opt, batches
    gc.collect()
    return summarize(it_ms), summarize(st_ms)["time_ms"], peak, n


def run(h: Harness) -> None:
    opts = _optimizers(h)
    for wname, mk_model, mk_batch, desc in workloads(h):
        for amp in (False, True):
            dt = "bf16-autocast" if amp else "float32"
            base = {}
            for label, key, backend, make_opt in opts:
                if h.smoke and amp and label not in SMOKE_AMP:
                    continue
                case = f"{wname} {desc}"
                with h.guard(kind="e2e", op=OP, case=case, backend=backend, dtype=dt):
                    t, step_ms, peak, n = _time_config(h, wname, mk_model, mk_batch, make_opt, amp)
                    if label == "adamw":
                        base = {"time_ms": t["time_ms"], "step_ms": step_ms}
                    extra = {"optimizer": label, "workload": wname, "step_ms": step_ms,
                             "peak_mem_mib": peak, "n_params": n}
                    if base:
                        extra["ratio"] = t["time_ms"] / base["time_ms"]
                        extra["step_ratio"] = step_ms / base["step_ms"] if base["step_ms"] else None
                    if "TCov=" in label:
                        extra["target_ratio"] = TARGETS.get((wname, int(label.split("=")[1])))
                    if not amp:
                        for k, v in ANCHORS.get((wname, key), {}).items():
                            extra[f"anchor_{k}"] = v
                    h.add(kind="e2e", op=OP, case=case, backend=backend, dtype=dt,
                          timing=t, shape=desc, **extra)
                if h.cuda:
                    torch.cuda.empty_cache()
