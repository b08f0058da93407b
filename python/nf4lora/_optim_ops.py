"""Schemas of PagedAdamW's torch ops (nf4lora::adamw_step, nf4lora::adamw8bit_step), their fakes,
and what every backend shares: argument checks and the float32 step constants.

Kernels are registered per device in backends/optim_default.py (pure torch, any device),
backends/optim_cpu.py (nf4lora._C) and backends/optim_cuda.py (nf4lora._C_cuda); optim.py imports
them. Both ops update `param` and the state in place (declared `(a!)` in the schema) and return
nothing.

State of one parameter with n elements (flattened, row-major), split into pages of `page_size`
elements (a multiple of 256, so an 8-bit block never straddles two pages):
  32-bit:  exp_avg, exp_avg_sq          float32 [n]
  8-bit:   exp_avg                      uint8 [n]  signed dynamic code  (value = code[q] * absmax)
           exp_avg_sq                   uint8 [n]  unsigned dynamic code
           exp_avg_absmax, exp_avg_sq_absmax   float32 [ceil(n/256)]
The state may live on the parameter's device, or (CUDA, paged) in pinned host memory: the CUDA
kernel then streams it through the GPU page by page.
"""
import math

import torch

LIB = "nf4lora"
BLOCK = 256          # 8-bit state: elements per absmax block
MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit state (as bitsandbytes)

_HP = "float lr, float beta1, float beta2, float eps, float weight_decay, int step, int page_size"
_SCHEMAS = {
    # param [any] fp32/fp16/bf16, grad like param, exp_avg/exp_avg_sq float32 [n]
    "adamw_step": (
        f"(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, {_HP}) -> ()"
    ),
    # exp_avg/exp_avg_sq uint8 [n], exp_avg_absmax/exp_avg_sq_absmax float32 [ceil(n/256)]
    "adamw8bit_step": (
        "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        f"Tensor(d!) exp_avg_absmax, Tensor(e!) exp_avg_sq_absmax, {_HP}) -> ()"
    ),
    # Multi-tensor forms (PagedAdamW's path): the same update on parallel lists of tensors that
    # share the hyper-parameters and step; the CPU kernel runs them all in one OpenMP region.
    "adamw_step_multi": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        f"{_HP}) -> ()"
    ),
    "adamw8bit_step_multi": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        f"Tensor(d!)[] exp_avg_absmaxs, Tensor(e!)[] exp_avg_sq_absmaxs, {_HP}) -> ()"
    ),
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"{LIB}::{_name}", _schema)


def n_blocks(n):
    return -(-n // BLOCK)


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The seven step constants in csrc AdamWScalars order, computed in double (as torch.optim.AdamW
    computes them); every backend rounds them once to float32, so all backends agree bit for bit:
    (decay, beta2, 1 - beta1, 1 - beta2, step_size, sqrt(1 - beta2^t), eps)."""
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    return (1.0 - lr * weight_decay, beta2, 1.0 - beta1, 1.0 - beta2, lr / bias1, math.sqrt(bias2), eps)


def check_hyper(lr, beta1, beta2, eps, weight_decay, step, page_size):
    """ValueError naming the hyper-parameter (the kernels check again)."""
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not math.isfinite(v) or v < 0.0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"betas: {name} must be in [0, 1), got {v}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if page_size <= 0 or page_size % BLOCK:
        raise ValueError(f"page_size must be a positive multiple of {BLOCK}, got {page_size}")


def _check_flat(name, t, n, dtype):
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {str(dtype).replace('torch.', '')}, got {str(t.dtype).replace('torch.', '')}")
    if t.numel() != n or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of {n} elements, got shape {tuple(t.shape)}")


def check_step_args(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax=None, exp_avg_sq_absmax=None):
    """Shapes, dtypes and devices of one update (TypeError/ValueError naming the argument)."""
    if param.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"param must be float32, float16 or bfloat16, got {param.dtype}")
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError("grad must be dense (sparse gradients are not supported)")
    if grad.is_complex():
        raise TypeError("grad must be real (complex gradients are not supported)")
    if grad.dtype != param.dtype:
        raise TypeError(f"grad dtype {grad.dtype} does not match param dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match param shape {tuple(param.shape)}")
    if grad.device != param.device:
        raise ValueError(f"grad is on {grad.device} but param is on {param.device}")
    n = param.numel()
    eight = exp_avg_absmax is not None
    sdt = torch.uint8 if eight else torch.float32
    _check_flat("exp_avg", exp_avg, n, sdt)
    _check_flat("exp_avg_sq", exp_avg_sq, n, sdt)
    if eight:
        _check_flat("exp_avg_absmax", exp_avg_absmax, n_blocks(n), torch.float32)
        _check_flat("exp_avg_sq_absmax", exp_avg_sq_absmax, n_blocks(n), torch.float32)
    state = [t for t in (exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax) if t is not None]
    if len({t.device for t in state}) != 1:
        raise ValueError("optimizer state tensors must all be on one device")
    sdev = state[0].device
    if sdev != param.device and not (param.device.type == "cuda" and sdev.type == "cpu"):
        raise ValueError(f"optimizer state is on {sdev} but param is on {param.device} "
                         "(state lives with the param, or in host memory for a paged CUDA param)")


def check_step_lists(*lists):
    """The multi-tensor ops' lists: sequences of tensors, all of one length (ValueError/TypeError)."""
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_absmaxs", "exp_avg_sq_absmaxs")
    n = len(lists[0])
    for name, lst in zip(names, lists):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors but params has {n}")
    return n


@torch.library.register_fake(f"{LIB}::adamw_step")
def _adamw_step_fake(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                     page_size):
    check_step_args(param, grad, exp_avg, exp_avg_sq)
    return None


@torch.library.register_fake(f"{LIB}::adamw8bit_step")
def _adamw8bit_step_fake(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, lr,
                         beta1, beta2, eps, weight_decay, step, page_size):
    check_step_args(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    return None


@torch.library.register_fake(f"{LIB}::adamw_step_multi")
def _adamw_step_multi_fake(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                           step, page_size):
    check_step_lists(params, grads, exp_avgs, exp_avg_sqs)
    for args in zip(params, grads, exp_avgs, exp_avg_sqs):
        check_step_args(*args)
    return None


@torch.library.register_fake(f"{LIB}::adamw8bit_step_multi")
def _adamw8bit_step_multi_fake(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs,
                               exp_avg_sq_absmaxs, lr, beta1, beta2, eps, weight_decay, step,
                               page_size):
    check_step_lists(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs)
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs):
        check_step_args(*args)
    return None
