"""Tiny transformers models built from configs (nothing downloaded) and helpers shared by the
model-level tests."""
import torch

VOCAB = 96


def tiny_llama(layers=2, hidden=64, inter=128, seed=0, dtype=torch.float32, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).to(dtype)
    m.eval()
    return m


def tokens(batch=2, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def dequantized_copy(qmodel, base):
    """`base` (a plain model of the same architecture) with each QLoRALinear of `qmodel` replaced by
    an nn.Linear holding its dequantized NF4 weight: the reference model PEFT wraps."""
    import copy

    from nf4lora.nn import QLoRALinear
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, QLoRALinear):
                lin = ref.get_submodule(name)
                lin.weight.copy_(m.nf4_weight.dequantize(lin.weight.dtype))
    return ref


from numerics import rel_err as rel  # noqa: E402  (the suite's one relative-error helper)


def randomize_adapters(model, adapter="default", seed=0, scale=0.05):
    """Give every adapter weight a non-zero value (B starts at zero, which would hide bugs)."""
    from nf4lora.nn import QLoRALinear
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, QLoRALinear) and adapter in m.lora_config:
                for p in (m.lora_A[adapter].weight, m.lora_B[adapter].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_name(name):
    """A PEFT model's parameter name as ours (without the base_model.model. prefix)."""
    return name.replace("base_model.model.", "")


def copy_into_peft(model, peft_model, trainable_only=False):
    """Our parameter values into the PEFT model under the same names. trainable_only: every
    trainable PEFT parameter must have a twin here (KeyError otherwise), nothing else is copied."""
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if trainable_only:
                if p.requires_grad:
                    p.copy_(ours[peft_name(n)])
            elif peft_name(n) in ours:
                p.copy_(ours[peft_name(n)])


def randomize_both(model, peft_model, scale, seed, ours_name=peft_name):
    """The same random values (N(0, scale^2)) into every trainable PEFT parameter and its twin here,
    named by ours_name(peft name)."""
    ours = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                v = torch.randn(p.shape, generator=g) * scale
                p.copy_(v)
                ours[ours_name(n)].copy_(v)


def train_losses(model, x, opt, steps, after_step=None):
    """`steps` training steps on (x, labels x) with `opt`; after_step(i) runs after opt.step() and
    before zero_grad() (AdaLoRA's update_and_allocate). Returns the losses."""
    model.train()
    losses = []
    for i in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(i)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def single_adapter_logits(model, x, names):
    """Row i of x run alone through adapter names[i] ("__base__": adapters disabled): what
    mixed_batch must reproduce. Leaves names[-1]'s adapter (or the previous one) active."""
    import nf4lora as nl
    out = []
    with torch.no_grad():
        for i, a in enumerate(names):
            if a == "__base__":
                with nl.disable_adapter(model):
                    out.append(model(x[i:i + 1]).logits)
            else:
                nl.set_adapter(model, a)
                out.append(model(x[i:i + 1]).logits)
    return out


def assert_training_step_matches_peft(model, peft_model, x, grad_tol=1e-4):
    """One training forward + backward of ours and PEFT's on (x, labels x): equal losses (1e-5) and
    every trainable parameter's gradient within grad_tol, the same names on both sides. Returns the
    names of the trainable parameters."""
    model.train(), peft_model.train()
    lm, lp = model(input_ids=x, labels=x).loss, peft_model(input_ids=x, labels=x).loss
    assert abs(float(lm) - float(lp)) <= 1e-5 * abs(float(lp))
    lm.backward(), lp.backward()
    theirs = {peft_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for n, p in ours.items():
        assert rel(p.grad, theirs[n].grad) < grad_tol, n
    return list(ours)


def assert_eval_and_merge_match_peft(model, peft_model, x, targets, tol=1e-5):
    """In eval mode: our logits = PEFT's, also with the adapter merged (then unmerged again), and
    merge_and_unload gives PEFT's merged weights on `targets`."""
    import copy

    import nf4lora as nl
    model.eval(), peft_model.eval()
    with torch.no_grad():
        want = peft_model(x).logits
        assert rel(model(x).logits, want) < tol
        nl.merge_adapter(model)
        assert rel(model(x).logits, want) < tol
        nl.unmerge_adapter(model)
        assert_same_merged_weights(nl.merge_and_unload(copy.deepcopy(model)), peft_model.merge_and_unload(), targets)


def assert_edited_config_rejected(base, path, change, match, exc=ValueError):
    """adapter_config.json at `path` with the fields in `change` replaced: load_adapter onto a fresh
    copy of `base` raises `exc` matching `match` and leaves that copy untouched. The file is restored."""
    import copy
    import json
    import os

    import pytest

    import nf4lora as nl
    cpath = os.path.join(str(path), "adapter_config.json")
    with open(cpath) as f:
        good = f.read()
    try:
        with open(cpath, "w") as f:
            f.write(json.dumps({**json.loads(good), **change}))
        fresh = copy.deepcopy(base)
        with pytest.raises(exc, match=match):
            nl.load_adapter(fresh, str(path))
        assert not any(isinstance(m, nl.QLoRALinear) for m in fresh.modules())
    finally:
        with open(cpath, "w") as f:
            f.write(good)


def assert_mixed_batch_matches_single(model, names, tol=1e-5):
    """mixed_batch(model, names) on a batch of len(names) rows gives each row what it gets alone
    through its adapter (an eval-mode model)."""
    import nf4lora as nl
    x = tokens(batch=len(names))
    with torch.no_grad(), nl.mixed_batch(model, names):
        mixed = model(x).logits
    for i, (a, alone) in enumerate(zip(names, single_adapter_logits(model, x, names))):
        assert rel(mixed[i:i + 1], alone) < tol, a


def assert_same_merged_weights(merged, merged_ref, targets, tol=1e-6):
    """After merge_and_unload: every target nn.Linear of ours holds PEFT's merged weight, and there
    is at least one (a target list that matches nothing would otherwise pass with no assertion)."""
    checked = []
    for n, mod in merged.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(t in n for t in targets):
            assert rel(mod.weight, merged_ref.get_submodule(n).weight) < tol, n
            checked.append(n)
    assert checked, f"no nn.Linear of the merged model matches {targets}: nothing was compared"
    want = [n for n, m in merged_ref.named_modules() if isinstance(m, torch.nn.Linear) and any(t in n for t in targets)]
    assert checked == want, f"merged models differ in their target layers: {checked} vs {want}"


def assert_files_round_trip(model, base, path, x):
    """Adapter files nf4lora wrote at `path`: PEFT loads them onto the dequantized base with our
    logits (1e-5), and load_adapter onto a fresh copy of `base` gives them back (1e-6)."""
    import copy

    import nf4lora as nl
    from peft import PeftModel
    ref = PeftModel.from_pretrained(dequantized_copy(model, base), str(path))
    back = nl.load_adapter(copy.deepcopy(base), str(path))
    with torch.no_grad():
        want = model(x).logits
        assert rel(want, ref(x).logits) < 1e-5
        assert rel(back(x).logits, want) < 1e-6


def three_adapters(base, dora=False, spread_magnitudes=False):
    """A copy of `base` with adapters "default" (q, v, down; r 4), "b" (q, o; r 2) and "c" (all
    linears; r 3), non-zero; dora: default and c are DoRA, spread_magnitudes moves their magnitudes
    away from ||W + s B A|| so the row scale matters. In eval mode."""
    import copy

    import nf4lora as nl
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                       use_dora=dora)
    nl.apply_qlora(m, ["q_proj", "o_proj"], r=2, lora_alpha=4, adapter_name="b")
    nl.apply_qlora(m, "all-linear", r=3, lora_alpha=3, adapter_name="c", use_dora=dora)
    for i, a in enumerate(("default", "b", "c")):
        randomize_adapters(m, adapter=a, seed=i, scale=0.1)
        if dora and spread_magnitudes:
            for _, layer in nl.lora.model.qlora_layers(m):
                if a in layer.lora_magnitude_vector:
                    with torch.no_grad():
                        layer.lora_magnitude_vector[a].weight.mul_(1.0 + 0.1 * i + 0.05)
    return m.eval()


def peft_three_adapters(model, base):
    """PEFT's twin of three_adapters(base) (plain LoRA): the same three adapters on the dequantized
    base of `model`, holding `model`'s adapter values, in eval mode."""
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(dequantized_copy(model, base),
                        LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8))
    pm.add_adapter("b", LoraConfig(target_modules=["q_proj", "o_proj"], r=2, lora_alpha=4))
    pm.add_adapter("c", LoraConfig(target_modules="all-linear", r=3, lora_alpha=3))
    copy_into_peft(model, pm)
    pm.eval()
    return pm
