"""The demo's fine-tunes: nf4lora's QLoRA (quantize_model -> apply_qlora -> PagedAdamW) and, for
--compare, the same run through bitsandbytes' Linear4bit + PEFT's LoRA + torch AdamW."""
import time

import torch
from tqdm import tqdm

from .. import PagedAdamW, QLoRALinear, apply_qlora, quantize_model
from .demo_model import head_name, lora_targets
from .resources import PhasePeak


def qlora(model, kind, r, alpha, dropout):
    """NF4-quantize every linear but the head, add LoRA on the attention and MLP linears, train the
    head in full (classifier: PEFT's modules_to_save). Returns (model, targets, head name or None)."""
    head = head_name(model) if kind == "classifier" else None
    quantize_model(model, exclude_modules=[head] if head else None)
    targets = lora_targets(model)
    apply_qlora(model, targets, r=r, lora_alpha=alpha, lora_dropout=dropout,
                modules_to_save=[head] if head else None)
    return model, targets, head


def weight_bytes(model):
    """(NF4 bytes of the quantized linears incl. scales, their bytes in bf16)."""
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    return (sum(m.nf4_weight.nbytes for m in layers),
            sum(2 * m.in_features * m.out_features for m in layers))


def param_counts(model):
    """Trainable and total parameters; an NF4 weight counts its logical [N, K] elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QLoRALinear))
    return {"trainable": trainable, "total": total}


def train(model, data, steps, batch_size, opt, desc, seed=0):
    """`steps` optimizer steps over shuffled batches of `data`. Returns {"loss": [...],
    "step_s": [...], "peak_rss": bytes sampled during the run}."""
    g = torch.Generator().manual_seed(seed)
    n = len(data["labels"])
    losses, times = [], []
    model.train()
    with PhasePeak() as mem, tqdm(range(steps), desc=desc, unit="step", leave=False, disable=None) as bar:
        order = torch.randperm(n, generator=g)
        pos = 0
        for _ in bar:
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            b = {k: v[idx] for k, v in data.items()}
            t0 = time.perf_counter()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"loss": losses, "step_s": times, "peak_rss": mem.peak}


def paged_adamw(model, lr):
    return PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def bnb_peft(model, kind, targets, head, r, alpha, dropout):
    """The baseline: every linear but the head as a bitsandbytes nf4 Linear4bit (double quant,
    blocksize 64: the same format), PEFT LoRA on the same targets, the head in modules_to_save."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and (head is None or not name.startswith(head)) \
                and name != _lm_head(model):
            lin4 = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                     compute_dtype=torch.float32, quant_type="nf4",
                                     compress_statistics=True)
            lin4.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                            compress_statistics=True, blocksize=64)
            if mod.bias is not None:
                lin4.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin4.to("cpu"))
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     modules_to_save=[head] if head else None)
    return get_peft_model(model, cfg)


def _lm_head(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
