"""bitsandbytes 4-bit checkpoints: a state_dict written by a transformers model quantized with
bitsandbytes (Linear4bit, nf4, with or without double quantization) loads into QLoRALinear layers
bit-exactly, and ours is written in the same layout so bitsandbytes / transformers load it."""
import os

from torch import nn

from .._files import atomic_path
from ..nf4 import NF4Tensor
from ..nn import QLoRALinear
from .model import TRAINED_PARTS, _set_child

_QS = ".weight.quant_state.bitsandbytes__nf4"
_FP4 = ".weight.quant_state.bitsandbytes__fp4"


def load_bnb_state_dict(model, state_dict, strict=True):
    """Load `state_dict` (e.g. a bitsandbytes-quantized model's state_dict() or model.safetensors)
    into `model`. Every module with NF4 keys (`<module>.weight.quant_state.bitsandbytes__nf4`) that
    is an nn.Linear becomes a QLoRALinear holding exactly those codes and scales (no re-quantization;
    every length and shape is validated first); existing QLoRALinear layers load them in place; all
    other keys load as usual. Returns torch's (missing_keys, unexpected_keys); with strict=True any
    of either is an error, except the LoRA weights of adapters the checkpoint does not hold."""
    for k in state_dict:
        if k.endswith(_FP4):
            raise ValueError(f"'{k}': the checkpoint is FP4-quantized; only NF4 is supported")
    modules = [k[: -len(_QS)] for k in state_dict if k.endswith(_QS)]
    for name, layer in model.named_modules():  # NF4 codes (or their scales) without the quant state
        prefix = f"{name}.weight" if name else "weight"
        nf4_keys = (f"{prefix}.absmax" in state_dict or f"{prefix}.quant_map" in state_dict
                    or (isinstance(layer, QLoRALinear) and prefix in state_dict))
        if nf4_keys and (name or "") not in modules and f"{prefix}.quant_state.bitsandbytes__nf4" not in state_dict:
            raise KeyError(f"state dict is missing '{prefix}.quant_state.bitsandbytes__nf4': it holds "
                           f"bitsandbytes NF4 entries for '{prefix}' without their quant state")
    plan = []
    for name in modules:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint has NF4 weights for '{name}', which the model does not "
                             "have") from None
        if isinstance(layer, QLoRALinear):
            continue
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"checkpoint has NF4 weights for '{name}', a {type(layer).__name__} "
                             "(only nn.Linear layers can hold them)")
        prefix = name + ".weight"
        sub = {k: v for k, v in state_dict.items() if k == prefix or k.startswith(prefix + ".")}
        try:
            q = NF4Tensor.from_bnb_state_dict(sub, prefix=prefix)
        except (KeyError, ValueError) as e:
            raise type(e)(f"{prefix}: {e.args[0] if e.args else e}") from None
        if tuple(q.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"'{prefix}': shape {tuple(q.shape)} in the checkpoint, but the model's "
                             f"layer is {(layer.out_features, layer.in_features)}")
        plan.append((name, layer, q))
    for name, layer, q in plan:  # all checked: now change the model
        dev = layer.weight.device
        bias = None if layer.bias is None else layer.bias.detach()
        new = QLoRALinear(q.to(dev), bias, r=0)
        new.requires_grad_(False)
        _set_child(model, name, new)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not _is_adapter_key(k)]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"load_bnb_state_dict: missing keys {missing}, unexpected keys "
                           f"{result.unexpected_keys}")
    return missing, list(result.unexpected_keys)


def bnb_state_dict(model, include_adapters=False):
    """The model's state_dict in bitsandbytes' layout: QLoRALinear weights under Linear4bit keys,
    everything else as usual; the LoRA weights only with include_adapters (a bitsandbytes model
    has no place for them). A merged layer contributes its NF4 base, never the merged weight."""
    sd = model.state_dict()
    if include_adapters:
        return sd
    # a modules_to_save module's original goes under its own keys, its adapters' copies not at all
    return {k.replace(".original_module.", "."): v for k, v in sd.items() if not _is_adapter_key(k)}


def _is_adapter_key(key):
    return any(f".{part}." in key for part in TRAINED_PARTS)


def save_bnb_checkpoint(model, path, include_adapters=False):
    """Write bnb_state_dict(model, include_adapters) to one safetensors file (the layout of a
    bitsandbytes-quantized transformers model.safetensors), crash-safe: a temporary file, then one
    rename, so a kill leaves the previous file or the new one. Tensors that share storage (tied
    weights) are written as copies."""
    from safetensors.torch import save_file

    sd = bnb_state_dict(model, include_adapters)
    tensors, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def load_bnb_checkpoint(model, path, strict=True):
    """load_bnb_state_dict(model, <the tensors of the safetensors file at path>, strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no bitsandbytes checkpoint at {path}")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    return load_bnb_state_dict(model, sd, strict)
