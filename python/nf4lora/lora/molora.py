"""Mixture of LoRA experts over an NF4 model (adapters/molora.py has the layer math):
apply_molora adds one to the matching linears, router_aux_loss gives the training loop the
load-balancing term of the last forward, and the adapter files (nf4lora's own MOLORA layout:
PEFT has no such kind) save and load through nl.save_adapter / nl.load_adapter."""
import torch

from ..adapters import MoloraConfig
from .model import (_activate_new, _adaptable_layers, _new_adapter_targets,
                    _targets_record, adapter_configs, qlora_layers)

PARTS = ("lora_A", "lora_B", "lora_router")


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


def molora_tensors(model, adapter_name):
    """{file key: tensor} of a MoLoRA adapter (base_model.model.<module>.<part>.weight)."""
    from .io import _key
    return {_key(n, which): getattr(layer, which)[adapter_name].weight.detach().cpu().contiguous().clone()
            for n, layer in qlora_layers(model) if adapter_name in layer.lora_config for which in PARTS}


def molora_file_config(c):
    return {k: c[k] for k in ("r", "lora_alpha", "num_experts", "top_k", "router_aux_loss_coef",
                              "lora_dropout", "target_modules", "exclude_modules",
                              "layers_to_transform", "layers_pattern")}


def load_molora(model, cfg, weights, adapter_name, is_trainable, blocksize, double_quant):
    """MOLORA files into a new adapter: every key checked against the layers it targets first."""
    from .io import PREFIX, _check_exact, file_targets, set_adapter
    from .model import active_adapters
    tm = cfg["target_modules"]
    names = file_targets(model, cfg)
    E, r = cfg.get("num_experts", 4), cfg.get("r", 8)
    want = {}
    for n in names:
        layer = model.get_submodule(n)
        want[f"{PREFIX}{n}.lora_A.weight"] = (E * r, layer.in_features)
        want[f"{PREFIX}{n}.lora_B.weight"] = (layer.out_features, E * r)
        want[f"{PREFIX}{n}.lora_router.weight"] = (E, layer.in_features)
    _check_exact(weights, want, "MOLORA")
    first = not active_adapters(model)
    apply_molora(model, tm, num_experts=E, r=r, lora_alpha=cfg.get("lora_alpha", 16),
                 top_k=cfg.get("top_k"), router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.01),
                 lora_dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                 layers_to_transform=cfg.get("layers_to_transform"),
                 layers_pattern=cfg.get("layers_pattern"), exclude_modules=cfg.get("exclude_modules"),
                 blocksize=blocksize, double_quant=double_quant, adapter_name=adapter_name)
    with torch.no_grad():
        for n in names:
            layer = model.get_submodule(n)
            for which in PARTS:
                getattr(layer, which)[adapter_name].weight.copy_(weights[f"{PREFIX}{n}.{which}.weight"])
    if first:
        set_adapter(model, adapter_name, inference_mode=not is_trainable)
    return model
