"""Triton backend: one module per operation of adafisher_fast/reference.py, same signatures.

Loaded by ``adafisher_fast.backends`` (backend="triton"); on CPU tensors it runs only under
``TRITON_INTERPRET=1`` (tests).  float64 buffers fall back to the torch reference (each op says so).
"""
from .linear_stats import linear_stats
from .conv_stats import conv_stats
from .norm_stats import norm_stats
from .embedding_stats import embedding_stats
from .layer_ema import layer_ema
from .fused_step import fused_step

__all__ = ["linear_stats", "conv_stats", "norm_stats", "embedding_stats", "layer_ema",
           "fused_step"]
