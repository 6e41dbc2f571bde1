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
(norm_stats' moments).

NOTE: [fp fusion] The compiler also contracts a multiply and an add into one FMA (rounded once, not
twice as by the interpreter and torch) unless a launch says otherwise, and triton 3.9 warns that
this default changes in 3.10.  So every launch says: ``enable_fp_fusion=False`` for ``fused_step``
and ``layer_ema``, whose arithmetic is elementwise and then rounds step by step as the reference's
and the CUDA kernels' (``__fmul_rn``/``__fadd_rn``) does -- min-max normalisation of a factor
whose entries lie close together turns one ulp of the EMA state into a visible part of H'/S'
(contracting ``state * decay + v * weight``, emulated in float64 on the CPU suite's small models,
moved 3 of 152 layer_ema calls past check=True's tolerance) -- and ``True`` for the statistics
reductions, whose sums run in another order than torch's anyway and where an FMA rounds once
instead of twice.  tests/test_triton_codegen.py counts the FMAs in the compiled kernels.
"""
from .linear_stats import linear_stats
from .conv_stats import conv_stats
from .norm_stats import norm_stats
from .embedding_stats import embedding_stats
from .layer_ema import layer_ema
from .fused_step import fused_step

__all__ = ["linear_stats", "conv_stats", "norm_stats", "embedding_stats", "layer_ema",
           "fused_step"]
