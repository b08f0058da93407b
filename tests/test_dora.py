"""DoRA adapters (use_dora=True): forward, gradients, dropout, merge and several active adapters
against PEFT's DoRA on the same (dequantized NF4) base; PEFT-format files both ways; the row norm
without a dense weight against the dense formula."""
import copy
import json

import pytest
import torch

import nf4lora as nl
from model_utils import (assert_same_merged_weights, assert_training_step_matches_peft, copy_into_peft,
                         dequantized_copy, randomize_adapters, rel, tiny_llama, tokens, train_losses)

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _pair(base, dropout=0.0, seed=0):
    """An nf4lora DoRA model with random adapters and PEFT's DoRA model on the dequantized base
    holding the same A, B and magnitude."""
    m = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, lora_dropout=dropout,
                       use_dora=True)
    randomize_adapters(m, seed=seed)
    with torch.no_grad():  # magnitude off its init, so it matters
        for _, layer in nl.lora.model.qlora_layers(m):
            mag = layer.lora_magnitude_vector["default"].weight
            mag.mul_(1 + 0.1 * torch.randn(mag.shape, generator=torch.Generator().manual_seed(seed)))
    pm = get_peft_model(dequantized_copy(m, base),
                        LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, lora_dropout=dropout,
                                   use_dora=True))
    copy_into_peft(m, pm, trainable_only=True)
    return m, pm


def test_weight_norm_without_dense_weight(base):
    m = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_dora=True)
    randomize_adapters(m, scale=0.3)
    for _, layer in nl.lora.model.qlora_layers(m):
        dense = layer.nf4_weight.dequantize(torch.float64) + layer.scaling * (
            layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())
        assert rel(layer.dora_weight_norm("default"), dense.norm(dim=1)) < 1e-6


def test_init_magnitude_is_row_norm_of_base(base):
    """PEFT's init: B = 0, so the magnitude is ||W||_row and the adapter starts as a no-op."""
    m = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_dora=True)
    pm = get_peft_model(dequantized_copy(m, base), LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8,
                                                             use_dora=True))
    theirs = {n.replace("base_model.model.", ""): p for n, p in pm.named_parameters()}
    for n, p in m.named_parameters():
        if "lora_magnitude_vector" in n:
            assert rel(p, theirs[n]) < 1e-6, n
    x = tokens()
    with nl.disable_adapter(m):
        plain = m(x).logits
    assert rel(m(x).logits, plain) < 1e-6


def test_forward_and_gradients_match_peft(base):
    m, pm = _pair(base)
    x = tokens()
    assert any("lora_magnitude_vector" in n for n in assert_training_step_matches_peft(m, pm, x))


def test_dropout_matches_peft_with_same_rng(base):
    """Under dropout PEFT feeds the dropped-out x to the DoRA base term too; same RNG, same masks."""
    m, pm = _pair(base, dropout=0.3)
    x = tokens()
    m.train(), pm.train()
    torch.manual_seed(123)
    lm = m(input_ids=x, labels=x).loss
    torch.manual_seed(123)
    lp = pm(input_ids=x, labels=x).loss
    assert abs(float(lm) - float(lp)) <= 1e-5 * abs(float(lp))
    m.eval(), pm.eval()
    assert rel(m(x).logits, pm(x).logits) < 1e-5


def test_merge_matches_peft(base):
    m, pm = _pair(base)
    x = tokens()
    want = pm(x).logits.detach()
    assert rel(m(x).logits, want) < 1e-5
    nl.merge_adapter(m)
    assert rel(m(x).logits, want) < 1e-5
    nl.unmerge_adapter(m)
    merged_ref = pm.merge_and_unload()
    merged = nl.merge_and_unload(copy.deepcopy(m))
    assert_same_merged_weights(merged, merged_ref, TARGETS)
    assert rel(merged(x).logits, want) < 1e-5


def test_two_active_adapters_match_peft(base):
    """A DoRA adapter and a plain one, both active: PEFT's order (each adds to the running result)."""
    m = nl.apply_qlora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_dora=True)
    nl.apply_qlora(m, ["q_proj", "down_proj"], r=2, lora_alpha=4, adapter_name="plain")
    randomize_adapters(m, seed=1)
    randomize_adapters(m, adapter="plain", seed=2)
    pm = get_peft_model(dequantized_copy(m, base),
                        LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, use_dora=True))
    pm.add_adapter("plain", LoraConfig(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=4))
    copy_into_peft(m, pm)
    x = tokens()
    for active in (["default", "plain"], ["plain", "default"]):
        nl.set_adapter(m, active)
        pm.base_model.set_adapter(active)
        assert rel(m(x).logits, pm(x).logits) < 1e-5, active


def test_files_both_ways(base, tmp_path):
    x = tokens()
    m, _ = _pair(base)
    nl.save_adapter(m, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    ref = PeftModel.from_pretrained(dequantized_copy(m, base), str(tmp_path / "ours"))
    assert rel(m(x).logits, ref(x).logits) < 1e-5
    # PEFT -> nf4lora: a PEFT DoRA adapter trained a little
    q = nl.quantize_model(copy.deepcopy(base), target_modules=TARGETS)
    pm = get_peft_model(dequantized_copy(q, base), LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8,
                                                             use_dora=True, init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "peft"))
    back = nl.load_adapter(q, str(tmp_path / "peft"))
    assert rel(back(x).logits, pm(x).logits) < 1e-5
    assert back.model.layers[0].self_attn.q_proj.lora_config["default"]["use_dora"]


def test_training_and_adapter_controls(base):
    m = nl.apply_qlora(copy.deepcopy(base), "all-linear", r=4, lora_alpha=8, use_dora=True)
    nl.prepare_for_training(m, gradient_checkpointing=False)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector.default" in n for n in trainable)
    opt = nl.PagedAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = train_losses(m, tokens(batch=2, seq=8), opt, 10)
    assert losses[-1] < 0.9 * losses[0], losses
    nl.apply_qlora(m, "all-linear", r=2, adapter_name="other")
    nl.delete_adapter(m, "default")
    assert not any("lora_magnitude_vector" in n for n, _ in m.named_parameters())


def test_bf16_model_trains():
    m = nl.apply_qlora(tiny_llama(dtype=torch.bfloat16), TARGETS, r=4, lora_alpha=8, use_dora=True,
                       lora_dropout=0.1)
    randomize_adapters(m)
    nl.prepare_for_training(m, gradient_checkpointing=False)
    m.train()
    x = tokens()
    loss = m(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x).logits).all()


def test_eval_row_norm_is_remembered_until_the_weights_change(base):
    """In eval the DoRA norm ||W + s B A|| is computed once and reused until A, B or the NF4 weight
    change (in place or replaced); every answer equals a fresh computation."""
    m, _ = _pair(base)
    m.eval()
    x = tokens()
    layer = m.model.layers[0].self_attn.q_proj
    calls = []
    import nf4lora.adapters.dora as dora_mod
    orig = dora_mod.weight_norm

    def counting(l, n):
        calls.append(n)
        return orig(l, n)

    dora_mod.weight_norm = counting
    try:
        with torch.no_grad():
            y0 = m(x).logits
            n0 = len(calls)
            assert torch.equal(m(x).logits, y0) and len(calls) == n0  # no recomputation
            layer.lora_B["default"].weight.mul_(1.5)                  # an in-place step
            y1 = m(x).logits
            assert len(calls) == n0 + 1
            want = layer.lora_magnitude_vector["default"].weight / orig(layer, "default")
            assert torch.equal(layer._kind("default").row_scale(layer, "default", torch.float32), want)
            assert rel(y1, y0) > 1e-4
            layer.lora_A["default"].weight = torch.nn.Parameter(layer.lora_A["default"].weight * 0.5)  # replaced
            m(x)
            assert len(calls) == n0 + 2
        m.train()
        with torch.no_grad():
            m(x), m(x)
        assert len(calls) == n0 + 2 + 2 * n0  # training mode always recomputes (n0: one per DoRA layer)
    finally:
        dora_mod.weight_norm = orig
