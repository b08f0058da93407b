"""VeRA adapters (nl.apply_vera, PEFT's VERA): shared projections bit-identical to PEFT's for the
same projection_prng_key; forward, gradients and merge against PEFT on the same (dequantized NF4)
base; PEFT-format files both ways (with and without the saved projections); training; mixing with
LoRA adapters in one model."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import nf4lora as nl
from model_utils import (assert_edited_config_rejected, assert_files_round_trip,
                         assert_mixed_batch_matches_single, assert_same_merged_weights,
                         assert_training_step_matches_peft, dequantized_copy, randomize_both, rel, tiny_llama,
                         tokens, train_losses)

peft = pytest.importorskip("peft")
from peft import VeraConfig, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _pair(base, r=8, key=0, **kw):
    m = nl.apply_vera(copy.deepcopy(base), TARGETS, r=r, projection_prng_key=key, **kw)
    pm = get_peft_model(dequantized_copy(m, base),
                        VeraConfig(target_modules=TARGETS, r=r, projection_prng_key=key, **kw))
    randomize_both(m, pm, scale=0.5, seed=3)  # non-zero lambdas in both (lambda_b starts at 0)
    return m, pm


def test_projections_identical_to_peft(base):
    for key in (0, 7):
        m, pm = _pair(base, key=key)
        A, B = nl.lora.vera.vera_projections(m, "default")
        assert torch.equal(A, pm.base_model.vera_A["default"]) and torch.equal(B, pm.base_model.vera_B["default"])
    assert not torch.equal(nl.lora.vera.vera_projections(_pair(base, key=0)[0], "default")[0], A)


def test_projections_shared_and_not_in_state_dict(base):
    m = nl.apply_vera(copy.deepcopy(base), TARGETS, r=8)
    mods = [layer.vera_projections["default"] for _, layer in nl.lora.model.qlora_layers(m)]
    assert len(mods) == 2 * len(TARGETS) and all(p is mods[0] for p in mods)
    assert not any("vera_projections" in k for k in m.state_dict())
    c = copy.deepcopy(m)
    mods = [layer.vera_projections["default"] for _, layer in nl.lora.model.qlora_layers(c)]
    assert all(p is mods[0] for p in mods) and mods[0] is c._nf4lora.vera["default"]


def test_init_is_a_no_op(base):
    m = nl.apply_vera(copy.deepcopy(base), TARGETS, r=8)
    x = tokens()
    with torch.no_grad(), nl.disable_adapter(m):
        plain = m(x).logits
    with torch.no_grad():
        assert rel(m(x).logits, plain) < 1e-6


def test_forward_and_gradients_match_peft(base):
    m, pm = _pair(base)
    x = tokens()
    m.eval(), pm.eval()
    with torch.no_grad():
        assert rel(m(x).logits, pm(x).logits) < 1e-5
    assert len(assert_training_step_matches_peft(m, pm, x)) == 2 * 2 * len(TARGETS)


def test_merge_matches_peft(base):
    m, pm = _pair(base)
    x = tokens()
    with torch.no_grad():
        want = pm(x).logits
        nl.merge_adapter(m)
        assert rel(m(x).logits, want) < 1e-5
        nl.unmerge_adapter(m)
        merged_ref = pm.merge_and_unload()
        merged = nl.merge_and_unload(copy.deepcopy(m))
        assert_same_merged_weights(merged, merged_ref, TARGETS)


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_both_ways(base, tmp_path, save_projection):
    x = tokens()
    m, _ = _pair(base, save_projection=save_projection)
    nl.save_adapter(m, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is save_projection
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert ("base_model.vera_A" in keys) is save_projection
    assert_files_round_trip(m, base, tmp_path / "ours", x)
    # PEFT -> nf4lora
    q = nl.quantize_model(copy.deepcopy(base), target_modules=TARGETS)
    pm = get_peft_model(dequantized_copy(q, base), VeraConfig(target_modules=TARGETS, r=8, projection_prng_key=5,
                                                             save_projection=save_projection, init_weights=False))
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = nl.load_adapter(q, str(tmp_path / "peft"))
    with torch.no_grad():
        assert rel(loaded(x).logits, pm(x).logits) < 1e-5


def test_bad_arguments(base):
    for kw, match in ((dict(r=0), "r must be a positive int"), (dict(projection_prng_key=1.5), "projection_prng_key"),
                      (dict(d_initial="x"), "d_initial must be a finite number"),
                      (dict(vera_dropout=1.0), "vera_dropout must be a number in")):
        m = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            nl.apply_vera(m, TARGETS, **{"r": 8, **kw})
        assert not any(isinstance(l, nl.QLoRALinear) for l in m.modules())  # untouched


def test_bad_vera_files(base, tmp_path):
    m, _ = _pair(base)
    nl.save_adapter(m, str(tmp_path))
    assert_edited_config_rejected(base, tmp_path, dict(r=4),
                                  "vera_lambda_d' must be a floating tensor of shape \\(4,\\)")


def test_training_and_mixing_with_lora(base):
    m = nl.apply_vera(copy.deepcopy(base), "all-linear", r=16)
    nl.prepare_for_training(m, gradient_checkpointing=False)
    assert all(".vera_lambda_" in n for n, p in m.named_parameters() if p.requires_grad)
    opt = nl.PagedAdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
    losses = train_losses(m, tokens(), opt, 15)
    assert losses[-1] < 0.95 * losses[0], losses
    # a LoRA adapter next to it; per-example routing and the bitsandbytes state dict
    nl.apply_qlora(m, ["q_proj"], r=4, adapter_name="lora")
    with torch.no_grad():
        for _, layer in nl.lora.model.qlora_layers(m):
            if "lora" in layer.lora_config:
                layer.lora_B["lora"].weight.normal_(0, 0.1)
    m.eval()
    assert_mixed_batch_matches_single(m, ["lora", "default", "__base__"])
    assert not any("vera" in k or "lora_" in k for k in nl.bnb_state_dict(m))
    nl.delete_adapter(m, "default")
    assert not any("vera" in n for n, _ in m.named_parameters())
