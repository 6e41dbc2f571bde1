"""Compile every Triton kernel launch of the backend to GPU machine code, on a machine with no GPU.

The interpreter (TRITON_INTERPRET=1, the CPU tests) runs kernels as numpy code and accepts things the
compiler rejects (a loop-carried value that changes type, a block too large for shared memory or
registers, a constexpr used as a runtime value...).  This script closes that gap without a GPU: it
patches ``JITFunction.run`` to record the launches instead of running them, drives the real launchers
(and, through the optimizer, the real hooks and step) on CPU tensors over the shapes and dtypes the
GPU tests and benchmarks use, and compiles each distinct (kernel, argument types, constexprs) for
each target with ``triton.compile(..., target=GPUTarget("cuda", sm, 32))`` down to a cubin (ptxas).

Usage: ``python tests/triton_codegen.py --arch 80 --arch 90 [--json FILE]``; exit status 1 if any
compilation failed or a kernel needs more shared memory than the target has; a launch over a grid
past CUDA's limits stops it with an error.  Must run without TRITON_INTERPRET
(tests/test_triton_codegen.py runs it in a subprocess).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from contextlib import contextmanager

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fisher_kernels  # noqa: E402
from adafisher_fast import AdaFisher, AdaFisherW  # noqa: E402
from adafisher_fast.presets import PRESETS  # noqa: E402
from bench import models  # noqa: E402
from launch_shapes import gpu_launches  # noqa: E402

fs = importlib.import_module("fisher_kernels.fused_step")    # the module, not the function

# opt-in shared memory per block (bytes), CUDA C programming guide, compute capabilities table
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# the JIT's own specialisation of a launch's arguments (what a GPU run compiles): pointers and
# integers divisible by 16 get tt.divisibility 16, integers equal to 1 become constexprs; without
# it the alignment and contiguity the vector loads rely on would be unknown here
_SPECIALIZER = make_backend(GPUTarget("cuda", 90, 32))
# programs per grid axis a CUDA launch takes (x, y, z; CUDA C programming guide): the interpreter
# runs any grid, a GPU refuses the launch
GRID_LIMIT = (2 ** 31 - 1, 65535, 65535)


def check_grid(kernel: str, grid: tuple) -> None:
    """Raise ValueError, naming the kernel, if a GPU would refuse a launch over ``grid``."""
    if len(grid) > 3 or any(g > lim for g, lim in zip(grid, GRID_LIMIT)):
        raise ValueError(f"{kernel}: grid {tuple(grid)} is past CUDA's {GRID_LIMIT} programs per axis")


@contextmanager
def recording():
    """Within: launches are recorded into the yielded dict, keyed by their compile signature:
    (kernel name, signature, constexprs, attrs) -> (JITFunction, signature, constexprs, attrs,
    options), as JITFunction.run would compile them."""
    seen = {}
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        check_grid(self.__name__, grid)
        binder = create_function_from_signature(self.signature, self.params, _SPECIALIZER)
        bound, specialization, options = binder(*args, **kwargs)
        _, sig, const, attrs = self._pack_args(_SPECIALIZER, kwargs, bound, specialization, options)
        key = (self.__name__, str(sig), str(const), str(attrs))
        seen.setdefault(key, (self, sig, const, attrs, options))

    JITFunction.run = run
    try:
        yield seen
    finally:
        JITFunction.run = orig


def _optimizer_runs(dev="cpu"):
    """The real hooks, layer_ema and the one-launch fused step, per preset and optimizer, on the
    benchmark models; parameters in float32, bfloat16 and float16, step counts on the device and
    on the host."""
    for preset in ("official", "paper"):
        for cls in (AdaFisher, AdaFisherW):
            for make, inp in ((lambda: models.resnet18_cifar(width=16),
                               lambda: torch.randn(4, 3, 32, 32)),
                              (lambda: models.GPT(vocab=97, d=64, n_layer=1, n_head=2, block_size=16),
                               lambda: torch.randint(0, 97, (2, 16)))):
                model = make().to(dev)
                opt = cls(model, preset=preset, backend="torch", TCov=1)
                opt._ops._ops = fisher_kernels
                out = model(inp().to(dev))
                out.float().square().mean().backward()
                opt.step()
                f = opt.fisher          # GradScaler's found_inf, read by the kernel (FOUND_INF)
                fisher_kernels.layer_ema(f.buf, f.table, f.state, f.fac, f.initialized,
                                         f.counters, PRESETS[preset].ema_rule(0.8),
                                         torch.zeros((), device=dev))
    meta = torch.tensor([[n, 1, 0, 0, 0, 1, 0, 0, n, 1, 0] for n in (5, 3000)])   # h_gs 1: GROUPS
    device_steps = fs._device_steps
    try:
        for on_device in (True, False):
            fs._device_steps = lambda steps, d: on_device
            fs._TABLES.clear()     # a reused address must not hit a table of the other kind
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                for gdt in {dt, torch.float32}:
                    ps = [torch.zeros(n, dtype=dt) for n in (5, 3000)]
                    for decoupled in (False, True):
                        fisher_kernels.fused_step(
                            ps, [torch.zeros_like(p, dtype=gdt) for p in ps],
                            [torch.zeros_like(p) for p in ps], [torch.zeros(()) for _ in ps],
                            torch.ones(2), meta, [(1e-3, 0.9, 1e-4, 1e-3)] * 2, decoupled)
            # a tensor lr, read by the kernel (LR_PTRS, NOTE: [tensor lr] in kernel_host.py)
            ps = [torch.zeros(n) for n in (5, 3000)]
            fisher_kernels.fused_step(
                ps, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                [torch.zeros(()) for _ in ps], torch.ones(2), meta,
                [(torch.tensor(1e-3, device=dev), 0.9, 1e-4, 1e-3), (1e-3, 0.9, 1e-4, 1e-3)], True)
            # GradScaler's found_inf, read by the kernel (FOUND_INF, NOTE: [GradScaler])
            for dt in (torch.float32, torch.bfloat16) if on_device else ():
                ps = [torch.zeros(n, dtype=dt) for n in (5, 3000)]
                fisher_kernels.fused_step(
                    ps, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                    [torch.zeros(()) for _ in ps], torch.ones(2), meta,
                    [(1e-3, 0.9, 1e-4, 1e-3)] * 2, False, torch.zeros(()))
    finally:
        fs._device_steps = device_steps


def _resources(cubin: bytes) -> dict:
    """Registers per thread, local memory per thread and the stack frame (where ptxas puts
    spilled registers too), read by cuobjdump; where a kernel has either, ``loop_spills``: its
    local-memory loads and stores that run inside a loop (``_loop_spills``)."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
        found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", out)}
        spills = 0
        if found.get("local") or found.get("stack"):
            spills = _loop_spills(subprocess.run([tool, "-sass", f.name], capture_output=True,
                                                 text=True).stdout)
    return {"registers": found.get("reg"), "local_bytes": found.get("local"),
            "stack_bytes": found.get("stack"), "loop_spills": spills}


def _loop_spills(sass: str) -> int:
    """Local-memory accesses (STL, LDL) of a kernel's SASS that lie inside a loop: between a
    backward branch and its target, or in a subroutine that such a loop calls (up to its RET).
    One spill around a kernel's prologue or tail costs a few bytes a thread once; one in a loop
    costs local-memory traffic per iteration, which a streaming kernel cannot afford."""
    code = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = [(int(t, 16), a) for a, ins in code
             for t in re.findall(r"\bBRA\b.*?(0x[0-9a-f]+)", ins) if int(t, 16) < a]
    called = {int(t, 16) for a, ins in code if any(lo <= a <= hi for lo, hi in spans)
              for t in re.findall(r"\bCALL\.\S+\s+(0x[0-9a-f]+)", ins)}
    for start in called:        # a subroutine runs from its entry to its first RET
        end = next((a for a, ins in code if a >= start and re.match(r"RET\b", ins)), start)
        spans.append((start, end))
    return sum(1 for a, ins in code if re.match(r"(?:@!?U?P\w+\s+)?(?:STL|LDL)\b", ins)
               and any(lo <= a <= hi for lo, hi in spans))


def _memory_ops(ptx: str) -> dict:
    """Global loads and stores by width: {"ld": {"v4": n, "b32": n, ...}, "st": {...}}."""
    out = {}
    for op in ("ld", "st"):
        found = re.findall(rf"\b{op}\.global(?:\.[a-z]+)*\.(v[248]|[bfsu]\d+)", ptx)
        out[op] = {w: found.count(w) for w in sorted(set(found))}
    return out


def _atomic_ops(ptx: str) -> dict:
    """Atomics by kind and memory order: {"red.relaxed": n, "atom.acq_rel": n, ...} (an ordered
    one fences the warp and, with acquire, invalidates the SM's L1: NOTE: [relaxed atomics] in
    fisher_kernels/linear_stats.py)."""
    found = [f"{op}.{sem}" for op, sem in re.findall(
        r"\b(atom|red)\.global(?:\.\w+)*?\.(relaxed|acquire|release|acq_rel)\b", ptx)]
    return {k: found.count(k) for k in sorted(set(found))}


def _approx_ops(ptx: str) -> dict:
    """Arithmetic the GPU rounds differently from IEEE (and so from the interpreter, which runs
    numpy): {"div.full.f32": n, "sqrt.approx.f32": n, "ex2.approx.f32": n, ...}."""
    found = re.findall(r"\b((?:div|sqrt|rsqrt|rcp|ex2|lg2|sin|cos|tanh)\.(?:full|approx)(?:\.ftz)?\.f\d+)", ptx)
    return {op: found.count(op) for op in sorted(set(found))}


def _fma_ops(ptx: str) -> int:
    """Fused multiply-adds: where the compiler contracted a multiply and an add, which the
    interpreter rounds twice."""
    return len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f(?:32|64)\b", ptx))


def compile_all(seen, arches):
    rows, ok = [], True
    for (name, _, _, _), (fn, sig, const, attrs, options) in sorted(seen.items(), key=lambda kv: kv[0][0]):
        names = fn.arg_names
        for arch in arches:
            row = dict(kernel=name, arch=f"sm_{arch}", signature=sig,
                       constexprs={names[k[0]]: str(v) for k, v in const.items()},
                       aligned=sorted(names[k[0]] for k, v in attrs.items()
                                      if ["tt.divisibility", 16] in v))
            try:
                k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                   options=options)
                row.update(shared=k.metadata.shared, num_warps=k.metadata.num_warps,
                           **_resources(k.asm["cubin"]), **_memory_ops(k.asm["ptx"]),
                           approx=_approx_ops(k.asm["ptx"]), fma=_fma_ops(k.asm["ptx"]),
                           atomics=_atomic_ops(k.asm["ptx"]))
                limit = SMEM_LIMIT.get(arch)
                if limit is not None and k.metadata.shared > limit:
                    row["error"] = f"needs {k.metadata.shared} B of shared memory, sm_{arch} has {limit}"
            except Exception as e:                     # noqa: BLE001 - reported, then exit 1
                row["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
            ok &= "error" not in row
            rows.append(row)
    return rows, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--json", help="write one JSON line per compilation here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_codegen.py compiles real kernels: run it without TRITON_INTERPRET=1")
    torch.manual_seed(0)
    with recording() as seen:
        gpu_launches(fisher_kernels)
        _optimizer_runs()
    rows, ok = compile_all(seen, a.arch or [80, 90])
    kernels = sorted({r["kernel"] for r in rows})
    print(f"triton {triton.__version__}: {len(seen)} launch configurations of {len(kernels)} kernels "
          f"({', '.join(kernels)}), {len(rows)} compilations")
    for r in rows:
        if r.get("local_bytes") or r.get("stack_bytes"):
            print(f"spills: {r['kernel']} {r['arch']} {r['constexprs']}: {r['registers']} registers, "
                  f"{r['local_bytes']} B local memory and {r['stack_bytes']} B stack per thread")
        if "error" in r:
            print(f"FAILED {r['kernel']} {r['arch']} {r['constexprs']}: {r['error']}")
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
