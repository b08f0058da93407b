"""CUDA kernels of the nf4lora ops: nf4lora._C_cuda on torch's current stream. Registered only
when the CUDA module was built; without a GPU these never run (CUDA tensors cannot exist)."""
import math

import torch

from .._native import DTYPE_CODE, _C_cuda, addr
from . import default
from .state import (check_nf4_state, check_out_dtype, check_quantize_absmax_args,
                    check_quantize_args)

OP = "nf4lora::"


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def quantize_nf4(w, blocksize):
    check_quantize_args(w, blocksize)
    if w.dtype not in DTYPE_CODE:
        return default.quantize_nf4(w, blocksize)
    w = w.contiguous()
    n = w.numel()
    packed = torch.empty(((n + 1) // 2,), dtype=torch.uint8, device=w.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=w.device)
    flag = torch.zeros((1,), dtype=torch.int32, device=w.device)
    with torch.cuda.device(w.device):
        _C_cuda.nf4_quantize(w.data_ptr(), DTYPE_CODE[w.dtype], n, blocksize, packed.data_ptr(),
                             absmax.data_ptr(), flag.data_ptr(), _stream(w))
    if bool(flag.item()):  # one sync: quantization is a load-time step
        raise ValueError("w contains NaN or Inf; NF4 cannot represent it")
    return packed, absmax


def quantize_absmax(absmax, offset, code8):
    check_quantize_absmax_args(absmax, offset, code8)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("absmax contains NaN or Inf")
    nb = absmax.numel()
    q = torch.empty((nb,), dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty((-(-nb // 256),), dtype=torch.float32, device=absmax.device)
    code8 = code8.to(absmax.device).contiguous()
    with torch.cuda.device(absmax.device):
        _C_cuda.absmax_quantize(absmax.data_ptr(), nb, offset, code8.data_ptr(), q.data_ptr(),
                                absmax2.data_ptr(), _stream(absmax))
    return q, absmax2


def dequantize_nf4(packed, absmax, absmax2, code8, offset, blocksize, shape, dtype):
    check_nf4_state(packed, absmax, absmax2, code8, blocksize, shape, offset)
    check_out_dtype(dtype)
    if dtype not in DTYPE_CODE:
        return default.dequantize_nf4(packed, absmax, absmax2, code8, offset, blocksize, shape, dtype)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    nested = absmax2 is not None
    with torch.cuda.device(packed.device):
        _C_cuda.nf4_dequantize(packed.data_ptr(), 0 if nested else absmax.data_ptr(),
                               absmax.data_ptr() if nested else 0, addr(absmax2), addr(code8),
                               offset, math.prod(shape), blocksize, out.data_ptr(),
                               DTYPE_CODE[dtype], _stream(packed))
    return out


def _register():
    if _C_cuda is None:
        return
    for name, fn in (("quantize_nf4", quantize_nf4), ("quantize_absmax", quantize_absmax),
                     ("dequantize_nf4", dequantize_nf4)):
        torch.library.register_kernel(OP + name, "cuda", fn)


_register()
