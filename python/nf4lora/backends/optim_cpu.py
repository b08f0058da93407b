"""CPU kernels of PagedAdamW's update ops: nf4lora._C (fused AVX2/OpenMP pass per page, scalar
fallback). `impl="ref"` runs the scalar csrc/ref twin instead (tests compare the two)."""
import torch

from .._native import DTYPE_CODE, _C
from .._optim_ops import adamw_scalars, check_hyper, check_step_args

OP = "nf4lora::"


def _contig(param):
    """The param's data as a contiguous tensor (a copy to write back if it is not)."""
    p = param.detach()
    return p if p.is_contiguous() else p.contiguous()


def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               page_size, impl="fast"):
    check_hyper(lr, beta1, beta2, eps, weight_decay, step, page_size)
    check_step_args(param, grad, exp_avg, exp_avg_sq)
    p = _contig(param)
    g = grad.contiguous()
    _C.adamw32(p.data_ptr(), g.data_ptr(), DTYPE_CODE[param.dtype], exp_avg.data_ptr(),
               exp_avg_sq.data_ptr(), p.numel(),
               *adamw_scalars(lr, beta1, beta2, eps, weight_decay, step), page_size, impl)
    if p.data_ptr() != param.data_ptr():
        param.detach().copy_(p)


def adamw8bit_step(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, lr, beta1,
                   beta2, eps, weight_decay, step, page_size, impl="fast"):
    check_hyper(lr, beta1, beta2, eps, weight_decay, step, page_size)
    check_step_args(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    p = _contig(param)
    g = grad.contiguous()
    _C.adamw8(p.data_ptr(), g.data_ptr(), DTYPE_CODE[param.dtype], exp_avg.data_ptr(),
              exp_avg_sq.data_ptr(), exp_avg_absmax.data_ptr(), exp_avg_sq_absmax.data_ptr(),
              p.numel(), *adamw_scalars(lr, beta1, beta2, eps, weight_decay, step), page_size,
              impl)
    if p.data_ptr() != param.data_ptr():
        param.detach().copy_(p)


def _register():
    torch.library.register_kernel(OP + "adamw_step", "cpu", adamw_step)
    torch.library.register_kernel(OP + "adamw8bit_step", "cpu", adamw8bit_step)


_register()
