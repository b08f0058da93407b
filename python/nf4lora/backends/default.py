"""Pure-torch reference of every op: readable, any device, any float dtype (float64 included).

It follows DESIGN.md "NF4 format" line by line and is what gradcheck runs through. The native
backends (cpu.py, cuda.py) register faster kernels for their devices and fall back to these
functions for what they do not cover (e.g. float64).
"""
import math

import torch

from ..nf4_format import NF4_CODE, NF4_MIDPOINTS
from .state import (check_dequantize_absmax_args, check_nf4_state, check_out_dtype,
                    check_quantize_absmax_args, check_quantize_args)

OP = "nf4lora::"


def quantize_nf4(w, blocksize):
    check_quantize_args(w, blocksize)
    n = w.numel()
    flat = w.reshape(-1).float()
    nb = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or Inf")
    # x = w * (1/absmax), absmax clamped to 1e-38 before inverting (zero blocks give x = 0)
    inv = 1.0 / absmax.clamp(min=1e-38)
    x = (blocks * inv[:, None]).reshape(-1)[:n]
    # code = number of midpoints strictly below x (bucketize, right=False)
    codes = torch.bucketize(x, NF4_MIDPOINTS.to(w.device)).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def code8_encode(x, code8):
    """Exact-nearest index of x in the sorted 256-entry code8: bitsandbytes' CUDA dQuantize search."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_p = torch.full_like(pivot, 255)
    lower_p = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code8[pivot]
    step = 64
    while step > 0:
        gt = x > val
        lower_p, lower = torch.where(gt, pivot, lower_p), torch.where(gt, val, lower)
        upper_p, upper = torch.where(gt, upper_p, pivot), torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code8[pivot]
        step //= 2
    upper = torch.where(upper_p == 255, code8[255], upper)
    lower = torch.where(lower_p == 0, code8[0], lower)
    gt = x > val
    up = torch.where(x > (upper + val) * 0.5, upper_p, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_p, pivot)
    return torch.where(gt, up, down).to(torch.uint8)


def quantize_absmax(absmax, offset, code8):
    check_quantize_absmax_args(absmax, offset, code8)
    nb = absmax.numel()
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("absmax contains NaN or Inf")
    groups = -(-nb // 256)
    v = absmax.float() - torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    vp = torch.nn.functional.pad(v, (0, groups * 256 - nb)).view(groups, 256)
    absmax2 = vp.abs().amax(dim=1)
    inv = torch.where(absmax2 > 0, 1.0 / absmax2, torch.zeros_like(absmax2))
    x = (vp * inv[:, None]).reshape(-1)[:nb]
    q = code8_encode(x, code8.to(absmax.device))
    zero_group = (absmax2 == 0).repeat_interleave(256)[:nb]
    q = torch.where(zero_group, torch.full_like(q, 127), q)  # index of 0.0 in the signed code
    return q, absmax2


def dequantize_absmax(qabsmax, absmax2, code8, offset):
    check_dequantize_absmax_args(qabsmax, absmax2, code8, offset)
    scale = absmax2.repeat_interleave(256)[: qabsmax.numel()]
    # two float32 roundings, never fused: code*scale, then + offset (as bitsandbytes)
    return code8[qabsmax.long()] * scale + torch.tensor(offset, dtype=torch.float32, device=qabsmax.device)


def block_absmax(absmax, absmax2, code8, offset):
    """Per-block float32 absmax of a plain or double-quantized state."""
    if absmax2 is None:
        return absmax
    return dequantize_absmax(absmax, absmax2, code8, offset)


def dequantize_nf4(packed, absmax, absmax2, code8, offset, blocksize, shape, dtype):
    check_nf4_state(packed, absmax, absmax2, code8, blocksize, shape, offset)
    check_out_dtype(dtype)
    n = math.prod(shape)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    scale = block_absmax(absmax, absmax2, code8, offset).repeat_interleave(blocksize)[:n]
    values = NF4_CODE.to(packed.device)[codes] * scale  # float32 product, then round to dtype
    return values.to(dtype).reshape(shape)


def _register():
    for name, fn in (("quantize_nf4", quantize_nf4), ("quantize_absmax", quantize_absmax),
                     ("dequantize_absmax", dequantize_absmax), ("dequantize_nf4", dequantize_nf4)):
        torch.library.register_kernel(OP + name, None, fn)


_register()


# ---------------------------------------------------------------------------------------------
# Linear ops (see _ops.py). The reference dequantizes W whole; the native kernels never do.
_M32 = 0xFFFFFFFF


def _hash32(x):
    """32-bit integer mixer on int64 tensors holding values < 2^32 (products stay < 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x6D2B79F5) & _M32
    return x ^ (x >> 16)


def dropout_threshold(p):
    """Keep an element iff (hash >> 8) >= threshold: P(drop) = threshold / 2^24 ~= p."""
    return int(p * (1 << 24) + 0.5)  # as make_dropout in dropout.h (round half up)


def dropout_mask(M, K, p, seed, device):
    """Bool [M, K] keep-mask of the LoRA-input dropout, regenerated from `seed` (int) with the same
    hash in csrc/include/nf4lora/dropout.h, so every backend drops the same elements:
      row(i) = hash32(hash32(i ^ seed)),  h(i, k) = hash32((row(i) + k) mod 2^32),  keep = h>>8 >= t."""
    i = torch.arange(M, dtype=torch.int64, device=device)
    k = torch.arange(K, dtype=torch.int64, device=device)
    row = _hash32(_hash32(i ^ (int(seed) & _M32)))
    h = _hash32((row[:, None] + k[None, :]) & _M32)
    return (h >> 8) >= dropout_threshold(p)


def apply_dropout(x, p, seed):
    """D(x): x * mask / (1 - p), in float32 (or float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(acc)
    if p == 0.0:
        return x
    mask = dropout_mask(x.shape[0], x.shape[1], p, int(seed), x.device)
    return torch.where(mask, x * (1.0 / (1.0 - p)), torch.zeros_like(x))


def _weight(packed, absmax, absmax2, code8, offset, blocksize, N, K, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dequantize_nf4(packed, absmax, absmax2, code8, offset, blocksize, [N, K], acc)


def nf4_linear(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, bias):
    w = _weight(packed, absmax, absmax2, code8, offset, blocksize, out_features, x.shape[1], x.dtype)
    y = x.to(w.dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(w.dtype)
    return y.to(x.dtype)


def nf4_linear_t(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features):
    w = _weight(packed, absmax, absmax2, code8, offset, blocksize, dy.shape[1], in_features, dy.dtype)
    return (dy.to(w.dtype) @ w).to(dy.dtype)


def qlora_fwd(x, packed, absmax, absmax2, code8, offset, blocksize, out_features, lora_A, lora_B,
              scaling, bias, dropout_p, seed):
    w = _weight(packed, absmax, absmax2, code8, offset, blocksize, out_features, x.shape[1], x.dtype)
    acc = w.dtype
    u = apply_dropout(x, dropout_p, seed).to(acc) @ lora_A.to(acc).t()
    y = x.to(acc) @ w.t() + scaling * (u @ lora_B.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), u.to(torch.float32 if acc == torch.float32 else acc)


def qlora_bwd_dx(dy, packed, absmax, absmax2, code8, offset, blocksize, in_features, g, lora_A,
                 scaling, dropout_p, seed):
    w = _weight(packed, absmax, absmax2, code8, offset, blocksize, dy.shape[1], in_features, dy.dtype)
    acc = w.dtype
    ga = g.to(acc) @ lora_A.to(acc)
    if dropout_p > 0.0:
        mask = dropout_mask(ga.shape[0], ga.shape[1], dropout_p, int(seed), ga.device)
        ga = torch.where(mask, ga * (1.0 / (1.0 - dropout_p)), torch.zeros_like(ga))
    return (dy.to(acc) @ w + scaling * ga).to(dy.dtype)


def lora_grad_a(g, x, scaling, dropout_p, seed):
    xd = apply_dropout(x, dropout_p, seed)
    return scaling * (g.to(xd.dtype).t() @ xd)


def _register_linear():
    for name, fn in (("nf4_linear", nf4_linear), ("nf4_linear_t", nf4_linear_t),
                     ("qlora_fwd", qlora_fwd), ("qlora_bwd_dx", qlora_bwd_dx),
                     ("lora_grad_a", lora_grad_a)):
        torch.library.register_kernel(OP + name, None, fn)


_register_linear()
