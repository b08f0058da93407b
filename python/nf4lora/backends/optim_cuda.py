"""CUDA kernels of PagedAdamW's update ops: nf4lora._C_cuda on torch's current stream.

State on the param's GPU ("resident"): one fused launch. State in host memory (paged; pinned, as
PagedAdamW allocates it): the launcher streams it through three device staging slots, allocated
here from torch's caching allocator, with copies on two side streams per device (copy-in and
copy-out, so both PCIe directions work at once). Registered only when the CUDA module was built.
"""
import torch

from .._native import DTYPE_CODE, _C_cuda
from .._optim_ops import adamw_scalars, check_hyper, check_step_args
from .optim_default import state_codes

OP = "nf4lora::"

_SIDE_STREAMS = {}


def side_streams(device):
    """(copy_in, copy_out) streams of a device, created once."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = (torch.cuda.Stream(device=key), torch.cuda.Stream(device=key))
    return _SIDE_STREAMS[key]


def _contig(param):
    p = param.detach()
    return p if p.is_contiguous() else p.contiguous()


def _run(param, grad, bits, exp_avg, exp_avg_sq, am, av, scalars, page_size):
    dev = param.device
    p = _contig(param)
    g = grad.contiguous()
    n = p.numel()
    dt = DTYPE_CODE[param.dtype]
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev)
        code_m, code_v = state_codes(dev) if bits == 8 else (None, None)
        cm = code_m.data_ptr() if bits == 8 else 0
        cv = code_v.data_ptr() if bits == 8 else 0
        if exp_avg.device.type == "cpu":  # paged: host state streams through staging slots
            copy_in, copy_out = side_streams(dev)
            page = min(page_size, -(-n // 256) * 256)  # a small tensor needs no full-size slots
            slot = _C_cuda.paged_slot_bytes(bits, page)
            staging = torch.empty((_C_cuda.PAGED_SLOTS * slot,), dtype=torch.uint8, device=dev)
            _C_cuda.adamw_paged(p.data_ptr(), g.data_ptr(), dt, bits, exp_avg.data_ptr(),
                                exp_avg_sq.data_ptr(), 0 if am is None else am.data_ptr(),
                                0 if av is None else av.data_ptr(), cm, cv, n, *scalars, page,
                                staging.data_ptr(), staging.numel(), stream.cuda_stream,
                                copy_in.cuda_stream, copy_out.cuda_stream)
            # the side streams still use the slots after this returns: keep them from reuse
            staging.record_stream(copy_in)
            staging.record_stream(copy_out)
        elif bits == 8:
            _C_cuda.adamw8(p.data_ptr(), g.data_ptr(), dt, exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                           am.data_ptr(), av.data_ptr(), cm, cv, n, *scalars, stream.cuda_stream)
        else:
            _C_cuda.adamw32(p.data_ptr(), g.data_ptr(), dt, exp_avg.data_ptr(),
                            exp_avg_sq.data_ptr(), n, *scalars, stream.cuda_stream)
    if p.data_ptr() != param.data_ptr():
        param.detach().copy_(p)


def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               page_size):
    check_hyper(lr, beta1, beta2, eps, weight_decay, step, page_size)
    check_step_args(param, grad, exp_avg, exp_avg_sq)
    _run(param, grad, 32, exp_avg, exp_avg_sq, None, None,
         adamw_scalars(lr, beta1, beta2, eps, weight_decay, step), page_size)


def adamw8bit_step(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, lr, beta1,
                   beta2, eps, weight_decay, step, page_size):
    check_hyper(lr, beta1, beta2, eps, weight_decay, step, page_size)
    check_step_args(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    _run(param, grad, 8, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
         adamw_scalars(lr, beta1, beta2, eps, weight_decay, step), page_size)


def _register():
    if _C_cuda is None:
        return
    torch.library.register_kernel(OP + "adamw_step", "cuda", adamw_step)
    torch.library.register_kernel(OP + "adamw8bit_step", "cuda", adamw8bit_step)


_register()
