"""Validation of raw op arguments, shared by every backend: runs before any kernel, so a bad or
inconsistent state is a ValueError/TypeError naming the argument, never an out-of-bounds read."""
import math

import torch

# Input dtypes of quantize_nf4 and output dtypes of dequantize_nf4 at the op level (float64 runs
# through the pure-torch backend; the public API takes the first three only).
OP_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _name(dtype):
    return str(dtype).replace("torch.", "")


def check_blocksize_value(blocksize, name="blocksize"):
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize}")


def check_offset(offset, name="offset"):
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"{name} must be a finite float, got {offset!r}")


def _check_tensor_arg(name, t, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but expected {device}")


def check_code8(code8, device=None):
    _check_tensor_arg("code8", code8, device)
    if code8.dtype != torch.float32 or code8.numel() != 256:
        raise ValueError(f"code8 (nested_quant_map) must be float32 with 256 elements, got "
                         f"{_name(code8.dtype)} with {code8.numel()}")


def check_quantize_args(w, blocksize):
    """quantize_nf4(w, blocksize): a non-empty floating tensor and a valid blocksize."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in OP_FLOAT_DTYPES:
        raise ValueError(f"w must have dtype in ({', '.join(map(_name, OP_FLOAT_DTYPES))}), got "
                         f"{_name(w.dtype)}")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    check_blocksize_value(blocksize)


def check_quantize_absmax_args(absmax, offset, code8):
    _check_tensor_arg("absmax", absmax)
    if absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32, got {_name(absmax.dtype)}")
    if absmax.numel() == 0:
        raise ValueError("absmax must not be empty")
    check_offset(offset)
    check_code8(code8, absmax.device)


def check_dequantize_absmax_args(qabsmax, absmax2, code8, offset):
    _check_tensor_arg("qabsmax", qabsmax)
    if qabsmax.dtype != torch.uint8:
        raise ValueError(f"qabsmax must be uint8 codes, got {_name(qabsmax.dtype)}")
    if qabsmax.numel() == 0:
        raise ValueError("qabsmax must not be empty")
    nb = qabsmax.numel()
    _check_tensor_arg("absmax2", absmax2, qabsmax.device)
    if absmax2.dtype != torch.float32 or absmax2.numel() != -(-nb // 256):
        raise ValueError(f"absmax2 (nested_absmax) must be float32 with {-(-nb // 256)} elements "
                         f"for {nb} codes, got {_name(absmax2.dtype)} with {absmax2.numel()}")
    check_code8(code8, qabsmax.device)
    check_offset(offset)


def check_out_dtype(dtype):
    if not isinstance(dtype, torch.dtype) or dtype not in OP_FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of ({', '.join(map(_name, OP_FLOAT_DTYPES))}), got {dtype}")


def check_nf4_state(packed, absmax, absmax2, code8, blocksize, shape, offset=0.0):
    """Raise ValueError if the state tensors do not describe `shape` consistently."""
    for name, t in (("packed", packed), ("absmax", absmax)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("absmax2", absmax2), ("code8", code8)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    shape = list(shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"shape must be a non-empty list of positive ints, got {shape}")
    n = math.prod(shape)
    check_blocksize_value(blocksize)
    nb = -(-n // blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with {(n + 1) // 2} elements for shape {shape}, "
            f"got {_name(packed.dtype)} with {packed.numel()}")
    for name, t in (("packed", packed), ("absmax", absmax), ("absmax2", absmax2), ("code8", code8)):
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    if absmax.numel() != nb:
        raise ValueError(f"absmax must have {nb} elements (one per block of {blocksize} for shape "
                         f"{shape}), got {absmax.numel()}")
    if absmax2 is None:
        if absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 when not double-quantized (absmax2 is None), "
                             f"got {_name(absmax.dtype)}")
        return
    if absmax.dtype != torch.uint8:
        raise ValueError(f"absmax must be uint8 codes when double-quantized (absmax2 given), got "
                         f"{_name(absmax.dtype)}")
    if code8 is None:
        raise ValueError("code8 (nested_quant_map) is required with absmax2 (double quantization)")
    check_code8(code8)
    if absmax2.dtype != torch.float32 or absmax2.numel() != -(-nb // 256):
        raise ValueError(f"absmax2 (nested_absmax) must be float32 with {-(-nb // 256)} elements, "
                         f"got {_name(absmax2.dtype)} with {absmax2.numel()}")
    check_offset(offset)



_CHECKED = "_nf4lora_state_checked"  # attribute on a packed-codes tensor: the state it was checked with


def _state_key(packed, absmax, absmax2, code8, blocksize, shape):
    # What the check depends on: which tensors (a swapped one has another id) and their sizes (an
    # in-place resize changes numel; no in-place op changes dtype; a tensor can not grow smaller
    # than its view). Cheap on purpose: this runs on every call.
    return (id(absmax), id(absmax2), id(code8), packed.numel(), absmax.numel(),
            0 if absmax2 is None else absmax2.numel(), blocksize, tuple(shape))


def check_nf4_state_once(packed, absmax, absmax2, code8, blocksize, shape, offset=0.0):
    """check_nf4_state, skipped when this very state (same tensor objects, same sizes) passed it
    before: an NF4 weight is validated when it is built or loaded, and the per-call path pays a
    lookup instead of the full check (the decode-sized calls of issue 13's "validation once").
    A state whose tensors were swapped or resized is checked again; offset is a per-call value."""
    key = _state_key(packed, absmax, absmax2, code8, blocksize, shape)
    if getattr(packed, _CHECKED, None) != key:
        check_nf4_state(packed, absmax, absmax2, code8, blocksize, shape, offset)
        try:
            setattr(packed, _CHECKED, key)
        except (AttributeError, RuntimeError):  # a tensor that takes no attributes: check each time
            pass
    else:
        check_offset(offset)


def check_linear_args(x, name, K, packed, absmax, absmax2, code8, blocksize, N, *, lora_A=None,
                      lora_B=None, bias=None, g=None, dropout_p=0.0, seed=None, offset=0.0):
    """Shapes/dtypes of a linear op's arguments against W [N, K] (raises ValueError naming them)."""
    check_nf4_state_once(packed, absmax, absmax2, code8, blocksize, (N, K), offset)
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


def seed_value(dropout_p, seed):
    """The dropout seed as the int the kernels take (0 when there is no dropout)."""
    return int(seed) if dropout_p > 0.0 else 0


def check_multi_lora_args(x, N, K, A_pool, B_pool, adapter_idx, scalings, bias):
    """multi_lora_linear's LoRA-side arguments against x [M, K] and W [N, K] (ValueError naming
    them; the NF4 state is checked by check_linear_args). Pools fp32/fp16/bf16 (one dtype; fp64
    for fp64 x), scalings fp32 (fp64), adapter_idx int64 with values in [-1, E)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, t, dim in (("A_pool", A_pool, 3), ("B_pool", B_pool, 3), ("adapter_idx", adapter_idx, 1),
                         ("scalings", scalings, 1)):
        _check_tensor_arg(name, t, x.device)
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    pool_dtypes = (torch.float64,) if acc == torch.float64 else (torch.float32, torch.float16, torch.bfloat16)
    if A_pool.dtype not in pool_dtypes:
        raise ValueError(f"A_pool must have dtype in ({', '.join(map(_name, pool_dtypes))}) for x of dtype "
                         f"{_name(x.dtype)}, got {_name(A_pool.dtype)}")
    if B_pool.dtype != A_pool.dtype:
        raise ValueError(f"B_pool must have A_pool's dtype {_name(A_pool.dtype)}, got {_name(B_pool.dtype)}")
    if scalings.dtype != acc:
        raise ValueError(f"scalings must be {_name(acc)} for x of dtype {_name(x.dtype)}, got {_name(scalings.dtype)}")
    if adapter_idx.dtype != torch.int64:
        raise ValueError(f"adapter_idx must be int64, got {_name(adapter_idx.dtype)}")
    E, r = A_pool.shape[0], A_pool.shape[1]
    if E == 0 or r == 0 or A_pool.shape[2] != K:
        raise ValueError(f"A_pool must have shape [E, r, {K}] with E, r >= 1, got {tuple(A_pool.shape)}")
    if tuple(B_pool.shape) != (E, N, r):
        raise ValueError(f"B_pool must have shape {(E, N, r)} (E, r from A_pool), got {tuple(B_pool.shape)}")
    if tuple(scalings.shape) != (E,):
        raise ValueError(f"scalings must have shape ({E},) (one per adapter of A_pool), got {tuple(scalings.shape)}")
    if adapter_idx.shape[0] != x.shape[0]:
        raise ValueError(f"adapter_idx must have shape ({x.shape[0]},) (one per row of x), got "
                         f"{tuple(adapter_idx.shape)}")
    if x.shape[0] > 0:
        lo, hi = int(adapter_idx.min()), int(adapter_idx.max())
        if lo < -1 or hi >= E:
            raise ValueError(f"adapter_idx values must be in [-1, {E}) (E = {E} adapters), got "
                             f"{lo if lo < -1 else hi}")
    if not bool(torch.isfinite(scalings).all()):
        raise ValueError("scalings contains NaN or Inf")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
