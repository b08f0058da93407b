"""What an NF4Tensor weight answers to (its __torch_dispatch__ / __torch_function__ tables).

A weight in a model is detached, moved, cast, cloned, copied into, and, under FSDP2, chunked along
dim 0, padded with new_zeros + narrow + copy_, viewed flat and back (as_strided). Those ops act on
the inner tensors and keep the codes bit for bit. A cast changes only the compute dtype (the dtype
activations meet the weight in); the codes are the same whatever it is. F.linear runs the fused NF4
op. Every other op raises NotImplementedError naming it: a silent dequantize would hide a full-size
dense weight (the memory QLoRA exists to avoid) behind an innocent-looking call.

Row slices (split / slice on dim 0) must hold whole quantization blocks: rows [a, b) of an [N, K]
weight are codes [a*K, b*K), bytes [a*K/2, b*K/2) and blocks [a*K/bs, ceil(b*K/bs)). Every slice
keeps the whole weight's nested scales (absmax2, code8: 4 bytes per 16384 weights), see nf4.py.
"""
import math

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES
from .nf4 import NF4Tensor

aten = torch.ops.aten
_TABLE = {}


def _implements(*ops):
    def register(fn):
        for op in ops:
            _TABLE[op] = fn
        return fn
    return register


def dispatch(func, args, kwargs):
    fn = _TABLE.get(func)
    if fn is None:
        raise NotImplementedError(
            f"NF4Tensor does not support {func}: an NF4 weight is used through F.linear / "
            "nl.nf4_linear / nl.qlora_linear, or dequantized explicitly with .dequantize(dtype)")
    return fn(*args, **kwargs)


def torch_function(func, types, args, kwargs):
    if func is F.linear:
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(w, NF4Tensor) and not isinstance(x, NF4Tensor):
            from .functional import nf4_linear
            return nf4_linear(x, w, bias)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _like(t, packed, absmax, absmax2=None, code8=None, shape=None, dtype=None):
    """An NF4Tensor with t's metadata (blocksize, offset, double quantization) over new inners."""
    return NF4Tensor._wrap(packed, absmax, t.shape if shape is None else shape,
                           t.dtype if dtype is None else dtype, t.blocksize,
                           absmax2 if t.double_quant else None, code8 if t.double_quant else None,
                           t.offset)


def _map(t, fn, **meta):
    dq = t.double_quant
    return _like(t, fn(t.packed), fn(t.absmax), fn(t.absmax2) if dq else None,
                 fn(t.code8) if dq else None, **meta)


@_implements(aten.detach.default, aten.alias.default)
def _detach(t):
    return _like(t, t.packed, t.absmax, t.absmax2, t.code8)


@_implements(aten.clone.default)
def _clone(t, memory_format=None):
    return _map(t, torch.clone)


def _compute_dtype(dtype):
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"an NF4Tensor's dtype (the compute dtype) must be float32, float16 or "
                         f"bfloat16, got {dtype}; call .dequantize({dtype}) for a dense copy")
    return dtype


@_implements(aten._to_copy.default)
def _to_copy(t, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    if layout not in (None, torch.strided):
        raise ValueError(f"an NF4Tensor is strided, got layout={layout}")
    new_dtype = t.dtype if dtype is None else _compute_dtype(dtype)

    def move(x):
        y = x.to(device=device, non_blocking=non_blocking, copy=True)
        return y.pin_memory() if pin_memory else y
    return _map(t, move, dtype=new_dtype)


@_implements(aten.is_pinned.default)
def _is_pinned(t, device=None):
    return all(x.is_pinned() for x in t.tensors())


def same_nf4_layout(dst, src):
    """Same shape, blocksize and inner tensor sizes: one can be copied into the other."""
    return (dst.shape == src.shape and dst.blocksize == src.blocksize
            and dst.double_quant == src.double_quant
            and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(dst.tensors(), src.tensors())))


@_implements(aten.copy_.default)
def _copy_(dst, src, non_blocking=False):
    if not isinstance(dst, NF4Tensor) or not isinstance(src, NF4Tensor):
        raise TypeError("copy_ into or out of an NF4Tensor needs an NF4Tensor on both sides (got "
                        f"{type(dst).__name__} <- {type(src).__name__}); quantize a dense weight with "
                        "nl.quantize_nf4 or dequantize an NF4 one with .dequantize()")
    if not same_nf4_layout(dst, src):
        raise ValueError(f"copy_ between NF4Tensors of different layouts: {dst!r} <- {src!r}")
    for a, b in zip(dst.tensors(), src.tensors()):
        a.copy_(b, non_blocking=non_blocking)
    dst.offset = src.offset
    return dst


def _as_shape(t, size):
    size = list(size)
    if size.count(-1) == 1:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = t.numel() // known if known else 0
    if math.prod(size) != t.numel():
        raise ValueError(f"cannot view an NF4Tensor of shape {tuple(t.shape)} as {tuple(size)}")
    # The codes are row-major over the flat weight, so any same-size shape is the same bytes.
    return _like(t, t.packed, t.absmax, t.absmax2, t.code8, shape=torch.Size(size))


@_implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(t, size):
    return _as_shape(t, size)


@_implements(aten.as_strided.default)
def _as_strided(t, size, stride, storage_offset=None):
    contiguous = torch.empty(0).new_empty_strided(size, stride).is_contiguous() if size else True
    if (storage_offset or 0) != 0 or not contiguous:
        raise ValueError("an NF4Tensor can only be viewed contiguously from its first element "
                         f"(as_strided size={tuple(size)}, stride={tuple(stride)}, "
                         f"offset={storage_offset})")
    return _as_shape(t, size)


def _rows(t, start, end):
    """Rows [start, end) along dim 0: a view of the inner tensors (writes through)."""
    row = math.prod(t.shape[1:])
    a, b = start * row, end * row
    if a % t.blocksize or (b % t.blocksize and end != t.shape[0]):
        raise ValueError(
            f"cannot cut an NF4Tensor of shape {tuple(t.shape)} (blocksize {t.blocksize}) at rows "
            f"[{start}, {end}): a row slice must hold whole quantization blocks (FSDP2 shards dim 0 "
            f"into ceil(N / world_size) rows, so each shard's rows x {row} must be a multiple of "
            f"{t.blocksize})")
    bs = t.blocksize
    return _like(t, t.packed[a // 2:(b + 1) // 2], t.absmax[a // bs:-(-b // bs)], t.absmax2, t.code8,
                 shape=torch.Size((end - start, *t.shape[1:])))


def _dim0(t, dim, op):
    if dim % t.dim() != 0:
        raise ValueError(f"{op} of an NF4Tensor is only defined along dim 0 (rows), got dim={dim}")


@_implements(aten.split.Tensor)
def _split(t, split_size, dim=0):
    _dim0(t, dim, "split")
    n = t.shape[0]
    if n % split_size:
        # FSDP2 cuts dim 0 with torch.chunk(world_size): uneven shards would need padded codes.
        raise ValueError(f"an NF4Tensor of {n} rows splits only into equal parts, got parts of "
                         f"{split_size} rows (under FSDP2: the rows must divide by the world size)")
    return [_rows(t, s, s + split_size) for s in range(0, n, split_size)]


@_implements(aten.split_with_sizes.default)
def _split_with_sizes(t, split_sizes, dim=0):
    _dim0(t, dim, "split")
    starts = [sum(split_sizes[:i]) for i in range(len(split_sizes))]
    return [_rows(t, s, s + k) for s, k in zip(starts, split_sizes)]


@_implements(aten.slice.Tensor)
def _slice(t, dim=0, start=None, end=None, step=1):
    _dim0(t, dim, "slice")
    if step != 1:
        raise ValueError(f"slice of an NF4Tensor needs step 1, got {step}")
    n = t.shape[0]
    start, end = max(0, min(n, start or 0)), max(0, min(n, n if end is None else end))
    return _rows(t, start, max(start, end))


@_implements(aten.new_zeros.default)
def _new_zeros(t, size, dtype=None, layout=None, device=None, pin_memory=None):
    """Zero codes and scales for `size` (FSDP2 pads a shard this way, then copies the rows in)."""
    n = math.prod(size)
    dev = t.device if device is None else device
    return _like(t, torch.zeros((n + 1) // 2, dtype=torch.uint8, device=dev),
                 torch.zeros(-(-n // t.blocksize), dtype=t.absmax.dtype, device=dev),
                 torch.zeros_like(t.absmax2, device=dev) if t.double_quant else None,
                 t.code8.to(dev, copy=True) if t.double_quant else None,
                 shape=torch.Size(size), dtype=t.dtype if dtype is None else _compute_dtype(dtype))
