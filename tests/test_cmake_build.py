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
