"""Pure-torch reference of PagedAdamW's update ops: readable, any device, and the oracle the tests
hold the C++ and CUDA kernels to, bit for bit.

Every line is one float32 torch op (one IEEE rounding), in the order of adamw_elem in
csrc/ref/optim_ref.h; the step constants come from _optim_ops.adamw_scalars, rounded to float32
once. The 8-bit scheme requantizes with bitsandbytes' exact-nearest code search (default.code8_encode).
"""
import torch

from .._optim_ops import BLOCK, adamw_scalars, check_hyper, check_step_args, check_step_lists, n_blocks
from ..nf4_format import dynamic_map
from .default import code8_encode

OP = "nf4lora::"

_CODES = {}


def state_codes(device):
    """(signed, unsigned) 8-bit dynamic codes, float32 [256] each, cached per device."""
    key = str(device)
    if key not in _CODES:
        _CODES[key] = (dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device))
    return _CODES[key]


def _consts(device, lr, beta1, beta2, eps, weight_decay, step):
    return [torch.tensor(c, dtype=torch.float32, device=device)
            for c in adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)]


def adamw_math(p, g, m, v, k):
    """float32 p, g, m, v -> new (p, m, v); k = the seven float32 constants (0-dim tensors)."""
    decay, beta2, omb1, omb2, step_size, bias2_sqrt, eps = k
    m1 = m + omb1 * (g - m)
    v1 = v * beta2 + (omb2 * g) * g
    # correctly rounded float32 sqrt: torch's CPU float32 sqrt is not (it differs from IEEE sqrt in
    # ~20% of elements on AVX-512 builds); sqrt in float64 rounded once to float32 is exact.
    denom = torch.sqrt(v1.double()).float() / bias2_sqrt + eps
    p1 = p * decay - step_size * (m1 / denom)
    return p1, m1, v1


def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               page_size):
    check_hyper(lr, beta1, beta2, eps, weight_decay, step, page_size)
    check_step_args(param, grad, exp_avg, exp_avg_sq)
    dev = param.device
    k = _consts(dev, lr, beta1, beta2, eps, weight_decay, step)
    p = param.detach().reshape(-1).float()
    g = grad.reshape(-1).float()
    p1, m1, v1 = adamw_math(p, g, exp_avg.to(dev), exp_avg_sq.to(dev), k)
    param.detach().copy_(p1.view(param.shape))  # float32 -> param dtype: round to nearest even
    exp_avg.copy_(m1)
    exp_avg_sq.copy_(v1)


def quantize_state(x, code, absmax):
    """float32 blocks x [nb, 256] with their absmax [nb] -> uint8 codes (exact nearest of
    x * (1 / max(absmax, 1e-38)))."""
    inv = torch.div(torch.ones_like(absmax), absmax.clamp(min=1e-38))
    return code8_encode((x * inv[:, None]).reshape(-1), code)


def _block_absmax(x):
    """max |x| per block, NaN ignored (0 for an all-NaN block), as every kernel computes it."""
    return torch.where(x.isnan(), 0.0, x.abs()).amax(dim=1)


def adamw8bit_step(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, lr, beta1,
                   beta2, eps, weight_decay, step, page_size):
    check_hyper(lr, beta1, beta2, eps, weight_decay, step, page_size)
    check_step_args(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    dev = param.device
    code_m, code_v = state_codes(dev)
    k = _consts(dev, lr, beta1, beta2, eps, weight_decay, step)
    n = param.numel()
    nb = n_blocks(n)
    pad = nb * BLOCK - n

    def blocks(t, fill):  # [n] -> [nb, 256], the tail padded with values that leave absmax alone
        return torch.nn.functional.pad(t, (0, pad), value=fill).view(nb, BLOCK)

    p = blocks(param.detach().reshape(-1).float(), 0.0)
    g = blocks(grad.reshape(-1).float(), 0.0)
    qm = blocks(exp_avg.to(dev).long(), 127)   # 127 = 0.0 in the signed code
    qv = blocks(exp_avg_sq.to(dev).long(), 0)  # 0 = 0.0 in the unsigned code
    m = code_m[qm] * exp_avg_absmax.to(dev)[:, None]
    v = code_v[qv] * exp_avg_sq_absmax.to(dev)[:, None]
    p1, m1, v1 = adamw_math(p, g, m, v, k)
    am = _block_absmax(m1)
    av = _block_absmax(v1)
    param.detach().copy_(p1.reshape(-1)[:n].view(param.shape))
    exp_avg.copy_(quantize_state(m1, code_m, am)[:n])
    exp_avg_sq.copy_(quantize_state(v1, code_v, av)[:n])
    exp_avg_absmax.copy_(am)
    exp_avg_sq_absmax.copy_(av)


def adamw_step_multi(params, grads, exp_avgs, exp_avg_sqs, *hp):
    """Any device: the single-tensor op per tensor (each dispatches to its device's kernel)."""
    check_step_lists(params, grads, exp_avgs, exp_avg_sqs)
    for args in zip(params, grads, exp_avgs, exp_avg_sqs):
        torch.ops.nf4lora.adamw_step(*args, *hp)


def adamw8bit_step_multi(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs,
                         *hp):
    check_step_lists(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs)
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs):
        torch.ops.nf4lora.adamw8bit_step(*args, *hp)


def _register():
    torch.library.register_kernel(OP + "adamw_step", None, adamw_step)
    torch.library.register_kernel(OP + "adamw8bit_step", None, adamw8bit_step)
    torch.library.register_kernel(OP + "adamw_step_multi", None, adamw_step_multi)
    torch.library.register_kernel(OP + "adamw8bit_step_multi", None, adamw8bit_step_multi)


_register()
