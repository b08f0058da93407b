"""CPU kernels of the linear ops (see _ops.py): nf4lora._C's fused QLoRA linear. float64 and
anything the kernels do not take go to the pure-torch default backend.

`impl="ref"` runs the scalar csrc/ref twin instead of the fast kernel (tests compare the two).
"""
import torch

from .._native import DTYPE_CODE, _C, addr, nf4_state_args
from . import default
from .state import check_linear_args, seed_value

OP = "nf4lora::"


def qlora_forward(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, lora_A,
                  lora_B, scaling, bias, dropout_p, seed, impl="fast"):
    M, K = x.shape
    N = out_features
    check_linear_args(x, "x", K, packed, absmax, absmax2, code8, blocksize, N, lora_A=lora_A,
                      lora_B=lora_B, bias=bias, dropout_p=dropout_p, seed=seed,
                      offset=offset)
    x = x.contiguous()
    r = 0 if lora_A is None else lora_A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    u = torch.empty((M, r), dtype=torch.float32)
    if M > 0:
        _C.qlora_forward(x.data_ptr(), DTYPE_CODE[x.dtype], M,
                         *nf4_state_args(packed, absmax, absmax2, code8, offset, blocksize), N, K,
                         addr(bias), addr(lora_A), addr(lora_B), r, scaling, dropout_p,
                         seed_value(dropout_p, seed), y.data_ptr(), u.data_ptr() if r else 0, impl)
    return y, u


def nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, bias):
    if x.dtype not in DTYPE_CODE:
        return default.nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, bias)
    return qlora_forward(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, None,
                         None, 0.0, bias, 0.0, None)[0]


def qlora_fwd(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, lora_A, lora_B,
              scaling, bias, dropout_p, seed):
    if x.dtype not in DTYPE_CODE:
        return default.qlora_fwd(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                                 lora_A, lora_B, scaling, bias, dropout_p, seed)
    return qlora_forward(x, packed, absmax, absmax2, code8, offset, blocksize, out_features,
                         lora_A, lora_B, scaling, bias, dropout_p, seed)


def qlora_backward_dx(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features, g, lora_A,
                      scaling, dropout_p, seed, impl="fast"):
    M, N = dy.shape
    K = in_features
    check_linear_args(dy, "dy", K, packed, absmax, absmax2, code8, blocksize, N, lora_A=lora_A, g=g,
                      dropout_p=dropout_p, seed=seed, offset=offset)
    if lora_A is not None and (g is None or g.shape[1] != lora_A.shape[0]):
        raise ValueError("g must have shape [M, r] with r = lora_A.shape[0]")
    dy = dy.contiguous()
    dx = torch.empty((M, K), dtype=dy.dtype)
    r = 0 if lora_A is None else lora_A.shape[0]
    if M > 0:
        _C.qlora_backward_dx(dy.data_ptr(), DTYPE_CODE[dy.dtype], M,
                             *nf4_state_args(packed, absmax, absmax2, code8, offset, blocksize), N, K,
                             addr(lora_A), r, scaling, dropout_p, seed_value(dropout_p, seed),
                             addr(None if g is None else g.contiguous()) if r else 0,
                             dx.data_ptr(), impl)
    return dx


def nf4_linear_t(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features):
    if dy.dtype not in DTYPE_CODE:
        return default.nf4_linear_t(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features)
    return qlora_backward_dx(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features,
                             None, None, 0.0, 0.0, None)


def qlora_bwd_dx(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features, g, lora_A,
                 scaling, dropout_p, seed):
    if dy.dtype not in DTYPE_CODE:
        return default.qlora_bwd_dx(dy, packed, absmax, absmax2, code8, offset, blocksize,
                                    in_features, g, lora_A, scaling, dropout_p, seed)
    return qlora_backward_dx(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features, g,
                             lora_A, scaling, dropout_p, seed)


def lora_grad_a(g, x, scaling, dropout_p, seed, impl="fast"):
    if x.dtype not in DTYPE_CODE:
        return default.lora_grad_a(g, x, scaling, dropout_p, seed)
    if g.dim() != 2 or x.dim() != 2 or g.shape[0] != x.shape[0] or g.dtype != torch.float32:
        raise ValueError(f"g must be float32 [M, r] and x [M, K] with the same M, got "
                         f"{tuple(g.shape)} {g.dtype} and {tuple(x.shape)}")
    if not 0.0 <= dropout_p < 1.0 or (dropout_p > 0.0 and seed is None):
        raise ValueError("dropout_p must be in [0, 1) and seed given when dropout_p > 0")
    M, K = x.shape
    r = g.shape[1]
    dA = torch.zeros((r, K), dtype=torch.float32)
    if M > 0 and r > 0:
        g, x = g.contiguous(), x.contiguous()
        _C.lora_grad_a(g.data_ptr(), x.data_ptr(), DTYPE_CODE[x.dtype], M, K, r, scaling, dropout_p,
                       seed_value(dropout_p, seed), dA.data_ptr(), impl)
    return dA


def _register():
    for name, fn in (("nf4_linear", nf4_linear), ("nf4_linear_t", nf4_linear_t),
                     ("qlora_fwd", qlora_fwd), ("qlora_bwd_dx", qlora_bwd_dx),
                     ("lora_grad_a", lora_grad_a)):
        torch.library.register_kernel(OP + name, "cpu", fn)


_register()
