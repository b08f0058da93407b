"""LoKr adapters on the NF4 base (PEFT's LOKR tuner, 0.21, Linear layers): per target layer
delta W = (alpha / r) * kron(w1, w2), with PEFT's parameter names, shapes, factorization and
initialisation (adapters/lokr.py); rank_pattern / alpha_pattern, and the training-time
rank_dropout / module_dropout as in PEFT.
"""
from ..adapters.base import check_dropout
from ..adapters.lokr import LoKrConfig, check_init
from .model import (_activate_new, _adaptable_layers, _new_adapter_targets, _targets_record,
                    adapter_configs)
from .targets import pattern_value


def apply_lokr(model, target_modules, r=8, alpha=8, decompose_both=False, decompose_factor=-1,
               rank_dropout=0.0, module_dropout=0.0, init_weights=True, rank_pattern=None,
               alpha_pattern=None, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
               blocksize=64, double_quant=True, adapter_name="default", rank_dropout_scale=False):
    """Add LoKr adapter `adapter_name` to the matching nn.Linear layers (quantized to NF4 on the way)
    or QLoRALinear layers, in place; freeze every other parameter; return the model. Every argument
    is checked before the model changes; the first adapter of a model becomes active.

    rank_dropout (drop output rows of the delta, rescaled by the kept fraction with
    rank_dropout_scale) and module_dropout (skip the adapter for a whole forward) act in training
    only, drawn from torch's RNG as PEFT draws them."""
    check_dropout("rank_dropout", rank_dropout)
    check_dropout("module_dropout", module_dropout)
    check_init(init_weights)
    target_modules, names = _new_adapter_targets(model, adapter_name, target_modules, layers_to_transform,
                                                 layers_pattern, exclude_modules)
    cfgs = []
    for n in names:
        try:  # the config dataclass validates r, alpha, decompose_both, decompose_factor, ...
            cfgs.append(LoKrConfig(r=pattern_value(rank_pattern, n, r),
                                   lora_alpha=pattern_value(alpha_pattern, n, alpha),
                                   decompose_both=decompose_both, decompose_factor=decompose_factor,
                                   rank_dropout=float(rank_dropout), module_dropout=float(module_dropout),
                                   rank_dropout_scale=rank_dropout_scale))
        except ValueError as e:
            raise ValueError(f"LoKr adapter for '{n}': {e}") from None
    for layer, cfg in zip(_adaptable_layers(model, names, blocksize, double_quant), cfgs):
        layer.add(adapter_name, cfg, init_weights=init_weights)
    adapter_configs(model)[adapter_name] = dict(
        peft_type="LOKR", r=r, alpha=alpha, **_targets_record(target_modules, names, exclude_modules),
        decompose_both=decompose_both, decompose_factor=decompose_factor,
        rank_dropout=float(rank_dropout), module_dropout=float(module_dropout),
        rank_dropout_scale=rank_dropout_scale, init_weights=init_weights, rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}), layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern, blocksize=blocksize, double_quant=double_quant)
    _activate_new(model, adapter_name)
    return model
