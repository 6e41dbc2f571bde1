"""End-to-end iteration benchmark: forward + backward + ``step()`` (+ ``zero_grad``), SPEC section 8.

Workloads (GPU mode; smoke runs use tiny versions of the same models):
* ResNet-18 CIFAR shape, batch 256 x 3 x 32 x 32, 10 classes, cross-entropy;
* 4-layer GPT, d=512, T=256, batch 16, vocab 8192, next-token cross-entropy;
each in fp32 and under bf16 autocast; and ``resnet18-cl``, the ResNet-18 in channels_last, eager
under bf16 autocast only.

Optimizers: SGD(momentum=0.9, foreach=True), AdamW(fused=True) (foreach on CPU), and AdaFisher /
AdaFisherW on every backend that loads, at TCov=1 and TCov=100.

Per configuration: ``warmup`` iterations (these include the statistics iterations of TCov=100 at
steps 0 and 100 only if the run is that long: the median is what TCov=100 costs on its 99 other
iterations), then ``iters`` timed iterations, each timed whole and its ``step()`` alone (CUDA events
around both, one sync at the end).  Columns: ``time_ms`` = median iteration, ``step_ms`` = median
``step()``, ``peak_mem_mib`` = torch.cuda.max_memory_allocated over warm-up and timed iterations
(model, activations, gradients, optimizer state), ``ratio`` = time / AdamW time of the same
workload and dtype (the headline), ``step_ratio`` = step_ms / AdamW step_ms, ``host_ms`` (eager
and compile modes) = the host time of one iteration, zero_grad included, from an idle device
(NOTE: [host-bound iterations]).  Anchor figures of
the released code (SPEC 8, H100, fp32) are added to the matching eager rows as ``anchor_*``.

Execution modes (column ``mode``; ``--modes``; NOTE: [e2e modes]):
* ``eager``: the loop above, as it always was.
* ``compile``: the model wrapped in ``torch.compile(model)`` (forward and backward compiled, the
  statistics hooks traced into the graph), ``step()`` eager.  Backend ``inductor``, except in smoke
  runs: ``aot_eager`` (dynamo + AOT autograd, no code generation), which keeps the CPU smoke run in
  seconds while still tracing the hooks forward and backward (``compile_backend`` column).
  ``torch.compiler.reset()`` before each configuration, so no configuration inherits another's
  graphs or runs into dynamo's recompile limit; the warm-up iterations include the compilation
  (``setup_s``), the timed ones do not.
* ``cudagraph`` (CUDA only): the whole iteration (``zero_grad(set_to_none=False)``, forward,
  backward, ``step()``) captured with ``torch.cuda.graph`` after eager warm-up on a side stream, then
  replayed on static input tensors (NOTE: [cudagraph mode]).  AdamW(fused=True, capturable=True),
  AdaFisher(capturable=True).  One event pair around each replay: ``step_ms`` is not measured.
The compile and cudagraph modes run AdamW(fused) and AdaFisher at TCov=1 and TCov=100 on every
backend (``MODE_OPTIMIZERS``); ``ratio`` is always to AdamW in the same mode, workload and dtype.
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

# NOTE: [e2e modes] execution modes (module docstring); the default is every mode the device runs
MODES = ("eager", "cudagraph", "compile")     # cudagraph before compile: it compiles nothing
# the compile and cudagraph modes measure AdamW(fused) and AdaFisher at both TCov (not SGD or
# AdaFisherW, which differ from these only in the step's arithmetic): half the compilations
MODE_OPTIMIZERS = ("adamw", "AdaFisher TCov=1", "AdaFisher TCov=100")
# torch.compile backend: inductor is what users run; smoke runs use aot_eager (dynamo + AOT
# autograd traced forward and backward, hooks included, but no code generation or C++ compiler)
COMPILE_BACKEND, SMOKE_COMPILE_BACKEND = "inductor", "aot_eager"
# smoke runs compile one workload, fp32, two optimizers: tracing the tiny ResNet-18 with its 41
# hooked layers takes ~18 s under aot_eager on a 2-core CI host, the tiny GPT ~5 s
SMOKE_COMPILE = ("gpt4", ("adamw", "AdaFisher TCov=1"))
# ResNet-18 with weights, inputs (so activations and gradients) in channels_last, as tensor-core
# training runs it: the kernels read those where they lie (NOTE: [memory order], [row transpose])
CL_WORKLOAD = "resnet18-cl"
CUDAGRAPH_CPU_NOTE = ("cudagraph mode not run: CUDA graphs (torch.cuda.graph) need a CUDA device; "
                      "this run is on the CPU")


def default_modes(h: Harness):
    """eager, cudagraph and compile on CUDA; eager and compile elsewhere."""
    return MODES if h.cuda else ("eager", "compile")


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

    def r18_cl_batch():
        x, y = r18_batch()
        return x.to(memory_format=torch.channels_last), y

    return [("resnet18", mk_r18, r18_batch, f"b{b} 3x{hw}x{hw}"),
            (CL_WORKLOAD, lambda: mk_r18().to(memory_format=torch.channels_last), r18_cl_batch,
             f"b{b} 3x{hw}x{hw} channels_last"),
            ("gpt4", lambda: models.GPT(**g), gpt_batch,
             f"b{gb} T{g['block_size']} d{g['d']} L{g['n_layer']} V{g['vocab']}")]


def _optimizers(h: Harness):
    """[(label, anchor key, backend, factory(model, capturable) -> optimizer)]; ``capturable``
    (cudagraph mode) keeps the step counts on the device."""
    from adafisher_fast import AdaFisher, AdaFisherW
    # AdamW first: every later row of the workload gets its ratio to it
    out = [("adamw", "adamw", "torch",
            lambda m, capturable=False: torch.optim.AdamW(
                m.parameters(), lr=1e-3, weight_decay=0.01,
                **({"fused": True, "capturable": capturable} if h.cuda else {"foreach": True}))),
           ("sgd", "sgd", "torch",
            lambda m, capturable=False: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9,
                                                        foreach=True))]
    ok, missing = available_backends(h)
    for name, why in missing:
        h.add(kind="e2e", op=OP, case="*", backend=name, status="skipped", note=why)
    for name, _ in ok:
        for cls in (AdaFisher, AdaFisherW):
            for tcov in (1, 100):
                def make(m, capturable=False, cls=cls, tcov=tcov, name=name):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return cls(m, lr=1e-3, TCov=tcov, weight_decay=5e-4, backend=name,
                                   capturable=capturable)
                label = f"{cls.__name__} TCov={tcov}"
                out.append((label, label, name, make))
    return out


def _loss(name, model, batch):
    x, y = batch
    out = model(x)
    if name == "gpt4":
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out.float(), y)


def compile_backend(h: Harness) -> str:
    return SMOKE_COMPILE_BACKEND if h.smoke else COMPILE_BACKEND


def _time_config(h, wname, mk_model, mk_batch, make_opt, amp, mode="eager"):
    """(timing, step ms or None, peak MiB, parameter count, extra columns) of one configuration."""
    torch.manual_seed(0)
    model = mk_model().to(h.device)
    opt = make_opt(model, capturable=mode == "cudagraph")
    batches = [mk_batch() for _ in range(2)]
    ctx = (lambda: torch.autocast(h.device.type, dtype=torch.bfloat16)) if amp else nullcontext
    extra = {}
    net = model                 # what the forward calls: the model, or its compiled wrapper
    if mode == "compile":
        # the optimizer hooked the model's layers above; dynamo traces those hooks.  A fresh dynamo
        # state per configuration (NOTE: [e2e modes])
        torch.compiler.reset()
        extra["compile_backend"] = compile_backend(h)
        net = torch.compile(model, backend=extra["compile_backend"])

    def fwd_bwd(i):
        with ctx():
            loss = _loss(wname, net, batches[i % 2])
        loss.backward()

    warmup = 1 if h.smoke else 10
    if mode == "compile":
        # TCov > 1 compiles twice (statistics iteration 0, plain iteration 1): both before timing
        warmup = max(warmup, 2)
    iters = h.iters(100, 5, 2)
    h.reset_peak_memory()
    if mode == "cudagraph":
        t, n_graphs, setup_s = _time_cudagraph(h, wname, model, opt, batches, ctx, warmup, iters)
        peak = h.peak_memory_mib()
        n = sum(p.numel() for p in model.parameters())
        del model, opt, batches
        gc.collect()
        return t, None, peak, n, {"graphs": n_graphs, "setup_s": setup_s}
    t_setup = time.perf_counter()
    for i in range(warmup):
        if i == warmup // 2:            # the second half of warm-up estimates an iteration's time
            h.sync()
            t0 = time.perf_counter()
        fwd_bwd(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
    h.sync()
    per_iter = (time.perf_counter() - t0) / (warmup - warmup // 2)
    extra["setup_s"] = time.perf_counter() - t_setup
    if not h.smoke:
        # NOTE: [e2e budget] ~E2E_BUDGET_S of timed iterations per configuration (20 to 100), so
        # that many of the 70 eager configurations (14 optimizers x 5 workloads and dtypes; fp32
        # first) fit in what the GPU plan leaves them, 85 s or more (NOTE: [GPU plan] in
        # .ci/gpu); the rest are marked skipped.  Compile and cudagraph modes: 3 optimizers each
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
    # NOTE: [host-bound iterations] The events time the device.  The host runs ahead of it, so its
    # Python and launches cost nothing while they take less time than the kernels they queue; past
    # that the device waits for them and every microsecond of host work is a microsecond of
    # iteration.  ``host_ms`` is how long the host takes to queue one iteration from an idle
    # device (a sync before each, none inside: the launches do not wait): a row whose host_ms
    # reaches its ms/iter is host-bound, and there AdaFisher's hooks and launchers (bench.host)
    # are what its extra time is made of.  So is ``step_ms`` there: its events span the device's
    # wait for the step's launches too (on the H200, 2026-12-04, AdamW's step read 0.742 ms
    # under bf16 autocast against 0.176 in fp32, the same fp32 parameters, on the GPT whose bf16
    # iteration leaves the device idle sooner).  (Median of 5 after the timed loop, which they
    # do not disturb.)
    host = []
    for i in range(1 if h.smoke else 5):
        h.sync()
        t0 = time.perf_counter()
        fwd_bwd(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
        host.append(time.perf_counter() - t0)
    h.sync()
    extra["host_ms"] = sorted(host)[len(host) // 2] * 1e3
    n = sum(p.numel() for p in model.parameters())
    del model, opt, batches, net
    gc.collect()
    return summarize(it_ms), summarize(st_ms)["time_ms"], peak, n, extra


# NOTE: [cudagraph mode] Whole-iteration capture, as in PyTorch's "whole network capture" recipe:
# * warm-up: ``warmup`` eager iterations on a side stream (cuBLAS/cuDNN handles and workspaces,
#   Triton JIT, optimizer state, AdaFisher's cached device tables all created there, on the stream
#   the capture then uses), the default stream waiting for it afterwards;
# * the captured iteration is ``zero_grad(set_to_none=False)``, forward, backward, ``step()``.
#   Gradients keep their storage: the warm-up allocated them, the graph zeroes them (a captured
#   memset; AdaFisher.zero_grad also clears its statistics buffer) and backward accumulates into
#   them.  Nothing allocated inside a capture outlives its replay, and AdaFisher's fused_step finds
#   the device pointer table it cached during warm-up (keyed by the parameters', gradients' and
#   momenta's data pointers: NOTE: [pointer tables] in fisher_kernels/fused_step.py) instead of
#   uploading a new one mid-capture;
# * inputs: static tensors, ``copy_``-ed from the workload's batches before each replay (outside the
#   timed region, as the eager loop feeds ready batches);
# * TCov > 1: a replay runs no Python, so neither ``opt.steps`` nor the TCov gating
#   (NOTE: [TCov gating]) advances during replay: a graph always does
#   what it did at capture.  So two graphs are captured, one after ``opt.set_steps(0)`` (hooks
#   gather statistics, step() runs layer_ema) and one after ``opt.set_steps(1)`` (plain), and the
#   replay loop picks by its own count ``k`` of device steps:
#   the statistics graph when ``k % TCov == 0``, as eager step() would.  The two captures share one
#   memory pool: each graph writes every temporary before reading it, and no tensor allocated
#   during a capture stays alive, so replaying them in any order is safe, and the pool holds one
#   iteration's activations rather than two;
# * capture also runs step()'s Python once per graph (``opt.steps`` advances) without running
#   anything on the device: the counter is put back to the device's count
#   afterwards (``opt.set_steps``).
def _time_cudagraph(h, wname, model, opt, batches, ctx, warmup, iters):
    """(timing, number of graphs, setup seconds) of the replayed whole-iteration graph(s)."""
    from adafisher_fast import AdaFisher
    dev = h.device
    fisher = isinstance(opt, AdaFisher)
    tcov = opt.TCov if fisher else 1
    static = [t.clone() for t in batches[0]]

    def load(k):
        for s, b in zip(static, batches[k % 2]):
            s.copy_(b)

    def iteration():
        opt.zero_grad(set_to_none=False)
        with ctx():
            loss = _loss(wname, model, static)
        loss.backward()
        opt.step()

    t_setup = time.perf_counter()
    warmup = max(warmup, 3)             # the PyTorch recipe warms up at least 3 iterations
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for k in range(warmup):
            load(k)
            iteration()
    torch.cuda.current_stream(dev).wait_stream(side)
    k = warmup                          # device steps so far (the TCov schedule of eager step())
    graphs, pool = {}, None
    for collecting in ((True, False) if tcov > 1 else (True,)):
        if fisher:
            opt.set_steps(0 if collecting else 1)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=pool, stream=side):
                iteration()
        except Exception as e:
            # a host sync inside the capture surfaces as "operation failed due to a previous error
            # during capture" from capture_end: report the first error, and which graph
            root = e
            while root.__context__ is not None:
                root = root.__context__
            raise RuntimeError(f"capture of the {'statistics' if collecting else 'plain'} graph "
                               f"failed: {type(root).__name__}: {root}") from e
        pool = g.pool()
        graphs[collecting] = g
    if fisher:                          # capture ran step()'s Python, not its kernels
        opt.set_steps(k)                # steps = k: the next iteration gathers iff k % TCov == 0

    def replay():
        nonlocal k
        graphs[k % tcov == 0].replay()
        k += 1

    # a few untimed replays (a graph's first launch uploads it); they also estimate the budget
    n_est = 1 if h.smoke else 5
    load(k)
    replay()
    h.sync()
    t0 = time.perf_counter()
    for _ in range(n_est):
        load(k)
        replay()
    h.sync()
    per_iter = (time.perf_counter() - t0) / n_est
    setup_s = time.perf_counter() - t_setup
    if not h.smoke:                     # NOTE: [e2e budget]
        iters = max(20, min(iters, int(E2E_BUDGET_S / max(per_iter, 1e-6))))
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(iters)]
    for i in range(iters):
        load(k)
        ev[i][0].record()
        replay()
        ev[i][1].record()
    torch.cuda.synchronize(dev)
    it_ms = [a.elapsed_time(b) for a, b in ev]
    return summarize(it_ms), (2 if tcov > 1 else 1), setup_s


def _selected(h: Harness, mode: str, wname: str, amp: bool, label: str) -> bool:
    """Whether this run measures (mode, workload, dtype, optimizer)."""
    if mode != "eager" and label not in MODE_OPTIMIZERS:
        return False
    if wname == CL_WORKLOAD:        # eager bf16 autocast, the recipe channels_last is for
        return mode == "eager" and amp and (label in SMOKE_AMP or not h.smoke)
    if h.smoke:
        if mode == "eager":
            return not amp or label in SMOKE_AMP
        return not amp and wname == SMOKE_COMPILE[0] and label in SMOKE_COMPILE[1]
    return True


def run(h: Harness, modes=None) -> None:
    """Every workload x dtype x optimizer in each of ``modes`` (default ``default_modes(h)``),
    mode by mode in the order given (a run cut short keeps the first; the default: all eager
    rows first, so that a compiler or capture failure cannot cost them)."""
    requested = tuple(modes) if modes else default_modes(h)
    unknown = set(requested) - set(MODES)
    if unknown:
        raise ValueError(f"unknown e2e modes {sorted(unknown)}; known: {', '.join(MODES)}")
    if not h.cuda and (modes is None or "cudagraph" in requested):
        # never a silent skip: one row (table.md) and one printed line
        h.add(kind="e2e", op=OP, case="*", backend="*", status="skipped", mode="cudagraph",
              note=CUDAGRAPH_CPU_NOTE)
        if not h.verbose:
            print(f"# e2e: {CUDAGRAPH_CPU_NOTE}", flush=True)
    run_modes = [m for m in dict.fromkeys(requested) if m != "cudagraph" or h.cuda]
    opts = _optimizers(h)
    wls = workloads(h)
    for mode in run_modes:
        # fp32 rows of every workload first: they carry SPEC 8's anchor figures, so a run cut
        # short (NOTE: [run deadline]) loses the bf16 rows first
        for amp in (False, True):
            for wname, mk_model, mk_batch, desc in wls:
                dt = "bf16-autocast" if amp else "float32"
                base = {}               # AdamW of this mode, workload and dtype
                for label, key, backend, make_opt in opts:
                    if not _selected(h, mode, wname, amp, label):
                        continue
                    case = f"{wname} {desc}"
                    if h.out_of_time(kind="e2e", op=OP, case=case, backend=backend, dtype=dt,
                                     optimizer=label, workload=wname, mode=mode):
                        continue
                    with h.guard(kind="e2e", op=OP, case=case, backend=backend, dtype=dt,
                                 optimizer=label, workload=wname, mode=mode):
                        t, step_ms, peak, n, more = _time_config(h, wname, mk_model, mk_batch,
                                                                 make_opt, amp, mode)
                        if label == "adamw":
                            base = {"time_ms": t["time_ms"], "step_ms": step_ms}
                        extra = {"optimizer": label, "workload": wname, "mode": mode,
                                 "step_ms": step_ms, "peak_mem_mib": peak, "n_params": n, **more}
                        if base:
                            extra["ratio"] = t["time_ms"] / base["time_ms"]
                            extra["step_ratio"] = (step_ms / base["step_ms"]
                                                   if step_ms and base["step_ms"] else None)
                        if "TCov=" in label and mode == "eager" and not amp:   # SPEC 8: fp32
                            extra["target_ratio"] = TARGETS.get((wname, int(label.split("=")[1])))
                        if not amp and mode == "eager":
                            for k, v in ANCHORS.get((wname, key), {}).items():
                                extra[f"anchor_{k}"] = v
                        h.add(kind="e2e", op=OP, case=case, backend=backend, dtype=dt,
                              timing=t, shape=desc, **extra)
                    if h.cuda:
                        torch.cuda.empty_cache()
    if "compile" in run_modes:
        torch.compiler.reset()
