"""Mixture of LoRA experts over an NF4 model (adapters/molora.py has the layer math):
apply_molora adds one to the matching linears, router_aux_loss gives the training loop the
load-balancing term of the last forward, and the adapter files (nf4lora's own MOLORA layout:
PEFT has no such kind; adapters/molora.py maps it) save and load through nl.save_adapter /
nl.load_adapter."""
import torch

from ..adapters import MoloraConfig
from .model import (_activate_new, _adaptable_layers, _new_adapter_targets,
                    _targets_record, adapter_configs, qlora_layers)


def apply_molora(model, target_modules, num_experts=4, r=8, lora_alpha=16, top_k=None,
                 router_aux_loss_coef=0.01, lora_dropout=0.0, layers_to_transform=None,
                 layers_pattern=None, exclude_modules=None, blocksize=64, double_quant=True,
                 adapter_name="default"):
    """Add mixture-of-LoRA-experts adapter `adapter_name` to the matching linears (quantized to NF4
    on the way; PEFT's matching rules), freeze everything else, return the model. Each layer gets
    num_experts LoRA experts of rank r (scaling lora_alpha / r) and a softmax router over them
    (top_k: keep the k largest gates per token, renormalised). Add
    `nl.router_aux_loss(model)` (router_aux_loss_coef x the mean load-balancing loss of the last
    forward) to the training loss to keep the experts in use. Merging is refused (routing depends
    on the input)."""
    cfg = MoloraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                       num_experts=num_experts, top_k=top_k)  # validated before the model changes
    if isinstance(router_aux_loss_coef, bool) or not isinstance(router_aux_loss_coef, (int, float)) \
            or not 0.0 <= router_aux_loss_coef < float("inf"):
        raise ValueError(f"router_aux_loss_coef must be a finite number >= 0, got {router_aux_loss_coef!r}")
    target_modules, names = _new_adapter_targets(model, adapter_name, target_modules, layers_to_transform,
                                                 layers_pattern, exclude_modules)
    for layer in _adaptable_layers(model, names, blocksize, double_quant):
        layer.add(adapter_name, cfg)
    adapter_configs(model)[adapter_name] = dict(
        peft_type="MOLORA", r=r, lora_alpha=lora_alpha, num_experts=num_experts, top_k=top_k,
        router_aux_loss_coef=float(router_aux_loss_coef), lora_dropout=float(lora_dropout),
        **_targets_record(target_modules, names, exclude_modules),
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        blocksize=blocksize, double_quant=double_quant)
    _activate_new(model, adapter_name)
    return model


def router_aux_loss(model, adapter_name=None):
    """router_aux_loss_coef x the mean over layers of the load-balancing loss their last forward
    left (a scalar tensor with gradients to the routers; 0 when no MoLoRA adapter ran)."""
    configs = adapter_configs(model)
    names = [adapter_name] if adapter_name is not None else \
        [a for a, c in configs.items() if c.get("peft_type") == "MOLORA"]
    terms = []
    for a in names:
        if configs.get(a, {}).get("peft_type") != "MOLORA":
            raise ValueError(f"adapter {adapter_name!r} is not a mixture of LoRA experts")
        losses = [layer.aux_losses[a] for _, layer in qlora_layers(model) if a in layer.aux_losses]
        if losses:
            terms.append(configs[a]["router_aux_loss_coef"] * torch.stack(losses).mean())
    return torch.stack(terms).sum() if terms else torch.zeros(())
