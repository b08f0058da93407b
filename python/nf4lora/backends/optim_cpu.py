"""CPU kernels of PagedAdamW's update ops: nf4lora._C (fused AVX2/OpenMP pass per page, scalar
fallback). `impl="ref"` runs the scalar csrc/ref twin instead (tests compare the two).
The multi-tensor ops hand a whole list to one C++ call (one OpenMP region); the per-tensor checks
there are a fast predicate, with check_step_args only to word the error when it fails."""
import torch

from .._native import DTYPE_CODE, _C
from .._optim_ops import adamw_scalars, check_hyper, check_step_args, check_step_lists

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


_CPU = torch.device("cpu")


def _fits(p, g, states, state_dtypes):
    """True when (p, g, states) can go to the multi-tensor kernel as they are: every check of
    check_step_args passes and param and grad are contiguous. A cheap predicate; the caller
    words any error with check_step_args."""
    n = p.numel()
    if not (g.dtype == p.dtype and g.shape == p.shape and g.device == _CPU and p.device == _CPU
            and g.layout == torch.strided and p.is_contiguous() and g.is_contiguous()):
        return False
    for t, dt, numel in zip(states, state_dtypes, (n, n, -(-n // 256), -(-n // 256))):
        if t.dtype != dt or t.numel() != numel or t.device != _CPU or not t.is_contiguous():
            return False
    return True


def _step_multi(single, launch, params, grads, states, state_dtypes, hp):
    """Route each tensor: the multi-tensor kernel (grouped by param dtype) or, for a
    non-contiguous param/grad, the single-tensor kernel; errors are raised before any update."""
    check_hyper(*hp)
    batches, rest = {}, []
    for i, (p, g) in enumerate(zip(params, grads)):
        st = [s[i] for s in states]
        if p.dtype in DTYPE_CODE and _fits(p, g, st, state_dtypes):
            batches.setdefault(p.dtype, []).append((p, g, st))
        else:
            check_step_args(p, g, *st)  # raises with the reason, if there is one
            rest.append((p, g, st))
    scalars = adamw_scalars(*hp[:-1])
    for dtype, items in batches.items():
        ptrs = [[p.data_ptr() for p, _, _ in items], [g.data_ptr() for _, g, _ in items]]
        ptrs += [[st[k].data_ptr() for _, _, st in items] for k in range(len(states))]
        launch(*ptrs, [p.numel() for p, _, _ in items], DTYPE_CODE[dtype], *scalars, hp[-1])
    for p, g, st in rest:
        single(p, g, *st, *hp)


def adamw_step_multi(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                     step, page_size):
    check_step_lists(params, grads, exp_avgs, exp_avg_sqs)
    _step_multi(adamw_step, _C.adamw32_multi, params, grads, (exp_avgs, exp_avg_sqs),
                (torch.float32, torch.float32), (lr, beta1, beta2, eps, weight_decay, step, page_size))


def adamw8bit_step_multi(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs,
                         lr, beta1, beta2, eps, weight_decay, step, page_size):
    check_step_lists(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs)
    _step_multi(adamw8bit_step, _C.adamw8_multi, params, grads,
                (exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs),
                (torch.uint8, torch.uint8, torch.float32, torch.float32),
                (lr, beta1, beta2, eps, weight_decay, step, page_size))


def _register():
    torch.library.register_kernel(OP + "adamw_step", "cpu", adamw_step)
    torch.library.register_kernel(OP + "adamw8bit_step", "cpu", adamw8bit_step)
    torch.library.register_kernel(OP + "adamw_step_multi", "cpu", adamw_step_multi)
    torch.library.register_kernel(OP + "adamw8bit_step_multi", "cpu", adamw8bit_step_multi)


_register()
