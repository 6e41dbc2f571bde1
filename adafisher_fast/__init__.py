"""adafisher-fast: the AdaFisher optimizer (ICLR 2025) with fused Triton and CUDA C++ kernels."""
from .attention import expose_attention
from .layers import LayerKind, register_layer
from .optimizer import AdaFisher, AdaFisherW
from .report import format_report

__all__ = ["AdaFisher", "AdaFisherW", "LayerKind", "expose_attention", "format_report",
           "register_layer"]
__version__ = "0.1.0"
