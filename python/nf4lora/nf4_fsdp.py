"""An NF4 weight under PyTorch's distributed engine: FSDP2's all-gather extension, and the state
dict entries of a whole or sharded weight (bitsandbytes' keys either way).

FSDP2 (torch.distributed.fsdp.fully_shard) shards a parameter along dim 0: an NF4 weight [N, K]
splits into row shards (nf4_dispatch.py's split), each holding its rows' codes and block scales and
the whole weight's nested scales (absmax2: 4 bytes per 16384 weights, and code8, 1 KB). Before a
forward only the codes and block scales travel (fsdp_pre_all_gather); the gathered buffers ARE the
unsharded weight's inner tensors (fsdp_post_all_gather wraps them, no copy), so FSDP frees and
refills them between steps. The shards must be equal (N divisible by the world size) and hold whole
quantization blocks; the split refuses anything else, on every rank, before any collective.

A sharded weight in a state dict is bitsandbytes' keys with the codes (`weight`, [n/2, 1]) and the
block scales (`weight.absmax`) as Shard(0) DTensors over each rank's bytes (views: DCP loads in
place), and the nested scales, the code maps and the quant-state JSON (the whole weight's shape)
as plain tensors, identical on every rank.
"""
import functools
import types

import torch

from .nf4 import NF4Tensor, read_bnb_layout


@functools.lru_cache(maxsize=None)
def _dtensor_type():
    """torch's DTensor class, looked up once (None in a torch built without distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_dtensor(t):
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def nf4_local(w):
    """The NF4Tensor behind a layer's weight: itself, or this rank's shard of a DTensor."""
    return w._local_tensor if is_dtensor(w) else w


# ------------------------------------------------------------------------------ FSDP2 extension
def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
    if self.shape[0] * mesh.size() != outer_size[0]:
        raise ValueError(f"FSDP shards an NF4 weight of {outer_size[0]} rows over {mesh.size()} "
                         "ranks unevenly: the rows must divide by the world size")
    return (self.packed, self.absmax), (self.blocksize, self.offset, self.absmax2, self.code8)


def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
    packed, absmax = all_gather_outputs
    blocksize, offset, absmax2, code8 = metadata
    if out is not None:  # the buffers were refilled in place: `out` already wraps them
        return None
    world = absmax.numel() // self.absmax.numel()  # equal shards (checked before the gather)
    shape = torch.Size((self.shape[0] * world, *self.shape[1:]))
    full = NF4Tensor._wrap(packed.reshape(-1), absmax.reshape(-1), shape, param_dtype, blocksize,
                           absmax2, code8, offset)
    return full, (packed, absmax)


# ------------------------------------------------------------------------------ state dict
def _expose_key_path(w):
    """torch.distributed.checkpoint.state_dict resolves every state-dict key as an attribute path
    (`weight.absmax`, `weight.quant_state.bitsandbytes__nf4`): give the weight object those
    attributes (bitsandbytes' Params4bit has them as its quant state). Markers only, never read."""
    for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        if not hasattr(w, name):
            setattr(w, name, None)
    if not hasattr(w, "quant_state"):
        w.quant_state = types.SimpleNamespace(bitsandbytes__nf4=None)


def nf4_state_dict_entries(w, key, keep_vars=False):
    """bitsandbytes' Linear4bit keys for a layer weight `w` (NF4Tensor, or a DTensor of shards)."""
    _expose_key_path(w)
    if not is_dtensor(w):
        sd = w.to_bnb_state_dict(key)
        return sd if keep_vars else {k: v.detach() for k, v in sd.items()}
    from torch.distributed.tensor import DTensor, Shard
    local = w._local_tensor
    mesh, placements = w.device_mesh, w.placements
    if tuple(placements) != (Shard(0),):
        raise ValueError(f"{key}: an NF4 weight shards along dim 0 only, got {placements}")
    whole = NF4Tensor._wrap(local.packed, local.absmax, w.shape, w.dtype, local.blocksize,
                            local.absmax2, local.code8, local.offset)
    sd = whole.to_bnb_state_dict(key)  # the nested scales, code maps and JSON are the whole weight's
    qs = key + ".quant_state.bitsandbytes__nf4"
    sd[qs] = _fixed_width_json(sd[qs], whole)
    n = w.shape.numel()
    sd[key] = DTensor.from_local(local.packed.reshape(-1, 1), mesh, placements, run_check=False,
                                 shape=torch.Size(((n + 1) // 2, 1)), stride=(1, 1))
    sd[key + ".absmax"] = DTensor.from_local(local.absmax, mesh, placements, run_check=False,
                                             shape=torch.Size((-(-n // local.blocksize),)), stride=(1,))
    return sd


def _fixed_width_json(blob, whole):
    """The quant-state JSON padded with trailing spaces (still valid JSON, as bitsandbytes reads it)
    to a length that does not depend on nested_offset's digits: torch.distributed.checkpoint loads
    into tensors of the saved sizes, and a fresh model's offset prints to another length."""
    meta_len = len(NF4Tensor._wrap(whole.packed, whole.absmax, whole.shape, whole.dtype,
                                   whole.blocksize, whole.absmax2, whole.code8, 0.0)
                   .to_bnb_state_dict("w")["w.quant_state.bitsandbytes__nf4"])
    width = meta_len - len("0.0") + _MAX_FLOAT_REPR
    return torch.cat([blob, torch.full((width - blob.numel(),), ord(" "), dtype=torch.uint8)])


_MAX_FLOAT_REPR = len(repr(-2.2250738585072014e-308))  # the longest repr() of a float64: 24


def _local_rows(w):
    """(first row, rows) of this rank's shard of a Shard(0) DTensor weight (equal shards)."""
    local = w._local_tensor
    rank = w.device_mesh.get_local_rank()
    return rank * local.shape[0], local.shape[0]


def load_nf4_entries(w, sub, key):
    """The NF4Tensor held by bitsandbytes' keys in `sub` for a layer whose weight is `w`. For a
    sharded `w` the entries (sharded DTensors, or a whole weight's plain tensors) are checked and
    copied into this rank's shard in place, which is returned."""
    if not is_dtensor(w):
        return NF4Tensor.from_bnb_state_dict(sub, prefix=key)
    local = w._local_tensor
    plain = {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in sub.items()
             if k != key and k != key + ".absmax"}
    codes, absmax = sub[key], sub.get(key + ".absmax")
    if absmax is None:
        raise KeyError(f"state dict is missing '{key}.absmax'")
    if is_dtensor(codes) != is_dtensor(absmax):
        raise ValueError(f"'{key}' and '{key}.absmax' must both be sharded or both be whole")
    if is_dtensor(codes):
        # The shard's own rows; the JSON and nested scales describe the whole weight, checked
        # against the DTensors' global sizes (nothing whole-sized is allocated).
        whole = read_bnb_layout({**plain, key: codes, key + ".absmax": absmax}, key)
        codes, absmax = codes.to_local(), absmax.to_local()
        if not whole.double_quant and not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"'{key}.absmax' contains NaN or Inf")
        if codes.shape != local.packed.reshape(-1, 1).shape or absmax.shape != local.absmax.shape:
            raise ValueError(f"'{key}': this rank's shard is {tuple(codes.shape)} codes / "
                             f"{tuple(absmax.shape)} scales, the model's is "
                             f"{tuple(local.packed.shape)} / {tuple(local.absmax.shape)}")
        shard_packed, shard_absmax = codes.reshape(-1), absmax
    else:
        whole = NF4Tensor.from_bnb_state_dict({**plain, key: codes, key + ".absmax": absmax}, prefix=key)
        start, rows = _local_rows(w)
        part = torch.ops.aten.slice.Tensor(whole, 0, start, start + rows)
        shard_packed, shard_absmax = part.packed, part.absmax
    if tuple(whole.shape) != tuple(w.shape) or whole.blocksize != local.blocksize \
            or whole.double_quant != local.double_quant:
        raise ValueError(f"'{key}': the state dict's weight {tuple(whole.shape)} (blocksize "
                         f"{whole.blocksize}, double quant {whole.double_quant}) does not match the "
                         f"sharded layer's {tuple(w.shape)} (blocksize {local.blocksize}, double quant "
                         f"{local.double_quant})")
    with torch.no_grad():
        local.packed.copy_(shard_packed)
        local.absmax.copy_(shard_absmax)
        if local.double_quant:
            local.absmax2.copy_(whole.absmax2)
            local.code8.copy_(whole.code8)
    local.offset = whole.offset
    return local
