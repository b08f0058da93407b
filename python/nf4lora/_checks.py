"""Argument checks that name the argument: bad input becomes a ValueError/TypeError before any
kernel runs (the kernels check again and never read out of bounds)."""
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name, t, *, dtypes=None, dim=None, contiguous=True, nonempty=True, finite=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if t.is_sparse or t.is_complex():
        raise ValueError(f"{name} must be a dense real tensor")
    if finite and t.numel() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_blocksize(blocksize, name="blocksize"):
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize}")
    return blocksize


def check_finite_scalar(name, v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return float(v)


def check_same_device(**tensors):
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len({d for d in devs.values()}) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"tensors must be on one device, got {listing}")
