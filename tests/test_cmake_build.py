"""CI compile check of csrc/ (SPEC section 9): CMakeLists.txt builds the CUDA kernels and their
launchers (no torch) with the machine's nvcc for the target architectures."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
needs_nvcc = pytest.mark.skipif(not Path(NVCC).exists(), reason="nvcc is not installed")


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_csrc(tmp_path):
    assert (ROOT / "CMakeLists.txt").exists(), "CMakeLists.txt is missing"
    cu = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
    assert cu, "csrc/ has no CUDA sources"
    env_nvcc = NVCC
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path),
                          f"-DCMAKE_CUDA_COMPILER={env_nvcc}"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    objects = [p.name for p in tmp_path.rglob("*.o")]
    for name in cu:
        assert any(o.startswith(name) for o in objects), f"{name} was not compiled: {objects}"


@needs_nvcc
def test_layer_ema_compiles_without_fma(tmp_path):
    """layer_ema's arithmetic rounds after each multiply and add, as the reference's does: nvcc
    (-fmad=true, its default) contracts none of it into an FMA, whose single rounding min-max
    normalisation would magnify (NOTE: [fp fusion] in fisher_kernels/__init__.py).  The emulator
    builds with contraction off, so only the PTX shows this."""
    ptx = tmp_path / "layer_ema.ptx"
    proc = subprocess.run([NVCC, "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-arch=sm_90",
                           f"-I{ROOT / 'csrc'}", "-ptx", str(ROOT / "csrc" / "layer_ema.cu"),
                           "-o", str(ptx)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = ptx.read_text()
    assert text.count(".entry") == 2 and "layer_ema_kernel" in text      # float and double
    assert "fma.rn" not in text


def _cuda_include() -> Path:
    """The CUDA toolkit's include folder: beside the nvcc on the PATH, or the usual one (this
    machine's nvcc on the PATH is a wrapper script)."""
    nvcc = Path(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc").resolve()
    near = nvcc.parent.parent / "include"
    return near if (near / "cuda_runtime_api.h").exists() else Path("/usr/local/cuda/include")


@pytest.mark.skipif(not (_cuda_include() / "cuda_runtime_api.h").exists(),
                    reason="the CUDA toolkit's headers are not installed")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_bindings_cuda_branch_type_checks(tmp_path):
    """csrc/bindings.cpp as setup.py compiles it for the GPU (its CUDA branch: c10/cuda's guard
    and stream, cudaStreamIsCapturing) type-checks against this torch's headers and the CUDA
    toolkit's, so a slip there shows in CI, not at the GPU machine's build.  (The emulator tests
    build the file's other branch; torch's CPU wheel lacks one generated c10/cuda header, which
    only sets an export macro: a stand-in is made.)"""
    import sysconfig

    import torch
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    inc = Path(torch.__file__).parent / "include"
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", f"-I{tmp_path}", f"-I{inc}",
           f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{_cuda_include()}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _cuobjdump() -> Path:
    """The cuobjdump that triton's wheel ships (the toolkit here has none), as
    tests/triton_codegen.py finds it."""
    try:
        import triton
    except ImportError:
        return Path("/nonexistent")
    return Path(triton.knobs.nvidia.cuobjdump.path)


def _loads_before_first_use(sass: str, kernel: str) -> int:
    """In the SASS of the (first) function whose mangled name contains ``kernel``: the global
    loads its innermost loop holding any issues before its first floating-point add or
    multiply-add, the instruction that consumes a load (a backward branch marks a loop)."""
    body = next(part for part in re.split(r"\n\s*Function : ", sass)
                if kernel in part.split("\n")[0])
    at = r"/\*([0-9a-f]{4,})\*/"
    ins = [(int(a, 16), op) for a, op in re.findall(at + r"\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", body)]
    loops = [(int(t, 16), int(a, 16)) for a, t in re.findall(at + r"[^;]*?\bBRA (0x[0-9a-f]+)", body)
             if int(t, 16) < int(a, 16)]
    holding = [(s, e) for s, e in loops
               if any(s <= a <= e and op.startswith("LDG") for a, op in ins)]
    start, end = min(holding, key=lambda se: se[1] - se[0])
    n = 0
    for a, op in ins:
        if start <= a <= end:
            if op.startswith("LDG"):
                n += 1
            elif op.startswith(("FADD", "FFMA", "DADD", "DFMA")):
                return n
    return n


@needs_nvcc
@pytest.mark.skipif(not _cuobjdump().exists(), reason="triton's cuobjdump is not installed")
def test_column_reduce_keeps_four_loads_in_flight(tmp_path):
    """NOTE: [words in flight] in csrc/reduce.cuh: in the sm_90 SASS of the plain column sums
    (16-byte words of float32 rows, single float32 elements of planes), each thread issues four
    loads before the loop adds the first of them.  The strided loop with ``#pragma unroll 4``
    it replaced issued one: a GPU-only slowdown (half of Triton's rate at 64x2048x7x7) that no
    CPU result shows, so the compiled code is read here."""
    cubin = tmp_path / "linear_stats.cubin"
    proc = subprocess.run([NVCC, "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-arch=sm_90",
                           f"-I{ROOT / 'csrc'}", "-cubin", str(ROOT / "csrc" / "linear_stats.cu"),
                           "-o", str(cubin)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sass = subprocess.run([str(_cuobjdump()), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    for kernel in ("reduce_rows_kernelIffLi16ENS_8NoAffine",
                   "reduce_planes_kernelIffLi4ENS_8NoAffine"):
        assert _loads_before_first_use(sass, kernel) >= 4, kernel
