"""Kernels of the multi_lora_linear op (_ops.py) on every device, in one file because the op is
one job: the base NF4 GEMM through the fused linear's own base path (never a second NF4 GEMM),
then the multi-adapter LoRA term added in place by the device's kernel.

  default  pure torch, any device and float dtype (float64 included): a loop over the distinct
           adapters; the tests' readable reference
  cpu      nf4lora._C: cpu_linear.qlora_forward (base) + multi_lora_add (csrc/cpu/multi_lora.h)
  cuda     nf4lora._C_cuda: cuda.nf4_linear (base) + multi_lora_add (csrc/cuda/multi_lora.h)

sgmv_min_rows (0: the default): on the CPU an adapter with at least this many rows in the batch
takes SGMV (kSgmvMinRows = 2), the rest BGMV; on CUDA the whole batch takes SGMV (rows sorted by
adapter) when it has at least this many rows (default 128), else BGMV (one row per block). Either
way 1 forces SGMV and a value above M forces BGMV. `impl="ref"` (CPU) runs the csrc/ref twins.
"""
import torch

from .._native import DTYPE_CODE, _C, _C_cuda
from . import cpu_linear, default
from .state import check_linear_args, check_multi_lora_args

OP = "nf4lora::"
CUDA_SGMV_MIN_BATCH = 128


def _check(x, packed, absmax, absmax2, code8, offset, blocksize, N, A_pool, B_pool, adapter_idx,
           scalings, bias):
    K = x.shape[1] if x.dim() == 2 else -1
    check_linear_args(x, "x", K, packed, absmax, absmax2, code8, blocksize, N, bias=bias,
                      offset=offset)
    check_multi_lora_args(x, N, K, A_pool, B_pool, adapter_idx, scalings, bias)
    return x.shape[0], K


def multi_lora_linear_default(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                              A_pool, B_pool, adapter_idx, scalings, bias, sgmv_min_rows):
    _check(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, A_pool, B_pool,
           adapter_idx, scalings, bias)
    y = default.nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, bias)
    acc = scalings.dtype  # float32, or float64 for float64 x
    for e in torch.unique(adapter_idx[adapter_idx >= 0]).tolist():
        rows = (adapter_idx == e).nonzero().squeeze(1)
        u = x[rows].to(acc) @ A_pool[e].to(acc).t()
        y[rows] = (y[rows].to(acc) + scalings[e] * (u @ B_pool[e].to(acc).t())).to(y.dtype)
    return y


def multi_lora_linear_cpu(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                          A_pool, B_pool, adapter_idx, scalings, bias, sgmv_min_rows, impl="fast"):
    if x.dtype not in DTYPE_CODE:
        return multi_lora_linear_default(x, packed, absmax, absmax2, code8, offset, blocksize,
                                         out_features, A_pool, B_pool, adapter_idx, scalings, bias,
                                         sgmv_min_rows)
    M, K = _check(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, A_pool,
                  B_pool, adapter_idx, scalings, bias)
    x = x.contiguous()
    y = cpu_linear.qlora_forward(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                                 None, None, 0.0, bias, 0.0, None, impl=impl)[0]
    if M > 0:
        E, r = A_pool.shape[0], A_pool.shape[1]
        _C.multi_lora_add(x.data_ptr(), DTYPE_CODE[x.dtype], M, K, out_features, A_pool.data_ptr(),
                          B_pool.data_ptr(), adapter_idx.data_ptr(), scalings.data_ptr(), E, r,
                          y.data_ptr(), sgmv_min_rows, impl, DTYPE_CODE[A_pool.dtype])
    return y


def cuda_uses_sgmv(M, sgmv_min_rows):
    """The CUDA path's choice for a batch of M rows (see the module docstring)."""
    return M >= (sgmv_min_rows if sgmv_min_rows > 0 else CUDA_SGMV_MIN_BATCH)


def multi_lora_linear_cuda(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                           A_pool, B_pool, adapter_idx, scalings, bias, sgmv_min_rows):
    if x.dtype not in DTYPE_CODE:
        return multi_lora_linear_default(x, packed, absmax, absmax2, code8, offset, blocksize,
                                         out_features, A_pool, B_pool, adapter_idx, scalings, bias,
                                         sgmv_min_rows)
    from . import cuda as cuda_backend
    M, K = _check(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, A_pool,
                  B_pool, adapter_idx, scalings, bias)
    y = cuda_backend.nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, bias)
    if M == 0:
        return y
    E, r = A_pool.shape[0], A_pool.shape[1]
    sgmv = cuda_uses_sgmv(M, sgmv_min_rows)
    x = x.contiguous()
    with torch.cuda.device(x.device):
        order = torch.argsort(adapter_idx, stable=True) if sgmv else None
        u = torch.empty((M, r), dtype=torch.float32, device=x.device)
        _C_cuda.multi_lora_add(x.data_ptr(), DTYPE_CODE[x.dtype], M, K, out_features,
                               A_pool.data_ptr(), B_pool.data_ptr(), adapter_idx.data_ptr(),
                               0 if order is None else order.data_ptr(), scalings.data_ptr(), E, r,
                               u.data_ptr(), y.data_ptr(), sgmv,
                               torch.cuda.current_stream(x.device).cuda_stream, DTYPE_CODE[A_pool.dtype])
    return y


def _register():
    torch.library.register_kernel(OP + "multi_lora_linear", None, multi_lora_linear_default)
    torch.library.register_kernel(OP + "multi_lora_linear", "cpu", multi_lora_linear_cpu)
    if _C_cuda is not None and hasattr(_C_cuda, "multi_lora_add"):
        torch.library.register_kernel(OP + "multi_lora_linear", "cuda", multi_lora_linear_cuda)


_register()
