"""nf4lora: NF4 (QLoRA) kernels for PyTorch.

Bit-exact bitsandbytes NF4 quantization with double-quantized scales, a fused dequant + GEMM +
LoRA linear (forward and backward), and paged optimizer state; C++ (AVX2/OpenMP) and CUDA kernels
registered as torch custom ops. See DESIGN.md for the architecture.
"""
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from .optim import PagedAdamW

__version__ = "0.1.0"

__all__ = ["NF4Tensor", "quantize_nf4", "dequantize_nf4", "PagedAdamW"]
