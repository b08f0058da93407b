"""VeRA adapters on the NF4 base (PEFT's VERA tuner, 0.21): one pair of frozen random projections
A [r, in_max], B [out_max, r] shared by every adapted layer of the model, generated from
projection_prng_key exactly as PEFT does (so a file saved without them still loads), and per layer
trainable lambda_d [r] and lambda_b [out_features]:

  y = x W^T + b + lambda_b * ((lambda_d * (dropout(x) A[:, :K]^T)) B[:N]^T)

QLoRALinear runs it through the fused op with A' = lambda_d A_s, B' = lambda_b B_s (nn.py).
The projections are one VeraProjections module per adapter, a submodule of every adapted layer
(model.to() moves it once; named in the model's ModelAdapters.vera[adapter] too).
"""
import math

import torch

from ..adapters import VeraProjections
from .model import (_activate_new, _adaptable_layers, _check_dropout, _new_adapter_targets,
                    _targets_record, adapter_configs, model_adapters)


def kaiming_projection(shape, generator):
    """PEFT's vera._kaiming_init: uniform(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in =
    shape[1], drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(model, adapter_name):
    """(A, B) of a VeRA adapter of the model."""
    P = model_adapters(model).vera[adapter_name]
    return P.A, P.B


def apply_vera(model, target_modules, r=256, projection_prng_key=0, vera_dropout=0.0, d_initial=0.1,
               init_weights=True, save_projection=True, layers_to_transform=None, layers_pattern=None,
               exclude_modules=None, blocksize=64, double_quant=True, adapter_name="default"):
    """Add VeRA adapter `adapter_name` to the matching nn.Linear layers (quantized to NF4 on the way)
    or QLoRALinear layers, in place; freeze every other parameter; return the model. Targets follow
    PEFT's matching rules; the first adapter of a model becomes active (as apply_qlora)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(projection_prng_key, bool) or not isinstance(projection_prng_key, int):
        raise ValueError(f"projection_prng_key must be an int, got {projection_prng_key!r}")
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
        raise ValueError(f"d_initial must be a finite number, got {d_initial!r}")
    _check_dropout("vera_dropout", vera_dropout)
    target_modules, names = _new_adapter_targets(model, adapter_name, target_modules, layers_to_transform,
                                                 layers_pattern, exclude_modules)
    out_max = max(model.get_submodule(n).out_features for n in names)
    in_max = max(model.get_submodule(n).in_features for n in names)
    g = torch.Generator(device="cpu").manual_seed(projection_prng_key)
    A = kaiming_projection((r, in_max), g)   # PEFT draws A first, then B, from one generator
    B = kaiming_projection((out_max, r), g)
    shared = VeraProjections(A, B)

    for layer in _adaptable_layers(model, names, blocksize, double_quant):
        shared.to(layer.weight.device)  # where the layers are (one device per model)
        layer.add_vera_adapter(adapter_name, shared, r, vera_dropout, d_initial, init_weights)
    model_adapters(model).vera[adapter_name] = shared
    adapter_configs(model)[adapter_name] = dict(
        peft_type="VERA", r=r, **_targets_record(target_modules, names, exclude_modules),
        projection_prng_key=projection_prng_key, save_projection=bool(save_projection),
        vera_dropout=float(vera_dropout), d_initial=d_initial, init_weights=init_weights,
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        blocksize=blocksize, double_quant=double_quant)
    _activate_new(model, adapter_name)
    return model
