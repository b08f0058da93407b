"""Schemas of the nf4lora torch ops, defined once, with their fake (meta) implementations.

Kernels are registered per device in backends/: default.py (pure torch, any device), cpu.py
(nf4lora._C), cuda.py (nf4lora._C_cuda). The fakes give shapes and dtypes so torch.compile and
torch.library.opcheck see through the ops.

NF4 state tensors (DESIGN.md "NF4 format"), for n = prod(shape) elements and nb = ceil(n/blocksize):
  packed  uint8 [(n+1)//2]      two codes per byte, element 2i in the high nibble
  absmax  float32 [nb]          or, double-quantized, uint8 [nb] codes into code8
  absmax2 float32 [ceil(nb/256)] second-level scales (None unless double-quantized)
  code8   float32 [256]          the signed dynamic code (None unless double-quantized)
  offset  float                  mean of the original absmax (0.0 unless double-quantized)
"""
import torch

LIB = "nf4lora"

_SCHEMAS = {
    # w [any shape] fp32/fp16/bf16 -> (packed uint8 [(n+1)//2], absmax float32 [nb])
    "quantize_nf4": "(Tensor w, int blocksize) -> (Tensor, Tensor)",
    # absmax float32 [nb] -> (qabsmax uint8 [nb], absmax2 float32 [ceil(nb/256)]); offset = mean
    "quantize_absmax": "(Tensor absmax, float offset, Tensor code8) -> (Tensor, Tensor)",
    # (qabsmax, absmax2, code8, offset) -> absmax float32 [nb]
    "dequantize_absmax": "(Tensor qabsmax, Tensor absmax2, Tensor code8, float offset) -> Tensor",
    # NF4 state -> dense tensor of `shape` in `dtype`
    "dequantize_nf4": (
        "(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code8, float offset, int blocksize, "
        "SymInt[] shape, ScalarType dtype) -> Tensor"
    ),
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"{LIB}::{_name}", _schema)


def _n_blocks(n, blocksize):
    return -(-n // blocksize)


@torch.library.register_fake(f"{LIB}::quantize_nf4")
def _quantize_nf4_fake(w, blocksize):
    n = w.numel()
    packed = w.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = w.new_empty((_n_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(f"{LIB}::quantize_absmax")
def _quantize_absmax_fake(absmax, offset, code8):
    nb = absmax.numel()
    return absmax.new_empty((nb,), dtype=torch.uint8), absmax.new_empty((_n_blocks(nb, 256),))


@torch.library.register_fake(f"{LIB}::dequantize_absmax")
def _dequantize_absmax_fake(qabsmax, absmax2, code8, offset):
    return qabsmax.new_empty((qabsmax.numel(),), dtype=torch.float32)


@torch.library.register_fake(f"{LIB}::dequantize_nf4")
def _dequantize_nf4_fake(packed, absmax, absmax2, code8, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)
