"""Merging adapters into the base weight.

merge_adapter / unmerge_adapter fold the active adapters into a dense weight that forward uses, and
drop it again; the NF4 codes are kept, so unmerging is exact (PEFT re-quantizes a merged 4-bit
layer, which is lossy both ways). merge_and_unload returns plain nn.Linear layers with
W_dequant + sum s B A, in the original weight dtype unless told otherwise, or, with requantize,
NF4 layers without adapters plus the error the re-quantization added.
"""
import torch

from ..nf4 import quantize_nf4
from ..nn import QLoRALinear
from .model import _set_child, active_adapters, qlora_layers


def _names(model, adapter_names):
    if adapter_names is None:
        return None
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def merge_adapter(model, adapter_names=None):
    """Fold the active adapters (or `adapter_names`) into each layer's dense merged weight."""
    names = _names(model, adapter_names)
    for _, layer in qlora_layers(model):
        layer.merge_([a for a in names if a in layer.lora_config] if names is not None else None)
    return model


def unmerge_adapter(model):
    """Back to the NF4 weight + separate adapters (exact: the codes were never changed)."""
    for _, layer in qlora_layers(model):
        layer.unmerge_()
    return model


@torch.no_grad()
def merge_and_unload(model, dtype=None, requantize=False, blocksize=None, double_quant=None,
                     adapter_names=None, return_report=False):
    """Replace every QLoRALinear by a plain nn.Linear with W_dequant + sum of s * B @ A over the
    active adapters (or `adapter_names`), computed in float32 and stored in `dtype` (default: each
    layer's original weight dtype). Layers without adapters are dequantized the same way.

    With requantize=True the merged weight is quantized back to NF4 (the layer's own blocksize and
    double_quant unless given) and the layers stay QLoRALinear without adapters. With
    return_report=True the result is (model, report), report[name] = {"rel_error": relative
    Frobenius error of the stored weight against the float32 merged weight, "adapters": [...]}."""
    names = _names(model, adapter_names)
    report = {}
    for name, layer in qlora_layers(model):
        use = [a for a in (names if names is not None else layer._active()) if a in layer.lora_config]
        if layer.merged_adapters:
            layer.unmerge_()
        w = layer.merged_dense(use)
        if requantize:
            q = quantize_nf4(w.to(dtype or layer.weight_dtype),
                             blocksize=blocksize or layer.blocksize,
                             double_quant=layer.weight_absmax2 is not None if double_quant is None
                             else double_quant)
            new = QLoRALinear(q, layer.bias, r=0)
            stored = q.dequantize(torch.float32)
        else:
            new = layer.merge(dtype, use)
            stored = new.weight.float()
        err = float((stored - w).norm() / w.norm().clamp_min(torch.finfo(torch.float32).tiny))
        report[name] = {"rel_error": err, "adapters": use}
        _set_child(model, name, new)
    for attr in ("_nf4lora_adapters", "_nf4lora_active", "_nf4lora_vera", "_nf4lora_adalora"):
        model.__dict__.pop(attr, None)
    return (model, report) if return_report else model
