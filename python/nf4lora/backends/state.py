"""Validation of raw NF4 state tensors, shared by every backend (runs before any kernel)."""
import math

import torch


def check_nf4_state(packed, absmax, absmax2, code8, blocksize, shape):
    """Raise ValueError if the state tensors do not describe `shape` consistently."""
    n = math.prod(shape)
    if n <= 0:
        raise ValueError(f"shape must have at least one element, got {list(shape)}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    nb = -(-n // blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with {(n + 1) // 2} elements for shape {list(shape)}, "
            f"got {packed.dtype} with {packed.numel()}")
    for name, t in (("packed", packed), ("absmax", absmax), ("absmax2", absmax2), ("code8", code8)):
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    if absmax.numel() != nb:
        raise ValueError(f"absmax must have {nb} elements (one per block), got {absmax.numel()}")
    if absmax2 is None:
        if absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 when not double-quantized, got {absmax.dtype}")
        return
    if absmax.dtype != torch.uint8:
        raise ValueError(f"absmax must be uint8 codes when double-quantized, got {absmax.dtype}")
    if code8 is None or code8.dtype != torch.float32 or code8.numel() != 256:
        raise ValueError("code8 (nested_quant_map) must be float32 with 256 elements")
    if absmax2.dtype != torch.float32 or absmax2.numel() != -(-nb // 256):
        raise ValueError(f"absmax2 (nested_absmax) must be float32 with {-(-nb // 256)} elements, "
                         f"got {absmax2.dtype} with {absmax2.numel()}")


def check_linear_args(x, name, K, packed, absmax, absmax2, code8, blocksize, N, *, lora_A=None,
                      lora_B=None, bias=None, g=None, dropout_p=0.0, seed=None):
    """Shapes/dtypes of a linear op's arguments against W [N, K] (raises ValueError naming them)."""
    check_nf4_state(packed, absmax, absmax2, code8, blocksize, (N, K))
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, features], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device != packed.device:
        raise ValueError(f"{name} is on {x.device} but the NF4 weight is on {packed.device}")
    for tname, t, shape in (("lora_A", lora_A, None if lora_A is None else (lora_A.shape[0], K)),
                            ("lora_B", lora_B, None if lora_A is None else (N, lora_A.shape[0])),
                            ("bias", bias, (N,)),
                            ("g", g, None if g is None else (x.shape[0], g.shape[1]))):
        if t is None:
            continue
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if t.dtype != acc:
            raise ValueError(f"{tname} must be {acc} for {name} of dtype {x.dtype}, got {t.dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{tname} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != packed.device:
            raise ValueError(f"{tname} is on {t.device} but the NF4 weight is on {packed.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed is required when dropout_p > 0")
