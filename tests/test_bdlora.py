"""BD-LoRA (PEFT's LoraConfig(use_bdlora=...)): A or B block-diagonal per module, against PEFT on
the dequantized base: parameter names and shapes, init, training step (loss and every gradient),
eval forward, merge, files both ways; per-example serving; bad configs refused before the model
changes."""
import copy
import json

import pytest
import torch

import nf4lora as nl
from model_utils import (assert_eval_and_merge_match_peft, assert_files_round_trip, assert_mixed_batch_matches_single,
                         assert_training_step_matches_peft, dequantized_copy, randomize_both, rel, tiny_llama,
                         tokens)

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

T = ["q_proj", "v_proj", "o_proj", "down_proj"]
BD = dict(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "v_proj"], nblocks=2)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _pair(base, bd=BD, **kw):
    kw = {"r": 4, "lora_alpha": 8, **kw}
    m = nl.apply_qlora(copy.deepcopy(base), T, use_bdlora=bd, **kw)
    pm = get_peft_model(dequantized_copy(m, base), LoraConfig(target_modules=T, use_bdlora=bd, **kw))
    return m, pm


def test_parameters_and_init_as_peft(base):
    torch.manual_seed(0)
    m = nl.apply_qlora(copy.deepcopy(base), T, r=4, use_bdlora=BD)
    torch.manual_seed(0)
    pm = get_peft_model(dequantized_copy(m, base), LoraConfig(target_modules=T, r=4, use_bdlora=BD))
    ours = {n: p for n, p in m.named_parameters() if p.requires_grad}
    theirs = {n.replace("base_model.model.", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    assert {n: tuple(p.shape) for n, p in ours.items()} == {n: tuple(p.shape) for n, p in theirs.items()}
    assert tuple(ours["model.layers.0.self_attn.o_proj.lora_A.default.weight"].shape) == (4, 32)   # [r, K/n]
    assert tuple(ours["model.layers.0.self_attn.q_proj.lora_B.default.weight"].shape) == (64, 2)   # [N, r/n]
    for n, p in ours.items():  # same RNG draws in the same order: PEFT's init values
        assert torch.equal(p, theirs[n]), n
    x = tokens()
    with torch.no_grad(), nl.disable_adapter(m):
        plain = m(x).logits
    with torch.no_grad():
        assert rel(m(x).logits, plain) < 1e-6  # B zero on every layer: a no-op adapter


@pytest.mark.parametrize("kw", [dict(), dict(r=8, use_rslora=True, lora_dropout=0.0),
                                dict(bd=dict(BD, nblocks=4), r=8),
                                dict(bd=dict(target_modules_bd_a=["down_proj"], match_strict=False))])
def test_forward_gradients_merge_match_peft(base, kw):
    m, pm = _pair(base, **kw)
    randomize_both(m, pm, scale=0.3, seed=2)
    x = tokens()
    assert_training_step_matches_peft(m, pm, x, grad_tol=1e-5)
    assert_eval_and_merge_match_peft(m, pm, x, T)


def test_files_both_ways(base, tmp_path):
    x = tokens()
    m, pm = _pair(base)
    randomize_both(m, pm, scale=0.3, seed=3)
    nl.save_adapter(m, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_bdlora"] == {**BD, "match_strict": True}
    assert_files_round_trip(m, base, tmp_path / "ours", x)
    pm.save_pretrained(str(tmp_path / "peft"))
    q = nl.quantize_model(copy.deepcopy(base), target_modules=T)
    loaded = nl.load_adapter(q, str(tmp_path / "peft"))
    pm.eval()
    with torch.no_grad():
        assert rel(loaded(x).logits, pm(x).logits) < 1e-5
    # served from a pool (dense factors assembled) and mixed per example with plain LoRA
    q2 = nl.quantize_model(copy.deepcopy(base), target_modules=T)
    pool = nl.AdapterPool(q2)
    pool.load("bd", str(tmp_path / "peft"))
    with torch.no_grad(), pool.batch(["bd", "__base__"]):
        got = q2(x).logits
    with torch.no_grad():
        assert rel(got[0], pm(x[:1]).logits[0]) < 1e-5
    nl.apply_qlora(m, ["q_proj"], r=4, adapter_name="plain", init_lora_weights=False)
    m.eval()
    assert_mixed_batch_matches_single(m, ["plain", "default", "__base__"])


@pytest.mark.parametrize("bd,kw,match", [
    (dict(BD, nblocks=3), {}, "nblocks=3 must be a positive int dividing r=4"),
    (dict(BD, nblocks=0), {}, "nblocks must be a positive int"),
    (dict(target_modules_bd_a=["q_proj"], target_modules_bd_b=["q_proj"]), {}, "in both"),
    (dict(target_modules_bd_a=["q_proj"]), {}, "matches neither"),
    (dict(BD, colour="red"), {}, "unknown fields"),
    (BD, dict(use_dora=True), "cannot be combined"),
    (BD, dict(init_lora_weights="pissa"), "cannot be combined"),
    ("yes", {}, "use_bdlora must be a dict"),
])
def test_bad_configs_rejected_before_the_model_changes(base, bd, kw, match):
    m = copy.deepcopy(base)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=match):
        nl.apply_qlora(m, T, r=4, use_bdlora=bd, **kw)
    assert not any(isinstance(mod, nl.QLoRALinear) for mod in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_weighted_mix_refuses_bdlora(base):
    m, _ = _pair(base)
    with pytest.raises(NotImplementedError, match="BD-LoRA"):
        nl.add_weighted_adapter(m, ["default"], [1.0], "mix")
