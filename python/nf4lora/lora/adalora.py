"""AdaLoRA on the NF4 base (PEFT's ADALORA tuner, 0.21): SVD-shaped adapters (QLoRALinear's
lora_A / lora_E / lora_B, nn.py) whose rank budget shrinks during training from init_r per layer
to target_r per layer on average, by zeroing the least important singular values.

  apply_adalora(model, ..., total_step=T)       adapters + the allocator + the orthogonality
                                                 regularizer (a forward hook adding
                                                 orth_reg_weight * mean ||P P^T - I||_F to .loss)
  update_and_allocate(model, global_step)        after each optimizer.step(), as PEFT's
                                                 model.base_model.update_and_allocate

The allocator follows PEFT's RankAllocator step for step (importance |p * grad| smoothed with beta1,
its uncertainty with beta2, triplet scores, a cubic budget schedule over [tinit, T - tfinal], the
final mask kept for the last tfinal steps), so the same gradients give the same masks. The final
mask is the adapter's rank_pattern, which save_adapter uses to write only the kept ranks.
"""
import math

import torch

from .model import (_activate_new, _adaptable_layers, _check_dropout, _new_adapter_targets,
                    _targets_record, adapter_configs, model_adapters, qlora_layers)


def _state(model):
    st = model_adapters(model).adalora
    if st is None:
        raise ValueError("the model has no trainable AdaLoRA adapter (apply_adalora)")
    return st


def _orth_loss_hook(module, args, output):
    """PEFT's AdaLoraModel.forward: loss += orth_reg_weight * mean over the trainable adapter's
    P and Q of ||P P^T - I||_F (Q^T Q for Q). Module-level so the model still pickles."""
    st = model_adapters(module).adalora
    loss = getattr(output, "loss", None)
    if st is None or not isinstance(loss, torch.Tensor):
        return None
    name, w = st["adapter"], st["config"]["orth_reg_weight"]
    terms = []
    for _, layer in qlora_layers(module):
        if name in layer.lora_E:
            for p, cov in ((layer.lora_A[name].weight, "AAt"), (layer.lora_B[name].weight, "BtB")):
                c = p @ p.T if cov == "AAt" else p.T @ p
                terms.append(torch.norm(c - torch.eye(*c.shape, dtype=c.dtype, device=c.device), p="fro"))
    if terms:
        output.loss = loss + w * (sum(terms) / len(terms))
    return output


def apply_adalora(model, target_modules, init_r=12, target_r=8, lora_alpha=8, lora_dropout=0.0,
                  tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                  total_step=None, init_lora_weights=True, layers_to_transform=None,
                  layers_pattern=None, exclude_modules=None, blocksize=64, double_quant=True,
                  adapter_name="default", inference_mode=False):
    """Add AdaLoRA adapter `adapter_name` (initial rank init_r) to the matching layers, in place;
    freeze every other parameter; return the model. total_step (the number of training steps) is
    required, as in PEFT; a model trains one AdaLoRA adapter at a time (inference_mode=True adds a
    frozen one, e.g. for loading)."""
    for field, v in (("init_r", init_r), ("target_r", target_r), ("deltaT", deltaT)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{field} must be a positive int, got {v!r}")
    for field, v in (("tinit", tinit), ("tfinal", tfinal)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{field} must be an int >= 0, got {v!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    _check_dropout("lora_dropout", lora_dropout)
    if not inference_mode:
        if isinstance(total_step, bool) or not isinstance(total_step, int) or total_step <= 0:
            raise ValueError("AdaLoRA needs total_step, the number of training steps (an int > 0), "
                             f"got {total_step!r}")
        if tinit >= total_step - tfinal:
            raise ValueError(f"tinit={tinit}, tfinal={tfinal}, total_step={total_step} leave no budgeting "
                             "phase (need tinit < total_step - tfinal)")
        if model_adapters(model).adalora is not None:
            raise ValueError("the model already trains an AdaLoRA adapter; add further ones with "
                             "inference_mode=True")
    for field, v, lo, hi in (("orth_reg_weight", orth_reg_weight, 0.0, math.inf),
                             ("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                lo <= v < hi if field == "orth_reg_weight" else lo < v < hi):
            raise ValueError(f"{field} must be a number in {'[0, inf)' if field == 'orth_reg_weight' else '(0, 1)'}, "
                             f"got {v!r}")
    target_modules, names = _new_adapter_targets(model, adapter_name, target_modules, layers_to_transform,
                                                 layers_pattern, exclude_modules)
    for layer in _adaptable_layers(model, names, blocksize, double_quant):
        layer.add_adalora_adapter(adapter_name, init_r, lora_alpha, lora_dropout, init_lora_weights)
    cfg = dict(peft_type="ADALORA", init_r=init_r, target_r=target_r, lora_alpha=lora_alpha,
               lora_dropout=float(lora_dropout), tinit=tinit, tfinal=tfinal, deltaT=deltaT,
               beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight, total_step=total_step,
               rank_pattern=None, init_lora_weights=init_lora_weights,
               **_targets_record(target_modules, names, exclude_modules),
               layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
               blocksize=blocksize, double_quant=double_quant)
    adapter_configs(model)[adapter_name] = cfg
    if not inference_mode:
        init_bgt = sum(model.get_submodule(n).lora_config[adapter_name]["r"] for n in names)
        model_adapters(model).adalora = dict(
            adapter=adapter_name, config=cfg, init_bgt=init_bgt, target_bgt=target_r * len(names),
            ipt={}, exp_avg_ipt={}, exp_avg_unc={})
        if not getattr(model, "_nf4lora_orth_hook", False):
            model.register_forward_hook(_orth_loss_hook)
            model._nf4lora_orth_hook = True
    _activate_new(model, adapter_name, inference_mode)
    return model


def _budget(st, step):
    """PEFT's budget_schedule: (budget, whether to mask at this step)."""
    c = st["config"]
    tinit, tfinal, total = c["tinit"], c["tfinal"], c["total_step"]
    if step <= tinit:
        return st["init_bgt"], False
    if step > total - tfinal:
        return st["target_bgt"], True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((st["init_bgt"] - st["target_bgt"]) * (mul ** 3) + st["target_bgt"])
    return budget, step % c["deltaT"] == 0


def _triplets(model, name):
    """(key, layer) per adapted layer, key = the E parameter's name without the adapter
    ("model.layers.0.self_attn.q_proj.lora_E", PEFT's rank_pattern key)."""
    return [(f"{n}.lora_E", layer) for n, layer in qlora_layers(model) if name in layer.lora_E]


@torch.no_grad()
def _update_ipt(st, model):
    name, b1, b2 = st["adapter"], st["config"]["beta1"], st["config"]["beta2"]
    for key, layer in _triplets(model, name):
        for part, p in (("A", layer.lora_A[name].weight), ("B", layer.lora_B[name].weight),
                        ("E", layer.lora_E[name])):
            k = (key, part)
            if k not in st["ipt"]:
                st["ipt"][k] = torch.zeros_like(p)
                st["exp_avg_ipt"][k] = torch.zeros_like(p)
                st["exp_avg_unc"][k] = torch.zeros_like(p)
            if p.grad is None:
                raise RuntimeError(f"update_and_allocate: {key} ({part}) has no gradient; call it after "
                                   "loss.backward() and before zero_grad()")
            st["ipt"][k] = (p * p.grad).abs().detach()
            st["exp_avg_ipt"][k] = b1 * st["exp_avg_ipt"][k] + (1 - b1) * st["ipt"][k]
            st["exp_avg_unc"][k] = b2 * st["exp_avg_unc"][k] + (1 - b2) * (st["ipt"][k] - st["exp_avg_ipt"][k]).abs()


@torch.no_grad()
def _mask_to_budget(st, model, budget):
    name = st["adapter"]
    score = {k: st["exp_avg_ipt"][k] * st["exp_avg_unc"][k] for k in st["exp_avg_ipt"]}
    triplet = {}
    for key, _ in _triplets(model, name):
        ab = torch.cat([torch.mean(score[(key, "A")], dim=1, keepdim=True),
                        torch.mean(score[(key, "B")], dim=0, keepdim=False).view(-1, 1)], dim=1)
        triplet[key] = (score[(key, "E")].view(-1) + ab.sum(dim=1, keepdim=False).view(-1)).view(-1, 1)
    threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]),
                               k=st["init_bgt"] - budget)[0].item()
    pattern = {}
    for key, layer in _triplets(model, name):
        layer.lora_E[name].masked_fill_(triplet[key] <= threshold, 0.0)
        pattern[key] = (~(triplet[key] <= threshold)).view(-1).tolist()
    return pattern


@torch.no_grad()
def _mask_with_pattern(model, name, pattern):
    for key, layer in _triplets(model, name):
        keep = torch.tensor(pattern[key], dtype=torch.bool, device=layer.lora_E[name].device)
        layer.lora_E[name].masked_fill_(~keep.unsqueeze(-1), 0.0)


def update_and_allocate(model, global_step):
    """One step of AdaLoRA's rank allocation; call after loss.backward() (and optimizer.step()),
    before zero_grad(), every step (PEFT's update_and_allocate). Updates the importance scores,
    prunes singular values to the scheduled budget, and from step total_step - tfinal on holds the
    final mask (the adapter's rank_pattern)."""
    st = _state(model)
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
    c = st["config"]
    last = c["total_step"] - c["tfinal"]
    if global_step < last:
        _update_ipt(st, model)
        budget, mask = _budget(st, global_step)
        if mask:
            c["rank_pattern"] = _mask_to_budget(st, model, budget)
    elif global_step == last:  # the final allocation (no score update at this step, as PEFT)
        budget, _ = _budget(st, global_step)
        c["rank_pattern"] = _mask_to_budget(st, model, budget)
        st["ipt"], st["exp_avg_ipt"], st["exp_avg_unc"] = {}, {}, {}
    elif c["rank_pattern"] is not None:
        _mask_with_pattern(model, st["adapter"], c["rank_pattern"])
