"""NF4Tensor: a weight in 4-bit NormalFloat with (optionally double-quantized) block scales, and
its bitsandbytes Linear4bit serialization. DESIGN.md "NF4 format" gives the layout."""
from __future__ import annotations

import json
import math
import typing

import torch

from . import _ops  # noqa: F401  (defines torch.ops.nf4lora.*)
from . import backends  # noqa: F401  (registers the kernels)
from ._checks import FLOAT_DTYPES, check_blocksize, check_tensor
from .backends.state import check_nf4_state_once
from .nf4_format import DYNAMIC_SIGNED, NESTED_BLOCKSIZE, NF4_CODE

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


class NF4Tensor(torch.Tensor):
    """A weight in NF4: a torch.Tensor subclass whose shape and dtype are the logical weight's
    ([out_features, in_features] and the compute dtype), holding the packed codes and the
    (optionally double-quantized) block scales as inner tensors (the wrapper-subclass pattern:
    __tensor_flatten__ / __tensor_unflatten__, so torch.compile and FSDP2 see through it).

    Inner tensors (n = prod(shape), nb = ceil(n / blocksize)):
      packed    uint8 [(n+1)//2]           two codes per byte, element 2i in the high nibble
      absmax    float32 [nb], or uint8 [nb] codes into code8 when double-quantized
      absmax2   float32 [nn] or None        (bitsandbytes' nested_absmax, one per 256 blocks)
      code8     float32 [256] or None       (bitsandbytes' nested_quant_map)
    Metadata: blocksize and offset (bitsandbytes' nested_offset).
    A row shard (FSDP2, nf4_fsdp.py) holds its rows' codes and block scales and the whole weight's
    nested scales (4 bytes per 16384 weights): the kernels' state check accepts it only when its
    nested scales index from its own first block, so a shard computes correctly or is refused.

    Only what a weight needs is defined on it (nf4_dispatch.py: detach, to/_to_copy, clone, copy_,
    view/as_strided/split/slice/new_zeros for FSDP2, F.linear through the fused op); any other op
    raises instead of dequantizing silently.
    """

    @staticmethod
    def __new__(cls, packed, absmax, shape, dtype, blocksize, absmax2=None, code8=None, offset=0.0,
                _checked=False):
        shape = torch.Size(shape)
        if not _checked:
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
            check_blocksize(blocksize)
            if (absmax2 is None) != (code8 is None):
                raise ValueError("absmax2 and code8 must be given together (double quantization)")
            if not isinstance(packed, torch.Tensor):
                raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"offset must be a finite float, got {offset!r}")
            packed = packed.reshape(-1)
            check_nf4_state_once(packed, absmax, absmax2, code8, blocksize, shape, offset)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device,
                                                   requires_grad=False)
        self.packed, self.absmax, self.absmax2, self.code8 = packed.reshape(-1), absmax, absmax2, code8
        self.offset, self.blocksize = float(offset), int(blocksize)
        self.nk = tuple(shape)  # the shape as a plain tuple: the hot path reads it without a
        return self             # __torch_function__ round trip (q.shape on a subclass takes one)

    def __init__(self, *args, **kwargs):  # everything happens in __new__
        pass

    @classmethod
    def _wrap(cls, packed, absmax, shape, dtype, blocksize, absmax2=None, code8=None, offset=0.0):
        """Internal: wrap inner tensors that are already known to be consistent (derived from a
        checked NF4Tensor by an op), without re-checking them."""
        return cls(packed, absmax, shape, dtype, blocksize, absmax2, code8, offset, _checked=True)

    # ------------------------------------------------------------------ subclass protocol
    _INNER = ("packed", "absmax", "absmax2", "code8")

    def __tensor_flatten__(self):
        names = [n for n in self._INNER if getattr(self, n) is not None]
        return names, (self.dtype, self.blocksize, self.offset)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        dtype, blocksize, offset = meta
        return cls._wrap(inner["packed"], inner["absmax"], outer_size, dtype, blocksize,
                         inner.get("absmax2"), inner.get("code8"), offset)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from .nf4_dispatch import dispatch
        return dispatch(func, args, kwargs or {})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from .nf4_dispatch import torch_function
        return torch_function(func, types, args, kwargs or {})

    # FSDP2's all-gather extension (nf4_fsdp.py): only codes and block scales travel
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        from .nf4_fsdp import fsdp_pre_all_gather
        return fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        from .nf4_fsdp import fsdp_post_all_gather
        return fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)

    # ------------------------------------------------------------------ properties
    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes and scales (what a kernel streams)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self):
        return [t for t in (self.packed, self.absmax, self.absmax2, self.code8) if t is not None]

    def __repr__(self, *, tensor_contents=None):
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={_dtype_name(self.dtype)}, "
                f"blocksize={self.blocksize}{dq}, device={self.device})")

    # ------------------------------------------------------------------ conversion
    def _map(self, fn):
        return NF4Tensor._wrap(fn(self.packed), fn(self.absmax), self.shape, self.dtype, self.blocksize,
                               None if self.absmax2 is None else fn(self.absmax2),
                               None if self.code8 is None else fn(self.code8), self.offset)

    def block_absmax(self) -> torch.Tensor:
        """float32 [nb]: the per-block scales (decoded when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return torch.ops.nf4lora.dequantize_absmax(self.absmax, self.absmax2, self.code8, self.offset)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    # ------------------------------------------------------------------ bitsandbytes layout
    def to_bnb_state_dict(self, prefix="weight"):
        """The keys bitsandbytes' Linear4bit writes (QuantState.as_dict(packed=True) + weight)."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        sd = {prefix: self.packed.reshape(-1, 1), f"{prefix}.absmax": self.absmax,
              f"{prefix}.quant_map": NF4_CODE.to(self.device).clone()}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.absmax2
            sd[f"{prefix}.nested_quant_map"] = self.code8.clone()
            meta.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                         "nested_offset": self.offset})
        sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd, prefix="weight") -> "NF4Tensor":
        """Read bitsandbytes Linear4bit keys; every length, dtype and shape is checked first."""
        return _from_bnb_state_dict(cls, sd, prefix)


class BnbLayout(typing.NamedTuple):
    """What bitsandbytes' keys say about one weight, checked: the logical shape, dtype, blocksize,
    the nested scales (None when not double-quantized) and nested_offset."""
    shape: list
    dtype: torch.dtype
    blocksize: int
    absmax2: typing.Optional[torch.Tensor]
    code8: typing.Optional[torch.Tensor]
    offset: float

    @property
    def double_quant(self):
        return self.absmax2 is not None


def _from_bnb_state_dict(cls, sd, prefix):
    lay = read_bnb_layout(sd, prefix)
    packed, absmax = sd[prefix], sd[f"{prefix}.absmax"]
    if not lay.double_quant and not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"'{prefix}.absmax' contains NaN or Inf")
    device = packed.device
    return cls(packed.reshape(-1).contiguous(), absmax.contiguous().to(device), lay.shape, lay.dtype,
               lay.blocksize, None if lay.absmax2 is None else lay.absmax2.to(device),
               None if lay.code8 is None else lay.code8.to(device), lay.offset)


def read_bnb_layout(sd, prefix):
    """Check bitsandbytes' keys of one weight on their sizes and dtypes (the packed codes and
    absmax are only measured, never read: they may be shards of the whole weight, e.g. DTensors)
    and return its BnbLayout. A float32 absmax's values are the caller's to check."""
    def get(suffix, required=True):
        key = f"{prefix}.{suffix}" if suffix else prefix
        if key not in sd:
            if required:
                raise KeyError(f"state dict is missing '{key}'")
            return None
        v = sd[key]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"'{key}' must be a tensor, got {type(v).__name__}")
        return v

    qs_key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if qs_key not in sd:
        if f"{prefix}.quant_state.bitsandbytes__fp4" in sd:
            raise ValueError(f"'{prefix}' is FP4-quantized; only NF4 is supported")
        raise KeyError(f"state dict is missing '{qs_key}'")
    qs = sd[qs_key]
    if not isinstance(qs, torch.Tensor) or qs.dtype != torch.uint8:
        raise ValueError(f"'{qs_key}' must be a uint8 tensor of JSON bytes, got "
                         f"{qs.dtype if isinstance(qs, torch.Tensor) else type(qs).__name__}")
    try:
        meta = json.loads(bytes(qs.detach().cpu().reshape(-1).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"'{qs_key}' is not valid JSON quant-state bytes: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"'{qs_key}' must hold a JSON object")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"'{qs_key}': quant_type must be 'nf4', got {meta.get('quant_type')!r}")
    dtype_name = meta.get("dtype")
    if dtype_name not in _DTYPE_NAMES:
        raise ValueError(f"'{qs_key}': dtype must be one of {sorted(_DTYPE_NAMES)}, got {dtype_name!r}")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"'{qs_key}': shape must be a non-empty list of positive ints, got {shape!r}")
    blocksize = meta.get("blocksize")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"'{qs_key}': blocksize must be an int, got {blocksize!r}")
    try:
        check_blocksize(blocksize)
    except ValueError as e:
        raise ValueError(f"'{qs_key}': {e}") from None

    packed = get("")
    if packed.dtype != torch.uint8:
        raise ValueError(f"'{prefix}' must be uint8 packed codes, got {packed.dtype} "
                         "(quant_storage other than uint8 is not supported)")
    absmax = get("absmax")
    quant_map = get("quant_map")
    if quant_map.numel() != 16 or quant_map.dtype != torch.float32 or not torch.equal(
            quant_map.cpu().reshape(-1), NF4_CODE):
        raise ValueError(f"'{prefix}.quant_map' must be the 16 float32 NF4 code values")
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"'{prefix}' has {packed.numel()} packed bytes but shape {shape} needs "
                         f"{(n + 1) // 2}")
    nb = -(-n // blocksize)
    if absmax.dim() != 1 or absmax.numel() != nb:
        raise ValueError(f"'{prefix}.absmax' must have {nb} elements (one per block), got "
                         f"{tuple(absmax.shape)}")
    # Nested (double-quantized) if any nested key or field is present; then all of them must be.
    nested = (f"{prefix}.nested_absmax" in sd or f"{prefix}.nested_quant_map" in sd
              or any(k in meta for k in ("nested_blocksize", "nested_offset", "nested_dtype")))
    absmax2 = code8 = None
    offset = 0.0
    if nested:
        absmax2 = get("nested_absmax")
        code8 = get("nested_quant_map")
        if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
            raise ValueError(f"'{qs_key}': nested_blocksize must be 256, got {meta.get('nested_blocksize')!r}")
        if meta.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"'{qs_key}': nested_dtype must be 'float32', got {meta.get('nested_dtype')!r}")
        offset = meta.get("nested_offset")
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"'{qs_key}': nested_offset must be a finite number, got {offset!r}")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"'{prefix}.absmax' must be uint8 when double-quantized, got {absmax.dtype}")
        if absmax2.dtype != torch.float32 or absmax2.numel() != -(-nb // NESTED_BLOCKSIZE):
            raise ValueError(f"'{prefix}.nested_absmax' must be float32 with {-(-nb // NESTED_BLOCKSIZE)} "
                             f"elements, got {absmax2.dtype} with {absmax2.numel()}")
        if code8.dtype != torch.float32 or code8.numel() != 256:
            raise ValueError(f"'{prefix}.nested_quant_map' must be float32 with 256 elements, got "
                             f"{code8.dtype} with {code8.numel()}")
        for key, t in ((f"{prefix}.nested_absmax", absmax2), (f"{prefix}.nested_quant_map", code8)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"'{key}' contains NaN or Inf")
        code8 = code8.reshape(-1).contiguous()
        absmax2 = absmax2.reshape(-1).contiguous()
    else:
        if absmax.dtype != torch.float32:
            raise ValueError(f"'{prefix}.absmax' must be float32 when not double-quantized, got "
                             f"{absmax.dtype}")
    return BnbLayout(shape, _DTYPE_NAMES[dtype_name], blocksize, absmax2, code8, float(offset))


def quantize_nf4(w, blocksize=64, double_quant=True) -> NF4Tensor:
    """Quantize a float tensor to NF4 (bit-exact with bitsandbytes' quantize_4bit, quant_type="nf4";
    double_quant = compress_statistics)."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    packed, absmax = torch.ops.nf4lora.quantize_nf4(w.detach(), blocksize)
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    offset = float(absmax.mean())  # torch's float32 mean, as bitsandbytes computes it
    code8 = DYNAMIC_SIGNED.to(w.device)
    qabsmax, absmax2 = torch.ops.nf4lora.quantize_absmax(absmax, offset, code8)
    return NF4Tensor(packed, qabsmax, w.shape, w.dtype, blocksize, absmax2, code8, offset)


def dequantize_nf4(q: NF4Tensor, dtype=None) -> torch.Tensor:
    """The dense tensor, in the original dtype unless `dtype` is given (float32/16, bfloat16, float64)."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype}")
    return torch.ops.nf4lora.dequantize_nf4(q.packed, q.absmax, q.absmax2, q.code8, q.offset,
                                            q.blocksize, list(q.shape), dtype)
