"""CPU kernels of the nf4lora ops: nf4lora._C (AVX2/OpenMP, scalar fallback). Outputs are
allocated here with torch; the kernels get raw pointers. float64 goes to the pure-torch default.

`impl="ref"` runs the scalar csrc/ref twin instead of the fast kernel (tests compare the two).
"""
import math

import torch

from .._native import DTYPE_CODE, _C, nf4_state_args
from . import default
from .state import (check_dequantize_absmax_args, check_nf4_state, check_out_dtype,
                    check_quantize_absmax_args, check_quantize_args)

OP = "nf4lora::"


def quantize_nf4(w, blocksize, impl="fast"):
    check_quantize_args(w, blocksize)
    if w.dtype not in DTYPE_CODE:
        return default.quantize_nf4(w, blocksize)
    w = w.contiguous()
    n = w.numel()
    packed = torch.empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    try:
        _C.nf4_quantize(w.data_ptr(), DTYPE_CODE[w.dtype], n, blocksize, packed.data_ptr(),
                        absmax.data_ptr(), impl)
    except ValueError as e:
        if "NaN or Inf" in str(e):
            raise ValueError("w contains NaN or Inf; NF4 cannot represent it") from None
        raise
    return packed, absmax


def quantize_absmax(absmax, offset, code8, impl="fast"):
    check_quantize_absmax_args(absmax, offset, code8)
    nb = absmax.numel()
    q = torch.empty((nb,), dtype=torch.uint8)
    absmax2 = torch.empty((-(-nb // 256),), dtype=torch.float32)
    try:
        _C.absmax_quantize(absmax.data_ptr(), nb, offset, code8.data_ptr(), q.data_ptr(),
                           absmax2.data_ptr(), impl)
    except ValueError as e:
        if "NaN or Inf" in str(e):
            raise ValueError("absmax contains NaN or Inf") from None
        raise
    return q, absmax2


def dequantize_absmax(qabsmax, absmax2, code8, offset):
    check_dequantize_absmax_args(qabsmax, absmax2, code8, offset)
    out = torch.empty((qabsmax.numel(),), dtype=torch.float32)
    _C.absmax_dequantize(qabsmax.data_ptr(), absmax2.data_ptr(), code8.data_ptr(), offset,
                         qabsmax.numel(), out.data_ptr())
    return out


def dequantize_nf4(packed, absmax, absmax2, code8, offset, blocksize, shape, dtype, impl="fast"):
    check_nf4_state(packed, absmax, absmax2, code8, blocksize, shape, offset)
    check_out_dtype(dtype)
    if dtype not in DTYPE_CODE:
        return default.dequantize_nf4(packed, absmax, absmax2, code8, offset, blocksize, shape, dtype)
    out = torch.empty(tuple(shape), dtype=dtype)
    _C.nf4_dequantize(*nf4_state_args(packed, absmax, absmax2, code8, offset, blocksize),
                      math.prod(shape), out.data_ptr(), DTYPE_CODE[dtype], impl)
    return out


def _register():
    for name, fn in (("quantize_nf4", quantize_nf4), ("quantize_absmax", quantize_absmax),
                     ("dequantize_absmax", dequantize_absmax), ("dequantize_nf4", dequantize_nf4)):
        torch.library.register_kernel(OP + name, "cpu", fn)


_register()
