"""CUDA kernels of the nf4lora ops: nf4lora._C_cuda on torch's current stream. Registered only
when the CUDA module was built; without a GPU these never run (CUDA tensors cannot exist)."""
import math

import torch

from .._native import DTYPE_CODE, _C_cuda, addr, nf4_state_args
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
    with torch.cuda.device(packed.device):
        _C_cuda.nf4_dequantize(*nf4_state_args(packed, absmax, absmax2, code8, offset, blocksize),
                               math.prod(shape), out.data_ptr(), DTYPE_CODE[dtype],
                               _stream(packed))
    return out


def _register():
    if _C_cuda is None:
        return
    for name, fn in (("quantize_nf4", quantize_nf4), ("quantize_absmax", quantize_absmax),
                     ("dequantize_nf4", dequantize_nf4)):
        torch.library.register_kernel(OP + name, "cuda", fn)


_register()


# ---------------------------------------------------------------------------------------------
# Linear ops (see _ops.py): nf4lora._C_cuda's fused NF4 linear, with the CPU's launch convention
# (csrc/include/nf4lora/epilogue.h): the forward launch does the LoRA shrink u = D(x) A^T itself,
# then base + expand. The launcher picks GEMV / tensor-core GEMM / SIMT fallback
# (csrc/cuda/linear_plan.h); Python allocates the outputs and the split-K workspace (its size from
# linear_workspace_floats). float64 (and anything else the kernels do not take) goes to the
# pure-torch default.
from .state import check_linear_args, seed_value  # noqa: E402


def _aligned(*tensors):
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _workspace(M, N, K, bwd, x, out, packed):
    n = _C_cuda.linear_workspace_floats(M, N, K, bwd, DTYPE_CODE[x.dtype], _aligned(x, out, packed))
    ws = torch.empty((n,), dtype=torch.float32, device=x.device) if n else None
    return ws, n


def _fwd(x, packed, absmax, absmax2, code8, offset, blocksize, N, bias, lora_A, lora_B, scaling,
         dropout_p, seed):
    """(y, u) = the fused forward on contiguous x [M, K], M > 0 (lora_A None: no LoRA, u [M, 0])."""
    M, K = x.shape
    r = 0 if lora_A is None else lora_A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, r), dtype=torch.float32, device=x.device)
    ws, n = _workspace(M, N, K, False, x, y, packed)
    _C_cuda.qlora_forward(x.data_ptr(), DTYPE_CODE[x.dtype], M,
                          *nf4_state_args(packed, absmax, absmax2, code8, offset, blocksize), N, K,
                          addr(bias), addr(lora_A) if r else 0, addr(lora_B) if r else 0, r,
                          float(scaling), float(dropout_p), seed_value(dropout_p, seed),
                          y.data_ptr(), u.data_ptr() if r else 0, addr(ws), n, _stream(x))
    return y, u


def _bwd(dy, packed, absmax, absmax2, code8, offset, blocksize, K, g, lora_A, scaling, dropout_p,
         seed):
    M, N = dy.shape
    r = 0 if lora_A is None else lora_A.shape[0]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    ws, n = _workspace(M, N, K, True, dy, dx, packed)
    _C_cuda.qlora_backward_dx(dy.data_ptr(), DTYPE_CODE[dy.dtype], M,
                              *nf4_state_args(packed, absmax, absmax2, code8, offset, blocksize),
                              N, K, addr(lora_A) if r else 0, r, float(scaling), float(dropout_p),
                              seed_value(dropout_p, seed), addr(g) if r else 0, dx.data_ptr(),
                              addr(ws), n, _stream(dy))
    return dx


def nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, bias):
    if x.dtype not in DTYPE_CODE:
        return default.nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize,
                                  out_features, bias)
    K = x.shape[1] if x.dim() == 2 else -1
    check_linear_args(x, "x", K, packed, absmax, absmax2, code8, blocksize, out_features, bias=bias)
    if x.shape[0] == 0:
        return default.nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize,
                                  out_features, bias)
    with torch.cuda.device(x.device):
        return _fwd(x.contiguous(), packed, absmax, absmax2, code8, offset, blocksize, out_features,
                    None if bias is None else bias.contiguous(), None, None, 0.0, 0.0, None)[0]


def nf4_linear_t(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features):
    if dy.dtype not in DTYPE_CODE or dy.dim() != 2 or dy.shape[0] == 0:
        return default.nf4_linear_t(dy, packed, absmax, absmax2, code8, offset, blocksize,
                                    in_features)
    check_linear_args(dy, "dy", in_features, packed, absmax, absmax2, code8, blocksize, dy.shape[1])
    with torch.cuda.device(dy.device):
        return _bwd(dy.contiguous(), packed, absmax, absmax2, code8, offset, blocksize, in_features,
                    None, None, 0.0, 0.0, None)


def qlora_fwd(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, lora_A, lora_B,
              scaling, bias, dropout_p, seed):
    if x.dtype not in DTYPE_CODE or x.dim() != 2 or x.shape[0] == 0:
        return default.qlora_fwd(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                                 lora_A, lora_B, scaling, bias, dropout_p, seed)
    K = x.shape[1]
    check_linear_args(x, "x", K, packed, absmax, absmax2, code8, blocksize, out_features,
                      lora_A=lora_A, lora_B=lora_B, bias=bias, dropout_p=dropout_p, seed=seed)
    with torch.cuda.device(x.device):
        return _fwd(x.contiguous(), packed, absmax, absmax2, code8, offset, blocksize, out_features,
                    None if bias is None else bias.contiguous(), lora_A.contiguous(),
                    lora_B.contiguous(), scaling, dropout_p, seed)


def qlora_bwd_dx(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features, g, lora_A,
                 scaling, dropout_p, seed):
    if dy.dtype not in DTYPE_CODE or dy.dim() != 2 or dy.shape[0] == 0:
        return default.qlora_bwd_dx(dy, packed, absmax, absmax2, code8, offset, blocksize,
                                    in_features, g, lora_A, scaling, dropout_p, seed)
    check_linear_args(dy, "dy", in_features, packed, absmax, absmax2, code8, blocksize, dy.shape[1],
                      lora_A=lora_A, g=g, dropout_p=dropout_p, seed=seed)
    r = lora_A.shape[0]
    if tuple(g.shape) != (dy.shape[0], r):
        raise ValueError(f"g must have shape {(dy.shape[0], r)}, got {tuple(g.shape)}")
    with torch.cuda.device(dy.device):
        return _bwd(dy.contiguous(), packed, absmax, absmax2, code8, offset, blocksize, in_features,
                    g.contiguous(), lora_A.contiguous(), scaling, dropout_p, seed)


def lora_grad_a(g, x, scaling, dropout_p, seed):
    if x.dtype not in DTYPE_CODE or x.dim() != 2 or g.dim() != 2 or x.shape[0] == 0 \
            or g.shape[1] == 0:
        return default.lora_grad_a(g, x, scaling, dropout_p, seed)
    M, K = x.shape
    r = g.shape[1]
    if g.shape[0] != M or g.dtype != torch.float32 or g.device != x.device:
        raise ValueError(f"g must be float32 [{M}, r] on {x.device}, got {g.dtype} "
                         f"{tuple(g.shape)} on {g.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed is required when dropout_p > 0")
    x, g = x.contiguous(), g.contiguous()
    with torch.cuda.device(x.device):
        da = torch.empty((r, K), dtype=torch.float32, device=x.device)
        n = _C_cuda.lora_grad_a_ws_floats(M, K, r)
        ws = torch.empty((n,), dtype=torch.float32, device=x.device) if n else None
        _C_cuda.lora_grad_a(g.data_ptr(), x.data_ptr(), DTYPE_CODE[x.dtype], M, K, r,
                            float(scaling), float(dropout_p), seed_value(dropout_p, seed),
                            da.data_ptr(), addr(ws), _stream(x))
    return da


def _register_linear():
    if _C_cuda is None:
        return
    for name, fn in (("nf4_linear", nf4_linear), ("nf4_linear_t", nf4_linear_t),
                     ("qlora_fwd", qlora_fwd), ("qlora_bwd_dx", qlora_bwd_dx),
                     ("lora_grad_a", lora_grad_a)):
        torch.library.register_kernel(OP + name, "cuda", fn)


_register_linear()
