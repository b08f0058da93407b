"""AdaLoRA adapters (nl.apply_adalora + nl.update_and_allocate, PEFT's ADALORA): forward, loss with
the orthogonality regularizer and gradients against PEFT on the same (dequantized NF4) base; the
rank allocation step for step against PEFT's RankAllocator given the same gradients; PEFT files
both ways before and after pruning (rank_pattern); training; bad configurations."""
import copy
import json

import pytest
import torch

import nf4lora as nl
from model_utils import (assert_files_round_trip, dequantized_copy, randomize_both, rel, tiny_llama, tokens,
                         train_losses)

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
KW = dict(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2, lora_alpha=8)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _ours_name(n):
    n = n.replace("base_model.model.", "")
    return n + ".weight" if ".lora_A." in n or ".lora_B." in n else n


def _pair(base, scale=0.3, **kw):
    kw = {**KW, **kw}
    m = nl.apply_adalora(copy.deepcopy(base), TARGETS, **kw)
    pm = get_peft_model(dequantized_copy(m, base),
                        AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **kw))
    randomize_both(m, pm, scale=scale, seed=0, ours_name=_ours_name)
    return m, pm


def _trainable(pm):
    return {_ours_name(n): p for n, p in pm.named_parameters() if p.requires_grad}


def test_loss_with_orth_reg_and_grads_match_peft(base):
    m, pm = _pair(base)
    x = tokens()
    m.train(), pm.train()
    lm, lp = m(input_ids=x, labels=x).loss, pm(input_ids=x, labels=x).loss
    assert abs(float(lm) - float(lp)) <= 1e-5 * abs(float(lp))
    cfg = m._nf4lora.adalora["config"]
    with torch.no_grad():  # the regularizer is there: without it the loss is lower
        cfg["orth_reg_weight"] = 0.0
        plain = float(m(input_ids=x, labels=x).loss)
        cfg["orth_reg_weight"] = KW.get("orth_reg_weight", 0.5)
    assert plain < float(lm) - 1e-3
    lm.backward(), lp.backward()
    theirs, ours = _trainable(pm), {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 3 * 2 * len(TARGETS)
    for n, p in ours.items():
        assert rel(p.grad, theirs[n].grad) < 1e-4, n


def test_allocation_matches_peft_step_for_step(base):
    """Same parameters and the same gradients each step -> the same pruned singular values and the
    same rank_pattern as PEFT's RankAllocator, through warm-up, the cubic schedule and the final
    phase."""
    m, pm = _pair(base, scale=0.5)
    ours, theirs = {n: p for n, p in m.named_parameters() if p.requires_grad}, _trainable(pm)
    g = torch.Generator().manual_seed(1)
    for step in range(KW["total_step"]):
        with torch.no_grad():
            for n, p in ours.items():
                grad = torch.randn(p.shape, generator=g)
                p.grad, theirs[n].grad = grad.clone(), grad.clone()
                p.sub_(0.01 * grad)
                theirs[n].sub_(0.01 * grad)
        nl.update_and_allocate(m, step)
        pm.base_model.update_and_allocate(step)
        for n, p in ours.items():
            assert torch.equal(p, theirs[n]), (step, n)
    pattern = m._nf4lora.configs["default"]["rank_pattern"]
    theirs_pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert pattern == theirs_pattern
    kept = sum(sum(v) for v in pattern.values())
    assert kept == KW["target_r"] * 2 * len(TARGETS)


def test_files_both_ways(base, tmp_path):
    x = tokens()
    m, _ = _pair(base)
    nl.save_adapter(m, str(tmp_path / "before"))  # no rank_pattern yet: every rank
    ref = PeftModel.from_pretrained(dequantized_copy(m, base), str(tmp_path / "before"))
    with torch.no_grad():
        assert rel(m(x).logits, ref(x).logits) < 1e-5
    # prune to the final budget, then save: only the kept ranks are written
    g = torch.Generator().manual_seed(2)
    for step in range(KW["total_step"]):
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        nl.update_and_allocate(m, step)
    nl.save_adapter(m, str(tmp_path / "after"))
    cfg = json.loads((tmp_path / "after" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["rank_pattern"]
    assert_files_round_trip(m, base, tmp_path / "after", x)
    # PEFT -> nf4lora after PEFT's own pruning
    q = nl.quantize_model(copy.deepcopy(base), target_modules=TARGETS)
    pm = get_peft_model(dequantized_copy(q, base), AdaLoraConfig(target_modules=TARGETS, **KW))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(KW["total_step"]):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = nl.load_adapter(q, str(tmp_path / "peft"))
    with torch.no_grad():
        assert rel(loaded(x).logits, pm(x).logits) < 1e-5


def test_training_with_paged_adamw(base):
    m = nl.apply_adalora(copy.deepcopy(base), "all-linear", **{**KW, "total_step": 20, "tfinal": 4})
    nl.prepare_for_training(m, gradient_checkpointing=False)
    opt = nl.PagedAdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
    losses = train_losses(m, tokens(), opt, 20, after_step=lambda step: nl.update_and_allocate(m, step))
    assert losses[-1] < losses[0], losses
    pattern = m._nf4lora.configs["default"]["rank_pattern"]
    n_layers = sum(1 for _ in nl.lora.model.qlora_layers(m))
    assert sum(sum(v) for v in pattern.values()) == KW["target_r"] * n_layers
    for key, keep in pattern.items():  # pruned singular values are zero
        E = m.get_submodule(key[: -len(".lora_E")]).lora_E["default"]
        assert torch.all(E[~torch.tensor(keep)] == 0)


def test_bad_configurations(base):
    with pytest.raises(ValueError, match="total_step"):
        nl.apply_adalora(copy.deepcopy(base), TARGETS, init_r=4, target_r=2)
    with pytest.raises(ValueError, match="tinit must be an int"):
        nl.apply_adalora(copy.deepcopy(base), TARGETS, total_step=10, tinit=1.5)
    with pytest.raises(ValueError, match="beta1 must be a number in"):
        nl.apply_adalora(copy.deepcopy(base), TARGETS, total_step=10, beta1=1.0)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        nl.apply_adalora(copy.deepcopy(base), TARGETS, total_step=10, lora_alpha="8")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lora_dropout must be a number in"):
        nl.apply_adalora(fresh, TARGETS, total_step=10, lora_dropout=1.5)
    assert not any(isinstance(l, nl.QLoRALinear) for l in fresh.modules())
    with pytest.raises(ValueError, match="budgeting"):
        nl.apply_adalora(copy.deepcopy(base), TARGETS, total_step=10, tinit=6, tfinal=4)
    m = nl.apply_adalora(copy.deepcopy(base), TARGETS, **KW)
    with pytest.raises(ValueError, match="already trains an AdaLoRA"):
        nl.apply_adalora(m, TARGETS, adapter_name="second", **KW)
    with pytest.raises(ValueError, match="no trainable AdaLoRA"):
        nl.update_and_allocate(copy.deepcopy(base), 0)
    with pytest.raises(ValueError, match="global_step must be an int"):
        nl.update_and_allocate(m, "3")
    nl.delete_adapter(m, "default")  # gone with its allocator; the model still runs
    assert m._nf4lora.adalora is None and not any(".lora_E." in n for n, _ in m.named_parameters())
    with torch.no_grad():
        m(input_ids=tokens(), labels=tokens())


def test_bad_adalora_files(base, tmp_path):
    from safetensors.torch import load_file, save_file
    m, _ = _pair(base)
    nl.save_adapter(m, str(tmp_path))
    cfg_path, w_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    good_cfg, good_w = cfg_path.read_text(), load_file(str(w_path))

    def attempt(cfg_edit=None, w_edit=None):
        cfg, w = json.loads(good_cfg), dict(good_w)
        if cfg_edit:
            cfg_edit(cfg)
        if w_edit:
            w_edit(w)
        cfg_path.write_text(json.dumps(cfg))
        save_file(w, str(w_path))
        fresh = copy.deepcopy(base)
        try:
            nl.load_adapter(fresh, str(tmp_path))
        finally:  # nothing changed on failure
            assert not any(isinstance(l, nl.QLoRALinear) for l in fresh.modules())

    key = "model.layers.0.self_attn.q_proj.lora_E"
    with pytest.raises(ValueError, match="has 3 entries, init_r is 6"):
        attempt(cfg_edit=lambda c: c.__setitem__("rank_pattern", {key: [True, False, True]}))
    with pytest.raises(ValueError, match=r"lora_A' must be a floating tensor of shape \(2, 64\)"):
        attempt(cfg_edit=lambda c: c.__setitem__("rank_pattern", {key: [True, False, True, False, False, False]}))
    with pytest.raises(KeyError, match="q_proj.lora_E"):
        attempt(w_edit=lambda w: w.pop("base_model.model." + key))


def test_merge_and_mixed_batch(base):
    m, pm = _pair(base)
    x = tokens(batch=3)
    with torch.no_grad():
        want = pm(x).logits
        nl.merge_adapter(m)
        assert rel(m(x).logits, want) < 1e-5
        nl.unmerge_adapter(m)
        m.eval()
        with nl.mixed_batch(m, ["default", "__base__", "default"]):
            mixed = m(x).logits
        assert rel(mixed[[0, 2]], want[[0, 2]]) < 1e-5
        merged = nl.merge_and_unload(copy.deepcopy(m))
        assert rel(merged(x).logits, want) < 1e-5
