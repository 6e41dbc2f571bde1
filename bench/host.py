"""Host cost of ``step()`` and of the statistics hooks: ``python -m bench.host [--device cpu|cuda]
[--smoke] [--out DIR]``.

SPEC 8 asks for ``step()`` in at most 0.8x AdamW(fused=True)'s time.  On the SPEC's ResNet-18
both steps move ~0.1 ms of memory on an H100, about what their Python costs, so the host side
decides that target as much as the kernels do.  This measures it apart from the GPU:

- on the CPU (no GPU needed): the kernels are stubbed, AdaFisher's (the Triton launchers run with
  ``TRITON_INTERPRET=1`` but launch nothing) and AdamW's (``torch._fused_adamw_``), so each row is
  the optimizer's Python and table handling alone;
- on CUDA: the real kernels, timed without synchronising (the launches queue behind each other
  while the host runs ahead), so a row is the host time including the launches (the hooks' rows
  one iteration a sample, from an idle device: NOTE: [launch queue]).

Each row: the mean host time of one ``step()`` with the same gradients every step (the steady
state of a training loop whose gradients stay at the same addresses, as the CUDA caching
allocator keeps them; a CPU allocator moves new ones), the median over repeats, AdamW's in the
same run, and their ratio.  TCov=1 adds the statistics iteration's host work (``layer_ema``'s
launch, the row counts, the found-layers check).

The hooks' rows (``kind: host_hooks``): the host time of ``zero_grad()`` + forward + backward of
the model with AdaFisher's hooks against a copy without them (interleaved, the same inputs),
with statistics (TCov=1) and on the other iterations (TCov=100: the hooks' early return), and
the difference per hooked layer; how much of that the backend's statistics ops take (their
launchers' Python, and on CUDA the launches: ``launcher_us`` per layer, the hooked model timed
again, interleaved, with those ops as no-ops: ``_NoOps``), the rest being the hooks' own
bookkeeping; and what one such iteration launches beyond the copy's
(``launches``: the backend's kernels, Triton's counted at their launchers and the CUDA
backend's custom ops, plus the torch ops that do device work, not views or bare allocations; a
count that does not depend on the host, where the times do).  A compiled model or a CUDA-graph
replay runs none of this Python (README, "torch.compile and CUDA graphs").

The launchers' rows (``kind: host_op``): one call of each statistics op of each backend at a
layer of those models, its host time (on CUDA with the launch; how much of a hook's time the
launch itself takes, Triton's against the CUDA extension's; on CUDA Triton's again through its
JIT dispatch, backend "triton, JIT dispatch": NOTE: [direct launch]).  One JSON line per row in
``DIR/host.jsonl``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adafisher_fast import AdaFisher
from adafisher_fast.backends import _try_load

from . import models
from .common import md_table, write_jsonl

KERNEL_MODULES = ("conv_stats", "linear_stats", "norm_stats", "embedding_stats", "layer_ema",
                  "fused_step")


def workloads(smoke: bool):
    """[(label, model factory, input factory)]: SPEC 8's ResNet-18 and GPT (smoke: narrow ones
    with the same parameter lists, on 8x8 images)."""
    w, hw, gpt = (8, 8, dict(vocab=256, d=32, block_size=16)) if smoke else (64, 32, {})
    return [("resnet18", lambda: models.resnet18_cifar(width=w),
             lambda dev: torch.randn(2, 3, hw, hw, device=dev)),
            ("gpt4", lambda: models.GPT(**gpt),
             lambda dev: torch.randint(0, 256, (2, 16), device=dev))]


class _NoLaunch:
    """A stand-in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _swap_kernels(replace, saved: list) -> None:
    """Every Triton kernel of fisher_kernels/ (JIT, interpreted, or a ``_NoLaunch`` stub) set to
    ``replace(kernel)``, each (module, name, kernel) appended to ``saved`` as it goes (for
    ``_put_back``, also after an error midway)."""
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"fisher_kernels.{name}")
        for attr, v in list(vars(mod).items()):
            if type(v).__name__ in ("InterpretedFunction", "JITFunction", "_NoLaunch"):
                saved.append((mod, attr, v))
                setattr(mod, attr, replace(v))


def _put_back(saved: list) -> None:
    for mod, attr, v in saved:
        setattr(mod, attr, v)


@contextlib.contextmanager
def stubbed_kernels():
    """Every Triton kernel of fisher_kernels/ and ``torch._fused_adamw_`` launch nothing, the
    Triton backend accepts CPU tensors (TRITON_INTERPRET=1, restored after); one
    intra-op thread (the statistics buffer's zero_(), a memset launch on a GPU, would otherwise
    wake the CPU's thread pool every step: ~0.2 ms that no GPU run pays, measured)."""
    saved, threads, interpret = [], torch.get_num_threads(), os.environ.get("TRITON_INTERPRET")
    try:
        torch.set_num_threads(1)
        os.environ["TRITON_INTERPRET"] = "1"    # the Triton backend on CPU tensors (backends.py)
        _swap_kernels(lambda kernel: _NoLaunch(), saved)
        saved.append((torch, "_fused_adamw_", torch._fused_adamw_))
        torch._fused_adamw_ = lambda *args, **kwargs: None
        yield
    finally:
        _put_back(saved)
        torch.set_num_threads(threads)
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interpret


# aten ops that only make views, read metadata or allocate without writing: no device work
_NO_LAUNCH = {"view", "_unsafe_view", "_reshape_alias", "reshape", "slice", "select", "detach",
              "permute", "alias", "as_strided", "expand", "unsqueeze", "squeeze", "t",
              "transpose", "unflatten", "narrow", "split", "unbind", "empty", "new_empty",
              "empty_strided", "lift_fresh", "_record_function_enter_new",
              "_record_function_exit"}


class _Launches(TorchDispatchMode):
    """Counts, within, the torch ops that do device work and the Triton kernels launched
    (``kernels``: fisher_kernels' JIT functions, wrapped so that each launch counts)."""

    def __enter__(self):
        self.n, self._saved = 0, []
        _swap_kernels(self._counted, self._saved)
        return super().__enter__()

    def __exit__(self, *exc):
        _put_back(self._saved)
        return super().__exit__(*exc)

    def _counted(self, kernel):
        mode = self

        class Counted:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    mode.n += 1
                    return launch(*args, **kwargs)
                return run
        return Counted()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in _NO_LAUNCH:
            self.n += 1
        return func(*args, **(kwargs or {}))


class _NoOps:
    """A backend's statistics ops that do nothing (``conv_stats`` says one output position); its
    other attributes are the backend's.  The hooks' rows time the hooks with these in place of
    the real ops, to split the hooks' host time into launchers and bookkeeping."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    @staticmethod
    def conv_stats(*args, **kwargs) -> int:
        return 1

    @staticmethod
    def linear_stats(*args, **kwargs) -> None:
        return None

    norm_stats = embedding_stats = linear_stats


@contextlib.contextmanager
def no_ops(opt):
    """``opt``'s hooks with their statistics ops as no-ops (``_NoOps``) inside the block."""
    real = opt._hooks.ops
    opt._hooks.ops = _NoOps(real)
    try:
        yield
    finally:
        opt._hooks.ops = real


def iteration(model, x, zero_grad):
    """One zero_grad() + forward + backward of ``model`` on ``x``, as the hooks' rows time it."""
    def run():
        zero_grad()
        model(x).float().square().mean().backward()
    return run


def bare_iteration(model, x):
    """``iteration`` of a model without hooks, whose zero_grad() is an optimizer's (an SGD's),
    as the hooked model's is: Module.zero_grad() walks the modules, ~3k instructions a layer
    more than an optimizer's walk of its parameters, which would flatter the hooks."""
    return iteration(model, x, torch.optim.SGD(model.parameters(), lr=0.1).zero_grad)


def launches(run) -> int:
    """What one call of ``run`` launches (``_Launches``)."""
    with _Launches() as counted:
        run()
    return counted.n


def host_us(step, n: int) -> float:
    """Mean host time of ``step()`` over n calls, in microseconds."""
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n * 1e6


def measure(label, factory, inputs, dev, backend, tcov, n, repeats) -> dict:
    torch.manual_seed(0)
    model = factory().to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisher(model, lr=1e-4, TCov=tcov, backend=backend)
    model(inputs(dev)).float().square().mean().backward()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for _ in range(3):                      # state made, tables cached
        opt.step()
        adamw.step()
    ours, theirs = [], []
    for _ in range(repeats):                # interleaved: both see the same machine state
        ours.append(host_us(opt.step, n))
        theirs.append(host_us(adamw.step, n))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return dict(kind="host_step", workload=label, backend=opt.backend, TCov=tcov,
                params=sum(1 for _ in model.parameters()), device=str(dev),
                adafisher_us=statistics.median(ours), adamw_us=statistics.median(theirs),
                ratio=statistics.median(a / b for a, b in zip(ours, theirs)),
                kernels="stubbed" if dev.type == "cpu" else "real")


# NOTE: [launch queue] A CUDA stream takes about a thousand pending kernels; past that a launch
# waits for the device.  A whole iteration launches hundreds (ResNet-18 at TCov=1: its model's
# and 105 statistics ones), so the hooks' rows time one iteration per sample on CUDA, each
# after a sync: timed over many, the host would wait on the device and the row would
# read the device's time, not the host's.
HOOK_ITERS_CUDA = 1


def measure_hooks(label, factory, inputs, dev, backend, tcov, n, repeats) -> dict:
    torch.manual_seed(0)
    plain = factory().to(dev)
    model = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisher(model, lr=1e-4, TCov=tcov, backend=backend)
    x = inputs(dev)
    ours, theirs = iteration(model, x, opt.zero_grad), bare_iteration(plain, x)
    ours()
    opt.step()              # steps = 1: TCov=100's next iterations gather nothing, TCov=1's do
    for _ in range(2):
        ours()
        theirs()

    def sample(run) -> float:       # NOTE: [launch queue]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return host_us(run, n)

    hooked, bare, zeroed = [], [], []
    for _ in range(repeats):
        hooked.append(sample(ours))
        bare.append(sample(theirs))
        with no_ops(opt):
            zeroed.append(sample(ours))
    layers = len(opt.fisher.layers)
    h, b, z = statistics.median(hooked), statistics.median(bare), statistics.median(zeroed)
    extra = launches(ours) - launches(theirs)
    return dict(kind="host_hooks", workload=label, backend=opt.backend, TCov=tcov,
                layers=layers, device=str(dev), hooked_us=h, plain_us=b, launches=extra,
                per_layer_us=(h - b) / layers, no_ops_us=z, launcher_us=(h - z) / layers,
                ratio=statistics.median(a / c for a, c in zip(hooked, bare)),
                kernels="stubbed" if dev.type == "cpu" else "real")


def op_cases(small: bool):
    """[(op, case, make(dev) -> args)]: one statistics call of each kind at a layer of SPEC 8's
    ResNet-18 (batch 256) and GPT (16 x 256 tokens), or (small) at a few entries, where the
    kernels are stubbed and only the launcher's Python counts."""
    b, hw, t = (2, 4, 8) if small else (256, 32, 4096)

    def f32(*shape):
        return lambda dev: torch.randn(*shape, device=dev)
    return [
        ("conv_stats", f"{b}x64x{hw}x{hw} k3s1", lambda dev: (
            f32(b, 64, hw, hw)(dev), torch.zeros(64 * 9, device=dev), (3, 3), (1, 1),
            ((1, 1), (1, 1)), (1, 1), 1)),
        ("linear_stats", f"conv S {b}x64x{hw}x{hw} dim 1", lambda dev: (
            f32(b, 64, hw, hw)(dev), torch.zeros(64, device=dev), 1)),
        ("linear_stats", f"{t}x512", lambda dev: (f32(t, 512)(dev), torch.zeros(512, device=dev))),
        ("norm_stats", f"BatchNorm {b}x64x{hw * hw}", lambda dev: (
            f32(b, 64, hw * hw)(dev), torch.zeros(64, device=dev), "channel", 1, 1e-5)),
        ("norm_stats", f"LayerNorm {t}x512", lambda dev: (
            f32(t, 512, 1)(dev), torch.zeros(512, device=dev), "sample", 1, 1e-5)),
        ("embedding_stats", f"{t} tokens of 8192", lambda dev: (
            torch.randint(0, 8192, (t,), device=dev), torch.zeros(8192, device=dev))),
    ]


def measure_ops(dev, backends, small: bool, n: int, repeats: int) -> list:
    """Host time of one call of each backend's statistics launcher (``kind: host_op``): on the
    CPU the Python alone (kernels stubbed), on CUDA with the launch, timed without synchronising
    as the hooks call them."""
    from fisher_kernels import host
    rows = []
    for op, case, make in op_cases(small):
        args = make(dev)
        for backend in backends:
            fn = getattr(_try_load(backend, dev)[0], op)
            call = lambda: fn(*args)        # noqa: E731
            # Triton's real kernels also through its JIT dispatch: NOTE: [direct launch]
            for direct in (True, False) if backend == "triton" and dev.type == "cuda" else (True,):
                host.DIRECT, was = direct, host.DIRECT
                try:
                    call()                  # compiled, tables made
                    times = []
                    for _ in range(repeats):
                        times.append(host_us(call, n))
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                finally:
                    host.DIRECT = was
                rows.append(dict(kind="host_op", op=op, case=case, device=str(dev),
                                 backend=backend if direct else f"{backend}, JIT dispatch",
                                 host_us=statistics.median(times),
                                 kernels="stubbed" if dev.type == "cpu" else "real"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--smoke", action="store_true", help="narrow models, few repeats (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="folder for host.jsonl")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    backends = ["triton"] + (["cuda"] if _try_load("cuda", dev)[0] is not None else [])
    n, repeats = (20, 3) if args.smoke else (200, 15)
    rows, hook_rows = [], []
    with stubbed_kernels() if dev.type == "cpu" else contextlib.nullcontext():
        for label, factory, inputs in workloads(args.smoke):
            for backend in backends:
                for tcov in (100, 1):
                    rows.append(measure(label, factory, inputs, dev, backend, tcov, n, repeats))
        # on the CPU the narrow models: the layers' own arithmetic runs there, unstubbed, and
        # at full width its noise would swamp the hooks' tens of microseconds
        for label, factory, inputs in workloads(args.smoke or dev.type == "cpu"):
            for backend in backends:
                for tcov in (100, 1):
                    hook_rows.append(measure_hooks(label, factory, inputs, dev, backend, tcov,
                                                   HOOK_ITERS_CUDA if dev.type == "cuda"
                                                   else max(n // 4, 5), repeats))
        op_rows = measure_ops(dev, backends, args.smoke or dev.type == "cpu", n, repeats)
    tables = [
        md_table(["workload", "params", "backend", "TCov", "step() host us", "AdamW(fused) us",
                  "ratio"],
                 [(r["workload"], r["params"], r["backend"], r["TCov"], f"{r['adafisher_us']:.0f}",
                   f"{r['adamw_us']:.0f}", f"{r['ratio']:.2f}") for r in rows]),
        md_table(["workload", "hooked layers", "backend", "TCov", "zero_grad+fwd+bwd us",
                  "without hooks us", "ratio", "per hooked layer us", "of which launchers",
                  "launches"],
                 [(r["workload"], r["layers"], r["backend"], r["TCov"], f"{r['hooked_us']:.0f}",
                   f"{r['plain_us']:.0f}", f"{r['ratio']:.2f}", f"{r['per_layer_us']:.1f}",
                   f"{r['launcher_us']:.1f}", r["launches"]) for r in hook_rows]),
        md_table(["op", "case", "backend", "host us per call"],
                 [(r["op"], r["case"], r["backend"], f"{r['host_us']:.1f}") for r in op_rows])]
    print("\n\n".join("\n".join(t) for t in tables))
    rows += hook_rows + op_rows
    if args.out is not None:
        write_jsonl(args.out / "host.jsonl", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
