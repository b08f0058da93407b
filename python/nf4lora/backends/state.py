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
