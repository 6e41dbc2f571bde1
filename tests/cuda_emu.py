"""Build csrc/ for the CPU under the CUDA emulator (NOTE: [CUDA emulator] in csrc/emu/emu.cpp) and
load it as the CUDA backend, so that tests/test_cuda_backend.py runs the real kernels, launchers and
bindings.cpp on a machine without a GPU.

NOTE: [emulated memcheck] With ADAFISHER_EMU_ASAN=1 the library is built with AddressSanitizer on
heap accesses and UndefinedBehaviorSanitizer (``asan_env()`` gives the environment a process needs:
libasan and libstdc++ preloaded), so a kernel reading or writing past a tensor's allocation stops
with a report in the log file, and one with undefined behaviour stops with a "runtime error:" on
stderr; test_cuda_emu.py runs the CUDA op tests that way.  (A reduce_rows_kernel changed to read one
column past K was caught.)  UBSan's alignment check is the GPU's "misaligned address" fault, which
x86 does not raise: norm_stats changed to take 16-byte words at any row address passed every plain
emulated test and stops here, as would the fused step's words at a 4-byte-aligned parameter.  Its
other checks (signed overflow, shifts, array bounds, invalid bool values) stop too.  Stack checks
stay off: ASan cannot follow the emulator's fiber stacks (which is also why its fiber switches may
skip ASan's stack unpoisoning: jump() in csrc/emu/emu.cpp).  So does UBSan's vptr check, which
would need the RTTI of every torch type the bindings touch.

The kernel files are copied with each ``kernel<<<config>>>(args)`` rewritten to
``::af_emu::launch(kernel, config)(args)`` (the one construct C++ cannot parse) and each
``__shared__`` variable passed to ``af_emu::shared`` after its declaration (NOTE: [poisoned shared
memory] in csrc/emu/emu.cpp); nothing else changes.  The library registers the ``adafisher`` ops for CPU tensors; ``backend()`` then imports
``adafisher_fast.cuda_backend`` over it (a stub stands in for the ``_C`` module it imports).
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jit_build
import poison
from adafisher_fast.backends import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
BUILD = jit_build.build_dir("cuda_emu")
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
FLAGS = ["-DADAFISHER_EMULATE", "-O1", "-g0", "-ffp-contract=off", "-ftrivial-auto-var-init=pattern",
         "-DAF_STEP_TARGET_PROGRAMS=2",     # fused_step chunks of several blocks (launchers.h)
         "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
# NOTE: [emulated memcheck]; UBSan's errors stop the process (as ASan's do: halt_on_error)
SANITIZE = ["-fsanitize=address", "--param=asan-stack=0", "-fno-omit-frame-pointer",
            "-fsanitize=undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
_state = {}


SHARED = re.compile(r"__shared__\s+[\w:]+(?:\s*<[^;]*?>)?\s+([^;]+);")


def rewrite_launches(src: str) -> tuple:
    """(source with every triple-chevron launch rewritten, number of launches)."""
    return LAUNCH.subn(lambda m: f"::af_emu::launch({m[1]}, {m[2]})(", src)


def poison_shared(src: str) -> tuple:
    """(source with each variable of every ``__shared__`` declaration passed to af_emu::shared
    after it, on the same line, number of declarations): NOTE: [poisoned shared memory] in
    csrc/emu/emu.cpp."""
    def mark(m):
        names = [d.split("[")[0].strip() for d in m[1].split(",")]
        return m[0] + "".join(f" ::af_emu::shared(&{v}, sizeof {v});" for v in names)
    return SHARED.subn(mark, src)


def _sources(build_dir: str) -> list:
    os.makedirs(os.path.join(build_dir, "src"), exist_ok=True)
    out = [os.path.join(CSRC, "emu", "emu.cpp"), os.path.join(CSRC, "bindings.cpp")]
    # headers launch kernels too; the copies sit beside the .cpp files, so `#include "reduce.cuh"`
    # finds the rewritten one first
    for path in sorted(glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cuh"))):
        with open(path) as f:
            src, _ = rewrite_launches(poison_shared(f.read())[0])
        if "<<<" in src:
            raise RuntimeError(f"{path}: a launch the emulator's rewrite does not recognise")
        name = os.path.basename(path)
        dst = os.path.join(build_dir, "src", name[:-3] + ".cpp" if name.endswith(".cu") else name)
        text = f'#line 1 "{path}"\n{src}'
        if not os.path.exists(dst) or Path(dst).read_text() != text:   # keep ninja's timestamps
            with open(dst, "w") as f:
                f.write(text)
        if name.endswith(".cu"):
            out.append(dst)
    return out


def build(verbose: bool = False) -> str:
    """Compile and load the emulated library once per process; returns the library path.
    ADAFISHER_EMU_ASAN=1 builds it with AddressSanitizer on heap accesses and UBSan (NOTE:
    [emulated memcheck]); the process must then run with libasan preloaded."""
    if "lib" not in _state:
        from torch.utils.cpp_extension import load
        asan = os.environ.get("ADAFISHER_EMU_ASAN") == "1"
        name = "adafisher_cuda_emu" + ("_asan" if asan else "")
        san = SANITIZE if asan else []
        build_dir = os.path.join(BUILD, "asan" if asan else "plain")
        with jit_build.locked(build_dir):   # the rewritten sources too (NOTE: [build locks])
            load(name=name, sources=_sources(build_dir), extra_include_paths=[CSRC, os.path.join(CSRC, "emu")],
                 extra_cflags=FLAGS + san, extra_ldflags=san, build_directory=build_dir,
                 is_python_module=False, verbose=verbose)
        _state["lib"] = os.path.join(build_dir, name + ".so")
    return _state["lib"]


def asan_env(log_path: str) -> dict:
    """os.environ plus what a process needs to run the ASan build (NOTE: [emulated memcheck]), or
    {} where gcc has no libasan or libubsan.  ASan writes to ``log_path``.*; UBSan, linked beside
    ASan, writes to stderr whatever its log_path says."""
    libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
            for lib in ("libasan.so", "libstdc++.so", "libubsan.so")]
    if not all(os.path.isabs(lib) for lib in libs):
        return {}
    # libstdc++ preloaded after libasan: ASan hooks __cxa_throw; libubsan is linked, not preloaded
    return dict(os.environ, ADAFISHER_EMU_ASAN="1", LD_PRELOAD=" ".join(libs[:2]),
                ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={log_path}",
                UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")


def backend():
    """adafisher_fast.cuda_backend running on the emulated library (CPU tensors)."""
    if "mod" not in _state:
        build()
        import adafisher_fast
        saved = {k: sys.modules.get(k) for k in ("adafisher_fast._C", "adafisher_fast.cuda_backend")}
        sys.modules["adafisher_fast._C"] = types.ModuleType("adafisher_fast._C")
        try:
            _state["mod"] = importlib.import_module("adafisher_fast.cuda_backend")
        finally:   # the package stays as it was: `import adafisher_fast._C` still fails elsewhere
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
            for attr in ("_C", "cuda_backend"):
                adafisher_fast.__dict__.pop(attr, None)
        for name in OPS:        # scratch starts as NaN (NOTE: [poisoned allocations])
            setattr(_state["mod"], name, poison.poisoned(getattr(_state["mod"], name)))
    return _state["mod"]


if __name__ == "__main__":
    print(build(verbose=True))
