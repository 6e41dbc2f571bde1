"""CI compile check of csrc/ (SPEC section 9): CMakeLists.txt builds the CUDA kernels and their
launchers (no torch) with the machine's nvcc for the target architectures."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc is not installed")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_csrc(tmp_path):
    assert (ROOT / "CMakeLists.txt").exists(), "CMakeLists.txt is missing"
    cu = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
    assert cu, "csrc/ has no CUDA sources"
    env_nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path),
                          f"-DCMAKE_CUDA_COMPILER={env_nvcc}"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    objects = [p.name for p in tmp_path.rglob("*.o")]
    for name in cu:
        assert any(o.startswith(name) for o in objects), f"{name} was not compiled: {objects}"


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
