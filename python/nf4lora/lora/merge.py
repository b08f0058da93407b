"""Merging adapters into the base weight, and into each other (add_weighted_adapter).

merge_adapter / unmerge_adapter fold the active adapters into a dense weight that forward uses, and
drop it again; the NF4 codes are kept, so unmerging is exact (PEFT re-quantizes a merged 4-bit
layer, which is lossy both ways). merge_and_unload returns plain nn.Linear layers with
W_dequant + sum s B A, in the original weight dtype unless told otherwise, or, with requantize,
NF4 layers without adapters plus the error the re-quantization added.
"""
import math

import torch

from ..nf4 import quantize_nf4
from .mixing import mix
from ..nn import QLoRALinear
from .model import _set_child, forget_adapters, qlora_layers
from .modules_to_save import wrappers


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
                             double_quant=layer.nf4_weight.double_quant if double_quant is None
                             else double_quant)
            new = QLoRALinear(q, layer.bias, r=0)
            stored = q.dequantize(torch.float32)
        else:
            new = layer.merge(dtype, use)
            stored = new.weight.float()
        err = float((stored - w).norm() / w.norm().clamp_min(torch.finfo(torch.float32).tiny))
        report[name] = {"rel_error": err, "adapters": use}
        _set_child(model, name, new)
    for name, w in wrappers(model):  # a modules_to_save module becomes the active adapter's copy (PEFT)
        pick = [a for a in (names if names is not None else [w.active_adapter]) if a in w.modules_to_save]
        if len(pick) > 1:
            raise ValueError(f"merge_and_unload: adapters {pick} each have their own '{name}' (modules_to_save)")
        new = w.modules_to_save[pick[0]] if pick else w.original_module
        new.requires_grad_(False)
        _set_child(model, name, new)
    forget_adapters(model)
    return (model, report) if return_report else model


COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


@torch.no_grad()
def add_weighted_adapter(model, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                         svd_clamp=None, svd_full_matrices=True, density=None,
                         majority_sign_method="total"):
    """A new LoRA adapter `adapter_name` mixing existing ones, as PEFT's add_weighted_adapter
    (added inactive and frozen; set_adapter to use it). combination_type:
      "cat"     A = [w_i s_i A_i] stacked, B = [B_i] side by side: exactly sum_i w_i s_i B_i A_i,
                rank = sum of the ranks;
      "svd"     the best rank-svd_rank (default: the largest rank) approximation of
                sum_i w_i s_i B_i A_i (torch.linalg.svd; svd_clamp clamps to that quantile);
      "linear"  A = sum sign_i sqrt|w_i s_i| A_i, B = sum sqrt|w_i s_i| B_i (equal ranks; a rough
                approximation, as PEFT warns);
      "ties", "dare_linear", "dare_ties", "magnitude_prune": "linear" with A and B mixed by that
                method (lora/mixing.py; density, majority_sign_method), and their "_svd" forms:
                "svd" of the delta weights mixed by that method. dare_* draw from torch's RNG.
    The new adapter has scaling 1 (r = lora_alpha = its rank), PEFT's convention. Plain LoRA
    adapters only (DoRA, VeRA and AdaLoRA adapters raise)."""
    from .model import _check_adapter_name, adapter_configs

    _check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    weights = list(weights)
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"weights must give one number per adapter: {len(adapters)} adapters, "
                         f"{len(weights)} weights")
    for a, w in zip(adapters, weights):
        if a not in configs:
            raise ValueError(f"adapter {a!r} not found; the model has {sorted(configs)}")
        c = configs[a]
        if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora") or c.get("use_bdlora"):
            what = "DoRA" if c.get("use_dora") else "BD-LoRA" if c.get("use_bdlora") else c.get("peft_type")
            raise NotImplementedError(f"add_weighted_adapter mixes plain LoRA adapters; {a!r} is {what}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight for {a!r} must be a finite number, got {w!r}")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    svd_family = combination_type.endswith("svd")
    method = combination_type[: -len("_svd")] if svd_family and combination_type != "svd" else (
        "linear" if svd_family or combination_type == "cat" else combination_type)
    if method != "linear" and (density is None or isinstance(density, bool)
                               or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0):
        raise ValueError(f"density must be a number in [0, 1] for {combination_type!r}, got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    ranks = [max([configs[a]["r"], *configs[a]["rank_pattern"].values()]) for a in adapters]
    if not svd_family and combination_type != "cat":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type {combination_type!r} needs adapters of one rank, got {ranks}")
        new_r = ranks[0]
    elif combination_type == "cat":
        new_r = sum(ranks)
    else:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}")
        new_r = svd_rank or max(ranks)
        if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                      or not 0.0 <= svd_clamp <= 1.0):
            raise ValueError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
    kinds = {type(configs[a]["target_modules"]) for a in adapters}
    if len(kinds) > 1:
        raise ValueError("the adapters' target_modules mix a regex string and lists; PEFT refuses that too")
    if kinds == {str}:
        target_modules = "|".join(f"({configs[a]['target_modules']})" for a in adapters)
    else:
        target_modules = sorted(set().union(*(configs[a]["target_modules"] for a in adapters)))

    layers = [(n, layer) for n, layer in qlora_layers(model) if any(a in layer.lora_config for a in adapters)]
    for _, layer in layers:  # first every new adapter, then the mixing: PEFT's order of RNG draws
        first = next(a for a in adapters if a in layer.lora_config)
        layer.add_adapter(adapter_name, new_r, new_r, 0.0, lora_dtype=layer.lora_A[first].weight.dtype)
    for _, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_config]
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        A.zero_(), B.zero_()
        if combination_type == "cat":
            As = [layer.lora_A[a].weight * (w * layer.lora_config[a]["scaling"]) for a, w in present]
            Bs = [layer.lora_B[a].weight for a, _ in present]
            k = sum(t.shape[0] for t in As)
            A[:k] = torch.cat(As, dim=0)
            B[:, :k] = torch.cat(Bs, dim=1)
        elif not svd_family:  # mix A's and B's (sqrt of |w s| on both, its sign on A)
            ws = [w * layer.lora_config[a]["scaling"] for a, w in present]
            wa = torch.tensor([math.copysign(math.sqrt(abs(v)), v) for v in ws], device=A.device)
            wb = torch.tensor([math.sqrt(abs(v)) for v in ws], device=B.device)
            A.copy_(mix([layer.lora_A[a].weight for a, _ in present], wa, method, density,
                        majority_sign_method).to(A.dtype))
            B.copy_(mix([layer.lora_B[a].weight for a, _ in present], wb, method, density,
                        majority_sign_method).to(B.dtype))
        else:
            deltas = [layer.delta_weight(a) for a, _ in present]
            delta = mix(deltas, torch.tensor([w for _, w in present], device=deltas[0].device), method,
                        density, majority_sign_method)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices)
            k = min(new_r, S.shape[0])  # < new_r when the layer is smaller than the rank asked for
            U = U[:, :k] @ torch.diag(S[:k])
            Vh = Vh[:k, :]
            if svd_clamp is not None:
                hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
                U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
            A[:k] = Vh.to(A.dtype)
            B[:, :k] = U.to(B.dtype)
        for p in layer.adapter_params(adapter_name):  # added frozen and inactive (PEFT)
            p.requires_grad_(False)
    base_cfg = dict(configs[adapters[0]])
    base_cfg.update(r=new_r, lora_alpha=new_r, lora_dropout=0.0, target_modules=target_modules,
                    rank_pattern={}, alpha_pattern={}, use_rslora=False)
    configs[adapter_name] = base_cfg
    return model
