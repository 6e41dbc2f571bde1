"""Triton backend: one module per operation of adafisher_fast/reference.py, same signatures.

Loaded by ``adafisher_fast.backends`` (backend="triton"); on CPU tensors it runs only under
``TRITON_INTERPRET=1`` (tests).  float64 buffers fall back to the torch reference (each op says so).

NOTE: [ieee rounding] The interpreter computes a kernel's arithmetic with numpy, rounded as IEEE,
so the CPU tests check the GPU's results only where the GPU rounds the same way.  Triton compiles
float32 ``/`` to ``div.full.f32`` and ``tl.sqrt`` to ``sqrt.approx.ftz.f32`` (errors of a few ulp,
and denormals flushed), so the kernels divide with ``tl.math.div_rn`` and take roots with
``tl.sqrt_rn``, as the CUDA kernels (nvcc's defaults) and the reference do: the compiled kernels
hold no approximate instruction (tests/test_triton_codegen.py reads their PTX).  The cost is a
few instructions per division, in loops bound by memory latency (layer_ema) or once per row
(norm_stats' moments).  What remains between the GPU and the interpreter is the GPU's
contraction of a multiply and an add into one FMA.
"""
from .linear_stats import linear_stats
from .conv_stats import conv_stats
from .norm_stats import norm_stats
from .embedding_stats import embedding_stats
from .layer_ema import layer_ema
from .fused_step import fused_step

__all__ = ["linear_stats", "conv_stats", "norm_stats", "embedding_stats", "layer_ema",
           "fused_step"]
