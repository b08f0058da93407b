"""PEFT's modules_to_save (a classification head trained whole next to the LoRA layers), against
PEFT on the dequantized base: trainable names, a training step (loss and every gradient), files both
ways; per-adapter heads with set_adapter / disable_adapter / mixed_batch / delete_adapter;
merge_and_unload; bitsandbytes state dicts keep the original head; bad input refused untouched."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import nf4lora as nl
from model_utils import dequantized_copy, rel, tokens

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

T = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForSequenceClassification(cfg).eval()


def _labels():
    return torch.tensor([0, 2])


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(m.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _pair(base):
    m = _randomize(nl.apply_qlora(copy.deepcopy(base), T, r=4, modules_to_save=["score"]), 1)
    pm = get_peft_model(dequantized_copy(m, base), LoraConfig(target_modules=T, r=4, modules_to_save=["score"]))
    ours = dict(m.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(ours[n.replace("base_model.model.", "")])
    return m, pm


def test_trainable_names_step_and_files_match_peft(base, tmp_path):
    m, pm = _pair(base)
    x = tokens()
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {n.replace("base_model.model.", "") for n, p in pm.named_parameters() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in names and "score.original_module.weight" not in names
    nl.prepare_for_training(m, gradient_checkpointing=False)  # keeps the head copy trainable
    assert {n for n, p in m.named_parameters() if p.requires_grad} == names
    m.train(), pm.train()
    lm, lp = m(input_ids=x, labels=_labels()).loss, pm(input_ids=x, labels=_labels()).loss
    assert abs(float(lm) - float(lp)) <= 1e-5 * abs(float(lp))
    lm.backward(), lp.backward()
    theirs = {n.replace("base_model.model.", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, theirs[n].grad) < 1e-5, n
    m.eval(), pm.eval()
    assert rel(_logits(m, x), _logits(pm, x)) < 1e-5
    # ours -> PEFT, PEFT -> ours
    nl.save_adapter(m, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"]
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert "base_model.model.score.weight" in keys
    ref = PeftModel.from_pretrained(dequantized_copy(m, base), str(tmp_path / "ours")).eval()
    assert rel(_logits(ref, x), _logits(m, x)) < 1e-5
    pm.save_pretrained(str(tmp_path / "peft"))
    assert set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == keys
    back = nl.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    assert rel(_logits(back, x), _logits(pm, x)) < 1e-5
    # into the existing adapter (resume): the same parameter objects get the file's values
    fresh = _randomize(nl.apply_qlora(copy.deepcopy(base), T, r=4, modules_to_save=["score"]), 7)
    head = fresh.score.modules_to_save["default"].weight
    nl.load_adapter(fresh, str(tmp_path / "ours"), adapter_name="default")
    assert fresh.score.modules_to_save["default"].weight is head
    assert torch.equal(_logits(fresh, x), _logits(m, x))


def test_heads_follow_the_adapter_controls(base):
    x = tokens(batch=3)
    m = _randomize(nl.apply_qlora(copy.deepcopy(base), T, r=4, modules_to_save=["score"]), 1)
    nl.apply_qlora(m, T, r=4, modules_to_save=["score"], adapter_name="b")
    _randomize(m, 2)  # only the active adapter's tensors are trainable: "b" stays as created
    with torch.no_grad():
        m.score.modules_to_save["b"].weight.normal_()
    a_out = _logits(m, x)
    with nl.disable_adapter(m):
        plain = _logits(m, x)
    q = nl.quantize_model(copy.deepcopy(base), target_modules=T)
    assert rel(plain, _logits(q, x)) < 1e-6  # the NF4 base with the original head
    assert torch.equal(m.score.original_module.weight, base.score.weight)
    nl.set_adapter(m, "b")
    b_out = _logits(m, x)
    assert rel(a_out, b_out) > 1e-2
    with pytest.raises(ValueError, match="only one of them can be active"):
        nl.set_adapter(m, ["default", "b"])
    assert m.score.active_adapter == "b"  # refused before anything changed
    with nl.mixed_batch(m, ["default", "b", "__base__"]):
        mixed = _logits(m, x)
    assert rel(mixed[0], a_out[0]) < 1e-6 and rel(mixed[1], b_out[1]) < 1e-6 and rel(mixed[2], plain[2]) < 1e-6
    nl.delete_adapter(m, "b")
    assert "b" not in m.score.modules_to_save and m.score.active_adapter == "default"
    assert torch.equal(_logits(m, x), a_out)
    merged = nl.merge_and_unload(copy.deepcopy(m))
    assert isinstance(merged.score, torch.nn.Linear) and rel(_logits(merged, x), a_out) < 1e-5


def test_bnb_state_dict_keeps_the_original_head(base):
    m = _randomize(nl.apply_qlora(copy.deepcopy(base), T, r=4, modules_to_save=["score"]), 1)
    sd = nl.bnb_state_dict(m)
    assert torch.equal(sd["score.weight"], base.score.weight)
    assert not any("modules_to_save" in k or "original_module" in k for k in sd)
    other = _randomize(nl.apply_qlora(copy.deepcopy(base), T, r=4, modules_to_save=["score"]), 3)
    with torch.no_grad():
        other.score.original_module.weight.zero_()
    nl.load_bnb_state_dict(other, sd)
    assert torch.equal(other.score.original_module.weight, base.score.weight)


def test_bad_modules_to_save_refused_untouched(base, tmp_path):
    for kw, match in ((dict(modules_to_save=["nothing_here"]), "matches no module"),
                      (dict(modules_to_save=["q_proj"]), "adapter targets|NF4 layer"),
                      (dict(modules_to_save=[3]), "list of module names")):
        m = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            nl.apply_qlora(m, T, r=4, **kw)
        assert not any(isinstance(x, nl.QLoRALinear) for x in m.modules())
    m = _randomize(nl.apply_qlora(copy.deepcopy(base), T, r=4, modules_to_save=["score"]), 1)
    nl.save_adapter(m, str(tmp_path))
    from safetensors.torch import save_file
    w = load_file(str(tmp_path / "adapter_model.safetensors"))
    w["base_model.model.score.weight"] = w["base_model.model.score.weight"][:, :10].contiguous()
    save_file(w, str(tmp_path / "adapter_model.safetensors"))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="score.weight' must be a floating tensor of shape"):
        nl.load_adapter(fresh, str(tmp_path))
    assert not any(isinstance(x, nl.QLoRALinear) for x in fresh.modules())
    pool = nl.AdapterPool(nl.quantize_model(copy.deepcopy(base), target_modules=T))
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        pool.load("a", str(tmp_path))
