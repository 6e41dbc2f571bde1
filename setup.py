"""Installs adafisher_fast (+ the Triton kernels in fisher_kernels).  The CUDA C++ extension in csrc/
is built when a CUDA-enabled torch and nvcc are present; elsewhere it is skipped with a message and
the package works with the torch and Triton backends.  ADAFISHER_NO_CUDA=1 skips the build."""
import os

from setuptools import find_packages, setup


def cuda_extensions():
    """([CUDAExtension], {"build_ext": BuildExtension}) when torch is CUDA-enabled, nvcc is found
    (CUDA_HOME) and ADAFISHER_NO_CUDA != 1; else ([], {}) with a message.  Architectures come from
    TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100 and H100).  See csrc/README.md."""
    if os.environ.get("ADAFISHER_NO_CUDA") == "1":
        print("adafisher-fast: ADAFISHER_NO_CUDA=1, skipping the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        print(f"adafisher-fast: torch is not importable at build time ({e}); skipping the CUDA "
              "extension (build it with `pip install --no-build-isolation -e .`)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc (CUDA_HOME) not found"
        print(f"adafisher-fast: {why}; skipping the CUDA extension (torch and Triton backends only)")
        return [], {}
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        # torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin gives
        # /usr/local, whose headers the C++ binding file then cannot find
        raise SystemExit(f"adafisher-fast: CUDA_HOME={CUDA_HOME} has no include/cuda_runtime_api.h; "
                         "set CUDA_HOME to the CUDA toolkit root (e.g. /usr/local/cuda), or "
                         "ADAFISHER_NO_CUDA=1 to skip the CUDA extension")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join("csrc", "bindings.cpp")] + sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith(".cu"))
    ext = CUDAExtension(
        name="adafisher_fast._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        # no -std flag: BuildExtension picks the C++ standard the installed torch's headers need
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="adafisher-fast",
    version="0.1.0",
    description="AdaFisher optimizer (ICLR 2025) with fused Triton and CUDA C++ kernels",
    # bench/ runs from a checkout (python -m bench in the repository root), not from the wheel,
    # which would install a top-level package named "bench" beside the user's own
    packages=find_packages(include=["adafisher_fast", "adafisher_fast.*", "fisher_kernels",
                                    "fisher_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        # ninja: tests/cuda_emu.py builds csrc/; pytest-xdist: the suite runs on two processes in CI
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "numpy", "ninja"],
        "demo": ["scikit-learn", "matplotlib", "tqdm", "numpy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
