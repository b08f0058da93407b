"""nf4_linear and qlora_linear: autograd over the nf4lora ops (register_autograd), the backward
built from our own ops. DESIGN.md "The fused QLoRA linear" gives the math:

  forward:  u  = D(x) A^T                  y  = x W^T + b + s u B^T
  backward: g  = dy B      dx = dy W + s D(g A)      dA = s g^T D(x)      dB = s dy^T u   db = sum dy

W is an NF4Tensor (never dequantized whole by the native kernels). Activations x [..., K] in
fp32/fp16/bf16 (fp64 through the pure-torch backend); LoRA weights and the bias enter the kernels in
float32 (float64 for float64 x) and their gradients come back in their own dtype through autograd.
"""
import torch

from . import _ops  # noqa: F401
from ._checks import check_finite_scalar, check_tensor
from .nf4 import NF4Tensor

ops = torch.ops.nf4lora
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _state(q):
    return (q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize)


def _check_common(x, q, bias):
    # q's own state was validated when it was built (NF4Tensor); here only this call's arguments.
    # q is read through plain attributes (nk, packed): a tensor property of a subclass (q.shape,
    # q.device) goes through __torch_function__, microseconds per access at decode sizes.
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    check_tensor("x", x, dtypes=_ACT_DTYPES, contiguous=False, nonempty=False)
    if len(q.nk) != 2:
        raise ValueError(f"q must be a 2-D weight [out_features, in_features], got shape {q.nk}")
    N, K = q.nk
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dimension {K} (in_features of q), got shape {tuple(x.shape)}")
    if x.device != q.packed.device:
        raise ValueError(f"x is on {x.device} but q is on {q.packed.device}")
    if x.device.type == "cuda":
        from ._native import _C_cuda
        if _C_cuda is None:
            raise RuntimeError("x is a CUDA tensor but nf4lora was built without its CUDA module")
    if bias is not None:
        check_tensor("bias", bias, dtypes=_ACT_DTYPES, contiguous=False)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return N, K


# ------------------------------------------------------------------------------- nf4_linear
def nf4_linear(x, q, bias=None):
    """y = x @ W^T + bias with W = q (NF4); differentiable in x and bias. x: [..., K] -> [..., N]."""
    N, K = _check_common(x, q, bias)
    x2 = x.reshape(-1, K).contiguous()
    b = None if bias is None else bias.to(_acc(x.dtype))
    if x2.shape[0] == 0:
        return x.new_zeros((*x.shape[:-1], N)) + (0 if b is None else b.to(x.dtype))
    y = ops.nf4_linear(x2, *_state(q), N, b)
    return y.reshape(*x.shape[:-1], N)


def _nf4_linear_setup(ctx, inputs, output):
    x, packed, absmax, absmax2, code8, offset, blocksize, N, bias = inputs
    ctx.save_for_backward(packed, absmax, absmax2, code8)
    ctx.offset, ctx.blocksize, ctx.K = offset, blocksize, x.shape[1]
    ctx.has_bias = bias is not None


def _nf4_linear_backward(ctx, dy):
    packed, absmax, absmax2, code8 = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = ops.nf4_linear_t(dy.contiguous(), packed, absmax, absmax2, code8, ctx.offset,
                              ctx.blocksize, ctx.K)
    db = dy.sum(0).to(_acc(dy.dtype)) if ctx.has_bias and ctx.needs_input_grad[8] else None
    return dx, None, None, None, None, None, None, None, db


torch.library.register_autograd("nf4lora::nf4_linear", _nf4_linear_backward,
                                setup_context=_nf4_linear_setup)


# ------------------------------------------------------------------------------- qlora_linear
def _new_seed():
    # drawn from torch's default CPU generator, so torch.manual_seed makes dropout reproducible
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def qlora_linear(x, q, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=None):
    """y = x W^T + bias + scaling * D(x) A^T B^T, W = q (NF4, frozen), A = lora_A [r, K],
    B = lora_B [N, r]; D = dropout with probability dropout_p on the LoRA input (a mask regenerated
    from `seed` in backward, never stored). Differentiable in x, lora_A, lora_B and bias."""
    N, K = _check_common(x, q, bias)
    check_tensor("lora_A", lora_A, dtypes=_ACT_DTYPES, dim=2, contiguous=False)
    check_tensor("lora_B", lora_B, dtypes=_ACT_DTYPES, dim=2, contiguous=False)
    r = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must have shape [{N}, {r}] (r from lora_A), got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    scaling = check_finite_scalar("scaling", scaling)
    dropout_p = check_finite_scalar("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    acc = _acc(x.dtype)
    x2 = x.reshape(-1, K).contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros((*x.shape[:-1], N))
    if dropout_p > 0.0 and seed is None:
        seed = _new_seed()
    elif dropout_p > 0.0 and not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    elif dropout_p == 0.0:
        seed = None
    y, _ = ops.qlora_fwd(x2, *_state(q), N, lora_A.to(acc).contiguous(), lora_B.to(acc).contiguous(),
                         scaling, None if bias is None else bias.to(acc), dropout_p, seed)
    return y.reshape(*x.shape[:-1], N)


def _qlora_setup(ctx, inputs, output):
    (x, packed, absmax, absmax2, code8, offset, blocksize, N, lora_A, lora_B, scaling, bias,
     dropout_p, seed) = inputs
    _, u = output
    ctx.save_for_backward(x, packed, absmax, absmax2, code8, lora_A, lora_B, u, seed)
    ctx.offset, ctx.blocksize, ctx.scaling, ctx.dropout_p = offset, blocksize, scaling, dropout_p
    ctx.has_bias = bias is not None


def _qlora_backward(ctx, dy, du):
    x, packed, absmax, absmax2, code8, lora_A, lora_B, u, seed = ctx.saved_tensors
    s, p = ctx.scaling, ctx.dropout_p
    dy = dy.contiguous()
    dyf = dy.to(lora_B.dtype)
    need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[8], ctx.needs_input_grad[9]
    dx = dA = dB = db = None
    if need_x or need_A:
        g = dyf @ lora_B  # [M, r]
        if need_x:
            dx = ops.qlora_bwd_dx(dy, packed, absmax, absmax2, code8, ctx.offset, ctx.blocksize,
                                  x.shape[1], g, lora_A, s, p, seed)
        if need_A:
            dA = ops.lora_grad_a(g, x, s, p, seed)
    if need_B:
        dB = (dyf.t() @ u) * s  # [N, r]
    if ctx.has_bias and ctx.needs_input_grad[11]:
        db = dyf.sum(0)
    return dx, None, None, None, None, None, None, None, dA, dB, None, db, None, None


torch.library.register_autograd("nf4lora::qlora_fwd", _qlora_backward, setup_context=_qlora_setup)
