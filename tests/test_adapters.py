"""Adapters in PEFT's on-disk format: files nf4lora writes load with PeftModel.from_pretrained, files
PEFT writes load with nf4lora.load_adapter, both giving the same logits on the same (dequantized NF4)
base; round trips; malformed files give errors that name the key."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nf4lora as nl
from model_utils import dequantized_copy, randomize_adapters, rel, tiny_llama, tokens, train_losses

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _train(m, x, steps=3, lr=1e-2):
    train_losses(m, x, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr), steps)
    m.eval()


CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
    dict(target_modules="all-linear", r=8, lora_alpha=16, use_rslora=True),
    dict(target_modules=["q_proj", "k_proj", "down_proj"], r=4, lora_alpha=8,
         rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"k_proj": 3}),
    dict(target_modules=["o_proj", "up_proj"], r=2, layers_to_transform=[1], layers_pattern="layers"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_nf4lora_adapter_loads_in_peft(base, tmp_path, cfg):
    x = tokens()
    m = nl.apply_qlora(copy.deepcopy(base), **cfg)
    randomize_adapters(m)
    _train(m, tokens(seq=12, seed=5))
    nl.save_adapter(m, str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in sd)
    ref = PeftModel.from_pretrained(dequantized_copy(m, base), str(tmp_path))
    assert rel(logits(m, x), logits(ref, x)) <= 1e-5
    # PEFT saw the same modules and ranks
    ours = {n: l.r for n, l in m.named_modules() if isinstance(l, nl.QLoRALinear)}
    theirs = {n: l.r["default"] for n, l in ref.base_model.model.named_modules()
              if isinstance(l, peft.tuners.lora.LoraLayer)}
    assert ours == theirs


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=range(3))
def test_peft_adapter_loads_in_nf4lora(base, tmp_path, cfg):
    x = tokens()
    # the NF4 base holds exactly the adapter's targets, so loading onto the plain model (which
    # quantizes the targets on the way in) must give the same model
    q = nl.quantize_model(copy.deepcopy(base), target_modules=cfg["target_modules"])
    pm = get_peft_model(dequantized_copy(q, base), LoraConfig(init_lora_weights=False, **cfg))
    _train(pm, tokens(seq=12, seed=5))
    pm.save_pretrained(str(tmp_path))
    want = logits(pm, x)
    for start in (q, base):  # onto an NF4 model, or a plain one quantized on the way in
        m = nl.load_adapter(copy.deepcopy(start), str(tmp_path))
        assert rel(logits(m, x), want) <= 1e-5
        assert not any(p.requires_grad for p in m.parameters())  # is_trainable=False, as PEFT
    m = nl.load_adapter(copy.deepcopy(q), str(tmp_path), is_trainable=True)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n.replace("base_model.model.", "") for n, p in pm.named_parameters() if p.requires_grad}


def test_save_load_round_trip(base, tmp_path):
    x = tokens()
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "down_proj"], r=4, lora_alpha=8,
                       rank_pattern={"down_proj": 3})
    randomize_adapters(m)
    nl.save_adapter(m, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj"]
    assert cfg["rank_pattern"] == {"down_proj": 3}
    assert cfg["bias"] == "none" and cfg["use_rslora"] is False
    back = nl.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert rel(logits(back, x), logits(m, x)) <= 1e-6
    # a second adapter from the same files, under another name
    nl.load_adapter(back, str(tmp_path), adapter_name="copy")
    nl.set_adapter(back, "copy")
    assert rel(logits(back, x), logits(m, x)) <= 1e-6


@pytest.mark.parametrize("use_dora", [False, True])
def test_load_into_existing_adapter_resumes(base, tmp_path, use_dora):
    """PEFT's load_adapter into an adapter name the model has: the weights go into its parameters
    (an optimizer holding them sees them), its active / trainable state stays, the config is checked."""
    x = tokens()
    kw = dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 2}, use_dora=use_dora)
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "down_proj"], **kw)
    randomize_adapters(m)
    nl.save_adapter(m, str(tmp_path))
    fresh = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "down_proj"], **kw)
    params = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=0.1)
    assert rel(logits(fresh, x), logits(m, x)) > 1e-3
    nl.load_adapter(fresh, str(tmp_path), adapter_name="default")
    assert torch.equal(logits(fresh, x), logits(m, x))
    assert {n: p for n, p in fresh.named_parameters() if p.requires_grad} == params  # same objects
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in params.values())
    # a config that does not match is refused before anything is copied
    other = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "down_proj"], r=4, lora_alpha=16,
                           rank_pattern={"down_proj": 2}, use_dora=use_dora)
    before = {n: p.clone() for n, p in other.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="lora_alpha"):
        nl.load_adapter(other, str(tmp_path), adapter_name="default")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters() if p.requires_grad)
    narrow = nl.apply_qlora(copy.deepcopy(base), ["q_proj"], **kw)
    with pytest.raises(ValueError, match="targets"):
        nl.load_adapter(narrow, str(tmp_path), adapter_name="default")


# ------------------------------------------------------------------------------ malformed files
@pytest.fixture()
def saved(base, tmp_path):
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4)
    randomize_adapters(m)
    nl.save_adapter(m, str(tmp_path))
    return tmp_path


def _edit(path, weights=None, config=None):
    if weights is not None:
        sd = load_file(str(path / "adapter_model.safetensors"))
        weights(sd)
        save_file(sd, str(path / "adapter_model.safetensors"))
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        config(cfg)
        (path / "adapter_config.json").write_text(json.dumps(cfg))


KEY_A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("case,exc,match", [
    ("missing", KeyError, KEY_A),
    ("transposed", ValueError, KEY_A + ".*shape"),
    ("wrong_r", ValueError, "q_proj.lora_A.weight.*r=5.*rank 4"),
    ("rank_pattern", ValueError, "v_proj.lora_A.weight.*r=2"),
    ("extra", ValueError, "k_proj.lora_A.weight.*not one that"),
    ("dora", ValueError, "DoRA"),
    ("peft_type", ValueError, "peft_type"),
    ("use_dora", KeyError, "q_proj.lora_magnitude_vector"),
    ("use_dora_str", ValueError, "use_dora must be true or false"),
    ("bias", NotImplementedError, "bias"),
    ("arrow", NotImplementedError, "arrow_config"),
    ("int", ValueError, KEY_B + ".*floating"),
])
def test_malformed_adapter_files(base, saved, case, exc, match):
    edits = {
        "missing": dict(weights=lambda sd: sd.pop(KEY_A)),
        "transposed": dict(weights=lambda sd: sd.__setitem__(KEY_A, sd[KEY_A].t().contiguous())),
        "wrong_r": dict(config=lambda c: c.__setitem__("r", 5)),
        "rank_pattern": dict(config=lambda c: c.__setitem__("rank_pattern", {"v_proj": 2})),
        "extra": dict(weights=lambda sd: sd.__setitem__(KEY_A.replace("v_proj", "k_proj"),
                                                        sd[KEY_A].clone())),
        "dora": dict(weights=lambda sd: sd.__setitem__(
            KEY_A.replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(64))),
        "peft_type": dict(config=lambda c: c.__setitem__("peft_type", "IA3")),
        "use_dora": dict(config=lambda c: c.__setitem__("use_dora", True)),
        "use_dora_str": dict(config=lambda c: c.__setitem__("use_dora", "yes")),
        "bias": dict(config=lambda c: c.__setitem__("bias", "all")),
        "arrow": dict(config=lambda c: c.__setitem__("arrow_config", {"top_k": 3})),
        "int": dict(weights=lambda sd: sd.__setitem__(KEY_B, sd[KEY_B].to(torch.int32))),
    }
    _edit(saved, **edits[case])
    m = copy.deepcopy(base)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(exc, match=match):
        nl.load_adapter(m, str(saved))
    # nothing changed: every check runs before the model is touched
    assert not any(isinstance(l, nl.QLoRALinear) for l in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_missing_files(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        nl.load_adapter(copy.deepcopy(base), str(tmp_path))
    cfg = {"peft_type": "LORA", "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        nl.load_adapter(copy.deepcopy(base), str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        nl.save_adapter(nl.apply_qlora(copy.deepcopy(base), ["q_proj"]), str(tmp_path), adapter_name="x")


def test_layers_keep_the_models_eval_mode(base, tmp_path):
    """Layers made by apply_qlora / quantize_model / load_adapter take the mode of the module they
    replace: an adapter file with lora_dropout loaded onto an eval-mode model for inference must not
    drop anything (it did: new layers start in training mode)."""
    x = tokens()
    m = nl.apply_qlora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_dropout=0.3)
    randomize_adapters(m)
    assert all(not mod.training for mod in m.modules())  # base is in eval mode
    nl.save_adapter(m, str(tmp_path))
    fresh = copy.deepcopy(base).eval()
    nl.load_adapter(fresh, str(tmp_path))
    assert all(not mod.training for mod in fresh.modules())
    assert torch.equal(logits(fresh, x), logits(fresh, x)) and torch.equal(logits(fresh, x), logits(m, x))
    trained = copy.deepcopy(base).train()
    nl.apply_qlora(trained, ["q_proj"], r=4)
    assert all(mod.training for mod in trained.modules())
