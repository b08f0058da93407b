"""add_weighted_adapter (PEFT's, for plain LoRA adapters): every combination type (cat, svd,
linear, ties, dare, magnitude pruning and their svd forms) on adapters with different targets,
ranks and negative weights gives PEFT's model on the same (dequantized NF4) base; "cat" is exact;
files of the mixed adapter load in PEFT; bad calls raise."""
import copy

import pytest
import torch

import nf4lora as nl
from model_utils import copy_into_peft, dequantized_copy, randomize_adapters, rel, tiny_llama, tokens

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _pair(base, same_rank=False):
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    nl.apply_qlora(m, ["q_proj", "down_proj"], r=4 if same_rank else 2, lora_alpha=3, adapter_name="b")
    randomize_adapters(m, seed=0, scale=0.2)
    randomize_adapters(m, adapter="b", seed=1, scale=0.2)
    pm = get_peft_model(dequantized_copy(m, base), LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    pm.add_adapter("b", LoraConfig(target_modules=["q_proj", "down_proj"], r=4 if same_rank else 2, lora_alpha=3))
    copy_into_peft(m, pm)
    return m.eval(), pm.eval()


@pytest.mark.parametrize("combination,kw", [
    ("cat", {}), ("svd", {}), ("svd", dict(svd_rank=3)), ("svd", dict(svd_clamp=0.99)), ("linear", {}),
    ("ties", dict(density=0.5)), ("ties", dict(density=0.3, majority_sign_method="frequency")),
    ("magnitude_prune", dict(density=0.4)), ("dare_linear", dict(density=0.6)), ("dare_ties", dict(density=0.6)),
    ("ties_svd", dict(density=0.5)), ("dare_linear_svd", dict(density=0.7)),
    ("dare_ties_svd", dict(density=0.7)), ("magnitude_prune_svd", dict(density=0.5))])
def test_matches_peft(base, combination, kw):
    m, pm = _pair(base, same_rank=not combination.endswith("svd") and combination != "cat")
    weights = [0.7, -1.3]
    torch.manual_seed(11)  # dare_* draw their masks from torch's RNG, in the same order as PEFT
    nl.add_weighted_adapter(m, ["default", "b"], weights, "mix", combination_type=combination, **kw)
    torch.manual_seed(11)
    pm.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination, **kw)
    nl.set_adapter(m, "mix")
    pm.set_adapter("mix")
    x = tokens()
    with torch.no_grad():
        assert rel(m(x).logits, pm(x).logits) < 1e-4
    # added frozen; its rank is PEFT's
    layer = m.model.layers[0].self_attn.q_proj
    assert layer.lora_config["mix"]["r"] == pm.peft_config["mix"].r


def test_cat_is_exact(base):
    m, _ = _pair(base)
    nl.add_weighted_adapter(m, ["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    for _, layer in nl.lora.model.qlora_layers(m):
        want = sum(w * layer.delta_weight(a) for a, w in (("default", 0.5), ("b", 2.0)) if a in layer.lora_config)
        assert rel(layer.delta_weight("mix"), want) < 1e-6


def test_saved_mix_loads_in_peft(base, tmp_path):
    m, _ = _pair(base)
    nl.add_weighted_adapter(m, ["default", "b"], [1.0, 1.0], "mix", combination_type="svd")
    nl.set_adapter(m, "mix")
    nl.save_adapter(m, str(tmp_path), adapter_name="mix")
    ref = PeftModel.from_pretrained(dequantized_copy(m, base), str(tmp_path))
    x = tokens()
    with torch.no_grad():
        assert rel(m(x).logits, ref(x).logits) < 1e-5


def test_bad_calls(base):
    m, _ = _pair(base)
    with pytest.raises(ValueError, match="one number per adapter"):
        nl.add_weighted_adapter(m, ["default", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="'nope' not found"):
        nl.add_weighted_adapter(m, ["default", "nope"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="one rank"):
        nl.add_weighted_adapter(m, ["default", "b"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        nl.add_weighted_adapter(m, ["default", "b"], [1.0, 1.0], "mix", combination_type="bogus")
    with pytest.raises(ValueError, match="svd_clamp must be a quantile"):
        nl.add_weighted_adapter(m, ["default", "b"], [1.0, 1.0], "mix", svd_clamp=1.5)
    with pytest.raises(ValueError, match="density must be a number"):
        nl.add_weighted_adapter(m, ["default", "b"], [1.0, 1.0], "mix", combination_type="ties_svd")
    with pytest.raises(ValueError, match="already exists"):
        nl.add_weighted_adapter(m, ["default", "b"], [1.0, 1.0], "b")
    d = nl.apply_qlora(copy.deepcopy(base), ["q_proj"], r=2, use_dora=True)
    nl.apply_qlora(d, ["q_proj"], r=2, adapter_name="plain")
    with pytest.raises(NotImplementedError, match="DoRA"):
        nl.add_weighted_adapter(d, ["default", "plain"], [1.0, 1.0], "mix")
    assert "mix" not in m._nf4lora.configs
